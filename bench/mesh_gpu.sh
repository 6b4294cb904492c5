#!/usr/bin/env bash
# The whole pipeline on one GPU, through the gateway over loopback, as a user runs it:
# `avatar serve` (all four services, full-size random weights, memory plan auto) and two
# `avatar generate --server` requests at 704*384 (the first warms up and compiles, the next two
# are measured).
# Run on the device machine from the repo root, carrying .whl (wheels, see performance.md) and
# avatar/v1 (generated code). Extra arguments go to `avatar serve`, e.g. --compile.
set -uo pipefail
source bench/device_setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mesh/*.whl || exit 1
OUT=${OUT:-/tmp/mesh_out}
mkdir -p "$OUT"
python3 - <<'PY'
# a 704x384 portrait cut from the sample, so the video takes exactly the hd size
from PIL import Image
im = Image.open("assets/astronaut.png")
w, h = im.size
ch = w * 384 // 704
im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch)).resize((704, 384)).save("/tmp/portrait.png")
PY
python3 -m avatar.cli serve --random-weights --device cuda --listen 127.0.0.1:50051 "$@" > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 300); do
    python3 -m avatar.healthcheck 127.0.0.1:50051 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -30 "$OUT/serve.log"; exit 1; }
    sleep 1
done
echo "server ready after ${SECONDS}s"
for i in 1 2 3; do
    python3 -m avatar.cli generate --server 127.0.0.1:50051 --image /tmp/portrait.png --audio assets/speech.wav \
        --preset hd --out "$OUT/hd$i.mp4" 2> "$OUT/generate$i.log" || { tail -5 "$OUT/generate$i.log"; tail -30 "$OUT/serve.log"; }
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kill -INT $server; wait $server
grep -E "memory plan|ready" "$OUT/serve.log" | head -5
python3 - "$OUT" <<'PY'
import json, sys
for i in (1, 2, 3):
    try:
        m = json.load(open(f"{sys.argv[1]}/hd{i}.json"))
    except FileNotFoundError:
        print(f"request {i}: no result"); continue
    t = {k: round(v["ms"] / max(1, v.get("count", 1)), 1) for k, v in m["timings_ms"].items()}
    fps = m["frames"] / m["total_s"]
    print(f"request {i}: {m['width']}x{m['height']} {m['frames']} frames in {m['total_s']:.2f} s = {fps:.1f} FPS; "
          f"first fragment {m['time_to_first_fragment_s']:.2f} s; ms per call/block: {t}")
PY
