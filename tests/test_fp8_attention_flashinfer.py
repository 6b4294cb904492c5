"""FlashInfer's FP8 attention (--fp8-attention-kernel flashinfer): the torch reference of its
arithmetic that the CPU runs, the op and the model with it, where it runs, how the library is
built (a stand-in nvcc: the real one is on GPU hosts; bench/flashinfer_attention_gpu.sh runs the
kernel) and the flag through the embedded mesh."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_fp8_attention import _blocks

from avatar.presets import GeneratorOptions, ModelSpec
from avatar.services.generator import fp8_attention_flashinfer as fi
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.fp8_attention import E4M3, reference, unavailable_reason


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _case(seed: int, queries=100, keys=300, heads=2, dim=32, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, queries, heads, dim, generator=g) * sharpness
    k8 = torch.randn(1, keys, heads, dim, generator=g).to(E4M3)
    v8 = torch.randn(1, keys, heads, dim, generator=g).to(E4M3)
    descale = (q.abs().amax() / 448).reshape(1, 1, 1, 1)
    return (q / descale).to(E4M3), k8, v8, descale


def test_the_ops_on_the_cpu_compute_flashinfers_arithmetic():
    """Its probabilities scaled by 448 and its output in bf16: as close to exact attention as
    cuDNN's arithmetic as codes, closer as the bf16 it writes (what the model takes), and not
    cuDNN's codes (the option is a different approximation)."""
    q8, k8, v8, descale = _case(seed=1)
    out = torch.ops.avatar.fp8_sdpa_bf16(q8, k8, v8, descale)
    assert out.dtype == torch.bfloat16 and out.shape == q8.shape
    assert torch.equal(out, reference(q8, k8, v8, descale, p_scale=448.0, bf16_out=True))
    codes = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale, "flashinfer")
    assert codes.dtype == E4M3 and torch.equal(codes, out.clamp(-448, 448).to(E4M3))
    cudnn = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale, "cudnn")
    exact = F.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q8.float() * descale, k8, v8))
    ).transpose(1, 2)
    assert _rel(out, exact) < _rel(cudnn, exact) and _rel(codes, exact) < 1.2 * _rel(cudnn, exact) < 0.06
    assert 0 < _rel(codes, cudnn) < 0.04


def test_the_bf16_op_returns_what_its_fake_promises():
    q8, k8, v8, descale = _case(seed=2, queries=20, keys=40, dim=16)
    checks = torch.library.opcheck(
        torch.ops.avatar.fp8_sdpa_bf16.default,
        (q8, k8, v8, descale),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
    )
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_the_tiny_dit_with_flashinfers_kernel(monkeypatch):
    """The model takes FlashInfer's bf16 output in every self-attention over the cache (its usual
    layout: head dim contiguous), and its blocks stay within FP8 rounding of cuDNN's arithmetic's."""
    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True)
    cudnn = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=options))
    fi_options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True, fp8_attention_kernel="flashinfer")
    flashinfer = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=fi_options), dit=cudnn.dit)
    calls = []
    real, real_codes = torch.ops.avatar.fp8_sdpa_bf16, torch.ops.avatar.fp8_sdpa
    monkeypatch.setattr(torch.ops.avatar, "fp8_sdpa_bf16", lambda *a: calls.append(a[2].stride(-1)) or real(*a))
    monkeypatch.setattr(torch.ops.avatar, "fp8_sdpa", lambda *a: calls.append(a[4]) or real_codes(*a))
    got = _blocks(flashinfer, blocks=2)
    assert calls and set(calls) == {1}  # only the bf16 op, the cache's usual layout
    calls.clear()
    ref = _blocks(cudnn, blocks=2)
    assert calls and set(calls) == {"cudnn"}
    assert torch.isfinite(got).all() and 0 < _rel(got, ref) < 0.05, _rel(got, ref)


def test_it_runs_on_hopper_with_a_library_or_what_builds_one(monkeypatch, tmp_path):
    monkeypatch.delenv(fi.LIB_ENV, raising=False)
    assert unavailable_reason("cpu", "flashinfer") is None  # the reference
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "compute capability 9.0" in unavailable_reason("cuda:0", "flashinfer")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fi, "flashinfer_data_dir", lambda: None)
    assert "pip install flashinfer-python" in unavailable_reason("cuda:0", "flashinfer")
    monkeypatch.setattr(fi, "flashinfer_data_dir", lambda: tmp_path)
    monkeypatch.setattr(fi, "nvcc_path", lambda: None)
    assert "nvcc" in unavailable_reason("cuda:0", "flashinfer")
    monkeypatch.setattr(fi, "nvcc_path", lambda: "/usr/bin/nvcc")
    assert unavailable_reason("cuda:0", "flashinfer") is None
    monkeypatch.setenv(fi.LIB_ENV, str(tmp_path / "missing.so"))  # a named library wins, if it is there
    assert "not a file" in unavailable_reason("cuda:0", "flashinfer")


FAKE_NVCC = """#!{python}
# nvcc's stand-in: records its command line, writes -o's file, fails where FAIL_ON names a config
import os, sys
args = sys.argv[1:]
with open(os.environ["NVCC_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if any(a == "-DFI_NAME=" + os.environ.get("FAIL_ON", "-") for a in args):
    sys.stderr.write("fp8_attention_flashinfer.cu(1): error: planted\\n")
    sys.exit(1)
open(args[args.index("-o") + 1], "wb").write(b"object")
"""


def _fake_nvcc(tmp_path, monkeypatch):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(python=sys.executable))
    nvcc.chmod(0o755)
    monkeypatch.setenv("NVCC_LOG", str(tmp_path / "nvcc.log"))
    data = tmp_path / "data"
    (data / "include" / "flashinfer").mkdir(parents=True)
    return str(nvcc), data


