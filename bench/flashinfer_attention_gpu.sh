#!/usr/bin/env bash
# FlashInfer's Hopper FP8 attention against cuDNN's, on one GPU, in one device call: the kernels
# alone at the DiT's 704*384 shape (bench_attention.py --flashinfer: each tile shape built), then,
# if FlashInfer's is faster there, the service's engine (CUDA graphs, fused norms, compiled) with
# each kernel at 704*384 (bench_generator.py --only engine-gaps --fp8-kernels flashinfer,cudnn).
# Carry .whl, avatar/v1 and .fi: .fi/fp8_attention_flashinfer.so built on this machine (no GPU
# needed: python3 -m avatar.services.generator.fp8_attention_flashinfer --build .fi), and
# .fi/flashinfer_data.tar.xz (flashinfer-python's data/ headers) to build it there with that
# machine's nvcc if the carried library does not load. Run from the repo root; results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/flashinfer_attention_out}
mkdir -p "$OUT"
source bench/serve_wheels.sh > /dev/null || exit 1
export AVATAR_FLASHINFER_FP8_LIB=$PWD/.fi/fp8_attention_flashinfer.so
if ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$AVATAR_FLASHINFER_FP8_LIB"; then
    echo "the carried library does not load: building it here ($(nvcc --version | tail -1))"
    mkdir -p /tmp/fi && tar -xJf .fi/flashinfer_data.tar.xz -C /tmp/fi || exit 1
    python3 -m avatar.services.generator.fp8_attention_flashinfer --build /tmp/fi/build --data /tmp/fi/data \
        --configs "${FI_CONFIGS:-fi_128x192x2,fi_128x128x2}" || exit 1
    export AVATAR_FLASHINFER_FP8_LIB=/tmp/fi/build/fp8_attention_flashinfer.so
fi
timeout "${ATTENTION_S:-200}" python3 bench/bench_attention.py --flashinfer "$AVATAR_FLASHINFER_FP8_LIB" \
    --sizes '704*384' --out "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
echo "bench_attention: exit $?"
grep -E "TFLOP/s|plan |vs the torch|Error" "$OUT/attention.txt" | cut -c1-170
faster=$(python3 - "$OUT/attention.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["sizes"][0]["variants"]
for n, r in v.items():
    if "vs_cudnn" in r:
        print(f"{n}: {r['ms']:.3f} ms, against cuDNN's output {r['vs_cudnn']:.4f}", file=sys.stderr)
cudnn = min(r["ms"] for n, r in v.items() if n.startswith("fp8-attention, ") and "cuDNN" in n and "ms" in r)
tiles = {n.split()[1]: r["ms"] for n, r in v.items() if n.startswith("flashinfer ") and "ms" in r}
best = min(tiles, key=tiles.get) if tiles else None
print("flashinfer" if best and tiles[best] < cudnn else "cudnn", best or "-")
PY
)
read -r faster best <<< "$faster"
echo "faster kernel alone: $faster (FlashInfer's fastest tiles: $best)"
[ "$best" != "-" ] && export AVATAR_FLASHINFER_FP8_CONFIG=$best
if [ "$faster" = flashinfer ] || [ -n "${ENGINE_ALWAYS:-}" ]; then
    timeout "${ENGINE_S:-420}" python3 bench/bench_generator.py --only engine-gaps --compile-first \
        --sizes '704*384' --blocks 6 --warm 2 --fp8-kernels flashinfer,cudnn \
        --out "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
    echo "engine-gaps: exit $?"
    grep -E "ms/block|ms a block|under the profiler|Error" "$OUT/engine.txt" | tail -40 | cut -c1-160
fi
rm -f "$OUT/attention.txt"
