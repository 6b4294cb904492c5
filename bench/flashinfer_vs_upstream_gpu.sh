#!/usr/bin/env bash
# Issue 13's DiT target in one device call: upstream LiveAvatar's causal DiT with FP8 + compile (its
# best; the harness in .upstream_speed) and ours as the service runs it (engine-gaps: CUDA graphs,
# fused norms, compiled) with FlashInfer's FP8 attention and with cuDNN's, at 704*384, same card.
# Carry .whl, avatar/v1, .upstream_speed and .fi/fp8_attention_flashinfer.so (built here with
# `python3 -m avatar.services.generator.fp8_attention_flashinfer --build .fi`). FI_CONFIG: its tiles.
set -uo pipefail
OUT=${OUT:-/tmp/flashinfer_vs_upstream_out}
mkdir -p "$OUT"
source bench/serve_wheels.sh > /dev/null || exit 1
export AVATAR_FLASHINFER_FP8_LIB=$PWD/.fi/fp8_attention_flashinfer.so
export AVATAR_FLASHINFER_FP8_CONFIG=${FI_CONFIG:-fi_128x192x2}
OUT=$OUT bash bench/upstream_gpu.sh "${UPSTREAM_S:-260}"
timeout "${ENGINE_S:-320}" python3 bench/bench_generator.py --only engine-gaps --compile-first \
    --sizes '704*384' --blocks 6 --warm 2 --fp8-kernels "${KERNELS:-flashinfer,cudnn}" \
    --out "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
echo "engine-gaps: exit $?"
grep -E "ms/block|ms a block|under the profiler|Error" "$OUT/engine.txt" | tail -40 | cut -c1-160
