#!/usr/bin/env bash
# Issue 13's first move, measured in one run on one GPU: the same requests through the gateway with
# all four services in one process (`avatar serve --processes one`) and with one process per
# service (`--processes per-service`, the default on a GPU since run O). Per mode: a 704*384 request with a new portrait, the same again (encoder
# cache), 384*256 at 4 steps, then a live session (bench/converse_gpu.py) at 384*256, 4 steps.
# Run on the device machine from the repo root, carrying .whl and avatar/v1; extra arguments go to
# `avatar serve` in both modes, e.g. --compile. Results: $OUT/{all,split}/.
set -uo pipefail
ROOT_OUT=${OUT:-/tmp/split_out}
python3 bench/hd_portrait.py /tmp/portrait.png
for mode in ${MODES:-all split}; do   # MODES=split: only the GPU default
    OUT=$ROOT_OUT/$mode
    SECONDS=0
    if [ $mode = all ]; then source bench/serve_gpu.sh --processes one "$@" || continue
    else source bench/serve_gpu.sh --processes per-service "$@" || continue; fi
    request hd1 --preset hd
    request hd2 --preset hd
    request sd4 --size 384*256 --sample_steps 4
    python3 bench/converse_gpu.py --server 127.0.0.1:50051 --size 384*256 --steps "${STEPS:-4}" \
        --speech-s "${SPEECH_S:-12}" --gap-s "${GAP_S:-6}" --out "$OUT/converse.json" > "$OUT/converse.txt"
    kill -TERM $server; wait $server
    echo "== $mode"
    python3 bench/mesh_summary.py "$OUT" hd1 hd2 sd4
    python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['live']; print({k: d.get(k) for k in \
('code','details','size','measured_block_ms','blocks','audio_to_fragment_ms','interrupt_to_idle_ms','max_gap_between_fragments_s','generator_block_ms')})" \
        "$OUT/converse.json" 2>&1 | tail -2
done
