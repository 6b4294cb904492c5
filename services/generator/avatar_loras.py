"""Per-avatar LoRAs: registered at start-up, chosen per session, applied unmerged beside the base.

The base DiT (bf16 or FP8 linears, with `--lora_path` merged as upstream) is shared by every
session and never changes. A registered LoRA is validated at registration from its header
alone (the LiveAvatar layout: every q,k,v,o,ffn.0,ffn.2 linear its targets select, one rank,
shapes that fit), and loaded onto the device when a session first asks for it; at most
`max_loras` are held, the least recently used one that no session renders with is dropped
for a newcomer.

How a LoRA reaches the layers: forward hooks on the target linears add the low-rank delta
x @ A^T @ (scale * B)^T of the LoRA active in the calling thread (`active(lora)`, set by the
session around its own model calls). Nothing is merged into shared weights, so sessions of
different LoRAs may run at once on one generator, and a "switch" costs only loading the
LoRA's tensors when it is not held yet. Generators without registered LoRAs have no hooks:
their forward is exactly the one without this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import pathlib
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from avatar.checkpoints import read_safetensors_header
from avatar.errors import InvalidInput, ResourceExhausted, WeightsError
from avatar.presets import LORA_ID
from avatar.services.generator.lora import LoraPlan, _sidecar_config, is_target, plan_lora

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")

NOT_SERVED = "this generator serves no per-avatar LoRAs (start it with --avatar-lora NAME=PATH)"
_ACTIVE: contextvars.ContextVar[AvatarLora | None] = contextvars.ContextVar("avatar_lora", default=None)


def check_name(name: str) -> str:
    if not LORA_ID.match(name):
        raise WeightsError(
            f"avatar LoRA name {name[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-' (first a letter or digit)"
        )
    return name


@dataclass
class AvatarLora:
    """One registered LoRA; `weights` is set while it is held on the device."""

    name: str
    path: pathlib.Path
    plan: LoraPlan
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # module -> (A [r, in], scale*B [out, r])
    sessions: int = 0  # sessions rendering with it now: it stays loaded until they end
    nbytes: int = 0

    @property
    def scale(self) -> float:
        return self.plan.alpha / self.plan.rank


def plan_avatar_lora(name: str, path: str | pathlib.Path, meta_dit: torch.nn.Module) -> AvatarLora:
    """Validates a LoRA file against the DiT (names and shapes, from the header: no tensor read).

    Stricter than `--lora_path`: the file must cover every layer its targets select (the 896
    keys of LiveAvatar's layout for the 14B), be complete on disk, and hold nothing but LoRA
    pairs, since base tensors would change the model every other avatar shares."""
    check_name(name)
    path = pathlib.Path(path).expanduser()
    source = f"avatar LoRA {name} ({path})"
    if not path.is_file():
        raise WeightsError(f"{source}: no such file")
    try:
        header = read_safetensors_header(path)
    except WeightsError as e:  # names the file already
        raise WeightsError(f"avatar LoRA {name}: {e}") from None
    _check_complete(path, source)
    odd = sorted(k for k, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES)
    if odd:
        raise WeightsError(f"{source}: tensors of dtype {header[odd[0]][1]} ({odd[0]}); LoRAs are float")
    side = _sidecar_config(path)
    try:
        plan = plan_lora(
            meta_dit,
            {k: shape for k, (shape, _) in header.items()},
            source=source,
            rank=side.get("r"),
            alpha=side.get("lora_alpha"),
            targets=tuple(side["target_modules"]) if isinstance(side.get("target_modules"), list) else None,
        )
    except (TypeError, ValueError) as e:  # an adapter_config.json with values of the wrong type
        raise WeightsError(f"{source}: adapter_config.json does not fit ({e})") from e
    if len(plan.modules) != plan.wrapped:
        linears = [n for n, m in meta_dit.named_modules() if isinstance(m, torch.nn.Linear)]
        missing = sorted(n for n in linears if is_target(n, plan.targets) and n not in plan.modules)
        raise WeightsError(
            f"{source}: {2 * len(plan.modules)} LoRA tensors cover {len(plan.modules)} of the {plan.wrapped} "
            f"{','.join(plan.targets)} layers (expected {2 * plan.wrapped} tensors); missing: {', '.join(missing[:4])}"
        )
    if plan.extra:
        raise WeightsError(
            f"{source}: holds {len(plan.extra)} base-model tensor(s) ({', '.join(sorted(plan.extra)[:3])}); "
            f"an avatar LoRA may hold only lora_A/lora_B pairs (base tensors would change every avatar): "
            f"merge it at start-up with --lora_path instead"
        )
    if plan.ignored:
        log.info("%s: %d non-LoRA tensors ignored, as upstream does", source, len(plan.ignored))
    return AvatarLora(name, path, plan)


def _check_complete(path: pathlib.Path, source: str) -> None:
    """The file holds every byte its header promises (a partly copied file fails here, not mid-session)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise WeightsError(f"{source}: truncated ({size} bytes, the header describes {8 + n + end})")


@contextlib.contextmanager
def active(lora: AvatarLora | None):
    """Model calls in this block (this thread) run with `lora`'s delta; None: the base alone."""
    token = _ACTIVE.set(lora)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _delta_hook(module_name: str):
    def hook(module, args, output):
        lora = _ACTIVE.get()
        if lora is None or lora.weights is None:
            return None
        ab = lora.weights.get(module_name)
        if ab is None:
            return None
        a, b = ab
        x = args[0]
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.device, a.dtype), a), b)
        return output + delta.to(output.device, output.dtype)

    return hook


class LoraLease:
    """A session's hold on a loaded LoRA: it stays on the device until release() (idempotent)."""

    def __init__(self, bank: LoraBank, lora: AvatarLora):
        self.bank, self.lora = bank, lora
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.bank._release(self.lora)


