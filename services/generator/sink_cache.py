"""Sinks kept by their inputs, so a returning portrait skips its sink's forward.

A session starts by running the reference and motion tokens through every layer at t=0 (the
sink: 2640 tokens at 704*384 where a block has 3168; one forward of the DiT on the first
fragment's path). What it writes depends only on the portrait's latents, the prompt and the
model, so a session whose inputs equal a recent one's copies that session's sink into its cache
instead (a device copy of 1.08 GB at 704*384 with the FP8 cache) and gets the same bits.
Base-model sessions only: an avatar LoRA changes the sink. The sink refresh after the first clip
(the first generated frame as reference) is per session and always runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from avatar.services.generator.kv_cache import KVCache

KEPT_SINKS = 2  # the last portraits' sinks; dropped with the kept slots when a session needs memory


@dataclass
class _Sink:
    key: tuple  # the cache's shapes and dtype
    inputs: tuple[torch.Tensor, ...]  # ref latent, motion latents, text embeddings as the session got them (host)
    tensors: tuple[torch.Tensor, ...]  # KVCache.sink() (device)

    @property
    def nbytes(self) -> int:
        """The device memory it holds (its inputs are kept on the host: a few MB)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def matches(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> bool:
        return self.key == key and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(self.inputs, inputs)
        )


class SinkCache:
    def __init__(self, size: int = KEPT_SINKS):
        self.size = size
        self._sinks: list[_Sink] = []  # most recently used last
        self._lock = threading.Lock()
        self.hits = 0

    def restore(self, kv: KVCache, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Copies the kept sink of these inputs into `kv` (every group's copy); False: none kept.
        The inputs are matched on the host (as they come over the wire): no wait for the device,
        where torch.equal would sync once per input."""
        inputs = _on_host(inputs)
        key = _key(kv)
        with self._lock:
            found = next((s for s in reversed(self._sinks) if s.matches(key, inputs)), None)
            if found is None:
                return False
            self._sinks.remove(found)
            self._sinks.append(found)
            self.hits += 1
        kv.load_sink(found.tensors)
        return True

    def keep(self, kv: KVCache, inputs: tuple[torch.Tensor, ...]) -> None:
        """Keeps the sink `kv` was just prefilled with, for sessions with equal inputs (host
        tensors: compared without waiting for the device)."""
        kept = _Sink(_key(kv), tuple(t.clone() for t in _on_host(inputs)), kv.sink())
        with self._lock:
            self._sinks = [s for s in self._sinks if not s.matches(kept.key, kept.inputs)] + [kept]
            del self._sinks[: -self.size]

    def clear(self) -> int:
        """Drops every kept sink; returns their bytes."""
        with self._lock:
            dropped, self._sinks = self._sinks, []
        return sum(s.nbytes for s in dropped)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._sinks)


def _on_host(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().cpu() for t in inputs)


def _key(kv: KVCache) -> tuple:
    s = kv.spec
    return (s.num_layers, s.num_heads, s.head_dim, s.frame_tokens, s.sink_tokens, s.batch, kv.dtype, kv.keys.device)
