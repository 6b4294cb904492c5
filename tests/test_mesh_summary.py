"""bench/mesh_summary.py: per-request lines from the sidecars, the DiT's per-block times from the spans."""

import json
import sys

sys.path.insert(0, "bench")
import mesh_summary  # noqa: E402


def _span(name, trace, start_ms, end_ms, **attributes):
    ms = 1_000_000
    base = 1_700_000_000_000 * ms
    return {
        "name": name,
        "trace_id": trace * 32,
        "start_unix_nano": base + int(start_ms * ms),
        "end_unix_nano": base + int(end_ms * ms),
        "duration_ms": end_ms - start_ms,
        "attributes": attributes,
    }


def test_per_block_dit_times_come_from_the_requests_own_spans_in_block_order(tmp_path, capsys):
    spans = [
        _span("avatar.v1.AvatarService/Generate", "a", 0, 2000),
        _span("encode_image", "a", 20, 53),
        _span("encode_audio", "a", 18, 200, first_chunk_ms=110.4, first_chunk_model_ms=31.2),
        _span("open_session", "a", 60, 95, graphs=28, sink_kept=True, admit_ms=1.2, inputs_ms=20.4, sink_ms=3.0),
        _span("dit_block", "a", 1300, 2000, block=1),
        _span("dit_block", "a", 130, 650, block=0),
        _span("dit_block", "b", 0, 9, block=2),  # another request
        _span("vae_decode", "a", 655, 680, block=0),
        _span("vae_decode", "a", 1000, 1020, block=1),
        _span("send", "a", 770, 772, block=0),
    ]
    lines = [json.dumps(s) for s in spans] + ['{"name": "dit_bl']  # a torn line from two writers
    # the gateway's spans and each per-service child's in its own file, as `serve` writes them
    children = {"generator": ("open_session", "dit_block"), "encoder": ("encode_",), "decoder": ("vae_decode",)}
    for role, prefixes in children.items():
        mine = [line for line in lines if any(f'"name": "{p}' in line for p in prefixes)]
        (tmp_path / f"trace.jsonl.{role}").write_text("\n".join(mine) + "\n")
        lines = [line for line in lines if line not in mine]
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
    spans_read = mesh_summary.read_spans(tmp_path / "trace.jsonl")
    assert len(spans_read) == len(spans) and mesh_summary.dit_blocks(spans_read, "a" * 32) == [520.0, 700.0]
    mesh_summary.main(tmp_path, ["hd1", "sd4"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hd1: 704x384 24 frames in 2.00 s = 12.0 FPS; first fragment 0.90 s")
    assert out[1] == "  hd1 DiT ms per block: 520 700"
    # the stages found, in the path's order, block 0's only; text and mux have no span here
    assert out[2] == (
        "  hd1 first fragment, ms from the request: image 20-53, audio 18-200 (first chunk at 128; its model "
        "31 ms), session 60-95 (28 graphs kept; sink kept; admit 1 ms; inputs 20 ms; sink 3 ms), DiT 0 130-650, "
        "decode 0 655-680, send 0 770-772"
    )
    assert out[3] == "sd4: no result"


def test_sessions_at_once_count_their_frames_over_the_sidecars_own_span(tmp_path):
    for name, started, finished, first in (("c2-1", "00.0", "04.0", 0.5), ("c2-2", "01.0", "05.0", 1.1)):
        sidecar = {
            "frames": 100,
            "time_to_first_fragment_s": first,
            "started": f"2026-12-04T20:00:{started}00+00:00",
            "finished": f"2026-12-04T20:00:{finished}00+00:00",
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(sidecar))
    line = mesh_summary.aggregate(tmp_path, ["c2-1", "c2-2", "c2-3"])  # c2-3 failed: no sidecar
    assert line == "3 sessions at once: 2 done, 200 frames in 5.00 s = 40.0 FPS aggregate; first fragments 0.50 1.10 s"
    assert mesh_summary.aggregate(tmp_path, ["x"]) == "1 sessions at once: none finished"
