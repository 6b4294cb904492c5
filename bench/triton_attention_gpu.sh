#!/usr/bin/env bash
# The Triton FP8 attention against cuDNN's, on one GPU, in one device call: the kernels alone at
# the DiT's 704*384 shape (bench_attention.py --triton: every config of the sweep), then, if the
# fastest Triton variant beats cuDNN's kernel, the service's engine (CUDA graphs, fused norms,
# compiled) with each kernel at 704*384 (bench_generator.py --only engine-gaps --fp8-kernels).
# With --mesh: instead of the engine, the whole mesh through the gateway (bench/mesh_gpu.sh, the
# issue's configuration) with the faster kernel (its default tiles), to save a device call.
# Run on the device machine from the repo root, carrying .whl and avatar/v1; results in $OUT.
set -uo pipefail
MESH=0
[ "${1:-}" = "--mesh" ] && MESH=1
OUT=${OUT:-/tmp/triton_attention_out}
mkdir -p "$OUT"
source bench/serve_wheels.sh > /dev/null || exit 1
timeout "${ATTENTION_S:-170}" python3 bench/bench_attention.py --triton --sizes '704*384' \
    --out "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
echo "bench_attention: exit $?"
grep -E "TFLOP/s|plan |write|vs the torch|Error" "$OUT/attention.txt" | cut -c1-160
best=$(python3 - "$OUT/attention.json" <<'PY'
import json, re, sys
size = json.load(open(sys.argv[1]))["sizes"][0]["variants"]
cudnn = min(v["ms"] for n, v in size.items() if n.startswith("fp8-attention,") and "ms" in v)
ours = {n: v["ms"] for n, v in size.items() if n.startswith("triton ") and "ms" in v and "as cached" not in n}
if ours:
    name = min(ours, key=ours.get)
    config = ",".join(re.findall(r"\d+", name.split("(")[1]))
    flag = ",ws" if "warp-specialized" in name else ",fma2" if "every 2nd" in name else ",fma1" if "fma-exp" in name else ""
    print(config + flag, ours[name], cudnn, name.replace(" ", "_"))
PY
)
echo "fastest Triton variant against cuDNN's kernel (config ms cudnn_ms name): $best"
read -r config ours cudnn _ <<< "$best"
faster=cudnn
if [ -n "${config:-}" ] && python3 -c "import sys; sys.exit(0 if $ours < $cudnn else 1)"; then faster=triton; fi
if [ "$MESH" = 1 ]; then
    echo "the mesh with the $faster kernel"
    timeout "${MESH_S:-400}" bash bench/mesh_gpu.sh --compile --fp8 --kv-fp8 --decoder light --fp8-attention \
        --fp8-attention-kernel "$faster" --warmup-shape 384x256@4 > "$OUT/mesh_stdout.txt" 2>&1
    echo "mesh: exit $?"
    tail -22 "$OUT/mesh_stdout.txt"
    rm -f "$OUT/mesh_stdout.txt" "$OUT/attention.txt"  # printed; at most 8 files come back
elif [ "$faster" = triton ]; then
    timeout "${ENGINE_S:-400}" python3 bench/bench_generator.py --only engine-gaps --compile-first \
        --sizes '704*384' --blocks 6 --warm 2 --fp8-kernels triton,cudnn --triton-attention "$config" \
        --out "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
    echo "engine-gaps: exit $?"
    grep -E "engine|block|ms" "$OUT/engine.txt" | tail -30 | cut -c1-200
fi
