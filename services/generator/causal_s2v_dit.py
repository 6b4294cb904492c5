"""CausalS2VDiT: LiveAvatar's block-causal Wan2.2-S2V diffusion transformer (our implementation).

Parameter names and shapes equal upstream's (`WanModel_S2V` / `CausalWanModel_S2V`), so the
Wan2.2-S2V-14B shards load with strict=True; see tests/data/keys/wan22_s2v_14b_dit.json.

Token streams the model sees:
- the sink (prefilled once into the KV cache, zero-timestep modulation): the reference-image
  latent (patch_embedding, RoPE frame REF_ROPE_FRAME) and the FramePack motion context
  (frame_packer: 1, 2 and 16 latent frames at 1x, 2x and 4x compression, negative RoPE frames);
- a block of noisy latent frames (patch_embedding + cond_encoder), which attends to the cached
  earlier blocks (ring buffer) and to the sink, and gets audio cross-attention after the layers
  in `audio_inject_layers`.

Dtypes follow upstream's autocast behaviour: linears run in the model dtype, the timestep
embedding, modulation, residual adds inside a block, the head and the audio encoder in float32.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from avatar.dit_config import DIT_CONFIGS, framepack_tokens
from avatar.services.generator import fused_norms
from avatar.services.generator.fp8 import FP8Linear, FP8Rows, apply_scales, quantize_rows_kernel, side_by_side
from avatar.services.generator.fp8_attention import (
    fp8_attention_bf16,
    fp8_attention_bf16_q8,
    fp8_attention_codes,
    fp8_attention_codes_q8,
)
from avatar.services.generator.kv_cache import BlockSpan, KVCache, to_cache_dtype

REF_ROPE_FRAME = 30  # RoPE frame index of the reference image at prefill (upstream)
ROPE_THETA = 10000.0
# Upstream rounds the text cross-attention's pre-norm (norm3) input, and so its output, to bf16
# whatever the model dtype, a float32 run included: the model was trained so.
CROSS_ATTN_NORM_DTYPE = torch.bfloat16

# Constructor arguments per preset, from the one description of the geometry (avatar/dit_config.py).
PRESETS: dict[str, dict] = {name: config.kwargs() for name, config in DIT_CONFIGS.items()}
_S2V = DIT_CONFIGS["s2v-14b"]  # the constructor defaults


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H*D].

    The single place attention runs: swap this function for a faster kernel.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


# --------------------------------------------------------------------------- RoPE


@dataclass
class Rope:
    """cos/sin of the rotary angles of L tokens: [L, 1, D/2] float32 (broadcast over heads)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def cat(parts: list[Rope]) -> Rope:
        return Rope(torch.cat([p.cos for p in parts]), torch.cat([p.sin for p in parts]))


def _axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs per axis (frame, height, width), upstream's split of head_dim / 2."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_grid(head_dim: int, frames, rows, cols, device) -> Rope:
    """RoPE for the tokens of a (frames x rows x cols) grid, flattened frame-major.

    frames/rows/cols are the integer positions along each axis (frames may be negative). Each
    axis's cos/sin come from _axis_rotations (computed once per positions, on `device`); a call
    is then one kernel, which matters where it runs: between a block's host sync and its first
    CUDA graph replay, with the GPU idle (the sink's and the block's RoPE, every forward).
    """
    device = str(torch.device(device))
    axes = [
        _axis_rotations(pairs, tuple(int(p) for p in pos), device)
        for pos, pairs in zip((frames, rows, cols), _axis_pairs(head_dim))
    ]
    f, h, w = axes
    nf, nh, nw = f.shape[1], h.shape[1], w.shape[1]
    grid = torch.cat(
        [
            f[:, :, None, None].expand(2, nf, nh, nw, -1),
            h[:, None, :, None].expand(2, nf, nh, nw, -1),
            w[:, None, None, :].expand(2, nf, nh, nw, -1),
        ],
        dim=-1,
    ).reshape(2, nf * nh * nw, 1, -1)
    return Rope(grid[0], grid[1])


