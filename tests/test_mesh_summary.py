"""bench/mesh_summary.py: per-request lines from the sidecars, the DiT's per-block times from the spans."""

import json
import sys

sys.path.insert(0, "bench")
import mesh_summary  # noqa: E402


def test_per_block_dit_times_come_from_the_requests_own_spans_in_block_order(tmp_path, capsys):
    spans = [
        {"name": "dit_block", "trace_id": "a" * 32, "duration_ms": 700.0, "attributes": {"block": 1}},
        {"name": "dit_block", "trace_id": "a" * 32, "duration_ms": 520.0, "attributes": {"block": 0}},
        {"name": "dit_block", "trace_id": "b" * 32, "duration_ms": 9.0, "attributes": {"block": 2}},  # other request
        {"name": "vae_decode", "trace_id": "a" * 32, "duration_ms": 20.0, "attributes": {"block": 2}},
    ]
    lines = [json.dumps(s) for s in spans] + ['{"name": "dit_bl']  # a torn line from two writers
    (tmp_path / "trace.jsonl").write_text("\n".join(lines) + "\n")
    sidecar = {
        "width": 704,
        "height": 384,
        "frames": 24,
        "total_s": 2.0,
        "time_to_first_fragment_s": 0.9,
        "timings_ms": {"dit_block": {"ms": 1220.0, "count": 2}},
        "trace_id": "a" * 32,
    }
    (tmp_path / "hd1.json").write_text(json.dumps(sidecar))
    assert mesh_summary.dit_blocks(tmp_path / "trace.jsonl", "a" * 32) == [520.0, 700.0]
    mesh_summary.main(tmp_path, ["hd1", "sd4"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hd1: 704x384 24 frames in 2.00 s = 12.0 FPS; first fragment 0.90 s")
    assert out[1] == "  hd1 DiT ms per block: 520 700"
    assert out[2] == "sd4: no result"
