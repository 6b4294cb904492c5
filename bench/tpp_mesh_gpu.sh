#!/usr/bin/env bash
# Issue 15's run through the gateway: the mesh with its DiT on R GPUs (a TPP group under torchrun;
# R=1: the single-GPU generator, the baseline), encoder and decoder on the next GPU (on the last
# rank's when all R are ranks), each service its own process, full-size random weights.
#   1. the generator's start: seconds to SERVING (NCCL set-up, the model, the warm-up)
#   2. hd1 hd2 hd3: 704*384 sequentially (a new portrait, then the same), as mesh_gpu.sh
#   3. 2 and then 4 sessions at once: aggregate FPS (all frames over the wall time)
#   4. a rank killed (SIGKILL, the last one) mid-stream: the stream must end with an error, not
#      hang, and torchrun must exit (R > 1 only)
# Usage, on the device machine from the repo root, carrying .whl and avatar/v1:
#   GEN_FLAGS="--compile --fp8 --kv-fp8" DEC_FLAGS="--latent-decoder light" bash bench/tpp_mesh_gpu.sh 2
# Results in $OUT: summary.txt, mesh.json (the sidecars by request), services.log, requests.log,
# trace.jsonl, hd1.mp4 (at most 8 files come back from the device).
# DRY_RUN=1 runs the same on the CPU (tiny model, gloo ranks, 96*64, AUDIO=a short clip): the
# script's own check (tests/test_tpp_bench.py); PYTHON names the interpreter (default python3).
set -uo pipefail
R=${1:?usage: tpp_mesh_gpu.sh RANKS}
OUT=${OUT:-/tmp/tpp_mesh_out}
PY=${PYTHON:-python3}
AUDIO=${AUDIO:-assets/speech.wav}
BASE=${BASE_PORT:-50051}
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (docs/operations.md, NCCL)
mkdir -p "$OUT"
$PY bench/hd_portrait.py /tmp/portrait.png || exit 1
if [ -n "${DRY_RUN:-}" ]; then
    gpus=$((R + 1)) req=(--preset preview --size 96*64)
    serve=($PY -m avatar.app.cli serve --model tiny --device cpu --trace-file "$OUT/trace.jsonl")
else
    source bench/serve_wheels.sh || exit 1
    gpus=$(nvidia-smi -L | wc -l) req=(--preset hd)
    serve=($PY -m avatar.app.cli serve --random-weights --device cuda --trace-file "$OUT/trace.jsonl")
