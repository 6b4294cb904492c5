# Sourced by the mesh benches (mesh_gpu.sh, converse_gpu.sh) on the device machine: the carried
# wheels (device_setup.sh, then .whl/mesh/*.whl, the serving stack), then `avatar serve` with
# full-size random weights on 127.0.0.1:50051 and the arguments given (its log: $OUT/serve.log),
# waiting until it reports SERVING (with --compile, after its warm-up). Sets $server (its pid).
source bench/device_setup.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mesh/*.whl || return 1
mkdir -p "$OUT"
python3 -m avatar.app.cli serve --random-weights --device cuda --listen 127.0.0.1:50051 "$@" > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 480); do
    python3 -m avatar.app.healthcheck 127.0.0.1:50051 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -30 "$OUT/serve.log"; return 1; }
    sleep 1
done
echo "server ready after ${SECONDS}s"
