"""bench/bench_gemm.py's CPU path: every case runs its GEMMs as FP8Linear computes them (a fused
q|k|v GEMM's column blocks are the three apart), and the summary is the cases' difference."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_gemm  # noqa: E402


def test_the_fused_qkv_gemm_is_the_three_apart_side_by_side():
    m, k, n = 12, 32, 16
    x = torch.randn(m, k).to(bench_gemm.E4M3)
    w = torch.randn(3 * n, k).to(bench_gemm.E4M3)
    xs, ws = torch.rand(m, 1) + 0.5, torch.rand(1, 3 * n) + 0.5

    def mm(weight, scale):
        return torch._scaled_mm(x, weight.t(), scale_a=xs, scale_b=scale, out_dtype=torch.bfloat16)

    fused = mm(w, ws)
    apart = [mm(w[i * n : (i + 1) * n], ws[:, i * n : (i + 1) * n].contiguous()) for i in range(3)]
    assert torch.equal(fused, torch.cat(apart, dim=1))


def test_the_bench_times_every_case_and_reports_the_saving(monkeypatch):
    times = iter([3.0, 2.5, 2.8, 1.0, 2.0, 2.0, 1.8])
    calls = []

    def graph_ms(fn, device, n, reps):
        fn()  # each case's GEMMs run
        calls.append(n)
        return next(times)

    monkeypatch.setattr(bench_gemm, "graph_ms", graph_ms)
    res = bench_gemm.bench(64, 64, "cpu", calls=2, reps=1, dim=32, ffn_dim=48)
    assert res["tokens"] == 3 * 4 * 4 and calls == [2] * 7
    assert res["cases"]["q, k, v apart"]["gemms"] == 3 and res["cases"]["q|k|v as one"]["gemms"] == 1
    assert res["qkv_fused_saves_ms_per_block"] == (3.0 - 2.5) * 160
    flop = 2 * 48 * 32 * 96  # q|k|v as one: m x 32 x 96
    assert abs(res["cases"]["q|k|v as one"]["tflops"] - flop / 2.5 / 1e9) < 1e-12


@pytest.mark.parametrize(
    "wrapper, flag, suffix, other",
    [("autotuned", "autotune", "max-autotune", "compiled"), ("compiled", "compile_too", "compiled", "max-autotune")],
)
def test_each_variant_adds_a_case_for_each_one_gemm_shape(monkeypatch, wrapper, flag, suffix, other):
    """--autotune (max-autotune) and --compiled (torch.compile's default mode, as the model's
    blocks): one more case for each one-GEMM shape, the transposed product included."""
    wrapped = []

    def wrap(fn):
        wrapped.append(fn)
        return fn

    monkeypatch.setattr(bench_gemm, wrapper, wrap)
    monkeypatch.setattr(bench_gemm, "graph_ms", lambda fn, device, n, reps: (fn(), 1.0)[1])
    res = bench_gemm.bench(64, 64, "cpu", calls=1, reps=1, dim=32, ffn_dim=48, **{flag: True})
    # the one-GEMM cases, not the multi-GEMM ones
    one = ("q|k|v as one", "o (self or cross)", "ffn up", "ffn down", "ffn down, as W @ x^T")
    assert [name for name in res["cases"] if name.endswith(f", {suffix}")] == [f"{n}, {suffix}" for n in one]
    assert len(wrapped) == 5 and not any(name.endswith(f", {other}") for name in res["cases"])


def test_the_command_line_reaches_the_bench(monkeypatch, tmp_path):
    seen = {}

    def bench(width, height, device, calls, reps, dim=5120, ffn_dim=13824, autotune=False, out=None, compile_too=False):
        seen.update(dim=dim, ffn_dim=ffn_dim, autotune=autotune, out=out, compile_too=compile_too)
        return {"cases": {}}

    monkeypatch.setattr(bench_gemm, "bench", bench)
    out = tmp_path / "gemm.json"
    assert bench_gemm.main(["--device", "cpu", "--compiled", "--autotune", "--out", str(out)]) == 0
    assert seen == {"dim": 5120, "ffn_dim": 13824, "autotune": True, "out": str(out), "compile_too": True}
    assert json.loads(out.read_text()) == {"cases": {}}


def test_the_results_so_far_are_on_disk_after_each_case(monkeypatch, tmp_path):
    """A device call cut short (its time limit) still returns the cases it timed."""
    calls = []

    def graph_ms(fn, device, n, reps):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the call's limit, mid-bench
        return 1.0

    monkeypatch.setattr(bench_gemm, "graph_ms", graph_ms)
    out = tmp_path / "gemm.json"
    with pytest.raises(KeyboardInterrupt):
        bench_gemm.bench(64, 64, "cpu", calls=1, reps=1, dim=32, ffn_dim=48, out=str(out))
    assert list(json.loads(out.read_text())["cases"]) == ["q, k, v apart", "q|k|v as one"]
