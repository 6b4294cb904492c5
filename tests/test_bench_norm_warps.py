"""bench/bench_norm_warps.py in Triton's interpreter: every kernel at every count, the fastest per
kernel, and fused_norms' own launch widths left as they were."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_norm_warps

    return bench_norm_warps


def test_the_sweep_times_every_kernel_at_every_count_and_keeps_the_defaults(bench, monkeypatch):
    from avatar.services.generator import fused_norms

    monkeypatch.setattr(fused_norms, "LAUNCH_WARPS", {"rope_into": 2})
    table = bench.cases(32, 32, "cpu", dim=64, ffn_dim=128, heads=2, layers=2)
    assert {key for key, *_ in table.values()} == {
        "norm_quantize", "residual_norm_quantize", "gelu_quantize", "rms_rope_fp8", "kv_into_cache", "rope_into"
    }  # fmt: skip
    counts = []

    def graph_ms(fn, *args):  # the interpreter's clock says nothing: 8 warps "take" half of 4's time
        out = fn()  # every call runs, as the DiT makes it
        assert out is None or isinstance(out, (tuple, fused_norms.FP8Rows, torch.Tensor))
        counts.append(dict(fused_norms.LAUNCH_WARPS))
        return 1.0 if 8 in fused_norms.LAUNCH_WARPS.values() else 2.0

    monkeypatch.setattr(bench, "graph_ms", graph_ms)
    res = bench.sweep(table, "cpu", [4, 8], calls=1, reps=1)
    assert len(counts) == 8 * 2 and {"rope_into": 4} in counts and {"rope_into": 8} in counts
    assert res["warps"] == dict.fromkeys(
        ["norm_quantize", "residual_norm_quantize", "gelu_quantize", "rms_rope_fp8", "kv_into_cache", "rope_into"], 8
    )
    row = res["kernels"]["norm1+modulate"]
    assert row["default_warps"] == 4 and set(row["by_warps"]) == {4, 8}  # 64 wide: 4 warps by default
    tokens = 3 * 2 * 2  # a block's 3 latent frames of 2 x 2 tokens
    assert row["by_warps"][8]["gb_s"] == pytest.approx(tokens * 64 * 3 / 1.0 / 1e6)
    assert res["kernels"]["reference keys rope_into the sink"]["default_warps"] == 2  # LAUNCH_WARPS's
    assert fused_norms.LAUNCH_WARPS == {"rope_into": 2}  # put back as it was


def test_the_cli_writes_the_fastest_counts(tmp_path):
    out = tmp_path / "warps.json"
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "bench/bench_norm_warps.py", "--size", "32*32", "--device", "cpu", "--warps", "4"]
    proc = subprocess.run([*cmd, "--reps", "1", "--out", str(out), "--dims", "64,128,2,2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["size"] == "32*32" and set(res["warps"].values()) == {4} and len(res["kernels"]) == 8
    assert "fastest warps per kernel" in proc.stdout
    assert torch.__version__ == res["torch"]
