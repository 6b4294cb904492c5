#!/usr/bin/env bash
# The web front's latency on one GPU (docs/clients.md): `avatar serve --http 8080` with full-size
# random weights, then bench/web_latency.py: gRPC Converse, the WebSocket bridge and an HTTP job,
# speech at real-time pace. Run on the device machine from the repo root, carrying .whl (as for
# converse_gpu.sh; .whl/mesh/ must also hold aiohttp and its dependencies: aiohappyeyeballs,
# aiosignal, attrs, frozenlist, multidict, propcache, yarl). Extra arguments go to `avatar serve`.
set -uo pipefail
OUT=${OUT:-/tmp/web_out}
source bench/serve_gpu.sh --http 127.0.0.1:8080 "$@" || exit 1
python3 bench/web_latency.py --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 --size "${SIZE:-384*256}" \
    --steps "${STEPS:-4}" --speech-s "${SPEECH_S:-20}" --out "$OUT/web_latency.json"
rc=$?
kill -TERM $server; wait $server
exit $rc
