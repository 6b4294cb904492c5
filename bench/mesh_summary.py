"""One line per `avatar generate --server` request of a mesh bench: size, FPS end to end, first
fragment, and milliseconds per call or block by stage, read from the sidecar JSON each request
wrote beside its video; with the server's spans in OUT/trace.jsonl (`avatar serve --trace-file`),
two more: the DiT's milliseconds for each block in order (where a request's first blocks differ
from its steady ones), and the first fragment's path, each stage's start and end in ms from the
gateway's receipt of the request (what the first fragment waits for).
Usage: python3 bench/mesh_summary.py OUT NAME... (e.g. hd1 hd2 sd4); for requests sent at once,
python3 bench/mesh_summary.py --aggregate OUT NAME... (FPS over them all); --bundle OUT NAME...
prints the sidecars as one JSON object."""

import json
import sys
from datetime import datetime
from pathlib import Path

ROOT_SPAN = "avatar.v1.AvatarService/Generate"
# (span name, its block attribute or None, label) on the first fragment's path, in order
FIRST_FRAGMENT_PATH = (
    ("encode_image", None, "image"),
    ("encode_text", None, "text"),
    ("encode_audio", None, "audio"),
    ("open_session", None, "session"),
    ("dit_block", 0, "DiT 0"),
    ("vae_decode", 0, "decode 0"),
    ("mux", 0, "mux 0"),
    ("send", 0, "send 0"),
)


def read_spans(trace: Path) -> list[dict]:
    """The spans in `trace` and in the files beside it that `serve --processes per-service` (the
    default on a GPU) has its children write, one per service (trace.jsonl.generator, ...)."""
    spans = []
    for path in (trace, *sorted(trace.parent.glob(trace.name + ".*"))):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:  # a line two processes wrote at once
                continue
    return spans


def dit_blocks(spans: list[dict], trace_id: str) -> list[float]:
    """The request's dit_block spans (generator service), ms per block in block order."""
    blocks = {}
    for span in spans:
        if span.get("name") == "dit_block" and span.get("trace_id") == trace_id and span.get("duration_ms"):
            blocks[int(span["attributes"].get("block", -1))] = span["duration_ms"]
    return [blocks[i] for i in sorted(blocks)]


OPEN_STAGES = ("admit_ms", "inputs_ms", "sink_ms")  # the generator's session opening (open_session span)


def first_fragment_path(spans: list[dict], trace_id: str) -> str:
    """'image 2-35, text 2-10, audio 3-130 (first chunk 120), session 36-80 (28 graphs), DiT 0
    81-600, ...': each stage on the first fragment's path, ms from the request's root span."""
    mine = [s for s in spans if s.get("trace_id") == trace_id and s.get("end_unix_nano")]
    roots = [s for s in mine if s.get("name") == ROOT_SPAN]
    if not roots:
        return ""
    t0 = roots[0]["start_unix_nano"]
    parts = []
    for name, block, label in FIRST_FRAGMENT_PATH:
        found = [s for s in mine if s["name"] == name and (block is None or s["attributes"].get("block") == block)]
        if not found:
            continue
        s = min(found, key=lambda s: s["start_unix_nano"])
        part = f"{label} {(s['start_unix_nano'] - t0) / 1e6:.0f}-{(s['end_unix_nano'] - t0) / 1e6:.0f}"
        attrs = s["attributes"]
        if "first_chunk_ms" in attrs:
            model = f"; its model {attrs['first_chunk_model_ms']:.0f} ms" if "first_chunk_model_ms" in attrs else ""
            part += f" (first chunk at {(s['start_unix_nano'] - t0) / 1e6 + attrs['first_chunk_ms']:.0f}{model})"
        if name == "open_session" and "graphs" in attrs:
            stages = "".join(f"; {k[:-3]} {attrs[k]:.0f} ms" for k in OPEN_STAGES if k in attrs)
            part += f" ({attrs['graphs']} graphs kept{'; sink kept' if attrs.get('sink_kept') else ''}{stages})"
        parts.append(part)
    return ", ".join(parts)


def aggregate(out: Path, names: list[str]) -> str:
    """Requests sent at once: how many finished, all their frames over the time from the first
    one's start to the last one's end (the sidecars' clocks: client start-ups left out), and
    their first fragments."""
    done = [json.loads(p.read_text()) for p in (out / f"{n}.json" for n in names) if p.exists()]
    if not done:
        return f"{len(names)} sessions at once: none finished"
    wall_s = (
        max(datetime.fromisoformat(d["finished"]) for d in done)
        - min(datetime.fromisoformat(d["started"]) for d in done)
    ).total_seconds()
    frames = sum(d["frames"] for d in done)
    firsts = " ".join(f"{d['time_to_first_fragment_s']:.2f}" for d in done)
    return (
        f"{len(names)} sessions at once: {len(done)} done, {frames} frames in {wall_s:.2f} s = "
        f"{frames / wall_s:.1f} FPS aggregate; first fragments {firsts} s"
    )


def bundle(out: Path, names: list[str]) -> dict:
    """The requests' sidecars in one object, {name: sidecar} (one file back from the device
    instead of one per request; the format of bench/results/*-mesh*.json)."""
    return {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()}


def main(out: Path, names: list[str]) -> None:
    spans = read_spans(out / "trace.jsonl")
    for name in names:
        try:
            m = json.loads((out / f"{name}.json").read_text())
        except FileNotFoundError:
            print(f"{name}: no result")
            continue
        t = {k: round(v["ms"] / max(1, v.get("count", 1)), 1) for k, v in m["timings_ms"].items()}
        print(
            f"{name}: {m['width']}x{m['height']} {m['frames']} frames in {m['total_s']:.2f} s = "
            f"{m['frames'] / m['total_s']:.1f} FPS; first fragment {m['time_to_first_fragment_s']:.2f} s; ms: {t}"
        )
        if spans and m.get("trace_id"):
            per_block = dit_blocks(spans, m["trace_id"])
            if per_block:
                print(f"  {name} DiT ms per block: " + " ".join(f"{ms:.0f}" for ms in per_block))
            if path := first_fragment_path(spans, m["trace_id"]):
                print(f"  {name} first fragment, ms from the request: {path}")


if __name__ == "__main__":
    if sys.argv[1] == "--aggregate":  # --aggregate OUT NAME...: requests sent at once
        print(aggregate(Path(sys.argv[2]), sys.argv[3:]))
    elif sys.argv[1] == "--bundle":  # --bundle OUT NAME...: the sidecars as one JSON on stdout
        print(json.dumps(bundle(Path(sys.argv[2]), sys.argv[3:]), indent=1))
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
