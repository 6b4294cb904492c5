#!/usr/bin/env bash
# The first fragment's path through the whole mesh on this machine's CPU, where no GPU is lent:
# `avatar serve` (tiny model, one process per service as on a GPU host, the light decoder) and six
# `avatar generate --server` requests at 704*384 with the same portrait (the first encodes it, the
# rest find it in the encoder's cache) and 1.44 s of the sample speech (3 blocks). The tiny DiT
# and decoder say nothing about GPU speed; the hops between the services carry full-size tensors
# (latents have 16 channels whatever the model), so the stages before the DiT are what this measures.
# Usage: bash bench/mesh_cpu.sh [OUT] (default /tmp/mesh_cpu); prints bench/mesh_summary.py's lines.
set -uo pipefail
OUT=${1:-/tmp/mesh_cpu}
PORT=${PORT:-50091}
PY=${PY:-.venv/bin/python}
rm -rf "$OUT"; mkdir -p "$OUT"
$PY bench/hd_portrait.py "$OUT/portrait.png"
$PY -c "
import soundfile as sf
x, r = sf.read('assets/speech.wav', dtype='float32')
sf.write('$OUT/speech.wav', x[: int(r * 1.44)], r)"
$PY -m avatar.app.cli serve --listen 127.0.0.1:$PORT --processes per-service --latent-decoder light \
    --trace-file "$OUT/trace.jsonl" > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 240); do
    $PY -m avatar.app.healthcheck 127.0.0.1:$PORT >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
    sleep 1
done
names=(k0 k1 k2 k3 k4 k5)
for n in "${names[@]}"; do
    timeout 300 $PY -m avatar.app.cli generate --server 127.0.0.1:$PORT --image "$OUT/portrait.png" \
        --audio "$OUT/speech.wav" --out "$OUT/$n.mp4" --size 704*384 2> "$OUT/$n.log" || tail -3 "$OUT/$n.log"
done
kill -INT $server; wait $server
$PY bench/mesh_summary.py "$OUT" "${names[@]}"
