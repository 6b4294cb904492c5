"""bench/bench_rotation.py's CPU path: the three rotations write the same bytes; the projection of the
attention's codes as they are is closer to codes @ W than the re-quantised one."""

import json
import sys

sys.path.insert(0, "bench")
import bench_rotation  # noqa: E402
from triton_interpreter import exact_downcasts  # noqa: E402


def test_the_rotation_bench_runs_both_ways_and_writes_json(tmp_path):
    out = tmp_path / "rot.json"
    argv = ["--size", "128*64", "--device", "cpu", "--layers", "2", "--heads", "4", "--head-dim", "32"]
    with exact_downcasts():  # the interpreter's float8 casts round as a GPU's do
        assert bench_rotation.main([*argv, "--reps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reference_tokens"] == 32 and res["rotation_same_bytes"] == 1.0
    assert res["rotation_eager_ms"] > 0 and res["rotation_compiled_ms"] > 0
    assert res["rotation_triton_ms"] > 0 and res["rotation_triton_same_bytes"] == 1.0  # Triton's interpreter
    assert res["oproj_error_codes"] < 0.01 < res["oproj_error_requantised"]
    assert bench_rotation.main(["--size", "big"]) == 2