@functools.lru_cache(maxsize=4096)
def _axis_rotations(pairs: int, positions: tuple[int, ...], device: str) -> torch.Tensor:
    """cos/sin [2, len(positions), pairs] of one axis's rotations, float32: computed in float64 on
    the device (runs of positions need no host-to-device copy, which from pageable memory would
    wait for the GPU queue), then rounded to float16 as upstream stores them (complex32: the model
    was trained so). Cached: a session asks for the same rows and columns every forward, and for
    a block's frames in each step."""
    dim = 2 * pairs
    inv = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    start = positions[0] if positions else 0
    if positions == tuple(range(start, start + len(positions))):  # the usual case: built on the device
        pos = torch.arange(start, start + len(positions), dtype=torch.float64, device=device)
    else:
        pos = torch.tensor(positions, dtype=torch.float64).to(device)
    ang = pos[:, None] * inv
    return torch.stack([ang.cos(), ang.sin()]).to(torch.float16).float()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] (computed in float32, returned in x's dtype)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * rope.cos - x1 * rope.sin, x0 * rope.sin + x1 * rope.cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rotated_reference_keys(ref_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """The reference's unrotated keys (as the cache stores them) at a RoPE frame, in the cache's
    dtype (CausalS2VDiT._rotate_reference: eagerly a few layers at a time, compiled all at once)."""
    return to_cache_dtype(apply_rope(ref_k.to(dtype), Rope(cos, sin)), ref_k.dtype)


# --------------------------------------------------------------------------- helpers


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 (upstream runs it under float32 autocast)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float32 (cos half, then sin half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] modulated per token group: shift/scale [B, G, C], L = G * n. float32 out."""
    b, l, c = x.shape
    g = shift.shape[1]
    xg = x.float().view(b, g, l // g, c)
    return (xg * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, l, c)


def _gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    b, l, c = y.shape
    g = gate.shape[1]
    return (y.float().view(b, g, l // g, c) * gate[:, :, None]).view(b, l, c)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# --------------------------------------------------------------------------- attention layers


@dataclass
class LayerKV:
    """Where one layer's self-attention reads and writes keys/values (views into a KVCache).

    Prefill: keys/values are every group's buffer [G, B, T, H, D]; the sink's values and its
    motion tokens' rotated keys go to [sink_start, sink_start + S) of each, the reference tokens'
    unrotated keys to ref_k. A block: keys/values are its group's buffer [B, T, H, D] (the model
    has already rotated the reference keys into the sink for this call); the block's rotated keys
    and values are written at [write, write + n), and attention reads the slice [lo, hi).
    One write per buffer per call: torch.compile then updates it in place (with two, inductor
    rewrote the whole buffer every layer).
    """

    keys: torch.Tensor
    values: torch.Tensor
    ref_k: torch.Tensor  # [B, frame_tokens, H, D], unrotated
    sink_start: int
    sink_tokens: int
    write: int = 0
    lo: int = 0
    hi: int = 0
    prefill: bool = False
    fp8_attention: bool = False  # attend over the FP8 cache with FP8 products (fp8_attention.py)
    fp8_kernel: str = "cudnn"  # ... with cuDNN's kernel, our Triton one (values keys-last) or FlashInfer's


class _Projections(nn.Module):
    """q, k, v, o and the RMS qk-norms, named as upstream, shared by every attention layer."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(_Projections):
    fused_norms = False  # q's RMSNorm + RoPE, and k's with v into the cache, in a kernel each (use_fused_norms)
    # q, k and v as one FP8 GEMM (join_qkv), in a tuple: not a submodule, the state dict keeps
    # upstream's names and counts each weight once
    qkv: tuple[FP8Linear, ...] = ()

    def join_qkv(self, on: bool) -> None:
        """The fused forward's q, k and v from one GEMM whose weights are theirs side by side
        (fp8.side_by_side: q, k and v keep their weights, as views), or from three again."""
        self.qkv = (side_by_side([self.q, self.k, self.v]),) if on else ()

    def _projections(self, x: torch.Tensor | FP8Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv:  # column slices of the one product: the kernels after read them in place
            return self.qkv[0](x).chunk(3, dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x: torch.Tensor | FP8Rows, rope: Rope, kv: LayerKV) -> torch.Tensor:
        if kv.prefill:  # the sink: attends to itself
            return self._prefill(x, rope, kv)
        if self.fused_norms:
            return self._forward_fused(x, rope, kv)
        heads, cache = (self.num_heads, -1), kv.keys.dtype
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), rope)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), rope)
        v = self.v(x).unflatten(-1, heads)
        n = q.shape[1]
        kv.keys[:, kv.write : kv.write + n] = to_cache_dtype(k, cache)
        kv.values[:, kv.write : kv.write + n] = to_cache_dtype(v, cache)
        keys, values = kv.keys[:, kv.lo : kv.hi], kv.values[:, kv.lo : kv.hi]
        if kv.fp8_attention and kv.fp8_kernel == "flashinfer":
            return self.o(fp8_attention_bf16(q, keys, values).to(q.dtype))
        if kv.fp8_attention:
            return self.o(fp8_attention_codes(q, keys, values, kv.fp8_kernel).to(q.dtype))
        return self.o(attention(q, keys.to(q.dtype), values.to(q.dtype)))

    def _forward_fused(self, x: torch.Tensor | FP8Rows, rope: Rope, kv: LayerKV) -> torch.Tensor:
        """forward() with the q/k norms and RoPE in Triton kernels (fused_norms.py): the keys and
        values go into the cache from one kernel; with FP8 attention the queries come out as e4m3
        at a scale fixed by their norm's weight, no reduction over them first."""
        heads = (self.num_heads, -1)
        rope_eps = (rope.cos, rope.sin, self.norm_q.eps)  # norm_q and norm_k share eps
        q, k, v = self._projections(x)
        fused_norms.kv_into_cache(k, v, self.norm_k.weight, *rope_eps, kv.keys, kv.values, kv.write)
        keys, values = kv.keys[:, kv.lo : kv.hi], kv.values[:, kv.lo : kv.hi]
        if not kv.fp8_attention:
            q = fused_norms.rms_rope(q, self.norm_q.weight, *rope_eps).unflatten(-1, heads)
            return self.o(attention(q, keys.to(q.dtype), values.to(q.dtype)))
        q8, descale = fused_norms.rms_rope_fp8(q, self.norm_q.weight, *rope_eps)
        q8 = q8.unflatten(-1, heads)
        if kv.fp8_kernel == "flashinfer":  # its bf16 output: the projection quantises each row
            return self.o(fp8_attention_bf16_q8(q8, descale, keys, values))
        out8 = fp8_attention_codes_q8(q8, descale, keys, values, kv.fp8_kernel)
        if isinstance(self.o, FP8Linear) and self.o.granularity == "row":
            # the kernel's e4m3 output at scale 1 is what the FP8 projection multiplies: no bf16
            # round trip, no second rounding to per-row scales (one kernel less per layer)
            return self.o(FP8Rows(out8, torch.ones(*out8.shape[:-1], 1, device=out8.device)))
        return self.o(out8.to(torch.bfloat16))

    def _prefill(self, x: torch.Tensor | FP8Rows, rope: Rope, kv: LayerKV) -> torch.Tensor:
        """The sink's tokens: the reference's keys stored unrotated (each call rotates them to its
        own frame), the motion tokens' rotated; attention over the sink itself."""
        heads, cache = (self.num_heads, -1), kv.keys.dtype
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), rope)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        k_rot, s0, nref = apply_rope(k, rope), kv.sink_start, kv.ref_k.shape[1]
        kv.ref_k.copy_(to_cache_dtype(k[:, :nref], cache))
        kv.keys[..., s0 + nref : s0 + kv.sink_tokens, :, :] = to_cache_dtype(k_rot[:, nref:], cache)
        kv.values[..., s0 : s0 + kv.sink_tokens, :, :] = to_cache_dtype(v, cache)
        return self.o(attention(q, k_rot, v))


class CrossAttention(_Projections):
    """Attention from x to a context (text tokens, or one latent frame's audio tokens)."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values [B, L, H, D]."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(
        self, x: torch.Tensor | FP8Rows, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """context: tokens [B, L, C], or their (keys, values) from context_kv."""
        k, v = self.context_kv(context) if isinstance(context, torch.Tensor) else context
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v))


class CausalS2VBlock(nn.Module):
    """Self-attention (RMS qk-norm, 3D RoPE, KV cache), text cross-attention, FFN; 6-way modulation."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.fused_norms = False
        self.ffn_products = False  # fused FFN: tensorwise products, their scales in the next kernel

    @property
    def fused_norms(self) -> bool:
        """The stretches between FP8 linears in Triton kernels (use_fused_norms), the
        self-attention's q/k norms and RoPE included."""
        return self._fused_norms

    @fused_norms.setter
    def fused_norms(self, on: bool) -> None:
        self._fused_norms = self.self_attn.fused_norms = on

    def forward(self, x, mod, rope: Rope, text_kv: tuple[torch.Tensor, torch.Tensor], kv: LayerKV):
        """x [B, L, C] model dtype; mod [B, G, 6, C] float32 timestep modulation per token group;
        text_kv: this layer's keys and values of the prompt (TextContext)."""
        if self.fused_norms:
            return self._forward_fused(x, mod, rope, text_kv, kv)
        dtype = x.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + mod).unbind(2)
        y = self.self_attn(_modulate(self.norm1(x), shift1, scale1).to(dtype), rope, kv)
        x = x.float() + _gate(y, gate1)  # float32 residual inside the block, as upstream
        x = x + self.cross_attn(self.norm3(x.to(CROSS_ATTN_NORM_DTYPE)).to(dtype), text_kv).float()
        y = self.ffn(_modulate(self.norm2(x), shift2, scale2).to(dtype))
        return (x + _gate(y, gate2)).to(dtype)

    def _forward_fused(self, x, mod, rope: Rope, text_kv: tuple[torch.Tensor, torch.Tensor], kv: LayerKV):
        """forward() of an FP8 block, each residual add + norm + modulation + the next linear's
        quantisation in one kernel (fused_norms.py). mod's six vectors: shift1, scale1, gate1,
        shift2, scale2, gate2."""
        dtype = x.dtype
        mod = self.modulation.float()[:, None] + mod
        _, h = fused_norms.norm_quantize(x, mod, self.norm1.eps, shift=0, scale=1, round_norm=True)
        y = self.self_attn(h, rope, kv)
        x, h = fused_norms.norm_quantize(
            x, mod, self.norm3.eps, residual=y, gate=2, weight=self.norm3.weight, bias=self.norm3.bias, round_input=True
        )
        y = self.cross_attn(h, text_kv)
        x, h = fused_norms.norm_quantize(x, mod, self.norm2.eps, residual=y, shift=3, scale=4)
        if self.ffn_products:  # the scales and biases inside gelu_quantize and the residual's kernel
            y = apply_scales(self.ffn[2].product(fused_norms.gelu_quantize(self.ffn[0].product(h))))
        else:
            y = self.ffn[2](fused_norms.gelu_quantize(self.ffn[0](h)))
        return (x + _gate(y, mod[:, :, 5])).to(dtype)


class Head(nn.Module):
    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_channels)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        """x [B, F*n, C]; e [B, F, C] float32 time embedding per frame."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return _linear_f32(self.head, _modulate(self.norm(x), shift, scale)).to(x.dtype)


# --------------------------------------------------------------------------- audio


class CausalConv1d(nn.Module):
    """Conv1d over time with replicate left padding, so frame t never sees frames after t."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride)

    def forward(self, x):  # [B, C, T], float32
        x = F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate")
        bias = None if self.conv.bias is None else self.conv.bias.float()
        return F.conv1d(x, self.conv.weight.float(), bias, stride=self.conv.stride)


