"""bench/vs_upstream.py: bad input exits 2 with one line; with a prepared harness (local only: nothing
of upstream is in the repository) the tiny plumbing pairs our run with upstream's."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = [sys.executable, str(ROOT / "bench" / "vs_upstream.py")]
HARNESS = ROOT / ".upstream_speed"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--variants", "bf16,int4"], "--variants: unknown ['int4']"),
        (["--variants", ","], "--variants: unknown none given"),
        (["--sizes", "700*384"], "--sizes: '700*384' is not W*H in multiples of 16"),
        (["--harness", "/nonexistent"], "no prepared upstream harness in /nonexistent"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, expected):
    r = subprocess.run(SCRIPT + args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.skipif(
    not (HARNESS / "upstream" / "liveavatar").is_dir() or importlib.util.find_spec("einops") is None,
    reason="needs the upstream harness prepared in .upstream_speed (docs/performance.md) and einops",
)
def test_tiny_plumbing_pairs_our_run_with_upstreams(tmp_path):
    out = tmp_path / "vs.json"
    cmd = SCRIPT + ["--tiny", "--device", "cpu", "--variants", "bf16", "--sizes", "704*384", "--timed", "2"]
    r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ours"]["size"] == "176*96" and row["upstream"]["size"] == "128*64"  # each side's tiny model
    assert row["ours"]["ms_per_block"] > 0 and row["upstream"]["ms_per_block"] > 0
    assert "speedup" not in row  # tiny models of different shapes: no comparison claimed
    assert "| bf16 | 704*384 |" in r.stdout
