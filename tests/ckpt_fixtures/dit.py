"""Tiny DiT and LoRA checkpoints in the exact upstream layout (file names, key names, bf16).

`write_dit_checkpoint` writes what `Wan2.2-S2V-14B/` holds for the DiT: config.json (upstream's
keys, tiny values, plus keys our constructor does not take), shards named
diffusion_pytorch_model-0000N-of-0000M.safetensors and diffusion_pytorch_model.safetensors.index.json.
`write_lora` writes a peft LoRA like liveavatar.safetensors (with or without `base_model.model.`).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from avatar.services.generator.causal_s2v_dit import CausalS2VDiT
from avatar.services.generator.lora import DEFAULT_TARGETS, PREFIX
from avatar.services.generator.weights import random_dit

# What upstream's config.json carries besides the sizes (values of the 14B config).
UPSTREAM_EXTRA = {
    "_class_name": "WanModel_S2V",
    "_diffusers_version": "0.35.0",
    "model_type": "s2v",
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "zero_init": True,
    "zero_timestep": True,
    "enable_motioner": False,
    "add_last_motion": True,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "motion_token_num": 1024,
    "enable_framepack": True,
    "framepack_drop_mode": "padd",
}


def write_dit_checkpoint(
    folder: str | pathlib.Path, seed: int = 0, num_shards: int = 2, model: CausalS2VDiT | None = None
) -> CausalS2VDiT:
    """Write a tiny random DiT (bf16) into `folder`; returns the float32 model it came from."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else random_dit("tiny", "cpu", torch.float32, seed=seed)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    (folder / "config.json").write_text(json.dumps({**UPSTREAM_EXTRA, **cfg}, indent=2))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return model


def write_lora(
    path: str | pathlib.Path,
    model: torch.nn.Module,
    rank: int = 4,
    seed: int = 1,
    prefix: bool = True,
    adapter_segment: bool = True,
    scale: float = 0.05,
) -> dict[str, torch.Tensor]:
    """A random LoRA on every q,k,v,o,ffn.0,ffn.2 linear of `model`, named as peft names them."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in sorted(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or not name.endswith(tuple("." + t for t in DEFAULT_TARGETS)):
            continue
        seg = ".default" if adapter_segment else ""
        pre = PREFIX if prefix else ""
        tensors[f"{pre}{name}.lora_A{seg}.weight"] = torch.randn(rank, mod.in_features, generator=gen) * scale
        tensors[f"{pre}{name}.lora_B{seg}.weight"] = torch.randn(mod.out_features, rank, generator=gen) * scale
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny-model tests run faster on one torch thread (2 shared cores: extra threads only spin);
    import this into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fail_holding_a_cache_view(monkeypatch, model, method: str, kv, run) -> BaseException:
    """Makes `model.<method>` fail with a view of the KV cache in its frame (as the real layers
    hold one), calls `run()` with garbage collection off, and checks that the error, still held,
    no longer keeps the cache's storage alive. Returns the error."""
    import gc
    import weakref

    storage = weakref.ref(kv.keys)

    def failing(*args, **kwargs):
        layer_keys = kv.keys[0, 0]
        raise RuntimeError(f"kernel failed on {tuple(layer_keys.shape)}")

    monkeypatch.setattr(model, method, failing)
    gc.disable()  # no collection may rescue it: the error is held below
    try:
        with pytest.raises(RuntimeError, match="kernel failed") as failure:
            run()
        assert storage() is None, "the traceback kept the KV cache alive"
        assert failure.value is not None
        return failure.value
    finally:
        gc.enable()
