#!/usr/bin/env bash
# One server start, every client measurement against it, in one device call (the compiled start-up
# takes four minutes of a ten-minute call): `avatar serve --http` with full-size random weights
# (bench/serve_gpu.sh), then
#   1. the mesh requests of mesh_gpu.sh: 704*384 with a new portrait, the same twice more, 384*256;
#   2. a live session (converse_gpu.py) at 384*256 with a 3:2 portrait (exactly the warmed-up size),
#      and the real-time guard's answer at 704*384;
#   3. the web front's latency (web_latency.py: gRPC Converse, WebSocket, HTTP job);
#   4. WebRTC viewers (whep_gpu.py, 1 and 4 viewers);
# then, the server stopped, the muxer alone on this GPU (bench_mux.py --device cuda).
# Steps run at STEPS sample steps (default 4); when the guard refuses the live session at that
# count, steps 3-4 run at the warm-up's 3 steps and say so. Carry .whl (with .whl/webrtc for
# step 4) and avatar/v1. Extra arguments go to `avatar serve`, e.g. --compile --fp8 --kv-fp8 --decoder light.
set -uo pipefail
RESULTS=${OUT:-/tmp/round_out}   # what comes back: at most 8 files (the device tool's limit)
OUT=/tmp/round_work && rm -rf $OUT && mkdir -p $OUT $RESULTS   # everything, videos and logs included
STEPS=${STEPS:-4}
python3 bench/hd_portrait.py /tmp/portrait.png
source bench/serve_gpu.sh --http 127.0.0.1:8080 "$@" || exit 1
mesh_requests   # hd1 hd2 hd3 sd4 (serve_gpu.sh)
echo "== mesh requests done at ${SECONDS}s"
timeout 150 python3 bench/converse_gpu.py --server 127.0.0.1:50051 --image /tmp/portrait.png --size 384*256 \
    --steps "$STEPS" --speech-s "${SPEECH_S:-16}" --gap-s "${GAP_S:-8}" --refuse-size 704*384 \
    --out "$OUT/converse.json" > "$OUT/converse.txt" 2>&1
live_steps=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['live']; \
print(sys.argv[2] if d.get('code', 'OK') == 'OK' else 3)" "$OUT/converse.json" "$STEPS" 2>/dev/null || echo 3)
echo "== live session done at ${SECONDS}s; web and WHEP at $live_steps steps"
timeout 150 python3 bench/web_latency.py --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 --image /tmp/portrait.png \
    --size 384*256 --steps "$live_steps" --speech-s 10 --out "$OUT/web_latency.json" > "$OUT/web.txt" 2>&1 \
    || tail -5 "$OUT/web.txt"
echo "== web done at ${SECONDS}s"
timeout 150 python3 bench/whep_gpu.py --server 127.0.0.1:50051 --image /tmp/portrait.png --size 384*256 \
    --steps "$live_steps" --speech-s 10 --viewers "${VIEWERS:-1,4}" --out "$OUT/whep.json" > "$OUT/whep.txt" 2>&1 \
    || tail -5 "$OUT/whep.txt"
echo "== WHEP done at ${SECONDS}s"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kill -TERM $server; wait $server
timeout 90 python3 bench/bench_mux.py --device cuda --out "$OUT/mux.json" > "$OUT/mux.txt" 2>&1 || tail -5 "$OUT/mux.txt"
grep -E "memory plan|warm-up|warm|listening|SERVING|moved|error|Error" "$OUT/serve.log" | head -30
python3 bench/mesh_summary.py "$OUT" hd1 hd2 hd3 sd4
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("converse", "web_latency", "whep", "mux"):
    try:
        print(name, json.dumps(json.load(open(f"{out}/{name}.json")))[:1500])
    except (FileNotFoundError, ValueError) as e:
        print(name, "no result", e)
PY
python3 - "$OUT" "$RESULTS/mesh.json" <<'PY'
import json, sys
from pathlib import Path
mesh = {}
for name in ("hd1", "hd2", "hd3", "sd4"):
    f = Path(sys.argv[1], f"{name}.json")
    mesh[name] = json.loads(f.read_text()) if f.exists() else None
Path(sys.argv[2]).write_text(json.dumps(mesh, indent=1))
PY
for f in converse.json web_latency.json whep.json mux.json serve.log; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RESULTS/"; done
