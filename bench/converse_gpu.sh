#!/usr/bin/env bash
# A live session through the gateway on one GPU (issue 11's targets): `avatar serve` with full-size
# random weights (all four services in one process; with --compile it compiles in its warm-up,
# before SERVING), then bench/converse_gpu.py: speech at real-time pace, a silence, an
# interrupted utterance, then a size the real-time guard must refuse.
# Run on the device machine from the repo root, carrying .whl (wheels: .whl/*.whl as for the other
# benches, .whl/mesh/*.whl the serving stack, see docs/performance.md) and avatar/v1.
# Extra arguments go to `avatar serve`, e.g. --compile --fp8 --kv-fp8; `--decoder light` runs the light
# latent decoder (serve_gpu.sh passes it as --latent-decoder light).
set -uo pipefail
OUT=${OUT:-/tmp/converse_out}
source bench/serve_gpu.sh "$@" || exit 1
python3 bench/converse_gpu.py --server 127.0.0.1:50051 --size "${SIZE:-384*256}" --steps "${STEPS:-4}" \
    --speech-s "${SPEECH_S:-20}" --gap-s "${GAP_S:-30}" --refuse-size "${REFUSE_SIZE:-704*384}" \
    --soak-s "${SOAK_S:-0}" --audio-encoder "${AUDIO_ENCODER:-}" \
    --out "$OUT/converse.json"
rc=$?
kill -TERM $server; wait $server
grep -E "warm|compil|SERVING|error|Error" "$OUT/serve.log" | tail -20
exit $rc
