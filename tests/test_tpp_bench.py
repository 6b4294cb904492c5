"""The multi-GPU bench's code paths on CPU ranks over gloo with the tiny model (--dry-run): one
process and a group of 2, several sessions in flight, JSON with every figure the GPU run reports."""

import json
import sys

import pytest

sys.path.insert(0, "bench")
import bench_tpp  # noqa: E402
from conftest import free_port  # noqa: E402


@pytest.mark.mesh
def test_dry_run_measures_one_rank_and_a_group_and_writes_json(tmp_path):
    out = tmp_path / "tpp.json"
    res = bench_tpp.main(["--dry-run", "--ranks", "1,2", "--sessions", "1,2", "--timeout", "400", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["config"]["device"] == "cpu" and res["config"]["model"] == "tiny"
    assert [g["ranks"] for g in res["groups"]] == [1, 2]
    for g in res["groups"]:
        assert g["errors"] == {} and g["exit_codes"] == [0] * g["ranks"], g
        assert len(g["peak_gib_per_rank"]) == g["ranks"] and all(p > 0 for p in g["peak_gib_per_rank"])
        assert [r["sessions"] for r in g["runs"]] == [1, 2]
        for r in g["runs"]:
            assert r["fps"] > 0 and r["steady_fps"] > 0 and 0 < r["first_block_s"] <= r["first_block_s_max"]
            assert r["kv_cache_gib_per_session"] > 0 and r["speedup_vs_1"] > 0
    assert res["groups"][0]["runs"][0]["speedup_vs_1"] == 1.0


def test_bad_arguments_are_refused_with_the_reason(capsys):
    for argv in (["--ranks", "0"], ["--sessions", "two"], ["--blocks", "2", "--warm", "2"]):
        with pytest.raises(SystemExit) as exit_:
            bench_tpp.parse_args(argv)
        assert exit_.value.code == 2
    assert "--ranks and --sessions" in capsys.readouterr().err


@pytest.mark.mesh
def test_the_gateway_run_script_on_cpu_ranks(tmp_path):
    """bench/tpp_mesh_gpu.sh (issue 15's run through the gateway) with DRY_RUN: a generator of 2
    gloo ranks under torchrun, encoder, decoder and gateway processes, three requests, 2 and 4 at
    once, then a rank killed mid-stream; what it brings back is at most 8 files."""
    import os
    import subprocess

    from conftest import ROOT, check_video, trim_speech

    out = tmp_path / "out"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "AUDIO": str(trim_speech(tmp_path / "clip.wav", 0.5, 2.0)),
        "BASE_PORT": str(free_port(count=4)),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        ["bash", "bench/tpp_mesh_gpu.sh", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for name in ("hd1", "hd2", "hd3"):
        assert f"{name}: 96x64 50 frames" in summary and f"{name} first fragment, ms from the request: image" in summary
    assert "2 sessions at once: 2 done, 100 frames" in summary
    assert "4 sessions at once: 4 done, 200 frames" in summary
    killed = next(line for line in summary.splitlines() if line.startswith("rank pid"))
    assert "the client exited 1" in killed and "UNAVAILABLE" in killed, killed
    assert "torchrun exited with 1 after the kill" in summary
    assert sorted(p.name for p in out.iterdir()) == [
        "hd1.mp4", "mesh.json", "requests.log", "services.log", "summary.txt", "trace.jsonl",
    ]  # fmt: skip
    assert sorted(json.loads((out / "mesh.json").read_text())) == sorted(
        ["hd1", "hd2", "hd3", "c2-1", "c2-2", "c4-1", "c4-2", "c4-3", "c4-4"]
    )
    check_video(out / "hd1.mp4", 2.0)
    leftover = subprocess.run(["pgrep", "-f", f"127.0.0.1:{env['BASE_PORT']}"], capture_output=True, text=True)
    assert leftover.stdout == "", "processes left running"