class AudioConvEncoder(nn.Module):
    """Causal conv stack, 4x temporal downsampling: per latent frame `num_tokens` local tokens
    (+ one learned padding token) and one global token (for the injectors' AdaLN)."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _trunk(self, x):  # [N, C, T] after conv1 -> [N, T', dim]
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = self.conv2(x)
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = self.conv3(x).transpose(1, 2)
        return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))

    def forward(self, x):
        """x [B, T, in_dim] float32 -> (local [B, T', n+1, dim], global [B, T', 1, dim])."""
        b, t, _ = x.shape
        x = x.transpose(1, 2)
        local = self.conv1_local(x)  # [B, n*dim/4, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B*n, dim/4, T]
        local = self._trunk(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        glob = _linear_f32(self.final_linear, self._trunk(self.conv1_global(x)))
        return local, glob[:, :, None]


class CausalAudioEncoder(nn.Module):
    """Learned weighting of the wav2vec2 hidden states, then the causal conv stack."""

    def __init__(self, audio_dim: int, audio_layers: int, dim: int, num_tokens: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, audio_layers, 1, 1), 0.01))
        self.encoder = AudioConvEncoder(audio_dim, dim, num_tokens)

    def forward(self, features):
        """features [B, layers, audio_dim, T] -> (local [B, T', n+1, dim], global [B, T', 1, dim]) f32."""
        w = F.silu(self.weights.float())
        feat = (features.float() * w).sum(1) / w.sum(1)  # [B, audio_dim, T]
        return self.encoder(feat.transpose(1, 2))


class AudioAdaLN(nn.Module):
    """LayerNorm whose shift and scale come from the global audio token (shift first, then scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, cond):  # x [N, n, C]; cond [N, C]
        shift, scale = self.linear(F.silu(cond)).float().chunk(2, dim=-1)
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
        return x * (1 + scale[:, None]) + shift[:, None]


