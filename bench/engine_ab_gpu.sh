#!/usr/bin/env bash
# Issue 13's DiT target, before and after a change, in one device call on one card: upstream
# LiveAvatar's causal DiT with FP8 + compile (its best; the harness in .upstream_speed), then our
# engine as the service runs it (engine-gaps: CUDA graphs, fused norms, compiled, cuDNN's FP8
# attention) in the tree of an earlier commit and in this one.
#
# Here:            bash bench/engine_ab_gpu.sh --prepare COMMIT
#   writes .carry/: the wheels of .whl/ but PyAV (the engine does not mux; the carry stays under
#   64 MiB) and COMMIT's tree (with avatar/v1). Then, on the device, carrying .carry, avatar/v1
#   and .upstream_speed:  bash bench/engine_ab_gpu.sh
# UPSTREAM_S / ENGINE_S: each part's time limit (upstream's first run on a fresh machine needs over
# 175 s: X1); UPSTREAM_S=0 skips upstream, BASE=0 the earlier tree.
# UPSTREAM_RUNS=N runs upstream N times, the first before the engine and the rest after it (its time
# follows its host: 3% apart in two runs on one card (V2/V4), 13% in three (W1/W2), 20% in three
# (X1/X2)); run k writes $OUT/upstream-k/. Over 8 files under $OUT (the device returns 8), they end up
# in one $OUT/engine_ab.tar (X1's third upstream log was left behind).
# Each part runs with nvidia-smi sampling the SM clock and power (bench/gpu_clocks.py): $OUT/smi-PART.csv
# and one summary line each (run V4: the engine runs power-capped, upstream at its full clock).
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
    commit=${2:?usage: bash bench/engine_ab_gpu.sh --prepare COMMIT}
    rm -rf .carry.tmp && mkdir -p .carry.tmp/base || exit 1
    cp -al .whl .carry.tmp/whl && rm -f .carry.tmp/whl/av-*.whl || exit 1
    git archive "$commit" avatar services gateway app bench pyproject.toml | tar -x -C .carry.tmp/base || exit 1
    cp -r avatar/v1 .carry.tmp/base/avatar/ && git rev-parse "$commit" > .carry.tmp/base/COMMIT || exit 1
    rm -rf .carry && mv .carry.tmp .carry && du -sh .carry && exit 0
fi
export OUT=${OUT:-/tmp/engine_ab_out}
mkdir -p "$OUT"
[ -e .whl ] || ln -s .carry/whl .whl
source bench/serve_wheels.sh > /dev/null || exit 1

# clocked NAME CMD...: runs CMD with nvidia-smi sampling the SM clock and power every 200 ms, then
# prints the busy samples' summary (run V4: upstream held 1980 MHz, the engine was power-capped)
clocked() {
    local name=$1; shift
    nvidia-smi $(python3 bench/gpu_clocks.py --query) -lms 200 > "$OUT/smi-$name.csv" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    echo "$name clocks: $(python3 bench/gpu_clocks.py "$OUT/smi-$name.csv")"
    return $rc
}

engine() {  # $1: the tree, $2: a name for the results
    (cd "$1" && timeout "${ENGINE_S:-170}" python3 bench/bench_generator.py --only engine-gaps --compile-first \
        --sizes '704*384' --blocks 6 --warm 2 --fp8-kernels cudnn --out "$OUT/engine-$2.json" \
        > "$OUT/engine-$2.txt" 2>&1)
    local rc=$?
    echo "engine-gaps $2 ($(cat "$1/COMMIT" 2>/dev/null || echo this tree)): exit $rc"
    grep -E "ms a block|Error" "$OUT/engine-$2.txt" | tail -5 | cut -c1-200
}

upstream() {  # $1: which run (1 writes into $OUT, as before; k > 1 into $OUT/upstream-k)
    [ "${UPSTREAM_S:-200}" != 0 ] || return 0
    local out=$OUT name=upstream
    [ "$1" = 1 ] || { out=$OUT/upstream-$1 name=upstream-$1; }
    mkdir -p "$out" && OUT=$out clocked "$name" bash bench/upstream_gpu.sh "${UPSTREAM_S:-200}"
}

upstream 1
if [ "${BASE:-1}" != 0 ]; then
    link_avatar_tree "$PWD/.carry/base" && ln -sfn "$PWD/.carry/whl" .carry/base/.whl && clocked engine-base engine "$PWD/.carry/base" base
fi
link_avatar_tree "$PWD" && clocked engine-new engine "$PWD" new
for k in $(seq 2 "${UPSTREAM_RUNS:-1}"); do upstream "$k"; done
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    tar -C "$OUT" -cf /tmp/engine_ab.tar . && find "$OUT" -mindepth 1 -delete && mv /tmp/engine_ab.tar "$OUT/" &&
        echo "the results are in $OUT/engine_ab.tar"
fi
