"""Every algorithm cuBLASLt offers for the DiT's FP8 GEMMs, timed alone and sustained under the
GPU's power cap, beside torch._scaled_mm (what the model calls, which takes cuBLASLt's first).

Why: the engine runs power-capped (~1740 MHz on an H100, runs V-X in docs/performance.md) while
every kernel it uses was chosen by timing it alone for milliseconds at the full clock. A kernel
that spends less energy a FLOP (larger tiles: fewer shared-memory and L2 reads per multiply) can
lose alone and win under the cap, where time is energy over the power limit. This bench asks
cuBLASLt for its candidates for each projection as FP8Linear runs it (e4m3 codes, per-row scales
on both sides, bf16 bias and output, fast accumulation) and times each one two ways: a CUDA graph
of `--calls` calls replayed a few times (alone), and the same graph replayed for `--sustain-s`
seconds with nvidia-smi's clock and power samples (sustained; the rounds alternate the
candidates so that the card's warming spreads over all of them).

    python3 bench/bench_gemm_algos.py [--size 704*384] [--algos 8] [--sustain-s 2.5] [--rounds 2] [--out F]

One GPU call, no model; cuBLASLt through ctypes (the library torch itself loaded).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_norm_warps import graph_ms, save_results  # noqa: E402
from gpu_clocks import GpuSampler  # noqa: E402

from avatar.presets import LATENT_FRAMES_PER_BLOCK

E4M3 = torch.float8_e4m3fn

# cublasLt.h / library_types.h / cublas_api.h (CUDA 13)
CUDA_R_32F, CUDA_R_16BF, CUDA_R_8F_E4M3 = 0, 14, 28
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
DESC_A_SCALE_POINTER, DESC_B_SCALE_POINTER, DESC_FAST_ACCUM, DESC_BIAS_DATA_TYPE = 17, 18, 25, 26
DESC_A_SCALE_MODE, DESC_B_SCALE_MODE = 31, 32
SCALE_OUTER_VEC_32F = 3
EPILOGUE_BIAS = 4
PREF_MAX_WORKSPACE_BYTES = 1
CAP_TILE_IDS, CAP_STAGES_IDS = 6, 13
CONFIG = {
    "id": (0, ctypes.c_int32),
    "tile": (1, ctypes.c_uint32),
    "splitk": (2, ctypes.c_int32),
    "swizzle": (4, ctypes.c_uint32),
    "stages": (6, ctypes.c_uint32),
    "cluster": (8, ctypes.c_uint16),
}
WORKSPACE = 32 << 20
TILES = {20: "128x128", 23: "128x256", 24: "256x128", 21: "256x64", 19: "64x256", 32: "128x192", 31: "192x128",
         18: "128x64", 17: "64x128", 15: "64x64", 29: "128x160", 30: "160x128", 28: "96x128", 33: "128x96"}  # fmt: skip


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", Algo),
        ("workspace", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def cublaslt() -> ctypes.CDLL:
    """The cuBLASLt torch loaded (by soname, so the same copy), else the first in site-packages."""
    torch.zeros(1, device="cuda") @ torch.zeros(1, device="cuda")  # loads cuBLAS(Lt)
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    for path in sys.path:
        for found in sorted(glob.glob(os.path.join(path, "nvidia", "*", "lib", "libcublasLt.so*"))):
            return ctypes.CDLL(found)
    raise OSError("no libcublasLt found")


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cuBLAS status {status}")


class LtGemm:
    """y [m, n] = (x [m, k] * row scales) @ (w [n, k] * row scales)^T + bias, in bf16, as FP8Linear
    (torch._scaled_mm's cuBLASLt call: column-major D [n, m] = op_T(w) @ x^T)."""

    def __init__(self, lt: ctypes.CDLL, handle, m: int, k: int, n: int, device: str, scales: str = "row"):
        self.lt, self.handle, self.m, self.k, self.n = lt, handle, m, k, n
        g = torch.Generator(device=device).manual_seed(k + n)
        self.x = torch.randn(m, k, generator=g, device=device).to(E4M3)
        self.w = torch.randn(n, k, generator=g, device=device).to(E4M3)
        rows = scales == "row"  # else one scale a tensor ("tensor" granularity: more kernels on offer)
        self.xs = torch.rand((m, 1) if rows else (), generator=g, device=device) + 0.5
        self.ws = torch.rand((1, n) if rows else (), generator=g, device=device) + 0.5
        self.bias = torch.randn(n, generator=g, device=device).bfloat16()
        self.out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
        self.workspace = torch.empty(WORKSPACE, device=device, dtype=torch.uint8)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

        self.desc = ctypes.c_void_p()
        check(lt.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc")
        self._set(DESC_TRANSA, ctypes.c_int32(CUBLAS_OP_T))
        self._set(DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_N))
        if rows:
            self._set(DESC_A_SCALE_MODE, ctypes.c_int32(SCALE_OUTER_VEC_32F))
            self._set(DESC_B_SCALE_MODE, ctypes.c_int32(SCALE_OUTER_VEC_32F))
        self._set(DESC_A_SCALE_POINTER, ctypes.c_void_p(self.ws.data_ptr()))
        self._set(DESC_B_SCALE_POINTER, ctypes.c_void_p(self.xs.data_ptr()))
        self._set(DESC_FAST_ACCUM, ctypes.c_int8(1))
        self._set(DESC_EPILOGUE, ctypes.c_uint32(EPILOGUE_BIAS))
        self._set(DESC_BIAS_POINTER, ctypes.c_void_p(self.bias.data_ptr()))
        self._set(DESC_BIAS_DATA_TYPE, ctypes.c_int32(CUDA_R_16BF))
        self.a_layout = self._layout(CUDA_R_8F_E4M3, k, n, k)
        self.b_layout = self._layout(CUDA_R_8F_E4M3, k, m, k)
        self.d_layout = self._layout(CUDA_R_16BF, n, m, n)

    def _set(self, attr: int, value) -> None:
        check(
            self.lt.cublasLtMatmulDescSetAttribute(
                self.desc, attr, ctypes.byref(value), ctypes.c_size_t(ctypes.sizeof(value))
            ),
            "set",
        )

    def _layout(self, dtype: int, rows: int, cols: int, ld: int):
        layout = ctypes.c_void_p()
        check(
            self.lt.cublasLtMatrixLayoutCreate(
                ctypes.byref(layout), dtype, ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld)
            ),
            "layout",
        )
        return layout

    def algos(self, count: int) -> list[HeuristicResult]:
        pref = ctypes.c_void_p()
        check(self.lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(WORKSPACE)
        check(
            self.lt.cublasLtMatmulPreferenceSetAttribute(
                pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), ctypes.c_size_t(8)
            ),
            "pref",
        )
        results = (HeuristicResult * count)()
        found = ctypes.c_int(0)
        check(
            self.lt.cublasLtMatmulAlgoGetHeuristic(
                *self._problem(),
                pref,
                count,
                results,
                ctypes.byref(found),
            ),
            "heuristic",
        )
        self.lt.cublasLtMatmulPreferenceDestroy(pref)
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def _problem(self) -> tuple:
        """The handle, descriptor and A, B, C, D layouts that name this product to cuBLASLt (C is D)."""
        return self.handle, self.desc, self.a_layout, self.b_layout, self.d_layout, self.d_layout

    def every_algo(self, offered: list[HeuristicResult], limit: int = 4096) -> tuple[list[HeuristicResult], dict]:
        """Every (algorithm, tile, stages) cuBLASLt accepts for this product (cublasLtMatmulAlgoCheck):
        the algorithms of cublasLtMatmulAlgoGetIds and the heuristics' own, each with every tile and
        stage count it lists (or, where it lists none, every tile named in TILES); and what was found."""
        types = (CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3, CUDA_R_16BF, CUDA_R_16BF)
        ids, found = (ctypes.c_int * 256)(), ctypes.c_int(0)
        check(self.lt.cublasLtMatmulAlgoGetIds(self.handle, *types, 256, ids, ctypes.byref(found)), "ids")
        bases = []
        for algo_id in ids[: found.value]:
            base = Algo()
            if self.lt.cublasLtMatmulAlgoInit(self.handle, *types, algo_id, ctypes.byref(base)) == 0:
                bases.append(base)
        bases += [Algo.from_buffer_copy(r.algo) for r in offered]
        seen = {"algorithm_ids": found.value, "tiles_listed": [], "checked": 0}
        accepted = []
        for base in bases:
            tiles = self._caps(base, CAP_TILE_IDS)
            stages_listed = self._caps(base, CAP_STAGES_IDS)
            seen["tiles_listed"].append(len(tiles))
            current = ctypes.c_uint32(), ctypes.c_size_t()
            self.lt.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(base),
                CONFIG["stages"][0],
                ctypes.byref(current[0]),
                ctypes.c_size_t(4),
                ctypes.byref(current[1]),
            )
            for tile in tiles or list(TILES):
                for stages in stages_listed or sorted({current[0].value, 0}):
                    algo = Algo.from_buffer_copy(base)
                    for attr, value in ((CONFIG["tile"][0], tile), (CONFIG["stages"][0], stages)):
                        v = ctypes.c_uint32(value)
                        self.lt.cublasLtMatmulAlgoConfigSetAttribute(
                            ctypes.byref(algo), attr, ctypes.byref(v), ctypes.c_size_t(4)
                        )
                    result = HeuristicResult()
                    seen["checked"] += 1
                    status = self.lt.cublasLtMatmulAlgoCheck(
                        *self._problem(),
                        ctypes.byref(algo),
                        ctypes.byref(result),
                    )
                    if status == 0 and result.workspace <= WORKSPACE:
                        result.algo = algo
                        accepted.append(result)
                    if len(accepted) >= limit:
                        return accepted, seen
        return accepted, seen

    def _caps(self, algo: Algo, attr: int) -> list[int]:
        written = ctypes.c_size_t()
        self.lt.cublasLtMatmulAlgoCapGetAttribute(
            ctypes.byref(algo), attr, None, ctypes.c_size_t(0), ctypes.byref(written)
        )
        count = written.value // 4
        if not count:
            return []
        values = (ctypes.c_uint32 * count)()
        self.lt.cublasLtMatmulAlgoCapGetAttribute(
            ctypes.byref(algo), attr, values, ctypes.c_size_t(4 * count), ctypes.byref(written)
        )
        return [v for v in values if v]

    def config(self, result: HeuristicResult) -> dict:
        res = {}
        for name, (attr, ctype) in CONFIG.items():
            value, written = ctype(), ctypes.c_size_t()
            status = self.lt.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(result.algo),
                attr,
                ctypes.byref(value),
                ctypes.c_size_t(ctypes.sizeof(value)),
                ctypes.byref(written),
            )
            if status == 0:
                res[name] = value.value
        return res | {"workspace": result.workspace, "waves": round(result.waves, 3)}

    def call(self, result: HeuristicResult):
        """A launcher of one algorithm on the current stream (capturable in a CUDA graph)."""
        algo, ptrs = result.algo, (self.w.data_ptr(), self.x.data_ptr(), self.out.data_ptr())

        def run():
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            check(
                self.lt.cublasLtMatmul(
                    self.handle,
                    self.desc,
                    ctypes.byref(self.alpha),
                    ctypes.c_void_p(ptrs[0]),
                    self.a_layout,
                    ctypes.c_void_p(ptrs[1]),
                    self.b_layout,
                    ctypes.byref(self.beta),
                    ctypes.c_void_p(ptrs[2]),
                    self.d_layout,
                    ctypes.c_void_p(ptrs[2]),
                    self.d_layout,
                    ctypes.byref(algo),
                    ctypes.c_void_p(self.workspace.data_ptr()),
                    ctypes.c_size_t(WORKSPACE),
                    stream,
                ),
                "matmul",
            )
            return self.out

        return run

    def reference(self):
        """The product as the model runs it."""

        def run():
            return torch._scaled_mm(
                self.x,
                self.w.t(),
                scale_a=self.xs,
                scale_b=self.ws,
                bias=self.bias,
                out_dtype=torch.bfloat16,
                use_fast_accum=True,
            )

        return run


