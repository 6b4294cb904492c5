"""bench/bench_mux.py's code paths on the CPU: both variants timed, the JSON written whole."""

import json
import sys

sys.path.insert(0, "bench")
import bench_mux  # noqa: E402


def test_both_variants_are_timed_and_written(tmp_path):
    out = tmp_path / "mux.json"
    assert (
        bench_mux.main(["--device", "cpu", "--sizes", "64*64", "--blocks", "2", "--warm", "1", "--out", str(out)]) == 0
    )
    row = json.loads(out.read_text())["sizes"]["64*64"]
    assert set(row) == {"rgb", "yuv"}
    assert all(r["mux_ms"] > 0 and r["to_host_ms"] > 0 and r["fragment_kib"] > 0 for r in row.values())
    assert not list(tmp_path.glob("*.part"))


def test_a_bad_size_is_refused_with_exit_2(capsys):
    assert bench_mux.main(["--device", "cpu", "--sizes", "70*64"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
