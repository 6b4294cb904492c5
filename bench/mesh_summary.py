"""One line per `avatar generate --server` request of a mesh bench: size, FPS end to end, first
fragment, and milliseconds per call or block by stage, read from the sidecar JSON each request
wrote beside its video. Usage: python3 bench/mesh_summary.py OUT NAME... (e.g. hd1 hd2 sd4)."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in sys.argv[2:]:
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
