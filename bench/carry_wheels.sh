#!/usr/bin/env bash
# Builds .whl/ (git-ignored) here, for the device machine's `carry`: the packages its image lacks
# (.library/device/KINDS.md lists what it holds), at the versions this checkout's .venv resolved from
# requirements.txt, as the bench scripts install them:
#   .whl/*.whl        diffusers (the VAE) and PyAV (the muxer, its wheel recompressed with LZMA so
#                     the carry stays under 64 MiB: the same files, pip reads it)  <- device_setup.sh
#   .whl/hub/         huggingface-hub, for an image whose copy is too old for diffusers
#   .whl/mesh/        the serving stack: gRPC health/reflection, OpenTelemetry, soundfile, and the
#                     grpcio/protobuf that avatar/v1 was generated with               <- serve_wheels.sh
#   .whl/cudnn/       the cuDNN frontend, for --fp8-attention                           <- serve_wheels.sh
#   .whl/webrtc/      aiortc and its needs, only with --webrtc (the WHEP benches)
# Usage: make setup && bash bench/carry_wheels.sh [--webrtc]; then name ".whl" (and "avatar/v1")
# in the device call's carry. Prints the carry's size; exits 1 if it is over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "carry_wheels: run 'make setup' first (versions come from .venv)" >&2; exit 2; }
WEBRTC=0
for arg in "$@"; do
    case "$arg" in
        --webrtc) WEBRTC=1 ;;
        *) echo "carry_wheels: unknown argument $arg (only --webrtc)" >&2; exit 2 ;;
    esac
done

version() {  # the version .venv holds of a distribution
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

fetch() {  # fetch DIR NAME[==VERSION]...: wheels for the device's Python 3.12 on x86-64 Linux
    local dir=$1
    shift
    mkdir -p "$dir"
    local specs=()
    for name in "$@"; do
        if [[ "$name" == *==* ]]; then specs+=("$name"); else specs+=("$name==$(version "$name")"); fi
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${specs[@]}" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    for spec in "${specs[@]}"; do  # pip download reports a miss only in its output: check the files
        local stem=${spec%%==*}
        stem=${stem//-/_}
        ls "$dir" | grep -qi "^${stem}-${spec##*==}-" || { echo "carry_wheels: no wheel for $spec" >&2; exit 1; }
    done
}

rm -rf .whl
fetch .whl diffusers importlib_metadata zipp av
fetch .whl/hub huggingface-hub
fetch .whl/mesh grpcio grpcio-health-checking grpcio-reflection protobuf \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
    opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common opentelemetry-proto \
    googleapis-common-protos soundfile cffi pycparser
fetch .whl/cudnn nvidia-cudnn-frontend==1.32.0
if [ "$WEBRTC" = 1 ]; then
    fetch .whl/webrtc aiortc aioice av==18.1.0 cryptography pyee pylibsrtp pyopenssl google-crc32c dnspython ifaddr
    rm -f .whl/webrtc/av-*.whl  # the one in .whl/ serves both
fi

# PyAV, LZMA-recompressed (its shared libraries shrink by a third)
av=$(ls .whl/av-*.whl)
"$PY" - "$av" <<'PY'
import os, sys, zipfile
src = sys.argv[1]
tmp = src + ".lzma"
with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as b:
    for info in a.infolist():
        b.writestr(info, a.read(info), compress_type=zipfile.ZIP_LZMA)
os.replace(tmp, src)
PY

size=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
gen=$(du -sb avatar/v1 2>/dev/null | cut -f1 || echo 0)
total=$((size + tree + gen))
printf 'carry_wheels: .whl %.1f MiB (+ tracked files and avatar/v1: %.1f MiB of the 64 MiB a call carries)\n' \
    "$(echo "$size / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
du -sh .whl/* | sort -h | tail -6
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "carry_wheels: over 64 MiB: a call carries .whl/webrtc (WHEP benches) or .whl/cudnn (--fp8-attention), not both: delete the other" >&2
    exit 1
fi
