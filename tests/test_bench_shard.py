"""bench/bench_shard.py's code paths on CPU with the tiny model: one process, and FSDP2 over 2
gloo ranks under torchrun (the GPU run differs only in the device and the model size)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port

sys.path.insert(0, str(ROOT / "bench"))
import bench_shard  # noqa: E402

SMALL = ["--tiny", "--device", "cpu", "--blocks", "2", "--infer-frames", "24", "--steps", "2"]


def test_one_process_baseline_writes_its_json(tmp_path, capsys):
    out = tmp_path / "shard1.json"
    assert bench_shard.main([*SMALL, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["layout"], r["world_size"], r["size"], r["cache_sets"], r["kv_dtype"]) == (
        "single",
        1,
        "64*64",
        2,
        "bfloat16",
    )
    assert r["errors"] == {} and len(r["rank0"]["block_ms_all"]) == 2 and r["rank0"]["block_ms"] > 0
    assert len(r["ranks"]) == 1 and r["ranks"][0]["weights_gib"] > 0
    assert not list(tmp_path.glob("*.part"))


def test_a_layout_that_does_not_match_the_processes_is_refused(capsys):
    assert bench_shard.main([*SMALL, "--parallel", "fsdp=2"]) == 2
    assert "fsdp 2 = 2 ranks, but 1 process" in capsys.readouterr().err


def test_planner_estimate_for_the_full_size_layouts():
    args = bench_shard.parse_args(["--fp8", "--cache-sets", "1", "--kv-fp8"])
    one, four = bench_shard.planner_estimate(args, (704, 384), 1), bench_shard.planner_estimate(args, (704, 384), 4)
    assert 22 < one["total_gib"] < 26 and four["total_gib"] < 15  # docs/operations.md, "Memory per rank"
    assert "dit" in one["parts_gib"] and "dit_shards" in four["parts_gib"]


@pytest.mark.mesh
def test_fsdp2_under_torchrun_reports_every_rank(tmp_path):
    out = tmp_path / "fsdp2.json"
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
    ]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [*torchrun, str(ROOT / "bench" / "bench_shard.py"), "--parallel", "fsdp=2", *SMALL, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["layout"] == "tpp=1,fsdp=2" and res["errors"] == {}
    assert [rank["rank"] for rank in res["ranks"]] == [0, 1]
    # each rank holds about half the weights (the blocks' shards, and the whole root)
    from avatar.services.generator.weights import random_dit

    dit = random_dit("tiny", "cpu", torch.float32)
    full = sum(t.numel() * t.element_size() for t in (*dit.parameters(), *dit.buffers())) / 2**30
    weights = [rank["weights_gib"] for rank in res["ranks"]]
    assert all(w < 0.7 * full for w in weights) and full <= sum(weights) <= 1.1 * full, (weights, full)
    assert len(res["rank0"]["block_ms_all"]) == 2