class LoraBank:
    """The registered avatar LoRAs of one generator and the ones held on its device (LRU, pinned
    while sessions use them). Thread-safe: sessions open from worker threads."""

    def __init__(self, max_loras: int, device: torch.device, dtype: torch.dtype):
        if max_loras < 1:
            raise InvalidInput(f"--max-loras must be at least 1, got {max_loras}")
        self.max_loras, self.device, self.dtype = max_loras, torch.device(device), dtype
        self.registered: dict[str, AvatarLora] = {}
        self._held: OrderedDict[str, AvatarLora] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.loads = self.evictions = 0
        self._hooks: list = []
        # imported with a bank: the engine alone (the GPU benches) needs neither grpc nor prometheus_client
        from avatar import metrics

        self.metrics = metrics

    def register(self, name: str, path: str | pathlib.Path, meta_dit: torch.nn.Module) -> AvatarLora:
        """Validates and registers (WeightsError naming the problem); nothing is loaded yet."""
        if name in self.registered:
            raise WeightsError(f"avatar LoRA {name} is registered twice")
        lora = plan_avatar_lora(name, path, meta_dit)
        self.registered[name] = lora
        log.info(
            "avatar LoRA %s: %s, %d tensors, rank %d, alpha %g",
            name,
            lora.path,
            2 * len(lora.plan.modules),
            lora.plan.rank,
            lora.plan.alpha,
        )
        return lora

    def attach(self, dit: torch.nn.Module) -> int:
        """Hooks the linears any registered LoRA targets (FP8 or not); returns their count."""
        targets = set().union(*(lora.plan.modules for lora in self.registered.values()))
        for name in sorted(targets):
            self._hooks.append(dit.get_submodule(name).register_forward_hook(_delta_hook(name)))
        self.metrics.LORAS_LOADED.set(0)
        return len(targets)

    def detach(self) -> None:
        """Removes the hooks: the model's forward is the plain one again (the bench's baseline)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def known(self) -> list[str]:
        return sorted(self.registered)

    def loaded(self) -> list[str]:
        """Held on the device now, most recently used first."""
        with self._lock:
            return list(reversed(self._held))

    def in_use(self) -> dict[str, int]:
        with self._lock:
            return {n: lora.sessions for n, lora in self.registered.items() if lora.sessions}

    def acquire(self, name: str) -> LoraLease:
        """The LoRA `name`, loaded if it is not held (dropping the least recently used idle one
        when `max_loras` are held), pinned until release(). InvalidInput for an unknown name,
        ResourceExhausted when every held LoRA is in use by a session."""
        lora = self.registered.get(name)
        if lora is None:
            known = ", ".join(self.known()) or "none"
            raise InvalidInput(f"unknown lora_id {name[:80]!r}: this generator serves {known}")
        with self._lock:
            if name in self._held:
                self._held.move_to_end(name)
            else:
                self._make_room(name)
                self._load(lora)
                self._held[name] = lora
                self.metrics.LORAS_LOADED.set(len(self._held))
            lora.sessions += 1
            self.metrics.LORA_SESSIONS.labels(name).inc()
            return LoraLease(self, lora)

    def _release(self, lora: AvatarLora) -> None:
        with self._lock:
            lora.sessions -= 1

    def _make_room(self, name: str) -> None:
        while len(self._held) >= self.max_loras:
            idle = next((n for n, lora in self._held.items() if lora.sessions == 0), None)
            if idle is None:
                raise ResourceExhausted(
                    f"lora_id {name!r} is not loaded and all {self.max_loras} loaded LoRAs "
                    f"({', '.join(self._held)}) are in use by sessions; retry when one ends, or raise --max-loras"
                )
            dropped = self._held.pop(idle)
            dropped.weights, dropped.nbytes = None, 0
            self.evictions += 1
            self.metrics.LORA_EVICTIONS.inc()
            log.info("avatar LoRA %s dropped for %s (LRU, --max-loras %d)", idle, name, self.max_loras)

    def _load(self, lora: AvatarLora) -> None:
        start = time.perf_counter()
        weights, nbytes = {}, 0
        try:
            with torch.no_grad(), safe_open(str(lora.path), framework="pt", device="cpu") as f:
                for module, (key_a, key_b) in lora.plan.modules.items():
                    a = f.get_tensor(key_a).to(self.device, self.dtype)
                    # scale folded into B once: the forward adds x A^T (sB)^T
                    b = (f.get_tensor(key_b).float() * lora.scale).to(self.device, self.dtype)
                    weights[module] = (a.contiguous(), b.contiguous())
                    nbytes += a.nbytes + b.nbytes
        except (OSError, RuntimeError) as e:  # the file changed or vanished since registration
            raise WeightsError(f"avatar LoRA {lora.name} ({lora.path}): cannot load ({e})") from e
        lora.weights, lora.nbytes = weights, nbytes
        self.loads += 1
        seconds = time.perf_counter() - start
        self.metrics.LORA_LOADS.labels(lora.name).inc()
        self.metrics.LORA_LOAD_SECONDS.observe(seconds)
        log.info("avatar LoRA %s loaded in %.2f s (%.1f MiB)", lora.name, seconds, nbytes / 2**20)


@dataclass
class LoraStatus:
    """What LorasReply carries."""

    registered: list[str]
    loaded: list[str]
    max_loras: int
    in_use: dict[str, int] = field(default_factory=dict)
    loads: int = 0
    evictions: int = 0


def status(bank: LoraBank | None) -> LoraStatus:
    if bank is None:
        return LoraStatus([], [], 0)
    return LoraStatus(bank.known(), bank.loaded(), bank.max_loras, bank.in_use(), bank.loads, bank.evictions)