fi
((R <= gpus)) || { echo "$R ranks but $gpus GPUs"; exit 2; }
aux=$((R < gpus ? R : R - 1))
gw=127.0.0.1:$BASE enc=127.0.0.1:$((BASE + 1)) gen=127.0.0.1:$((BASE + 2)) dec=127.0.0.1:$((BASE + 3))
pids=()
cleanup() { for p in "${pids[@]}"; do pkill -9 -P "$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; done; }   # torchrun's ranks too
trap cleanup EXIT

wait_serving() {   # address, pid, name: seconds until SERVING, or fail
    local start=$SECONDS
    for _ in $(seq 600); do
        $PY -m avatar.app.healthcheck "$1" >/dev/null 2>&1 && { echo "$3 SERVING after $((SECONDS - start)) s"; return 0; }
        kill -0 "$2" 2>/dev/null || { echo "$3 exited:"; tail -30 "$OUT/$3.log"; return 1; }
        sleep 1
    done
    echo "$3 not SERVING after 600 s"; return 1
}

ranks=$(seq -s, 0 $((R - 1)))
# shellcheck disable=SC2086  # GEN_FLAGS and DEC_FLAGS are lists of flags
if ((R == 1)); then
    CUDA_VISIBLE_DEVICES=0 "${serve[@]}" --role generator --listen $gen --max-sessions 4 --max-queue 8 \
        ${GEN_FLAGS:-} > "$OUT/generator.log" 2>&1 &
else
    CUDA_VISIBLE_DEVICES=$ranks $PY -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$R" --no-python \
        "${serve[@]}" --role generator --listen $gen --max-sessions 4 --max-queue 8 \
        ${GEN_FLAGS:-} > "$OUT/generator.log" 2>&1 &
fi
generator=$!; pids+=($generator)
CUDA_VISIBLE_DEVICES=$aux "${serve[@]}" --role encoder --listen $enc > "$OUT/encoder.log" 2>&1 &
pids+=($!); encoder=$!
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES=$aux "${serve[@]}" --role decoder --listen $dec ${DEC_FLAGS:-} > "$OUT/decoder.log" 2>&1 &
pids+=($!); decoder=$!
"${serve[@]}" --role gateway --listen $gw --encoder $enc --generator $gen --decoder $dec \
    --max-sessions 4 --max-queue 8 > "$OUT/gateway.log" 2>&1 &
pids+=($!); gateway=$!
echo "DiT ranks on GPUs $ranks, encoder and decoder on GPU $aux"
wait_serving $gen $generator generator || exit 1
wait_serving $enc $encoder encoder && wait_serving $dec $decoder decoder && wait_serving $gw $gateway gateway || exit 1

request() {   # name, then generate's flags
    local name=$1; shift
    timeout 300 $PY -m avatar.app.cli generate --server $gw --image /tmp/portrait.png \
        --audio "$AUDIO" --out "$OUT/$name.mp4" "${req[@]}" "$@" 2> "$OUT/$name.log"
}
names=(hd1 hd2 hd3)
for n in hd1 hd2 hd3; do request $n || tail -5 "$OUT/$n.log"; done
for k in 2 4; do   # k sessions at once
    clients=() batch=()
    for i in $(seq "$k"); do request "c$k-$i" & clients+=($!); batch+=("c$k-$i"); done
    wait "${clients[@]}"
    $PY bench/mesh_summary.py --aggregate "$OUT" "${batch[@]}" | tee -a "$OUT/concurrent.txt"
    names+=("${batch[@]}")
done

if ((R > 1)); then   # a rank that dies mid-stream: an error at the client, no hang, the group exits
    request killed &
    client=$!
    for _ in $(seq 600); do   # until it streams
        grep -q frames "$OUT/killed.log" 2>/dev/null || ! kill -0 $client 2>/dev/null && break; sleep 0.1
    done
    victim=$(pgrep -P "$generator" | tail -1)
    kill -9 "$victim"; killed_at=$EPOCHREALTIME
    wait $client; code=$?
    echo "rank pid $victim killed: the client exited $code after $($PY -c "import time; print(f'{time.time() - $killed_at:.2f}')") s: $(tail -1 "$OUT/killed.log")" \
        | tee -a "$OUT/concurrent.txt"
    for _ in $(seq 30); do kill -0 "$generator" 2>/dev/null || break; sleep 1; done
    kill -0 "$generator" 2>/dev/null && echo "torchrun still running 30 s after the kill" | tee -a "$OUT/concurrent.txt" \
        || { wait "$generator"; echo "torchrun exited with $? after the kill" | tee -a "$OUT/concurrent.txt"; }
fi

kill -INT "$gateway" "$encoder" "$decoder" "$generator" 2>/dev/null; wait "$gateway" "$encoder" "$decoder" 2>/dev/null
[ -n "${DRY_RUN:-}" ] || nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
{ $PY bench/mesh_summary.py "$OUT" "${names[@]}"; cat "$OUT/concurrent.txt"; } | tee "$OUT/summary.txt"
$PY bench/mesh_summary.py --bundle "$OUT" "${names[@]}" > "$OUT/mesh.json"
for s in generator encoder decoder gateway; do echo "== $s"; cat "$OUT/$s.log"; done > "$OUT/services.log"
for n in "${names[@]}" killed; do echo "== $n"; cat "$OUT/$n.log" 2>/dev/null; done > "$OUT/requests.log"
for n in "${names[@]}" killed; do rm -f "$OUT/$n.log" "$OUT/$n.json"; [ "$n" = hd1 ] || rm -f "$OUT/$n.mp4"; done
rm -f "$OUT"/{generator,encoder,decoder,gateway}.log "$OUT/concurrent.txt"
