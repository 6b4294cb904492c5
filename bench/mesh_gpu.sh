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
python3 bench/hd_portrait.py /tmp/portrait.png
source bench/serve_gpu.sh --trace-file "$OUT/trace.jsonl" "$@" || exit 1
mesh_requests   # hd1 hd2 hd3 sd4 (serve_gpu.sh)
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kill -INT $server; wait $server
grep -E "memory plan|warm-up|listening" "$OUT/serve.log" | head -12
python3 bench/mesh_summary.py "$OUT" hd1 hd2 hd3 sd4   # + the DiT per block, from the spans
# What comes back from the device is a few files: one video, the sidecars, the logs in one file.
for n in hd1 hd2 hd3 sd4; do echo "== $n"; cat "$OUT/$n.log" 2>/dev/null; done > "$OUT/requests.log"
rm -f "$OUT"/hd2.mp4 "$OUT"/hd3.mp4 "$OUT"/sd4.mp4 "$OUT"/hd1.log "$OUT"/hd2.log "$OUT"/hd3.log "$OUT"/sd4.log
