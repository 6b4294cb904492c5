"""KV cache of the causal DiT: a sink (reference + motion tokens) and ring buffers one clip long.

Memory is fixed when the cache is created: blocks are written into a ring of `window_frames`
latent frames (one clip), so it does not grow with the length of the video. With timestep
forcing (upstream's single-GPU path) there is one ring per sampling step ("cache set"); with a
single set the engine re-encodes each finished block at t=0 (clean context) into it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Shapes of a KV cache, all derived from the model config and the latent size."""
    num_layers: int
    num_heads: int
    head_dim: int
    frame_tokens: int       # tokens of one latent frame
    window_frames: int      # latent frames the ring holds (one clip)
    sink_tokens: int        # reference + motion tokens
    num_sets: int = 1       # rings: 1, or one per sampling step (timestep forcing)
    batch: int = 1

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "head_dim", "frame_tokens", "window_frames", "sink_tokens",
                     "num_sets", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def for_model(cls, model, latent_h: int, latent_w: int, window_frames: int, num_sets: int = 1,
                  batch: int = 1) -> "KVCacheSpec":
        cfg = model.config
        return cls(num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.dim // cfg.num_heads,
                   frame_tokens=model.frame_tokens(latent_h, latent_w), window_frames=window_frames,
                   sink_tokens=model.sink_tokens(latent_h, latent_w), num_sets=num_sets, batch=batch)

    @property
    def ring_tokens(self) -> int:
        return self.window_frames * self.frame_tokens

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes the cache takes: keys and values of every ring and of the sink."""
        per_token = 2 * self.num_layers * self.batch * self.num_heads * self.head_dim * dtype.itemsize
        return per_token * (self.num_sets * self.ring_tokens + self.sink_tokens)


class KVCache:
    """ring_k/ring_v [sets, layers, B, ring_tokens, H, D] hold rotated keys of generated blocks;
    sink_k/sink_v [layers, B, sink_tokens, H, D] hold the sink's keys *unrotated*, because the
    reference token's RoPE frame moves with the current block."""

    def __init__(self, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device | str):
        self.spec = spec
        s = spec
        ring = (s.num_sets, s.num_layers, s.batch, s.ring_tokens, s.num_heads, s.head_dim)
        sink = (s.num_layers, s.batch, s.sink_tokens, s.num_heads, s.head_dim)
        self.ring_k = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_v = torch.zeros(ring, dtype=dtype, device=device)
        self.sink_k = torch.zeros(sink, dtype=dtype, device=device)
        self.sink_v = torch.zeros(sink, dtype=dtype, device=device)
        self.sink_filled = False

    def ring_span(self, frame_start: int, num_frames: int) -> tuple[int, int]:
        """(slot, valid): where a block starting at absolute latent frame `frame_start` is written,
        and how many ring tokens are filled once it is (all of them after the first clip)."""
        window, ft = self.spec.window_frames, self.spec.frame_tokens
        offset = frame_start % window
        if frame_start < 0 or offset + num_frames > window:
            raise ValueError(f"block of {num_frames} frames at frame {frame_start} does not fit a ring "
                             f"of {window} frames (the window must be a multiple of the block)")
        return offset * ft, min(frame_start + num_frames, window) * ft

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ring_k, self.ring_v, self.sink_k, self.sink_v))

    def free(self) -> None:
        """Drop the tensors now (a session's memory is returned when it closes, not at GC time)."""
        empty = torch.empty(0, dtype=self.ring_k.dtype, device=self.ring_k.device)
        self.ring_k = self.ring_v = self.sink_k = self.sink_v = empty
        self.sink_filled = False
