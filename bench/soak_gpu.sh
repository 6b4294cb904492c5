#!/usr/bin/env bash
# Issue 11's GPU soak, longer than one ten-minute device call: started detached (setsid) so it
# outlives the call that starts it, results in /tmp/soak (a later call on the same machine reads
# them: `until [ -f /tmp/soak/done ]; do sleep 5; done`). `avatar serve` with the arguments given
# (e.g. --compile --fp8 --kv-fp8 --decoder light), then WebRTC viewers (whep_gpu.py, 1 and 4), then
# a SOAK_S-second live session at 384*256 (converse_gpu.py --soak-s: 20 s speech, 30 s silence, an
# interrupted utterance, repeated) with a 3:2 portrait, then the server stops.
# Many interrupts in one call (issue 11's interrupt -> idle p95): SPEECH_S=4 GAP_S=2 SOAK_S=240
# VIEWERS=none (about 24 interrupts; with the server's start it fits one 600 s call, no detaching).
# REQUESTS=1 first sends round_gpu.sh's four mesh requests (704*384 x3, 384*256) to the same server.
# Carry .whl (with .whl/webrtc) and avatar/v1, as for round_gpu.sh.
set -uo pipefail
export OUT=/tmp/soak
rm -rf $OUT && mkdir -p $OUT
python3 bench/hd_portrait.py /tmp/portrait.png
source bench/serve_gpu.sh "$@" || { echo failed > $OUT/done; exit 1; }
if [ -n "${REQUESTS:-}" ]; then   # the mesh requests of round_gpu.sh first (issue 13's figures), same server
    mesh_requests
    python3 bench/mesh_summary.py "$OUT" hd1 hd2 hd3 sd4 | tee "$OUT/mesh.txt"
    echo "mesh requests done at ${SECONDS}s"
fi
[ "${VIEWERS:-1,4}" = none ] || timeout 150 python3 bench/whep_gpu.py --server 127.0.0.1:50051 --image /tmp/portrait.png --size 384*256 \
    --steps "${STEPS:-4}" --speech-s 10 --viewers "${VIEWERS:-1,4}" --out "$OUT/whep.json" > "$OUT/whep.txt" 2>&1
echo "whep rc=$? at ${SECONDS}s"
python3 bench/converse_gpu.py --server 127.0.0.1:50051 --image /tmp/portrait.png --size 384*256 \
    --steps "${STEPS:-4}" --speech-s "${SPEECH_S:-20}" --gap-s "${GAP_S:-30}" --soak-s "${SOAK_S:-600}" --out "$OUT/soak.json" > "$OUT/soak.txt" 2>&1
echo "soak rc=$? at ${SECONDS}s"
kill -TERM $server; wait $server
echo ok > $OUT/done
