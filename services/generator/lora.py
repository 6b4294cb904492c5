"""PEFT LoRA for the DiT: LiveAvatar's `liveavatar.safetensors` or any LoRA for this architecture.

Keys may carry peft's `base_model.model.` prefix and an adapter segment (`.default.`) or not
(peft's saved-adapter format). Every LoRA key must name a wrapped linear layer with matching
shapes, otherwise loading fails naming the keys (upstream loads non-strictly and silently skips
them). rank comes from the tensors; alpha and targets from an `adapter_config.json` beside the
file if there is one, else LiveAvatar's (alpha 64, q,k,v,o,ffn.0,ffn.2). Merged by default.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from avatar.checkpoints import read_safetensors_header
from avatar.errors import WeightsError

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer, LoraModel

PREFIX = "base_model.model."
ADAPTER = "default"
DEFAULT_ALPHA = 64.0
DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraPlan:
    """How a LoRA file's tensors map onto a model (names and shapes only, no data read)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    modules: dict[str, tuple[str, str]]  # module name -> (key of A, key of B)
    extra: dict[str, str] = field(default_factory=dict)  # non-LoRA key -> model parameter it sets
    ignored: list[str] = field(default_factory=list)  # non-LoRA keys that set nothing
    wrapped: int = 0  # linear layers the targets select in the model


@dataclass
class LoraReport:
    path: str
    plan: LoraPlan
    merged: bool
    handle: LoraModel | None = None  # kept when not merged: .merge_adapter() / .unmerge_adapter()

    @property
    def matched(self) -> int:
        return 2 * len(self.plan.modules)

    def describe(self) -> str:
        p = self.plan
        text = (
            f"LoRA {self.path}: {self.matched} tensors matched {len(p.modules)} of {p.wrapped} target layers "
            f"(rank {p.rank}, alpha {p.alpha:g}, {'merged' if self.merged else 'unmerged'})"
        )
        if p.extra:
            text += f"; {len(p.extra)} base tensors loaded"
        if p.ignored:
            text += f"; {len(p.ignored)} tensors ignored ({', '.join(p.ignored[:3])}...)"
        return text


def _sidecar_config(path: pathlib.Path) -> dict:
    cfg_path = path.parent / "adapter_config.json"
    if not cfg_path.exists():
        return {}
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{cfg_path}: not valid JSON ({e})") from e


