"""FlashInfer's Hopper FP8 attention (`--fp8-attention-kernel flashinfer`): the FlashAttention-3-
derived kernel template that the flashinfer-python package ships as CUDA headers, built once with
nvcc for the DiT's head size (csrc/fp8_attention_flashinfer.cu, one object per tile shape) and
called through a C function, so the library does not depend on the installed torch's ABI.

Where the library comes from, first found: $AVATAR_FLASHINFER_FP8_LIB (a library built before,
e.g. by `python3 -m avatar.services.generator.fp8_attention_flashinfer --build DIR`); the cache
(~/.cache/avatar/flashinfer-fp8/, keyed by the source, the headers, nvcc and the tile shape); else
the one tile shape in use is built there on first use (about a minute) from `pip install
flashinfer-python` (only its headers are read; the package is not imported) with nvcc 12.8 or
newer. Hopper only (sm_90a).

Numerics (opt-in, like every FP8 attention here, docs/performance.md "FlashInfer's FP8
attention"): the same e4m3 queries (one scale per call), the cache's e4m3 keys and values at scale
1, products in float32; the probabilities enter the second product as e4m3 scaled by 448
(FlashInfer's choice; cuDNN's and our Triton kernel's: 256); the output is written in bf16, and
the model hands it to the FP8 output projection, which quantises each row to its own scale
(fp8_attention.fp8_attention_bf16), where the other kernels give it e4m3 codes at scale 1.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
P_SCALE = 448.0  # FlashInfer's scale of the probabilities into e4m3 (the e4m3 maximum)
HEAD_DIM = 128
LIB_ENV = "AVATAR_FLASHINFER_FP8_LIB"
SOURCE = Path(__file__).parent / "csrc" / "fp8_attention_flashinfer.cu"
LIB_NAME = "fp8_attention_flashinfer.so"

# name -> (query rows, key rows a tile, pipeline stages); FlashInfer's own choice for head dim 128
# is 128 x 192, 2 stages, and it measured fastest at 704*384 (run Q1, docs/performance.md).
CONFIGS = {
    "fi_128x192x2": (128, 192, 2),
    "fi_128x128x2": (128, 128, 2),
    "fi_128x256x2": (128, 256, 2),
    "fi_128x128x3": (128, 128, 3),
}
DEFAULT_CONFIG = "fi_128x192x2"
CONFIG_ENV = "AVATAR_FLASHINFER_FP8_CONFIG"  # another of CONFIGS for the model's calls (benches)
log = logging.getLogger(__name__)


def flashinfer_data_dir() -> Path | None:
    """The flashinfer-python package's data/ folder (include/, cutlass/, cccl/), found without
    importing the package (its import pulls in far more than these headers)."""
    try:
        spec = importlib.util.find_spec("flashinfer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if _has_headers(data) else None


def _has_headers(data: Path) -> bool:
    return (data / "include" / "flashinfer").is_dir()


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def compile_command(nvcc: str, data: Path, name: str, out: Path) -> list[str]:
    """nvcc's command line for one tile shape's object file."""
    q, kv, stages = CONFIGS[name]
    return [
        nvcc,
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "-Xcompiler",
        "-fPIC",
        "-gencode=arch=compute_90a,code=sm_90a",  # wgmma and setmaxnreg: sm_90a, not sm_90
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
        "-DFLASHINFER_ENABLE_FP8_E4M3",
        "-DFLASHINFER_ENABLE_BF16",
        # FlashInfer's own CCCL and CUTLASS before the toolkit's (the versions its headers expect)
        f"-I{data / 'cccl' / 'libcudacxx' / 'include'}",
        f"-I{data / 'cccl' / 'cub'}",
        f"-I{data / 'cccl' / 'thrust'}",
        f"-I{data / 'include'}",
        f"-I{data / 'cutlass' / 'include'}",
        f"-I{data / 'cutlass' / 'tools' / 'util' / 'include'}",
        f"-I{data / 'spdlog' / 'include'}",
        f"-DFI_CTA_Q={q}",
        f"-DFI_CTA_KV={kv}",
        f"-DFI_STAGES={stages}",
        f"-DFI_NAME={name}",
        "-c",
        str(SOURCE),
        "-o",
        str(out),
    ]


def build(out: Path, data: Path, nvcc: str, configs=tuple(CONFIGS), jobs: int | None = None) -> Path:
    """Compiles each tile shape (in parallel) and links them into `out`, written whole or not at
    all. The CUDA runtime is linked statically: the library needs only the driver."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        objects = [Path(tmp) / f"{name}.o" for name in configs]

        def compile_one(args):
            name, obj = args
            done = subprocess.run(compile_command(nvcc, data, name, obj), capture_output=True, text=True)
            if done.returncode:
                errors = [line for line in done.stderr.splitlines() if " error" in line or "fatal" in line]
                raise RuntimeError(f"nvcc failed on {name}: " + " | ".join(errors[:3] or done.stderr.splitlines()[-3:]))

        with ThreadPoolExecutor(jobs or min(len(objects), os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, zip(configs, objects)))
        linked = Path(tmp) / LIB_NAME
        link = [nvcc, "-shared", "-cudart", "static", "-gencode=arch=compute_90a,code=sm_90a", *map(str, objects)]
        done = subprocess.run([*link, "-o", str(linked)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"linking {LIB_NAME} failed: {done.stderr.strip()[-500:]}")
        os.replace(linked, out)
    return out


def _cache_key(data: Path, nvcc: str, config: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    for header in sorted((data / "include" / "flashinfer" / "attention" / "hopper").rglob("*.cuh")):
        h.update(header.read_bytes())
    h.update(repr((config, CONFIGS[config])).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "avatar" / "flashinfer-fp8"


_NEEDS = "--fp8-attention-kernel flashinfer builds FlashInfer's kernel with"


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why FlashInfer's FP8 attention cannot run on `device` (None: it can, or the CPU, which runs
    the torch reference of its arithmetic)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return f"--fp8-attention-kernel flashinfer runs on Hopper GPUs (compute capability 9.0); {device} is not"
    if os.environ.get(LIB_ENV):
        lib = Path(os.environ[LIB_ENV])
        return None if lib.is_file() else f"{LIB_ENV} names {lib}, which is not a file"
    if flashinfer_data_dir() is None:
        return f"{_NEEDS} its headers: pip install flashinfer-python"
    if nvcc_path() is None:
        return f"{_NEEDS} nvcc 12.8+: none on PATH or in CUDA_HOME"
    return None


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}


def library(config: str = DEFAULT_CONFIG) -> ctypes.CDLL:
    """A loaded library with `config`'s kernel: $AVATAR_FLASHINFER_FP8_LIB (every tile shape built
    into it), else the cached build of that one shape, else built now (about a minute)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown FlashInfer tile shape {config!r}; known: {', '.join(CONFIGS)}")
    with _lock:
        path = os.environ.get(LIB_ENV)
        if not path:
            data, nvcc = flashinfer_data_dir(), nvcc_path()
            if data is None or nvcc is None:
                raise RuntimeError(unavailable_reason("cuda") or "FlashInfer's FP8 attention is unavailable")
            path = cache_dir() / _cache_key(data, nvcc, config) / LIB_NAME
            if not path.is_file():
                log.info("building FlashInfer's FP8 attention (%s) into %s: about a minute, once", config, path)
                build(path, data, nvcc, configs=(config,))
                log.info("built FlashInfer's FP8 attention (%s)", config)
        path = str(path)
        if path not in _libs:
            lib = ctypes.CDLL(path)
            for name in CONFIGS:
                if hasattr(lib, name):
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_int
                    fn.argtypes = (
                        [ctypes.c_int]
                        + [ctypes.c_void_p] * 4
                        + [ctypes.c_int] * 3
                        + [ctypes.c_int64] * 8
                        + [ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p]
                    )
            _libs[path] = lib
        return _libs[path]


def fp8_sdpa_flashinfer(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, config: str | None = None
) -> torch.Tensor:
    """Unmasked attention of e4m3 [B, L, H, 128] tensors (q scaled by descale_q, a one-element
    tensor; k and v by 1) -> bf16 [B, Lq, H, 128]. Any strides with a contiguous head dim.
    config: one of CONFIGS (default: $AVATAR_FLASHINFER_FP8_CONFIG, else DEFAULT_CONFIG)."""
    config = config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    b, lq, h, d = q8.shape
    lk = k8.shape[1]
    if d != HEAD_DIM or k8.shape[-1] != d or v8.shape[-1] != d:
        raise ValueError(f"FlashInfer's FP8 attention is built for head dim {HEAD_DIM}, got {d}")
    if any(t.stride(-1) != 1 for t in (q8, k8, v8)):
        raise ValueError("FlashInfer's FP8 attention needs the head dim contiguous")
    fn = getattr(library(config), config, None)
    if fn is None:
        raise ValueError(f"the FlashInfer FP8 library has no tile shape {config!r}")
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=q8.device)
    scale_q = descale_q.float().reshape(1).expand(h).contiguous()  # read per head by the kernel
    stream = torch.cuda.current_stream(q8.device).cuda_stream
    device = q8.device.index if q8.device.index is not None else torch.cuda.current_device()
    strides = [t.stride(j) for t in (q8, k8, v8, out) for j in (1, 2)]  # tokens and heads
    for i in range(b):
        ptrs = (t[i].data_ptr() for t in (q8, k8, v8, out))
        rc = fn(device, *ptrs, lq, lk, h, *strides, scale_q.data_ptr(), 1 / math.sqrt(d), stream)
        if rc:
            raise RuntimeError(f"FlashInfer's FP8 attention ({config}) failed: CUDA error {rc}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build FlashInfer's FP8 attention library (no GPU needed).")
    p.add_argument("--build", required=True, metavar="DIR", help=f"write DIR/{LIB_NAME}")
    p.add_argument("--data", default=None, help="flashinfer-python's data/ folder (default: the installed package's)")
    p.add_argument("--nvcc", default=None)
    p.add_argument("--configs", default=",".join(CONFIGS), help="tile shapes, comma-separated")
    args = p.parse_args(argv)
    data = Path(args.data) if args.data else flashinfer_data_dir()
    nvcc = args.nvcc or nvcc_path()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    problem = (
        "no flashinfer-python headers (pip install flashinfer-python, or --data)"
        if data is None or not _has_headers(data)
        else "no nvcc (PATH, CUDA_HOME or --nvcc)"
        if nvcc is None
        else f"unknown tile shapes {unknown}; known: {', '.join(CONFIGS)}"
        if unknown or not configs
        else None
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        out = build(Path(args.build) / LIB_NAME, data, nvcc, configs)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {out}: {', '.join(configs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
