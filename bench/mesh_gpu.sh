#!/usr/bin/env bash
# The whole pipeline on one GPU, through the gateway over loopback, as a user runs it:
# `avatar serve` (all four services, full-size random weights) and five `avatar generate --server`
# requests: 704*384 with a portrait the server has not seen (its encoders run), the same twice more
# (the encoder's result cache answers), then 384*256 at 4 steps twice. With --compile the server
# compiles the DiT and the VAE decoder in its warm-up, before it reports SERVING.
# Run on the device machine from the repo root, carrying .whl (wheels, see performance.md) and
# avatar/v1 (generated code). Extra arguments go to `avatar serve`, e.g. --compile; `--decoder light`
# runs the light latent decoder (serve_gpu.sh passes it as --latent-decoder light).
set -uo pipefail
OUT=${OUT:-/tmp/mesh_out}
python3 bench/hd_portrait.py /tmp/portrait.png
source bench/serve_gpu.sh --trace-file "$OUT/trace.jsonl" "$@" || exit 1
mesh_requests   # hd1 hd2 hd3 sd4 (serve_gpu.sh)
request sd5 --size 384*256 --sample_steps 4   # sd4 again: its size's graphs kept from sd4
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
kill -INT $server; wait $server
# The per-service children write their spans beside the gateway's (trace.jsonl.<role>): one file
# of them comes back (at most 8 do), and the summary reads them all.
for f in "$OUT"/trace.jsonl.*; do [ -f "$f" ] && cat "$f" >> "$OUT/trace.jsonl" && rm -f "$f"; done
grep -E "memory plan|warm-up|listening" "$OUT/serve.log" | head -12
names=(hd1 hd2 hd3 sd4 sd5)
python3 bench/mesh_summary.py "$OUT" "${names[@]}" | tee "$OUT/summary.txt"   # + per block and the first fragment's path
# What comes back from the device is at most 8 files: one video, the sidecars in one JSON
# ({name: sidecar}, as bench/results/*-mesh*.json), the logs in one file, the spans, the summary.
python3 bench/mesh_summary.py --bundle "$OUT" "${names[@]}" > "$OUT/mesh.json"
for n in "${names[@]}"; do echo "== $n"; cat "$OUT/$n.log" 2>/dev/null; done > "$OUT/requests.log"
for n in "${names[@]}"; do rm -f "$OUT/$n.log" "$OUT/$n.json"; [ "$n" = hd1 ] || rm -f "$OUT/$n.mp4"; done
