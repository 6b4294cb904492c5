# Source on the GPU machine: installs the carried wheels (.whl/, see docs/performance.md) into
# /tmp/site and checks that the VAE (diffusers) and the muxer (PyAV) import.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# The import root `avatar` spans avatar/, services/, gateway/ and app/ (pyproject.toml): link them
# under one folder, as an installed wheel has them.
# link_avatar_tree DIR does it for another checkout (bench/engine_ab_gpu.sh: an earlier commit's tree).
link_avatar_tree() {
    rm -rf /tmp/src && mkdir -p /tmp/src/avatar && ln -s "$1"/avatar/* /tmp/src/avatar/ \
        && for d in services gateway app; do ln -s "$1/$d" "/tmp/src/avatar/$d"; done
}
link_avatar_tree "$PWD" || return 1
# PYTHONSAFEPATH: `python3 -m` must not put the repo root (its avatar/ alone) before /tmp/src.
export PYTHONPATH=/tmp/site:/tmp/src PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if ! python3 -c "import diffusers.models.autoencoders.autoencoder_kl_wan" 2>/tmp/diffusers_err; then
    tail -2 /tmp/diffusers_err
    echo "diffusers needs a newer huggingface-hub: installing .whl/hub"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/hub/*.whl || return 1
fi
python3 - <<'PY'
import importlib
for m in ("torch", "triton", "diffusers", "av", "huggingface_hub", "transformers", "safetensors", "numpy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:200])
PY
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,power.limit --format=csv,noheader