def kernel_names(fn) -> list[str]:
    """The GPU kernels one call launches (memsets left out)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "memset" not in n.lower() and "Memset" not in n]


def quick_ms(fn, calls: int = 5) -> float:
    """ms a call of `calls` eager calls after one: enough to rank hundreds of configurations."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def sustained(fn, calls: int, seconds: float, warm_s: float = 0.5) -> dict:
    """ms a call over `seconds` of back-to-back graph replays, after `warm_s` to reach the cap,
    with the clock and power nvidia-smi saw meanwhile."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    per_replay = max(time.perf_counter() - t0, 1e-4)
    for _ in range(max(1, int(warm_s / per_replay))):
        graph.replay()
    torch.cuda.synchronize()
    replays = max(3, int(seconds / per_replay))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with GpuSampler("cuda", interval_ms=100) as sampler:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return {"ms": start.elapsed_time(end) / (replays * calls), "replays": replays} | sampler.summary()


def shapes(dim: int = 5120, ffn_dim: int = 13824) -> dict[str, tuple[int, int]]:
    """The (K, N) of each projection that runs at the block's token count."""
    return {"q, k, v, o (self); q, o (cross)": (dim, dim), "ffn up": (dim, ffn_dim), "ffn down": (ffn_dim, dim)}


def bench(
    width, height, algos, calls, reps, sustain_s, rounds, out=None, dim=5120, ffn_dim=13824, keep=5, scales=("row",)
) -> dict:
    """scales: "row" (FP8Linear's default, the model's products) and/or "tensor" (one scale a tensor)."""
    m = LATENT_FRAMES_PER_BLOCK * (height // 16) * (width // 16)
    lt = cublaslt()
    handle = ctypes.c_void_p()
    check(lt.cublasLtCreate(ctypes.byref(handle)), "create")
    res: dict = {"size": f"{width}*{height}", "tokens": m, "calls_per_graph": calls, "sustain_s": sustain_s}
    res["shapes"] = {}
    cases = [(sc, name, k, n) for sc in scales for name, (k, n) in shapes(dim, ffn_dim).items()]
    for sc, name, k, n in cases:
        name = name if sc == "row" else f"{name}, one scale a tensor"
        gemm = LtGemm(lt, handle, m, k, n, "cuda", scales=sc)
        flop = 2 * m * k * n
        ref = gemm.reference()().float()
        cands = {"torch._scaled_mm": gemm.reference()}
        info = {"torch._scaled_mm": {"kernels": kernel_names(gemm.reference())}}
        offered = [(f"algo {i}", r) for i, r in enumerate(gemm.algos(algos))]
        found, seen = gemm.every_algo([r for _, r in offered])
        res.setdefault("enumerated", {})[name] = seen | {"accepted": len(found)}
        print(f"{name}: cuBLASLt's heuristics offer {len(offered)}; {seen} -> {len(found)} accepted", flush=True)
        best_per_tile: dict[int, tuple[float, HeuristicResult]] = {}
        for result in found:  # alone, briefly: the fastest configuration of each tile shape
            try:
                ms = quick_ms(gemm.call(result))
            except RuntimeError:
                continue
            tile = gemm.config(result).get("tile", 0)
            if tile not in best_per_tile or ms < best_per_tile[tile][0]:
                best_per_tile[tile] = (ms, result)
        ranked = sorted(best_per_tile.items(), key=lambda kv: kv[1][0])[:keep]
        offered += [(f"tile {TILES.get(tile, tile)}", result) for tile, (_, result) in ranked]
        for key, result in offered:
            fn = gemm.call(result)
            try:
                got = fn().float()
            except RuntimeError as e:
                info[key] = {"error": str(e)}
                continue
            err = ((got - ref).norm() / ref.norm()).item()
            info[key] = gemm.config(result) | {"kernels": kernel_names(fn), "error_vs_torch": err}
            if err < 1e-2:
                cands[key] = fn
        for key, fn in cands.items():
            ms = graph_ms(fn, "cuda", calls, reps)
            info[key] |= {"alone_ms": ms, "alone_tflops": flop / ms / 1e9}
        runs: dict[str, list[dict]] = {key: [] for key in cands}
        for r in range(rounds):
            order = list(cands) if r % 2 == 0 else list(reversed(cands))
            for key in order:
                runs[key].append(sustained(cands[key], calls, sustain_s))
        for key, got in runs.items():
            ms = statistics.median(g["ms"] for g in got)
            info[key] |= {"sustained_ms": ms, "sustained_tflops": flop / ms / 1e9, "sustained_runs": got}
        res["shapes"][name] = {"k": k, "n": n, "candidates": info}
        print(f"{name} (M={m}, K={k}, N={n}):", flush=True)
        for key, row in info.items():
            if "alone_ms" not in row:
                print(f"  {key:18s} {row.get('error', 'off: ' + format(row.get('error_vs_torch', 0), '.2e'))}")
                continue
            clock = statistics.median(g.get("clock_mhz_median", 0) for g in runs[key])
            print(
                f"  {key:18s} alone {row['alone_ms'] * 1e3:7.1f} us {row['alone_tflops']:5.0f} TFLOP/s | "
                f"sustained {row['sustained_ms'] * 1e3:7.1f} us {row['sustained_tflops']:5.0f} TFLOP/s "
                f"{clock:5.0f} MHz | {(row['kernels'] or ['?'])[0][:60]}",
                flush=True,
            )
        save_results(res, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="704*384", help="W*H (default 704*384)")
    ap.add_argument("--algos", type=int, default=8, help="candidates to ask cuBLASLt for, a shape")
    ap.add_argument("--keep", type=int, default=5, help="tile shapes beyond the heuristics' to time, fastest first")
    ap.add_argument("--scales", default="row", help="row and/or tensor, comma-separated (default row)")
    ap.add_argument("--calls", type=int, default=20, help="calls in one CUDA graph")
    ap.add_argument("--reps", type=int, default=20, help="replays timed alone")
    ap.add_argument("--sustain-s", type=float, default=2.5, help="seconds of replays, a candidate and round")
    ap.add_argument("--rounds", type=int, default=2, help="sustained rounds (alternating the order)")
    ap.add_argument("--out", help="results as JSON")
    args = ap.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.split("*"))
    except ValueError:
        print(f"bench_gemm_algos: --size must be W*H, got {args.size!r}", file=sys.stderr)
        return 2
    scales = tuple(args.scales.split(","))
    if not scales or any(sc not in ("row", "tensor") for sc in scales):
        print(f"bench_gemm_algos: --scales takes row and/or tensor, got {args.scales!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gemm_algos: needs a CUDA GPU", file=sys.stderr)
        return 2
    bench(
        width,
        height,
        args.algos,
        args.calls,
        args.reps,
        args.sustain_s,
        args.rounds,
        args.out,
        keep=args.keep,
        scales=scales,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