class AudioInjection(nn.Module):
    """One injection: AdaLN from the frame's global audio token, cross-attention to the frame's
    audio tokens, the residual add. One module so that torch.compile takes it whole (compiling
    the cross-attention alone left the AdaLN and the add as eager float32 kernels: ~8 ms of a
    704*384 step in run H7's profile). Not registered in the DiT: it refers to AudioInjector's
    layers, whose names stay upstream's."""

    def __init__(self, adain: AudioAdaLN, attn: CrossAttention):
        super().__init__()
        self.adain, self.attn = adain, attn
        self.fused_norms = False  # AdaLN + the FP8 quantisation in one kernel (fused_norms.py)

    def forward(self, x, audio_tokens, audio_global):
        """Per latent frame, x's tokens attend to that frame's audio tokens. x [B, F*n, C]."""
        b, f = audio_tokens.shape[:2]
        xf = x.reshape(b * f, -1, x.shape[-1])
        cond = audio_global.flatten(0, 1)[:, 0]
        if self.fused_norms:
            shift_scale = self.adain.linear(F.silu(cond)).float().unflatten(-1, (1, 2, -1))
            _, h = fused_norms.norm_quantize(xf, shift_scale, 1e-5, shift=0, scale=1)
        else:
            h = self.adain(xf, cond).to(x.dtype)
        out = self.attn(h, audio_tokens.flatten(0, 1))
        return x + out.reshape(x.shape)


class AudioInjector(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_injectors: int, eps: float):
        super().__init__()
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, eps) for _ in range(num_injectors)])
        self.injector_adain_layers = nn.ModuleList([AudioAdaLN(dim) for _ in range(num_injectors)])
        # a plain list: not submodules, so the state dict keeps upstream's names only
        self.injections = [AudioInjection(a, c) for a, c in zip(self.injector_adain_layers, self.injector)]

    def forward(self, idx: int, x, audio_tokens, audio_global):
        """Injection idx: x [B, F*n, C] plus what its tokens read from their frame's audio."""
        return self.injections[idx](x, audio_tokens, audio_global)


