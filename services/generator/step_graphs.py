"""CUDA graphs of the DiT's denoising forward: captured once per cache span, then replayed.

Why: one forward at 704*384 is a few thousand kernel launches from 52 compiled modules and the
glue between them; the host needs about as long to issue them as the GPU needs to run them
(run E in docs/performance.md: ~32 ms of launch gaps per 199 ms step; at 384*256 the host is
the bottleneck). A graph replay issues the whole forward at once.

What a graph bakes in: tensor addresses and plain ints. The cache span of a forward (where the
block's keys are written, which slice attention reads) is plain ints, so there is one graph per
span, i.e. per (cache set, slot in the ring); everything else that changes between calls (the
latents, the time embedding, the audio tokens, the RoPE of the block and of the sink's reference
token) is copied into static buffers before a replay. The session's KV cache and text context
are fixed for its lifetime, so graphs belong to a session and go with it.

When: for spans whose ring is full, i.e. from the last block of the first clip on. The first
blocks (what the time to first fragment waits for) never pay for a capture in a request: a
capture costs one ordinary forward (its output is the call's result) plus the recording, and
each filling span runs once per session. Their spans are the same ints in every session of the
same shapes, though, so the server's warm-up records them too (`record_filling`), and a session
that takes the warm-up's graphs over (GeneratorEngine's kept slots) replays its first blocks as
well (at 384*256 the host, not the GPU, sets an unreplayed block's time: docs/performance.md, Z2).
"""

from __future__ import annotations

import logging
import threading

import torch

from avatar.services.generator.causal_s2v_dit import (
    AudioTokens,
    CausalS2VDiT,
    Rope,
    StepPositions,
    TextContext,
    TimeEmbedding,
)
from avatar.services.generator.kv_cache import KVCache

log = logging.getLogger(__name__)

_capture_locks: dict[str, threading.Lock] = {}
_capture_locks_guard = threading.Lock()


def capture_lock(device: torch.device) -> threading.Lock:
    """One capture at a time per device: torch.cuda.graph records on one shared capture stream,
    and two sessions recording at once broke both captures (run Q, docs/performance.md)."""
    with _capture_locks_guard:
        return _capture_locks.setdefault(str(device), threading.Lock())