def test_the_build_compiles_each_tile_shape_for_sm90a_and_links_them(tmp_path, monkeypatch):
    nvcc, data = _fake_nvcc(tmp_path, monkeypatch)
    out = fi.build(tmp_path / "lib" / fi.LIB_NAME, data, nvcc, configs=("fi_128x192x2", "fi_128x128x3"))
    assert out.read_bytes() == b"object"
    lines = (tmp_path / "nvcc.log").read_text().splitlines()
    compiles, link = lines[:-1], lines[-1]
    assert len(compiles) == 2 and all("arch=compute_90a,code=sm_90a" in c for c in compiles)
    assert any("-DFI_CTA_KV=192 -DFI_STAGES=2 -DFI_NAME=fi_128x192x2" in c for c in compiles)
    assert any("-DFI_CTA_KV=128 -DFI_STAGES=3 -DFI_NAME=fi_128x128x3" in c for c in compiles)
    assert all(f"-I{data / 'include'}" in c and str(fi.SOURCE) in c for c in compiles)
    assert link.startswith("-shared -cudart static") and link.count(".o ") == 2
    assert sorted(p.name for p in out.parent.iterdir()) == [fi.LIB_NAME]  # the objects went with their folder


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    nvcc, data = _fake_nvcc(tmp_path, monkeypatch)
    monkeypatch.setenv("FAIL_ON", "fi_128x128x2")
    lib = tmp_path / "lib" / fi.LIB_NAME
    with pytest.raises(RuntimeError, match="nvcc failed on fi_128x128x2: .*error: planted"):
        fi.build(lib, data, nvcc, configs=("fi_128x192x2", "fi_128x128x2"))
    assert list(lib.parent.iterdir()) == []


def test_the_build_command_line(tmp_path, monkeypatch, env):
    nvcc, data = _fake_nvcc(tmp_path, monkeypatch)
    module = [sys.executable, "-m", "avatar.services.generator.fp8_attention_flashinfer"]
    ok = subprocess.run(
        [*module, "--build", str(tmp_path / "out"), "--data", str(data), "--nvcc", nvcc, "--configs", "fi_128x128x2"],
        env={**env, "NVCC_LOG": str(tmp_path / "nvcc.log")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / fi.LIB_NAME).is_file()
    for bad, says in (
        (["--data", str(tmp_path / "nowhere"), "--nvcc", nvcc], "no flashinfer-python headers"),
        (["--data", str(data), "--nvcc", nvcc, "--configs", "fi_1x1x1"], "unknown tile shapes ['fi_1x1x1']"),
    ):
        r = subprocess.run(
            [*module, "--build", str(tmp_path / "bad"), *bad], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2 and r.stderr.startswith(f"error: {says}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
        assert not (tmp_path / "bad").exists()


def test_avatar_generate_with_flashinfers_kernel_renders_a_video(tmp_path, env):
    """The flag through the embedded mesh; on the CPU the reference of its arithmetic runs."""
    from conftest import ASSETS, AVATAR, ROOT, check_video

    out = tmp_path / "flashinfer.mp4"
    args = ["generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(ASSETS / "speech.wav")]
    args += ["--size", "64*64", "--num_clip", "1", "--infer_frames", "24", "--sample_steps", "2", "--seed", "5"]
    args += ["--fp8-attention-kernel", "flashinfer", "--out", str(out)]
    r = subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_video(out, 24 / 25)
    assert json.loads(out.with_suffix(".json").read_text())["parameters"]["fp8_attention_kernel"] == "flashinfer"


def test_the_library_is_built_once_per_tile_shape_and_cached(tmp_path, monkeypatch, caplog):
    """Built on first use, only the tile shape asked for, into the cache; found there afterwards;
    a library named by AVATAR_FLASHINFER_FP8_LIB is used as it is."""
    nvcc, data = _fake_nvcc(tmp_path, monkeypatch)
    monkeypatch.delenv(fi.LIB_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fi, "flashinfer_data_dir", lambda: data)
    monkeypatch.setattr(fi, "nvcc_path", lambda: nvcc)
    monkeypatch.setattr(fi, "_libs", {})
    loaded = []
    monkeypatch.setattr(fi.ctypes, "CDLL", lambda path: loaded.append(path) or object())
    builds = []
    real_build = fi.build
    monkeypatch.setattr(fi, "build", lambda *a, **k: builds.append(k["configs"]) or real_build(*a, **k))
    with caplog.at_level("INFO", logger=fi.log.name):
        first = fi.library("fi_128x128x3")
    assert builds == [("fi_128x128x3",)] and len(loaded) == 1
    assert "building FlashInfer's FP8 attention (fi_128x128x3)" in caplog.text  # the minute it takes is said
    assert loaded[0].startswith(str(tmp_path / "cache" / "avatar" / "flashinfer-fp8"))
    assert fi.library("fi_128x128x3") is first and len(builds) == 1  # loaded once
    monkeypatch.setattr(fi, "_libs", {})
    fi.library("fi_128x128x3")
    assert len(builds) == 1 and len(loaded) == 2  # a new process finds the cached file
    with pytest.raises(ValueError, match="unknown FlashInfer tile shape 'fi_1x1x1'"):
        fi.library("fi_1x1x1")
    monkeypatch.setenv(fi.LIB_ENV, str(tmp_path / "prebuilt.so"))
    fi.library("fi_128x192x2")
    assert loaded[-1] == str(tmp_path / "prebuilt.so") and len(builds) == 1