@dataclass
class AudioTokens:
    """One block's encoded audio: per latent frame `tokens` [B, F, n+1, C] and `global_` [B, F, 1, C]."""

    tokens: torch.Tensor
    global_: torch.Tensor


@dataclass
class TextContext:
    """The prompt as every layer's text cross-attention sees it: per layer (keys, values)
    [B, text_len, H, D]. The prompt is fixed for a session, so these are computed once at its
    start instead of in every step (saves 2 x 40 projections of 512 tokens per step)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)

    def copy_(self, other: TextContext) -> TextContext:
        """Another prompt's keys and values into these tensors (a CUDA graph reads them by address)."""
        for mine, theirs in zip(self.kv, other.kv, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a.copy_(b)
        return self


@dataclass
class TimeEmbedding:
    """Timesteps [B, F] as the model sees them, float32: `e` [B, F, C] modulates the head, `mod`
    [B, F, 6, C] every block (shift, scale, gate of the attention's and the FFN's inputs)."""

    e: torch.Tensor
    mod: torch.Tensor


@dataclass
class StepPositions:
    """Everything position-dependent of one forward: where it writes/reads in the KV cache (plain
    ints) and the RoPE of the block and of the sink's reference token (tensors). Split from the
    forward so that a CUDA graph can be captured per span, with the RoPE fed in as buffers."""

    span: BlockSpan
    rope: Rope
    ref_rope: Rope


# --------------------------------------------------------------------------- motion context


class FramePacker(nn.Module):
    """FramePack motion context: the newest motion latent frames at full resolution, older ones
    compressed 2x and 4x in time and space (buckets of 1, 2 and 16 latent frames)."""

    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, int, int]):
        super().__init__()
        self.buckets = tuple(buckets)
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion):
        """motion [B, C, T, h, w] (newest last) -> tokens [B, N, dim] (1x, 2x, 4x order)."""
        total = sum(self.buckets)
        b, c, t, h, w = motion.shape
        padded = motion.new_zeros(b, c, total, h, w)  # older than the given frames: zeros
        keep = min(t, total)
        if keep:
            padded[:, :, -keep:] = motion[:, :, -keep:]
        far, mid, near = padded.split(self.buckets[::-1], dim=2)
        return torch.cat(
            [
                self.proj(near).flatten(2).transpose(1, 2),
                self.proj_2x(mid).flatten(2).transpose(1, 2),
                self.proj_4x(far).flatten(2).transpose(1, 2),
            ],
            dim=1,
        )

    def rope(self, head_dim: int, h: int, w: int, device) -> Rope:
        """Negative RoPE frames before the video; sparse rows/columns spread over the full grid."""
        rows, cols = h // 2, w // 2
        parts, start = [], 0
        for bucket, scale in zip(self.buckets, (1, 2, 4)):
            start -= bucket
            n_f = bucket // scale
            frames = -np.linspace(-start, -start - bucket + 1, n_f).astype(int)
            r = np.linspace(0, rows - 1, h // (2 * scale)).astype(int)
            cc = np.linspace(0, cols - 1, w // (2 * scale)).astype(int)
            parts.append(rope_grid(head_dim, frames, r, cc, device))
        return Rope.cat(parts)

    def num_tokens(self, h: int, w: int) -> int:
        return framepack_tokens(h, w, self.buckets)


# --------------------------------------------------------------------------- the model


class CausalS2VDiT(ModelMixin, ConfigMixin):
    """LiveAvatar's causal Wan2.2-S2V DiT. Constructor defaults = the s2v-14b configuration."""

    _no_split_modules = ["CausalS2VBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size=_S2V.patch_size,
        in_dim=_S2V.in_dim,
        out_dim=_S2V.out_dim,
        dim=_S2V.dim,
        ffn_dim=_S2V.ffn_dim,
        freq_dim=_S2V.freq_dim,
        text_dim=_S2V.text_dim,
        text_len=_S2V.text_len,
        num_heads=_S2V.num_heads,
        num_layers=_S2V.num_layers,
        eps=_S2V.eps,
        cond_dim=_S2V.cond_dim,
        audio_dim=_S2V.audio_dim,
        audio_layers=_S2V.audio_layers,
        num_audio_token=_S2V.num_audio_token,
        audio_inject_layers=_S2V.audio_inject_layers,
        motion_frames=_S2V.motion_frames,
        framepack_buckets=_S2V.framepack_buckets,
    ):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        if tuple(patch_size) != (1, 2, 2):
            raise ValueError(f"patch_size must be (1, 2, 2) (FramePack assumes it), got {patch_size}")
        inject = sorted(int(i) for i in audio_inject_layers)
        if len(set(inject)) != len(inject) or (inject and not 0 <= inject[0] <= inject[-1] < num_layers):
            raise ValueError(f"audio_inject_layers {audio_inject_layers} must be distinct layers < {num_layers}")
        self.patch_size = tuple(patch_size)
        self.head_dim = dim // num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([CausalS2VBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers)])
        self.head = Head(dim, out_dim * int(np.prod(self.patch_size)), eps)
        self.cond_encoder = nn.Conv3d(cond_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(audio_dim, audio_layers, dim, num_audio_token)  # sic
        self.audio_injector = AudioInjector(dim, num_heads, len(inject), eps)
        self.injector_of_layer = {layer: i for i, layer in enumerate(inject)}
        self.trainable_cond_mask = nn.Embedding(3, dim)  # 0 noisy, 1 reference, 2 motion tokens
        self.frame_packer = FramePacker(in_dim, dim, framepack_buckets)
        self._motion_rope: dict[tuple, Rope] = {}
        self._rotate_compiled = None  # compile_reference_rotation(): the rotation as one fused kernel
        self._rotate_fused = False  # use_fused_norms(): fused_norms.rope_into, straight into the sink

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype. (ModelMixin.dtype walks every parameter: milliseconds per call at 14B.)"""
        return self.patch_embedding.weight.dtype

    # ------------------------------------------------------------ sizes

    @property
    def motion_latent_frames(self) -> int:
        return (self.config.motion_frames + 3) // 4

    def frame_tokens(self, h: int, w: int) -> int:
        """Tokens of one latent frame of h x w."""
        return (h // 2) * (w // 2)

    def sink_tokens(self, h: int, w: int) -> int:
        """Tokens in the sink: the reference frame plus the FramePack motion context."""
        return self.frame_tokens(h, w) + self.frame_packer.num_tokens(h, w)

    def check_latent_size(self, h: int, w: int) -> None:
        if h % 2 or w % 2 or h < 8 or w < 8:
            raise ValueError(f"latent size {h}x{w} must be even and at least 8x8 (64x64 pixels)")

    # ------------------------------------------------------------ conditioning, once per session/block

    @torch.no_grad()
    def embed_text(self, text: torch.Tensor) -> TextContext:
        """text [B, L, text_dim] (L <= text_len), zero-padded to text_len as upstream -> every
        layer's text keys and values."""
        b, n, _ = text.shape
        if n > self.config.text_len:
            raise ValueError(f"text has {n} tokens, more than text_len {self.config.text_len}")
        text = F.pad(text.to(self.dtype), (0, 0, 0, self.config.text_len - n))
        tokens = self.text_embedding(text)
        return TextContext([_on_device(block.cross_attn, tokens.device).context_kv(tokens) for block in self.blocks])

    def offload_text_projections(self) -> int:
        """Keep the text cross-attention's k/v projections (2 of the 12 linears of every layer:
        about 2 GB in FP8) in pinned CPU memory: they are only needed once per session, by
        embed_text, which copies them in layer by layer. Returns the bytes moved off the GPU."""
        moved = 0
        for block in self.blocks:
            for proj in (block.cross_attn.k, block.cross_attn.v):
                for t in (*proj.parameters(recurse=False), *proj.buffers(recurse=False)):
                    if t.device.type != "cpu":
                        moved += t.numel() * t.element_size()
                proj.to("cpu")
                if torch.cuda.is_available():
                    for _name, t in (*proj._parameters.items(), *proj._buffers.items()):
                        if t is not None and not t.is_pinned():
                            t.data = t.data.pin_memory()
        return moved

    def use_fused_norms(self, on: bool = True, ffn_products: bool = True, qkv_gemm: bool = False) -> None:
        """Run the norms of every block, self-attention and audio injection in the fused kernels of
        fused_norms.py (`--fused-norms`), or again in torch (on=False). Needs FP8 linears with row
        scales in the trunk, bf16 activations and Triton; ValueError naming what is missing
        otherwise. ffn_products: the FFN's two products through cuBLAS's kernels for one scale a
        tensor, their row scales and biases applied by the kernels after them (FP8Linear.product;
        one more bf16 rounding, of the product before its scales). qkv_gemm: the self-attention's
        q, k and v from one GEMM (SelfAttention.join_qkv; the same arithmetic, one launch for three;
        its weights are q's, k's and v's side by side, theirs become views of it)."""
        blocks, injections = list(self.blocks), self.audio_injector.injections
        if on and (reason := fused_norms.unavailable_reason(self.device)):
            raise ValueError(reason)
        if on and self.dtype != torch.bfloat16:
            raise ValueError(f"--fused-norms rounds as a bf16 model does; this one is {self.dtype}")
        linears = [injection.attn.q for injection in injections]
        for b in blocks:
            linears += [b.self_attn.q, b.self_attn.k, b.self_attn.v, b.cross_attn.q, *b.ffn[::2]]
        if on and not all(isinstance(m, FP8Linear) and m.granularity == "row" for m in linears):
            raise ValueError("--fused-norms quantises the linears' inputs per row: it needs --fp8")
        for module in (*blocks, *injections):
            module.fused_norms = on
        for b in blocks:  # cuBLAS's tensorwise kernels for the FFN's two products (run Y3)
            b.ffn_products = on and ffn_products
            b.self_attn.join_qkv(on and qkv_gemm)
        # the attention outputs no fused kernel quantised (the small audio-token projections stay
        # with inductor, which fuses their quantisation into the kernel before it)
        outputs = [b.self_attn.o for b in blocks] + [b.cross_attn.o for b in blocks] + [i.attn.o for i in injections]
        for layer in outputs:
            if isinstance(layer, FP8Linear) and layer.granularity == "row":
                layer.compile_quantize(quantize_rows_kernel if on else None)
        self._rotate_fused = on

    @torch.no_grad()
    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """features [B, audio_layers, audio_dim, T] (T video frames of one block) -> AudioTokens.

        The first frame is repeated over the motion context span in front, as upstream, and
        the latent frames of that span are dropped: T video frames give T / 4 latent frames.
        """
        pad = features[..., :1].expand(*features.shape[:-1], self.config.motion_frames)
        local, glob = self.casual_audio_encoder(torch.cat([pad, features], dim=-1))
        drop = self.motion_latent_frames
        return AudioTokens(local[:, drop:].to(self.dtype), glob[:, drop:].to(self.dtype))

    @torch.no_grad()
    def embed_time(self, t: torch.Tensor) -> TimeEmbedding:
        """Timesteps t [B, F] in [0, 1000] -> their embedding and every block's modulation."""
        e = sinusoidal_embedding(self.config.freq_dim, t.float().flatten())
        e = _linear_f32(self.time_embedding[2], F.silu(_linear_f32(self.time_embedding[0], e)))
        e6 = _linear_f32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, -1))
        return TimeEmbedding(e.unflatten(0, t.shape), e6.unflatten(0, t.shape))

    def _sink_rope(self, h: int, w: int, ref_frame: int, device) -> Rope:
        key = (h, w, str(device))
        if key not in self._motion_rope:  # fixed positions: computed once per size
            self._motion_rope[key] = self.frame_packer.rope(self.head_dim, h, w, device)
        ref = rope_grid(self.head_dim, range(ref_frame, ref_frame + 1), range(h // 2), range(w // 2), device)
        return Rope.cat([ref, self._motion_rope[key]])

    # ------------------------------------------------------------ forward passes

    @torch.no_grad()
    def prefill_sink(
        self, ref_latent: torch.Tensor, motion_latents: torch.Tensor, context: TextContext, kv: KVCache
    ) -> None:
        """Run the reference + motion tokens (timestep 0) through every layer and store their
        keys/values as the cache's sink. ref_latent [B, 16, 1, h, w], motion [B, 16, T, h, w]."""
        b, _, _, h, w = ref_latent.shape
        self.check_latent_size(h, w)
        dtype, device = self.dtype, ref_latent.device
        ref = self.patch_embedding(ref_latent.to(dtype)).flatten(2).transpose(1, 2)
        mot = self.frame_packer(motion_latents.to(dtype))
        x = torch.cat([ref, mot], dim=1)
        kinds = torch.tensor([1] * ref.shape[1] + [2] * mot.shape[1], device=device)
        x = x + self.trainable_cond_mask(kinds).to(dtype)
        if x.shape[1] != kv.spec.sink_tokens:
            raise ValueError(f"sink has {x.shape[1]} tokens, the cache was sized for {kv.spec.sink_tokens}")
        mod = self.embed_time(torch.zeros(b, 1, device=device)).mod
        rope = self._sink_rope(h, w, REF_ROPE_FRAME, device)
        spec = kv.spec
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                mod,
                rope,
                context.kv[i],
                LayerKV(kv.keys[:, i], kv.values[:, i], kv.ref_k[i], spec.sink_start, spec.sink_tokens, prefill=True),
            )
        kv.sink_filled = True

    @torch.no_grad()
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: TextContext,
        audio: AudioTokens,
        kv: KVCache,
        cache_set: int,
        frame_start: int,
        sink_frame: int,
        cond_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for one block of noisy latents, attending to the cache and the sink.

        latents [B, 16, F, h, w]; timestep [B] or [B, F] in [0, 1000]; context from embed_text;
        frame_start: absolute latent frame index of the block (its RoPE frame and ring slot);
        sink_frame: RoPE frame the reference token sits at for this call. Returns [B, 16, F, h, w].
        """
        b, _, f, h, w = latents.shape
        pos = self.positions(kv, cache_set, frame_start, f, h, w, sink_frame, latents.device)
        time = self.embed_time(timestep.to(latents.device).reshape(b, -1).expand(b, f))
        return self.denoise(latents, time, context, audio, kv, pos, cond_states)

    def positions(
        self, kv: KVCache, cache_set: int, frame_start: int, frames: int, h: int, w: int, sink_frame: int, device
    ) -> StepPositions:
        """The cache span and RoPE of a block of `frames` latent frames starting at frame_start."""
        rows, cols = range(h // 2), range(w // 2)
        return StepPositions(
            kv.block_span(cache_set, frame_start, frames),
            rope_grid(self.head_dim, range(frame_start, frame_start + frames), rows, cols, device),
            rope_grid(self.head_dim, range(sink_frame, sink_frame + 1), rows, cols, device),
        )

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        time: TimeEmbedding,
        context: TextContext,
        audio: AudioTokens,
        kv: KVCache,
        pos: StepPositions,
        cond_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() with its positions and time embedding given (embed_time: a session's steps
        repeat every block, so it embeds each once): no host-device synchronisation, no host
        data, so it can be captured in a CUDA graph (services/generator/step_graphs.py)."""
        if not kv.sink_filled:
            raise RuntimeError("prefill_sink must run before the first block")
        b, _, f, h, w = latents.shape
        dtype = self.dtype
        x = self.patch_embedding(latents.to(dtype))
        cond = torch.zeros_like(latents) if cond_states is None else cond_states
        x = (x + self.cond_encoder(cond.to(dtype))).flatten(2).transpose(1, 2)
        x = x + self.trainable_cond_mask.weight[0].to(dtype)
        span, spec = pos.span, kv.spec
        self._rotate_reference(kv, span.group, pos.ref_rope, dtype)
        for i, block in enumerate(self.blocks):
            layer_kv = LayerKV(
                kv.keys[span.group, i],
                kv.values[span.group, i],
                kv.ref_k[i],
                spec.sink_start,
                spec.sink_tokens,
                span.write,
                span.lo,
                span.hi,
                fp8_attention=kv.fp8_attention,
                fp8_kernel=kv.fp8_kernel,
            )
            x = block(x, time.mod, pos.rope, context.kv[i], layer_kv)
            if i in self.injector_of_layer:
                x = self.audio_injector(self.injector_of_layer[i], x, audio.tokens, audio.global_)
        x = self.head(x, time.e)
        return self._unpatchify(x, f, h // 2, w // 2)

    def compile_reference_rotation(self) -> None:
        """torch.compile the reference keys' rotation (every forward, every layer: ~216M elements at
        704*384): eager, its float32 temporaries and dozen kernels per group of layers took ~5 ms a
        step in run F1's profile; compiled it is one kernel reading the cache's keys once."""
        self._rotate_compiled = torch.compile(rotated_reference_keys, dynamic=True)

    def _rotate_reference(self, kv: KVCache, group: int, rope: Rope, dtype: torch.dtype, layers_at_once=4) -> None:
        """Rotate the reference tokens' keys to this call's RoPE frame, into the sink of `group`'s
        buffers: with the fused norms, one Triton kernel writing into the sink (compiled, Inductor's
        kernel took 1.9 ms a step at 704*384 on an H100, ~10x its memory traffic, and a copy);
        compiled, all layers in one kernel; eager, a few layers per op (bounded float32
        temporaries, few launches)."""
        s0, nref, layers = kv.spec.sink_start, kv.spec.frame_tokens, kv.spec.num_layers
        if self._rotate_fused:
            fused_norms.rope_into(kv.ref_k, rope.cos, rope.sin, kv.keys[group, :, :, s0 : s0 + nref])
            return
        compiled = self._rotate_compiled is not None
        rotate = self._rotate_compiled if compiled else rotated_reference_keys
        step = layers if compiled else layers_at_once
        for i in range(0, layers, step):
            kv.keys[group, i : i + step, :, s0 : s0 + nref] = rotate(kv.ref_k[i : i + step], rope.cos, rope.sin, dtype)

    def _unpatchify(self, x, f, rows, cols):
        b = x.shape[0]
        pt, ph, pw = self.patch_size
        x = x.view(b, f, rows, cols, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, self.config.out_dim, f * pt, rows * ph, cols * pw)

    # ------------------------------------------------------------ init

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> CausalS2VDiT:
        """Deterministic random weights (not upstream's training init: every path, the zero-initialised
        ones included, gets non-zero values so that tests and benchmarks exercise all of them)."""
        for name, p in sorted(self.named_parameters()):
            if p.device.type == "meta":
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed + _name_hash(name))
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.normal_(1.0, 0.02, generator=gen)
            elif p.ndim >= 2 and not name.endswith(("modulation", "padding_tokens", "trainable_cond_mask.weight")):
                p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("casual_audio_encoder.weights"):
                p.normal_(0.01, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        return self


def _name_hash(name: str) -> int:
    """A stable per-parameter seed offset (Python's hash() is salted per process)."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` itself when all its tensors are on `device`; else a shallow twin whose tensors
    that live elsewhere (offloaded weights) are copied there for this one use."""
    children = {n: _on_device(m, device) for n, m in module._modules.items()}
    direct = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    if all(t.device == device for t in direct) and all(children[n] is m for n, m in module._modules.items()):
        return module
    twin = copy.copy(module)
    twin._parameters = {
        n: None if p is None else nn.Parameter(p.to(device, non_blocking=True), requires_grad=False)
        for n, p in module._parameters.items()
    }
    twin._buffers = {n: None if b is None else b.to(device, non_blocking=True) for n, b in module._buffers.items()}
    twin._modules = children
    return twin
