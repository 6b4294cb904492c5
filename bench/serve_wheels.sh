# Sourced by the mesh benches on the device machine: device_setup.sh (the wheels of the model
# stack), then the serving stack (.whl/mesh/*.whl), the cuDNN frontend (.whl/cudnn, for
# --fp8-attention) and aiortc (.whl/webrtc, for the WHEP benches) where carried.
source bench/device_setup.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mesh/*.whl || return 1
for extra in cudnn webrtc; do
    if [ -d .whl/$extra ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/$extra/*.whl || return 1
    fi
done