def is_target(module: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the module's name is one of them or ends with
    "." + one (so "q" selects blocks.0.self_attn.q and audio_injector.injector.0.q alike)."""
    return any(module == t or module.endswith("." + t) for t in targets)


def plan_lora(
    model: torch.nn.Module,
    shapes: dict[str, tuple[int, ...]],
    *,
    source: str = "LoRA",
    rank: int | None = None,
    alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
) -> LoraPlan:
    """Match LoRA tensor names/shapes against the model (works on the meta device)."""
    prefixed = [k.startswith(PREFIX) for k in shapes]
    if any(prefixed) and not all(prefixed):
        raise WeightsError(f"{source}: some keys carry the {PREFIX!r} prefix and some do not")
    strip = len(PREFIX) if any(prefixed) else 0
    pairs: dict[str, dict[str, str]] = {}
    adapters, others = set(), []
    for key in shapes:
        m = _LORA_KEY.match(key[strip:])
        if m is None:
            others.append(key)
            continue
        adapters.add(m["adapter"])
        pairs.setdefault(m["module"], {})[m["ab"]] = key
    if not pairs:
        raise WeightsError(f"{source}: no LoRA tensors (names like '<module>.lora_A.default.weight')")
    if len(adapters) > 1:
        raise WeightsError(f"{source}: holds several adapters {sorted(map(str, adapters))}; expected one")
    half = sorted(f"{m}.lora_{'B' if 'A' in ab else 'A'}" for m, ab in pairs.items() if len(ab) != 2)
    if half:
        raise WeightsError(f"{source}: LoRA tensors without their pair: {', '.join(half[:5])}")
    ranks = {shapes[ab["A"]][0] for ab in pairs.values()}
    if len(ranks) != 1:
        raise WeightsError(f"{source}: LoRA ranks differ between layers ({sorted(ranks)}); not supported")
    file_rank = ranks.pop()
    if rank is not None and rank != file_rank:
        raise WeightsError(f"{source}: rank {file_rank} in the tensors, but the adapter config says {rank}")
    targets = tuple(targets or DEFAULT_TARGETS)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = {n for n in linears if is_target(n, targets)}
    unmatched, bad = [], []
    for module, ab in sorted(pairs.items()):
        if module not in wrapped:
            unmatched.append(ab["A"])
            continue
        lin = linears[module]
        want_a, want_b = (file_rank, lin.in_features), (lin.out_features, file_rank)
        if tuple(shapes[ab["A"]]) != want_a or tuple(shapes[ab["B"]]) != want_b:
            bad.append(
                f"{module}: A {tuple(shapes[ab['A']])} B {tuple(shapes[ab['B']])}, expected A {want_a} B {want_b}"
            )
    if unmatched:
        raise WeightsError(
            f"{source}: {len(unmatched)} LoRA key(s) match no {'/'.join(targets)} linear layer "
            f"of the model: {', '.join(unmatched[:5])}"
        )
    if bad:
        raise WeightsError(f"{source}: {len(bad)} LoRA shape mismatch(es): {'; '.join(bad[:5])}")
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    extra, ignored = {}, []
    for key in others:
        name = key[strip:]
        module = name.rsplit(".", 1)[0]
        if ".base_layer." in name:  # peft's name of a wrapped layer's own weight
            name = name.replace(".base_layer.", ".")
        elif module in wrapped:  # upstream: renamed under peft, so never loaded
            ignored.append(key)
            continue
        if params.get(name) == tuple(shapes[key]):
            extra[key] = name
        else:
            ignored.append(key)
    return LoraPlan(
        rank=file_rank,
        alpha=float(alpha or DEFAULT_ALPHA),
        targets=targets,
        modules={m: (ab["A"], ab["B"]) for m, ab in pairs.items()},
        extra=extra,
        ignored=ignored,
        wrapped=len(wrapped),
    )


def load_lora(
    model: torch.nn.Module,
    path: str | pathlib.Path,
    *,
    merge: bool = True,
    rank: int | None = None,
    alpha: float | None = None,
) -> LoraReport:
    """Wrap the model's target layers with peft LoRA, load the file, merge (default) and unload.

    With merge=False the LoRA layers stay (report.handle can merge_adapter()/unmerge_adapter()).
    """
    from peft import LoraConfig  # imported here: planning a LoRA needs no peft
    from peft.tuners.lora import LoraModel

    path = pathlib.Path(path)
    shapes = {k: shape for k, (shape, _) in read_safetensors_header(path).items()}
    side = _sidecar_config(path)
    plan = plan_lora(
        model,
        shapes,
        source=str(path),
        rank=rank if rank is not None else side.get("r"),
        alpha=alpha if alpha is not None else side.get("lora_alpha"),
        targets=tuple(side["target_modules"]) if isinstance(side.get("target_modules"), list) else None,
    )
    cfg = LoraConfig(
        r=plan.rank,
        lora_alpha=plan.alpha,
        target_modules=list(plan.targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    params = dict(model.named_parameters())
    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        for key, name in plan.extra.items():  # before wrapping, while the names are plain
            params[name].copy_(f.get_tensor(key))
        handle = LoraModel(model, cfg, ADAPTER)
        layers = dict(model.named_modules())
        for layer in lora_layers(model):  # float32 adapters, as peft's get_peft_model keeps them
            layer.lora_A[ADAPTER].float()
            layer.lora_B[ADAPTER].float()
        for module, (key_a, key_b) in plan.modules.items():
            layers[module].lora_A[ADAPTER].weight.copy_(f.get_tensor(key_a))
            layers[module].lora_B[ADAPTER].weight.copy_(f.get_tensor(key_b))
    if merge:
        handle.merge_and_unload()
        return LoraReport(str(path), plan, merged=True)
    return LoraReport(str(path), plan, merged=False, handle=handle)


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]
