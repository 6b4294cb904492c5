#!/usr/bin/env bash
# Upstream LiveAvatar's causal DiT with FP8 + compile (its best single-GPU configuration) at 704*384,
# through the harness in .upstream_speed (docs/performance.md says how to prepare it): its output
# into $OUT/upstream.jsonl, one summary line printed. $1: the time limit in seconds (default 200).
# Called by the device scripts that set it beside our engine (engine_ab_gpu.sh, flashinfer_vs_upstream_gpu.sh).
OUT=${OUT:-/tmp/upstream_out}
mkdir -p "$OUT"
(cd .upstream_speed && timeout "${1:-200}" python3 run.py --fp8 --compile --timed 8 --size '704*384' \
    > "$OUT/upstream.jsonl" 2> "$OUT/upstream.err")
echo "upstream: exit $?"
grep "^RESULT " "$OUT/upstream.jsonl" | tail -1 | cut -c8- | python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"upstream fp8+compile {r['size']}: {r['ms_per_block_median']:.1f} ms a block, {r['fps']:.2f} FPS\")" \
    || tail -5 "$OUT/upstream.err"
rm -f "$OUT/upstream.err"
