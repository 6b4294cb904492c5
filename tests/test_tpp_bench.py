"""The multi-GPU bench's code paths on CPU ranks over gloo with the tiny model (--dry-run): one
process and a group of 2, several sessions in flight, JSON with every figure the GPU run reports."""

import json
import sys

import pytest

sys.path.insert(0, "bench")
import bench_tpp  # noqa: E402


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
