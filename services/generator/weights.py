"""Building and loading the DiT: presets, upstream config.json, sharded safetensors, random weights.

Loading is lazy: the model is built on the meta device, then each shard is opened with
safetensors (mmap) and its tensors assigned into the model (`load_state_dict(assign=True)`),
cast to the target dtype/device one tensor at a time, so two full copies never exist in RAM.
"""

from __future__ import annotations

import inspect
import json
import logging
import pathlib

import torch
from safetensors import safe_open

from avatar.checkpoints import DIT_CONFIG, DIT_INDEX, read_safetensors_header, read_shard_index, resolve_ckpt_dir
from avatar.errors import WeightsError
from avatar.services.generator.causal_s2v_dit import PRESETS, CausalS2VDiT

log = logging.getLogger(__name__)

SINGLE_NAME = "diffusion_pytorch_model.safetensors"

# Upstream config.json switches for variants we do not implement: the value each must have.
_REQUIRED = {
    "model_type": "s2v",
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "enable_framepack": True,
    "enable_motioner": False,
    "zero_timestep": True,
    "add_last_motion": True,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "qk_norm": True,
    "cross_attn_norm": True,
    "window_size": [-1, -1],
    "local_attn_size": -1,
}
_CONSTRUCTOR_KEYS = set(inspect.signature(CausalS2VDiT.__init__).parameters) - {"self"}


def dit_config(preset_or_config: str | dict) -> dict:
    """Constructor arguments from a preset name ("tiny", "s2v-14b") or a config dict (e.g. an
    upstream config.json: keys we do not take are ignored and logged; unsupported variants fail)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown DiT preset {preset_or_config!r}; known: {', '.join(PRESETS)}")
        return dict(PRESETS[preset_or_config])
    cfg = dict(preset_or_config)
    for key, want in _REQUIRED.items():
        if key in cfg and _normal(cfg[key]) != _normal(want):
            raise WeightsError(f"config {key}={cfg[key]!r} is not supported (this DiT implements {key}={want!r})")
    ignored = sorted(k for k in cfg if k not in _CONSTRUCTOR_KEYS and not k.startswith("_"))
    if ignored:
        log.info("DiT config: ignoring keys %s", ", ".join(ignored))
    return {k: v for k, v in cfg.items() if k in _CONSTRUCTOR_KEYS}


def _normal(v):
    return list(v) if isinstance(v, tuple) else v


def build_dit(
    preset_or_config: str | dict = "s2v-14b", device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
) -> CausalS2VDiT:
    """The DiT with uninitialised weights on `device` (meta: names and shapes only, no memory).

    Built on the meta device and cast there, then allocated once on `device` in `dtype`: a
    full-size model never exists in float32 or on the CPU on its way to the GPU.
    """
    cfg = dit_config(preset_or_config)
    with torch.device("meta"):
        model = CausalS2VDiT(**cfg)
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast.
    model = torch.nn.Module.to(model, dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
    return model.eval().requires_grad_(False)


def random_dit(
    preset_or_config: str | dict, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> CausalS2VDiT:
    """Random weights, deterministic from `seed`, created directly on `device` (no CPU round trip)."""
    model = build_dit(preset_or_config, device=device, dtype=dtype)
    return model.init_random(seed)


def read_dit_config(ckpt_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(ckpt_dir) / DIT_CONFIG
    try:
        return dit_config(json.loads(path.read_text()))
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: missing (is --ckpt_dir the Wan2.2-S2V-14B folder?)") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    except TypeError as e:
        raise WeightsError(f"{path}: not a config object ({e})") from e


def checkpoint_files(ckpt_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> shard path, from the index json (or the single unsharded file)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    index = ckpt_dir / DIT_INDEX
    if index.exists():
        files = {name: ckpt_dir / shard for name, shard in read_shard_index(index).items()}
    elif (ckpt_dir / SINGLE_NAME).exists():
        files = {name: ckpt_dir / SINGLE_NAME for name in read_safetensors_header(ckpt_dir / SINGLE_NAME)}
    else:
        raise WeightsError(f"{ckpt_dir}: neither {DIT_INDEX} nor {SINGLE_NAME} found")
    for shard in sorted(set(files.values())):
        if not shard.exists():
            raise WeightsError(f"{shard}: listed in {index.name} but missing")
    return files


def check_dit_files(model: CausalS2VDiT, ckpt_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Compare the checkpoint's names and shapes (headers only) with the model; WeightsError on any
    missing, unexpected or mis-shaped tensor, naming the tensors and files."""
    files = checkpoint_files(ckpt_dir)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    headers = {}
    for shard in sorted(set(files.values())):
        headers.update({k: (shape, shard) for k, (shape, _) in read_safetensors_header(shard).items()})
    problems = []
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    listed_elsewhere = sorted(k for k in files if k in headers and headers[k][1] != files[k])
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} tensor(s): {_few(unexpected)} "
            f"(in {_few(sorted({headers[k][1].name for k in unexpected}))})"
        )
    if listed_elsewhere:
        problems.append(f"index lists {_few(listed_elsewhere)} in another shard than the one holding it")
    bad = [
        f"{k} is {headers[k][0]} in {headers[k][1].name}, expected {expected[k]}"
        for k in sorted(expected)
        if k in headers and headers[k][0] != expected[k]
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_few(bad)}")
    if problems:
        raise WeightsError(f"DiT checkpoint {ckpt_dir} does not match the model: " + "; ".join(problems))
    return {k: headers[k][1] for k in expected}


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def load_dit(
    ckpt_dir: str | pathlib.Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> CausalS2VDiT:
    """The DiT from an upstream-layout folder (config.json + sharded safetensors), strict.
    `ckpt_dir` may be that folder or the one above it, as for every other component."""
    ckpt_dir = resolve_ckpt_dir(ckpt_dir).root
    model = build_dit(read_dit_config(ckpt_dir), device="meta", dtype=dtype)
    where = check_dit_files(model, ckpt_dir)
    by_shard: dict[pathlib.Path, list[str]] = {}
    for name, shard in where.items():
        by_shard.setdefault(shard, []).append(name)
    device = torch.device(device)
    for shard, names in sorted(by_shard.items()):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                part = {n: f.get_tensor(n).to(device=device, dtype=dtype) for n in names}
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise WeightsError(f"{shard}: cannot read tensors ({e})") from e
        model.load_state_dict(part, strict=False, assign=True)
        del part
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise WeightsError(f"DiT checkpoint {ckpt_dir}: no data loaded for {_few(left)}")
    return model.eval().requires_grad_(False)
