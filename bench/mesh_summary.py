"""One line per `avatar generate --server` request of a mesh bench: size, FPS end to end, first
fragment, and milliseconds per call or block by stage, read from the sidecar JSON each request
wrote beside its video; with the server's spans in OUT/trace.jsonl (`avatar serve --trace-file`),
a second line with the DiT's milliseconds for each block in order (where a request's first
blocks, CUDA graph captures included, differ from its steady ones).
Usage: python3 bench/mesh_summary.py OUT NAME... (e.g. hd1 hd2 sd4)."""

import json
import sys
from pathlib import Path


def dit_blocks(trace: Path, trace_id: str) -> list[float]:
    """The request's dit_block spans (generator service), ms per block in block order."""
    blocks = {}
    for line in trace.read_text().splitlines():
        try:
            span = json.loads(line)
        except json.JSONDecodeError:  # a line two processes wrote at once
            continue
        if span.get("name") == "dit_block" and span.get("trace_id") == trace_id and span.get("duration_ms"):
            blocks[int(span["attributes"].get("block", -1))] = span["duration_ms"]
    return [blocks[i] for i in sorted(blocks)]


def main(out: Path, names: list[str]) -> None:
    trace = out / "trace.jsonl"
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
        if trace.exists() and m.get("trace_id"):
            per_block = dit_blocks(trace, m["trace_id"])
            if per_block:
                print(f"  {name} DiT ms per block: " + " ".join(f"{ms:.0f}" for ms in per_block))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
