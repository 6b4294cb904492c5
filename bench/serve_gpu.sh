# Sourced by the mesh benches (mesh_gpu.sh, converse_gpu.sh) on the device machine: the carried
# wheels (serve_wheels.sh), then `avatar serve` with
# full-size random weights on 127.0.0.1:50051 and the arguments given (its log: $OUT/serve.log),
# waiting until it reports SERVING (with --compile, after its warm-up). Sets $server (its pid) and
# defines request NAME FLAGS...: one `avatar generate --server` with /tmp/portrait.png
# (bench/hd_portrait.py) and the sample speech, into $OUT/NAME.{mp4,json,log}, and mesh_requests:
# the four requests hd1 hd2 hd3 sd4 that mesh_gpu.sh, round_gpu.sh and soak_gpu.sh send.
# `--decoder full|light` picks the latent decoder (serve's --latent-decoder; serve's own --decoder
# is a peer address, meaningless for the one-process mesh), e.g. `bash bench/mesh_gpu.sh --decoder light`.
source bench/serve_wheels.sh || return 1
mkdir -p "$OUT"
serve_args=()
while (($#)); do
    case $1 in
        --decoder) serve_args+=(--latent-decoder "${2:-}"); shift; (($#)) && shift ;;
        --decoder=*) serve_args+=(--latent-decoder "${1#*=}"); shift ;;
        *) serve_args+=("$1"); shift ;;
    esac
done
python3 -m avatar.app.cli serve --random-weights --device cuda --listen 127.0.0.1:50051 ${serve_args[@]+"${serve_args[@]}"} \
    > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 480); do
    python3 -m avatar.app.healthcheck 127.0.0.1:50051 >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { tail -30 "$OUT/serve.log"; return 1; }
    sleep 1
done
echo "server ready after ${SECONDS}s"

mesh_requests() {   # the mesh benches' four: 704*384 with a new portrait, the same twice more, 384*256 at 4 steps
    request hd1 --preset hd
    request hd2 --preset hd
    request hd3 --preset hd
    request sd4 --size 384*256 --sample_steps 4
}

request() {   # name, then generate's flags
    local name=$1; shift
    timeout 300 python3 -m avatar.app.cli generate --server 127.0.0.1:50051 --image /tmp/portrait.png \
        --audio assets/speech.wav --out "$OUT/$name.mp4" "$@" 2> "$OUT/$name.log" \
        || { tail -5 "$OUT/$name.log"; tail -20 "$OUT/serve.log"; }
}
