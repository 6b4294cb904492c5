#!/usr/bin/env bash
# WebRTC (WHEP) viewers of a live session on one GPU: `avatar serve` with full-size random weights
# (bench/serve_gpu.sh), then bench/whep_gpu.py: one Converse session per viewer count, its stream
# published into a SessionHub and watched by that many aiortc viewers over loopback.
# Run on the device machine from the repo root, carrying .whl as for converse_gpu.sh; .whl/mesh
# must also hold the WebRTC stack's wheels (aiohttp, aiortc and their dependencies: aioice,
# pylibsrtp, pyee, google-crc32c, cryptography, pyopenssl, dnspython, ifaddr, multidict, yarl,
# frozenlist, aiosignal, aiohappyeyeballs, propcache, attrs).
# Extra arguments go to `avatar serve`, e.g. --compile.
set -uo pipefail
OUT=${OUT:-/tmp/whep_out}
source bench/serve_gpu.sh "$@" || exit 1
python3 bench/whep_gpu.py --server 127.0.0.1:50051 --size "${SIZE:-384*256}" --steps "${STEPS:-4}" \
    --speech-s "${SPEECH_S:-20}" --viewers "${VIEWERS:-1,4,8}" --out "$OUT/whep.json"
rc=$?
kill -TERM $server; wait $server
exit $rc
