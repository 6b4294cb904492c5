"""KV cache of the causal DiT: a sink (reference + motion tokens) and ring buffers one clip long.

Memory is fixed when the cache is created: blocks are written into a ring of `window_frames`
latent frames (one clip), so it does not grow with the length of the video. With timestep
forcing (upstream's single-GPU path) there is one ring per sampling step ("cache set"); with a
single set the engine re-encodes each finished block at t=0 (clean context) into it.

Layout: a block attends to the filled part of its ring plus the sink. To hand attention one
contiguous slice (no per-layer concatenation), the sink's rotated keys and values sit right next
to the rings in one buffer per group of two sets: [ring A | sink | ring B], ring A filled
backwards from the sink, ring B forwards; with one set the buffer is [sink | ring]. The order of
keys does not matter to attention. The motion tokens' RoPE positions are fixed, so their keys are
stored rotated once; the reference token's RoPE frame moves with every call, so its keys are
also kept unrotated (`ref_k`) and rotated into the sink per call.

The cache may be stored in float8_e4m3fn (half the bytes of bf16): writes convert (clamped to
e4m3's range), attention reads upcast copies of the slice it needs, or, with FP8 attention, the
codes as they are. For the Triton FP8 kernel the values are stored keys-last ([.., H, D, tokens]
in memory, the same logical [.., tokens, H, D] tensor): FP8 tensor cores read both operands along
the product's reduction, which for P @ V is the keys (fp8_attention_triton.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_KERNELS = ("cudnn", "triton", "flashinfer")  # FP8 attention kernels (fp8_attention*.py)


def keys_last(values: torch.Tensor) -> bool:
    """Whether values [.., T, H, D] are laid out [.., H, D, T] (each channel's tokens contiguous):
    how the cache stores them for the Triton FP8 attention."""
    t, _, d = values.shape[-3:]
    return values.stride(-3) == 1 and values.stride(-1) >= t and values.stride(-2) == d * values.stride(-1)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; e4m3 has no infinity, so clamp rather than produce NaN."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shapes of a KV cache, all derived from the model config and the latent size."""

    num_layers: int
    num_heads: int
    head_dim: int
    frame_tokens: int  # tokens of one latent frame (= the reference token count)
    window_frames: int  # latent frames the ring holds (one clip)
    sink_tokens: int  # reference + motion tokens
    num_sets: int = 1  # rings: 1, or one per sampling step (timestep forcing)
    batch: int = 1

    def __post_init__(self):
        for name in (
            "num_layers",
            "num_heads",
            "head_dim",
            "frame_tokens",
            "window_frames",
            "sink_tokens",
            "num_sets",
            "batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {getattr(self, name)}")
        if self.frame_tokens > self.sink_tokens:
            raise ValueError(
                f"the sink ({self.sink_tokens} tokens) must hold the reference frame ({self.frame_tokens} tokens)"
            )

    @classmethod
    def for_model(
        cls, model, latent_h: int, latent_w: int, window_frames: int, num_sets: int = 1, batch: int = 1
    ) -> KVCacheSpec:
        cfg = model.config
        return cls(
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            head_dim=cfg.dim // cfg.num_heads,
            frame_tokens=model.frame_tokens(latent_h, latent_w),
            window_frames=window_frames,
            sink_tokens=model.sink_tokens(latent_h, latent_w),
            num_sets=num_sets,
            batch=batch,
        )

    @property
    def ring_tokens(self) -> int:
        return self.window_frames * self.frame_tokens

    @property
    def groups(self) -> int:
        """Buffers: one per two cache sets (they share a copy of the sink)."""
        return (self.num_sets + 1) // 2

    @property
    def sink_start(self) -> int:
        return self.ring_tokens if self.num_sets > 1 else 0

    @property
    def buffer_tokens(self) -> int:
        """Tokens of one group's buffer: [ring | sink | ring], or [sink | ring] for a single set."""
        return self.sink_tokens + self.ring_tokens * (2 if self.num_sets > 1 else 1)

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes the cache takes: keys and values of every buffer, plus the unrotated reference keys."""
        per_token = self.num_layers * self.batch * self.num_heads * self.head_dim * dtype.itemsize
        return per_token * (2 * self.groups * self.buffer_tokens + self.frame_tokens)


@dataclass(frozen=True)
class RingFirstSpec(KVCacheSpec):
    """One cache set laid out as an even set of a multi-set cache ([ring | sink], the ring filled
    backwards: set 0 of a two-set buffer without the second ring), so attention sees the keys in
    the same order as in the multi-set cache and the results match bit for bit."""

    @property
    def buffer_tokens(self) -> int:
        return self.ring_tokens + self.sink_tokens


def step_cache_spec(
    model, latent_h: int, latent_w: int, window_frames: int, step: int, steps: int
) -> tuple[KVCacheSpec, int]:
    """The single cache set of sampling step `step` (of `steps`, one set per step) laid out as in
    the multi-set cache, and the index the model addresses it by (a TPP rank holds only this)."""
    if steps > 1 and step % 2 == 0:
        base = KVCacheSpec.for_model(model, latent_h, latent_w, window_frames, num_sets=2)
        return RingFirstSpec(**dataclasses.asdict(base)), 0
    return KVCacheSpec.for_model(model, latent_h, latent_w, window_frames, num_sets=1), 0


@dataclass(frozen=True)
class BlockSpan:
    """Where one block's forward writes and reads in its group's buffer (token indices)."""

    group: int
    write: int  # the block's tokens go to [write, write + n)
    lo: int  # attention reads keys/values [lo, hi): the filled ring and the sink
    hi: int


class KVCache:
    """keys/values [groups, layers, B, buffer_tokens, H, D]; ref_k [layers, B, frame_tokens, H, D]
    holds the reference token's keys unrotated (its RoPE frame moves with the current block)."""

    def __init__(
        self,
        spec: KVCacheSpec,
        dtype: torch.dtype,
        device: torch.device | str,
        fp8_attention: bool = False,
        fp8_kernel: str = "cudnn",
    ):
        if fp8_attention and dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 attention reads the cache as FP8; this one would be {dtype}")
        if fp8_kernel not in FP8_KERNELS:
            raise ValueError(f"fp8_kernel must be one of {', '.join(FP8_KERNELS)}, got {fp8_kernel!r}")
        self.fp8_attention = fp8_attention  # attention over it with FP8 products (fp8_attention.py)
        self.fp8_kernel = fp8_kernel  # which kernel: the values are stored keys-last for "triton"
        self.spec = s = spec
        buf = (s.groups, s.num_layers, s.batch, s.buffer_tokens, s.num_heads, s.head_dim)
        self.keys = torch.zeros(buf, dtype=dtype, device=device)
        if fp8_attention and fp8_kernel == "triton":
            # rows padded to 16 bytes: TMA reads rows whose stride is a multiple of 16
            tokens = -(-s.buffer_tokens // 16) * 16
            stored = torch.zeros((*buf[:3], s.num_heads, s.head_dim, tokens), dtype=dtype, device=device)
            self.values = stored[..., : s.buffer_tokens].permute(0, 1, 2, 5, 3, 4)
        else:
            self.values = torch.zeros(buf, dtype=dtype, device=device)
        self.ref_k = torch.zeros(
            (s.num_layers, s.batch, s.frame_tokens, s.num_heads, s.head_dim), dtype=dtype, device=device
        )
        self.sink_filled = False

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def ring_span(self, frame_start: int, num_frames: int) -> tuple[int, int]:
        """(slot, valid): where in its ring a block starting at absolute latent frame `frame_start`
        goes, and how many ring tokens are filled once it is (all of them after the first clip)."""
        window, ft = self.spec.window_frames, self.spec.frame_tokens
        offset = frame_start % window
        if frame_start < 0 or offset + num_frames > window:
            raise ValueError(
                f"block of {num_frames} frames at frame {frame_start} does not fit a ring "
                f"of {window} frames (the window must be a multiple of the block)"
            )
        return offset * ft, min(frame_start + num_frames, window) * ft

    def block_span(self, cache_set: int, frame_start: int, num_frames: int) -> BlockSpan:
        s = self.spec
        if not 0 <= cache_set < s.num_sets:
            raise ValueError(f"cache set {cache_set} out of range (the cache has {s.num_sets})")
        slot, valid = self.ring_span(frame_start, num_frames)
        n = num_frames * s.frame_tokens
        group, side = divmod(cache_set, 2) if s.num_sets > 1 else (0, 1)
        s0, sink = s.sink_start, s.sink_tokens
        if side:  # ring after the sink, filled forwards
            return BlockSpan(group, s0 + sink + slot, s0, s0 + sink + valid)
        return BlockSpan(group, s0 - slot - n, s0 - valid, s0 + sink)  # before it, filled backwards

    def sink(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A copy of what prefill wrote: the motion tokens' rotated keys [layers, B, sink - ref, H, D],
        the sink's values [layers, B, sink, H, D] and the reference's unrotated keys (its rotated
        keys are written per call); every group holds the same, so group 0's."""
        s0, nref, n = self.spec.sink_start, self.spec.frame_tokens, self.spec.sink_tokens
        return (
            self.keys[0, :, :, s0 + nref : s0 + n].clone(),
            self.values[0, :, :, s0 : s0 + n].clone(),
            self.ref_k.clone(),
        )

    def load_sink(self, sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Writes a copy made by sink() into every group, as prefill would have."""
        keys, values, ref_k = sink
        s0, nref, n = self.spec.sink_start, self.spec.frame_tokens, self.spec.sink_tokens
        self.keys[:, :, :, s0 + nref : s0 + n] = keys
        self.values[:, :, :, s0 : s0 + n] = values
        self.ref_k.copy_(ref_k)
        self.sink_filled = True

    @property
    def nbytes(self) -> int:  # the values' whole storage: keys-last rows are padded (< 16 tokens)
        return self.keys.nbytes + self.values.untyped_storage().nbytes() + self.ref_k.nbytes

    def free(self) -> None:
        """Drop the tensors now (a session's memory is returned when it closes, not at GC time)."""
        empty = torch.empty(0, dtype=self.keys.dtype, device=self.keys.device)
        self.keys = self.values = self.ref_k = empty
        self.sink_filled = False
