"""The generator engine contract the servicer uses: GeneratorEngine (one process) and TPPEngine (N ranks) meet it."""

from __future__ import annotations

import concurrent.futures
from typing import Protocol

import torch

from avatar.jobs import Job


class BlockSession(Protocol):
    """One stream of latent blocks, in order. GeneratorSession runs a block in the caller's thread
    (pipeline_depth 1); TPPSession takes up to pipeline_depth blocks before the first comes back."""

    @property
    def pipeline_depth(self) -> int:
        """Blocks that may be in flight before the first result is awaited."""
        ...

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes this session's KV cache holds (on TPP: one rank's share)."""
        ...

    last_block_ms: float

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [frames_per_block, audio_layers, audio_dim] -> latent [16, block_frames, h, w]."""
        ...

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        """generate_block's work queued; the future holds the latent (or the error)."""
        ...

    def close(self) -> None:
        """Frees the session's caches; idempotent."""
        ...


class BlockGenerator(Protocol):
    """Opens sessions; InvalidInput for a job or conditioning it cannot run, ResourceExhausted when
    it has no room for one more."""

    def open_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor
    ) -> BlockSession:
        """text [L, text_dim], ref_latent [16, 1, h, w], motion_latents [16, T, h, w]."""
        ...
