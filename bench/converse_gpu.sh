#!/usr/bin/env bash
# A live session through the gateway on one GPU (issue 11's targets): `avatar serve` with full-size
# random weights (all four services in one process; with --compile it compiles in its warm-up,
# before SERVING), then bench/converse_gpu.py: speech at real-time pace, a silence, an
# interrupted utterance, then a size the real-time guard must refuse.
# Run on the device machine from the repo root, carrying .whl (wheels: .whl/*.whl as for the other
# benches, .whl/mesh/*.whl the serving stack, see docs/performance.md) and avatar/v1.
# Extra arguments go to `avatar serve`, e.g. --compile --fp8 --kv-fp8.
set -uo pipefail
source bench/device_setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mesh/*.whl || exit 1
OUT=${OUT:-/tmp/converse_out}
mkdir -p "$OUT"
python3 -m avatar.app.cli serve --random-weights --device cuda --listen 127.0.0.1:50051 "$@" > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 480); do
    python3 -m avatar.app.healthcheck 127.0.0.1:50051 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -30 "$OUT/serve.log"; exit 1; }
    sleep 1
done
echo "server ready after ${SECONDS}s"
python3 bench/converse_gpu.py --server 127.0.0.1:50051 --size "${SIZE:-384*256}" --steps "${STEPS:-4}" \
    --speech-s "${SPEECH_S:-20}" --gap-s "${GAP_S:-30}" --refuse-size "${REFUSE_SIZE:-704*384}" \
    --out "$OUT/converse.json"
rc=$?
kill -TERM $server; wait $server
grep -E "warm|compil|SERVING|error|Error" "$OUT/serve.log" | tail -20
exit $rc
