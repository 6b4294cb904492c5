# Sourced like serve_gpu.sh, but each service in its own process on the same GPU (issue 13: "the
# GIL of one process serves four services"): encoder :50052, generator :50053, decoder :50054
# behind an internal token, the gateway on 127.0.0.1:50051. The arguments go to every role (model
# flags such as --compile or --fp8 mean the same to each). Logs: $OUT/serve-ROLE.log; sets
# $server (the gateway's pid) and $servers (all four).
source bench/device_setup.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mesh/*.whl || return 1
mkdir -p "$OUT"
token=split-$RANDOM$RANDOM
servers=""
role() {   # role, port, extra flags
    local name=$1 port=$2; shift 2
    python3 -m avatar.app.cli serve --role "$name" --listen 127.0.0.1:$port ${SERVE_MODEL:---random-weights --device cuda} \
        --internal-token $token "$@" > "$OUT/serve-$name.log" 2>&1 &
    servers="$servers $!"
}
wait_serving() {   # port, pid
    for _ in $(seq 480); do
        python3 -m avatar.app.healthcheck 127.0.0.1:$1 >/dev/null 2>&1 && return 0
        kill -0 $2 2>/dev/null || return 1
        sleep 1
    done
    return 1
}
# The generator first: its memory plan reads the free memory, and it is the one that needs it.
role generator 50053 "$@"; wait_serving 50053 ${servers##* } || { tail -30 "$OUT/serve-generator.log"; return 1; }
role encoder 50052 "$@"
role decoder 50054 "$@"
role gateway 50051 --encoder 127.0.0.1:50052 --generator 127.0.0.1:50053 --decoder 127.0.0.1:50054 "$@"
server=${servers##* }
for p in 50052 50054 50051; do
    wait_serving $p $server || { tail -30 "$OUT"/serve-*.log; return 1; }
done
echo "split server ready after ${SECONDS}s"
