#!/usr/bin/env bash
# The whole pipeline on one GPU, through the gateway over loopback, as a user runs it:
# `avatar serve` (all four services, full-size random weights) and four `avatar generate --server`
# requests: 704*384 with a portrait the server has not seen (its encoders run), the same twice more
# (the encoder's result cache answers), then 384*256 at 4 steps. With --compile the server
# compiles the DiT and the VAE decoder in its warm-up, before it reports SERVING.
# Run on the device machine from the repo root, carrying .whl (wheels, see performance.md) and
# avatar/v1 (generated code). Extra arguments go to `avatar serve`, e.g. --compile; `--decoder light`
# runs the light latent decoder (serve_gpu.sh passes it as --latent-decoder light).
set -uo pipefail
OUT=${OUT:-/tmp/mesh_out}
python3 - <<'PY'
# a 704x384 portrait cut from the sample, so the video takes exactly the hd size
from PIL import Image
im = Image.open("assets/astronaut.png")
w, h = im.size
ch = w * 384 // 704
im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch)).resize((704, 384)).save("/tmp/portrait.png")
PY
source bench/serve_gpu.sh "$@" || exit 1
request() {   # name, then generate's flags
    local name=$1; shift
    python3 -m avatar.app.cli generate --server 127.0.0.1:50051 --image /tmp/portrait.png --audio assets/speech.wav \
        --out "$OUT/$name.mp4" "$@" 2> "$OUT/$name.log" || { tail -5 "$OUT/$name.log"; tail -30 "$OUT/serve.log"; }
}
request hd1 --preset hd
request hd2 --preset hd
request hd3 --preset hd
request sd4 --size 384*256 --sample_steps 4
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kill -INT $server; wait $server
grep -E "memory plan|warm-up|listening" "$OUT/serve.log" | head -12
python3 - "$OUT" <<'PY'
import json, sys
for name in ("hd1", "hd2", "hd3", "sd4"):
    try:
        m = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except FileNotFoundError:
        print(f"{name}: no result"); continue
    t = {k: round(v["ms"] / max(1, v.get("count", 1)), 1) for k, v in m["timings_ms"].items()}
    fps = m["frames"] / m["total_s"]
    print(f"{name}: {m['width']}x{m['height']} {m['frames']} frames in {m['total_s']:.2f} s = {fps:.1f} FPS; "
          f"first fragment {m['time_to_first_fragment_s']:.2f} s; ms per call/block: {t}")
PY