class StepGraphs:
    """Runs `dit.denoise` for one session, through a CUDA graph where the span allows it.

    `capture=False` runs the same static-buffer path without recording (how the CPU tests check
    the plumbing: a replay reads only what was copied into the buffers)."""

    def __init__(self, dit: CausalS2VDiT, context: TextContext, kv: KVCache, capture: bool = True):
        self.dit, self.context, self.kv = dit, context, kv
        self.capture = capture
        self.enabled = True
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, torch.Tensor]] = {}
        self._static: dict[str, torch.Tensor] | None = None
        self._span = None  # the span of the inputs in the buffers (set with them)
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.filling_failed = False  # a first-clip capture failed: record full-ring spans only
        self.first_clip = False  # holds graphs of first-clip spans (what only a warm-up records)
        self._audio: tuple[torch.cuda.CUDAGraph | None, torch.Tensor, AudioTokens] | None = None
        self._audio_seen: tuple | None = None  # the (shape, dtype) of the features encode_audio last saw
        self._audio_failed = False  # its recording failed: eager from then on

    def steady(self, pos: StepPositions) -> bool:
        """Whether the span reads a full ring (its ints repeat every clip from now on)."""
        s = self.kv.spec
        return pos.span.hi - pos.span.lo == s.sink_tokens + s.ring_tokens

    def run(
        self,
        latents: torch.Tensor,
        time: TimeEmbedding,
        audio: AudioTokens,
        pos: StepPositions,
        record_filling: bool = False,
    ) -> torch.Tensor:
        """One forward; replayed when this span has a graph, recorded when it has none and its
        ring is full (or `record_filling`: the warm-up's first clip), else run as is."""
        key = (pos.span, tuple(latents.shape))
        steady = self.steady(pos)
        wanted = steady or (record_filling and not self.filling_failed)
        if not self.enabled or not (key in self._graphs or wanted):
            return self.dit.denoise(latents, time, self.context, audio, self.kv, pos)
        self._fill(latents, time, audio, pos)
        entry = self._graphs.get(key)
        if entry is None:
            return self._record(key, steady)
        graph, out = entry
        if graph is not None:
            graph.replay()
        else:  # no capture (CPU): run on the buffers, as a replay would
            out = self._forward()
        self.replays += 1
        return out

    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """dit.encode_audio, replayed from a graph of its own from the second block of a shape on:
        its ~50 small kernels are the first work of a block, launched one by one on a GPU that
        the previous block's host sync left idle. The tokens it returns are overwritten by the
        next call (the block's forwards have read them by then: same stream)."""
        if not self.enabled or self._audio_failed:
            return self.dit.encode_audio(features)
        seen = (features.shape, features.dtype)
        if self._audio is not None and (self._audio[1].shape, self._audio[1].dtype) == seen:
            graph, static_in, static_out = self._audio
            static_in.copy_(features)
            if graph is None:  # no capture (CPU): run on the buffer, as a replay would
                return self.dit.encode_audio(static_in)
            graph.replay()
            return static_out
        out = self.dit.encode_audio(features)  # also any first-time work (cuDNN's plans), outside a capture
        if self._audio_seen != seen:  # recorded the second time: the first block stays eager
            self._audio_seen = seen
            return out
        static_in = features.clone()  # the same strides: the same arithmetic as the eager call
        if not self.capture:
            self._audio = (None, static_in, out)
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            with (
                capture_lock(static_in.device),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                static_out = self.dit.encode_audio(static_in)
        except Exception as e:  # never fail a session for an optimisation
            log.warning("CUDA graph capture of the audio encoder failed (%s: %s); it runs eagerly", type(e).__name__, e)
            self._audio_failed = True
            return out
        self._audio = (graph, static_in, static_out)
        return out

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        """Drops the graphs and their memory pool (the session's KV cache goes with the session)."""
        self._graphs.clear()
        self._static = self._audio = None
        self._pool = None

    # -------------------------------------------------------------- internals

    def _fill(self, latents, time: TimeEmbedding, audio: AudioTokens, pos: StepPositions) -> None:
        new = {
            "latents": latents,
            "e": time.e,
            "mod": time.mod,
            "tokens": audio.tokens,
            "global": audio.global_,
            "cos": pos.rope.cos,
            "sin": pos.rope.sin,
            "ref_cos": pos.ref_rope.cos,
            "ref_sin": pos.ref_rope.sin,
        }
        if self._static is None or any(
            self._static[k].shape != v.shape or self._static[k].dtype != v.dtype for k, v in new.items()
        ):
            self._graphs.clear()  # new shapes (never within a session): graphs would read stale buffers
            self._static = {k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in new.items()}
        for k, v in new.items():
            self._static[k].copy_(v)
        self._span = pos.span

    def _forward(self) -> torch.Tensor:
        s = self._static
        pos = StepPositions(self._span, Rope(s["cos"], s["sin"]), Rope(s["ref_cos"], s["ref_sin"]))
        time, audio = TimeEmbedding(s["e"], s["mod"]), AudioTokens(s["tokens"], s["global"])
        return self.dit.denoise(s["latents"], time, self.context, audio, self.kv, pos)

    def _record(self, key, steady: bool) -> torch.Tensor:
        # An ordinary forward on the static buffers first: it is this call's result, and it runs
        # any first-time work (compilation for these shapes, cuBLAS/cuDNN plans) outside the
        # capture. Recording then launches nothing; the cache writes it records are the ones
        # this forward just made (same inputs, same rows), so they are idempotent.
        out = self._forward()
        if not self.capture:
            self._graphs[key] = (None, out)
            self.first_clip |= not steady
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other services of an `avatar serve --role all` process keep using the GPU
            with (
                capture_lock(self._static["latents"].device),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                static_out = self._forward()
        except Exception as e:  # never fail a session for an optimisation
            if not steady:  # the warm-up's extra: the full-ring graphs stay
                log.warning(
                    "CUDA graph capture of a first-clip block failed (%s: %s); those blocks run as they are",
                    type(e).__name__,
                    e,
                )
                self.filling_failed = True
                return out
            log.warning("CUDA graph capture failed (%s: %s); this session runs without graphs", type(e).__name__, e)
            self.enabled = False
            self._graphs.clear()
            return out
        self._graphs[key] = (graph, static_out)
        self.first_clip |= not steady
        return out
