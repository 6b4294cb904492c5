"""One Triton kernel for each stretch of a DiT block between two FP8 linears (`--fused-norms`).

In the FP8 DiT every linear quantises its input per row first, and what comes before that is a
residual add, a LayerNorm and the timestep modulation (or the FFN's GELU). Under torch.compile
those became reduction kernels that ran at a fraction of their memory traffic: four of them took
30 of the 167 ms of a 704*384 step on an H100 (the profile of run H7, docs/performance.md), about
five times what reading and writing their tensors costs. Here each stretch is one program per row
that holds the row in registers: read once, write the FP8 codes, their scale and (after a residual
add) the new float32 residual. The same for the audio injections' AdaLN (`norm_quantize` with two
modulation vectors) and the self-attention's q/k RMSNorm + RoPE (`rms_rope`, the keys in the
cache's dtype); and, outside the blocks, the reference keys' RoPE into the sink (`rope_into`).

Same arithmetic as the block's own code (tests/test_fused_norms.py compares both, in Triton's
interpreter on the CPU): float32 inside, rounded to bf16 where the block rounds, then e4m3 with
one scale per row as `fp8.quantize`. Only the order of the LayerNorm's sums differs.
"""

from __future__ import annotations

import math
import os

import torch

from avatar.services.generator.fp8 import E4M3, FP8Rows, RowProduct
from avatar.services.generator.kv_cache import keys_last

try:
    import triton
    import triton.language as tl

    from avatar.services.generator.fp8 import store_row_e4m3
except ImportError:  # CPU-only installs: unavailable_reason() says so
    triton = None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the fused kernels cannot run on `device`, or None. Triton compiles for CUDA GPUs; on the
    CPU only its interpreter runs them (TRITON_INTERPRET=1, what the tests use)."""
    device = torch.device(device)
    if triton is None:
        return "--fused-norms needs Triton (installed with the CUDA builds of torch)"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"--fused-norms runs on a CUDA GPU, not on {device}"


if triton is not None:

    @triton.jit
    def _norm_quantize_kernel(
        x_ptr,
        y_ptr,
        mod_ptr,
        w_ptr,
        b_ptr,
        x_out_ptr,
        q_ptr,
        s_ptr,
        C,
        tokens,
        tokens_per_group,
        groups,
        vectors,
        eps,
        GATE: tl.constexpr,
        SHIFT: tl.constexpr,
        SCALE: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ROUND_INPUT: tl.constexpr,
        AFFINE: tl.constexpr,
        ROUND_NORM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One row (token) per program. mod holds `vectors` modulation vectors per token group,
        # [B, G, vectors, C] (a block's six, AdaLN's two); SHIFT/SCALE/GATE pick one (-1: none).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        group_row = (row // tokens) * groups + (row % tokens) // tokens_per_group
        mod_row = mod_ptr + group_row * vectors * C
        x = tl.load(x_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:  # x + y (* gate), kept in float32 as the block keeps its residual
            y = tl.load(y_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
            if GATE >= 0:
                y = y * tl.load(mod_row + GATE * C + offs, mask=mask, other=0.0)
            x = x + y
            tl.store(x_out_ptr + row * C + offs, x, mask=mask)
        if ROUND_INPUT:  # the text cross-attention's norm reads the residual in bf16
            x = x.to(tl.bfloat16).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        centred = tl.where(mask, x - mean, 0.0)
        h = centred / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
        if AFFINE:
            h = h * tl.load(w_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + offs, mask=mask, other=0.0)
        if ROUND_NORM:  # the LayerNorm returns its input's dtype (bf16)
            h = h.to(tl.bfloat16).to(tl.float32)
        if SCALE >= 0:
            h = h * (1.0 + tl.load(mod_row + SCALE * C + offs, mask=mask, other=0.0))
        if SHIFT >= 0:
            h = h + tl.load(mod_row + SHIFT * C + offs, mask=mask, other=0.0)
        _store_rows_fp8(h, q_ptr, s_ptr, row, C, offs, mask)

    @triton.jit
    def _gelu_quantize_kernel(
        x_ptr, q_ptr, s_ptr, rs_ptr, cs_ptr, b_ptr, C, BLOCK: tl.constexpr, SCALED: tl.constexpr, BIAS: tl.constexpr
    ):
        # GELU (tanh form, as nn.GELU(approximate="tanh")) of one row, then its FP8 codes; SCALED:
        # the row is a product before its scales (fp8.RowProduct), finished here as apply_scales()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        x = tl.load(x_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
        if SCALED:
            x = x * tl.load(rs_ptr + row) * tl.load(cs_ptr + offs, mask=mask, other=0.0)
            if BIAS:
                x = x + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = x.to(tl.bfloat16).to(tl.float32)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # saturates to +-1, no overflow to nan
        _store_rows_fp8(0.5 * x * (1.0 + tanh), q_ptr, s_ptr, row, C, offs, mask)

    @triton.jit
    def _store_rows_fp8(h, q_ptr, s_ptr, row, C, offs, mask):
        # the next linear's input is bf16: round there first, then fp8.quantize(h, "row")
        store_row_e4m3(tl.where(mask, h.to(tl.bfloat16).to(tl.float32), 0.0), q_ptr, s_ptr, row, C, offs, mask)


if triton is not None:

    @triton.jit
    def _rope_row(h, token, cos_ptr, sin_ptr, C, HALF_D: tl.constexpr, BLOCK: tl.constexpr):
        # RoPE on each head's channel pairs of one token's row (float32 in), bf16 out
        x0, x1 = tl.split(tl.reshape(h, (BLOCK // 2, 2)))
        pair = tl.arange(0, BLOCK // 2)
        angle = token * HALF_D + pair % HALF_D
        cos = tl.load(cos_ptr + angle, mask=pair < C // 2, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=pair < C // 2, other=0.0)
        return tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (BLOCK,)).to(tl.bfloat16)

    @triton.jit
    def _cache_codes(out, FP8: tl.constexpr):
        # as the KV cache stores a bf16 row: as it is, or clamped to e4m3's range and cast
        if FP8:
            out = tl.clamp(out.to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
        return out


if triton is not None:

    @triton.jit
    def _rms_rope_row(
        x_ptr, w_ptr, cos_ptr, sin_ptr, row, C, stride_x, tokens, eps, offs, mask,
        HALF_D: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One token's query or key row (rows stride_x apart: a slice of q|k|v's one product reads
        # in place): RMSNorm over all heads (bf16 out, times the bf16 weight, as the block's
        # RMSNorm), then RoPE on each head's channel pairs (float32, bf16 out).
        # Also returns max |weight|, which bounds the output (QUERY_BOUND).
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps))).to(tl.bfloat16).to(tl.float32)
        h = (h * w).to(tl.bfloat16).to(tl.float32)
        return _rope_row(h, row % tokens, cos_ptr, sin_ptr, C, HALF_D, BLOCK), tl.max(tl.abs(w), axis=0)

    @triton.jit
    def _rms_rope_kernel(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        C,
        stride_x,
        tokens,
        eps,
        descale_ptr,
        bound_per_weight,
        HALF_D: tl.constexpr,
        FP8: tl.constexpr,
        QUERIES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # rms_rope of one row. FP8: clamped to e4m3's range and cast, as the KV cache stores it.
        # QUERIES: e4m3 at the fixed scale the norm's weight gives (rms_rope_fp8), its descale
        # written by the first program.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        out, w_max = _rms_rope_row(
            x_ptr, w_ptr, cos_ptr, sin_ptr, row, C, stride_x, tokens, eps, offs, mask, HALF_D, BLOCK
        )
        if QUERIES:
            descale = tl.maximum(bound_per_weight * w_max, 1e-12) / 448.0
            out = tl.clamp(out.to(tl.float32) / descale, -448.0, 448.0).to(tl.float8e4nv)
            if row == 0:
                tl.store(descale_ptr, descale)
        else:
            out = _cache_codes(out, FP8)
        tl.store(out_ptr + row * C + offs, out, mask=mask)

    @triton.jit
    def _kv_into_cache_kernel(
        k_ptr,
        v_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        keys_ptr,
        values_ptr,
        C,
        stride_k,
        stride_v,
        tokens,
        eps,
        write,
        keys_stride_batch,
        keys_stride_token,
        values_stride_batch,
        values_stride_token,
        HALF_D: tl.constexpr,
        FP8: tl.constexpr,
        VALUES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One token of a block: its key (rms_rope) and value, as the cache stores them, straight
        # into the cache's rows write + token (no output tensor, no copy after). VALUES false:
        # the values are keys-last, _values_keys_last_kernel's.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        batch, token = row // tokens, row % tokens
        k, _ = _rms_rope_row(k_ptr, w_ptr, cos_ptr, sin_ptr, row, C, stride_k, tokens, eps, offs, mask, HALF_D, BLOCK)
        dst = keys_ptr + batch * keys_stride_batch + (write + token) * keys_stride_token
        tl.store(dst + offs, _cache_codes(k, FP8), mask=mask)
        if VALUES:  # each token's values contiguous, as its keys
            v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0)
            dst = values_ptr + batch * values_stride_batch + (write + token) * values_stride_token
            tl.store(dst + offs, _cache_codes(v, FP8), mask=mask)

    @triton.jit
    def _values_keys_last_kernel(
        v_ptr, values_ptr, C, stride_v, tokens, write, stride_batch, stride_channel, FP8: tl.constexpr,
        TOKENS: tl.constexpr, CHANNELS: tl.constexpr,
    ):  # fmt: skip
        # A tile of a block's values [TOKENS, CHANNELS] into a keys-last cache ([B, H*D, T]: each
        # channel's tokens contiguous, what the Triton FP8 attention reads): Triton moves the tile
        # through shared memory between the row-major load and the token-major store.
        t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        c = tl.program_id(1) * CHANNELS + tl.arange(0, CHANNELS)
        batch = tl.program_id(2).to(tl.int64)
        ok = (t < tokens)[:, None] & (c < C)[None, :]
        v = tl.load(v_ptr + (batch * tokens + t[:, None]) * stride_v + c[None, :], mask=ok, other=0.0)
        dst = values_ptr + batch * stride_batch + c[None, :].to(tl.int64) * stride_channel + write + t[:, None]
        tl.store(dst, _cache_codes(v, FP8), mask=ok)


if triton is not None:

    @triton.jit
    def _rope_into_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        C,
        tokens,
        per_layer,
        stride_layer,
        stride_batch,
        stride_token,
        HALF_D: tl.constexpr,
        FP8: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One token's stored reference key (a layer's, a batch item's; all heads) at this call's
        # RoPE frame, as rotated_reference_keys: bf16 in, the rotation in float32, bf16 out, then
        # the cache's dtype; written straight into the sink's rows (strided), no copy after.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        x = tl.load(x_ptr + row * C + offs, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        token = row % tokens
        out = _rope_row(x, token, cos_ptr, sin_ptr, C, HALF_D, BLOCK)
        layer, batch = row // per_layer, (row % per_layer) // tokens
        dst = out_ptr + layer * stride_layer + batch * stride_batch + token * stride_token
        tl.store(dst + offs, _cache_codes(out, FP8), mask=mask)


# Warps per program of each kernel (one row per program), where bench/bench_norm_warps.py measured
# a count faster than the default for the row width (run L3, H100, 704*384: the norms 40/59/71 us
# with 4 against 41/64/75 with 8, the GELU 63 with 8 against 66 with 16; run S2: the keys and
# values into the cache 43.6 us with 4 against 50.0 with 8); the others keep it.
LAUNCH_WARPS: dict[str, int] = {
    "norm_quantize": 4,
    "residual_norm_quantize": 4,
    "gelu_quantize": 8,
    "kv_into_cache": 4,
}


def _launch_shape(c: int, kernel: str) -> tuple[int, int]:
    block = triton.next_power_of_2(c)
    return block, LAUNCH_WARPS.get(kernel, 16 if block >= 16384 else 8 if block >= 2048 else 4)


# Each kernel is a torch custom op: torch.compile calls it as one opaque op with the output shapes
# of its fake below, and fuses the block's other elementwise work around it (a Triton kernel
# traced by dynamo instead would not run in the interpreter the tests use).


@torch.library.custom_op("avatar::norm_quantize", mutates_args=())
def _norm_quantize_op(
    x: torch.Tensor,
    mod: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    shift: int,
    scale: int,
    gate: int,
    round_input: bool,
    round_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, c = x.shape
    # rows are indexed as row * C: the first layer's input (a transposed patch embedding) is
    # copied once here; every later one comes out of the block contiguous
    x, mod = x.contiguous(), mod.contiguous()
    residual = residual.contiguous() if residual is not None else None
    x_out, codes, scales = _norm_quantize_outputs(x, residual)
    if b * n:
        block, warps = _launch_shape(c, "residual_norm_quantize" if residual is not None else "norm_quantize")
        _norm_quantize_kernel[(b * n,)](
            x,
            residual if residual is not None else x,
            mod,
            weight if weight is not None else mod,
            bias if bias is not None else mod,
            x_out if residual is not None else codes,
            codes,
            scales,
            c,
            n,
            n // mod.shape[1],
            mod.shape[1],
            mod.shape[2],
            eps,
            GATE=gate,
            SHIFT=shift,
            SCALE=scale,
            RESIDUAL=residual is not None,
            ROUND_INPUT=round_input,
            AFFINE=weight is not None,
            ROUND_NORM=round_norm,
            BLOCK=block,
            num_warps=warps,
        )
    return x_out, codes, scales


def _norm_quantize_outputs(x, residual):
    b, n, c = x.shape
    x_out = x.new_empty((b, n, c) if residual is not None else (0,), dtype=torch.float32)
    return x_out, x.new_empty((b, n, c), dtype=E4M3), x.new_empty((b, n, 1), dtype=torch.float32)


@_norm_quantize_op.register_fake
def _(x, mod, residual, weight, bias, eps, shift, scale, gate, round_input, round_norm):
    return _norm_quantize_outputs(x, residual)


@torch.library.custom_op("avatar::gelu_quantize", mutates_args=())
def _gelu_quantize_op(
    x: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = _gelu_quantize_outputs(x)
    c = x.shape[-1]
    if x.numel():
        block, warps = _launch_shape(c, "gelu_quantize")
        scaled = row_scale is not None
        rs = row_scale.contiguous() if scaled else scales  # an unread pointer when not SCALED
        cs = col_scale.contiguous() if scaled else scales
        b = bias if bias is not None else scales
        _gelu_quantize_kernel[(x.numel() // c,)](
            x.contiguous(), codes, scales, rs, cs, b, c,
            BLOCK=block, SCALED=scaled, BIAS=scaled and bias is not None, num_warps=warps,
        )  # fmt: skip
    return codes, scales


def _gelu_quantize_outputs(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@_gelu_quantize_op.register_fake
def _(x, row_scale=None, col_scale=None, bias=None):
    return _gelu_quantize_outputs(x)


@torch.library.custom_op("avatar::rms_rope", mutates_args=())
def _rms_rope_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, fp8: bool
) -> torch.Tensor:
    out = _rms_rope_output(x, fp8)
    _launch_rms_rope(x, weight, cos, sin, eps, out, None)
    return out


@torch.library.custom_op("avatar::rms_rope_fp8", mutates_args=())
def _rms_rope_fp8_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, descale = _rms_rope_fp8_outputs(x)
    _launch_rms_rope(x, weight, cos, sin, eps, out, descale)
    return out, descale


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, L, C] as the row kernels read it, with the distance between its rows: in place when
    each row is contiguous and the rows evenly spaced (a column slice of a wider product, as q, k
    and v of one GEMM), else a contiguous copy."""
    b, n, c = x.shape
    if x.stride(2) == 1:
        if n == 1:
            return x, x.stride(0)
        if b == 1 or x.stride(0) == n * x.stride(1):
            return x, x.stride(1)
    return x.contiguous(), c


def _launch_rms_rope(x, weight, cos, sin, eps, out, descale):
    b, n, c = x.shape
    if b * n:
        block, warps = _launch_shape(c, "rms_rope_fp8" if descale is not None else "rms_rope")
        x, stride_x = _rows(x)
        _rms_rope_kernel[(b * n,)](
            x, weight, cos.contiguous(), sin.contiguous(), out, c, stride_x, n, eps,
            descale if descale is not None else out, query_bound_per_weight(c), HALF_D=cos.shape[-1],
            FP8=out.dtype == E4M3, QUERIES=descale is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    elif descale is not None:
        descale.fill_(1.0)


def query_bound_per_weight(c: int) -> float:
    """|rms_rope(x)| <= this * max |weight| for any row x of width c: the RMS-normalised row has
    sum(x_i^2) = c, RoPE keeps each pair's length, and the three bf16 roundings add < 2^-8 each
    (1.02 covers them). The FP8 queries' fixed scale: no value can reach past e4m3's 448."""
    return math.sqrt(c) * 1.02


@torch.library.custom_op("avatar::kv_into_cache", mutates_args=("keys", "values"))
def _kv_into_cache_op(
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    write: int,
) -> None:
    b, n, c = k.shape
    if b * n:
        block, warps = _launch_shape(c, "kv_into_cache")
        values_keys_last = keys_last(values)
        (k, stride_k), (v, stride_v) = _rows(k), _rows(v)
        _kv_into_cache_kernel[(b * n,)](
            k, v, weight, cos.contiguous(), sin.contiguous(), keys, values, c, stride_k, stride_v, n, eps,
            write, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), HALF_D=cos.shape[-1],
            FP8=keys.dtype == E4M3, VALUES=not values_keys_last, BLOCK=block, num_warps=warps,
        )  # fmt: skip
        if values_keys_last:
            tile_t, tile_c = VALUES_TILE
            _values_keys_last_kernel[(triton.cdiv(n, tile_t), triton.cdiv(c, tile_c), b)](
                v, values, c, stride_v, n, write, values.stride(0), values.stride(3), FP8=values.dtype == E4M3,
                TOKENS=tile_t, CHANNELS=tile_c, num_warps=4,
            )  # fmt: skip


VALUES_TILE = (64, 64)  # (tokens, channels) of _values_keys_last_kernel's tiles


@torch.library.custom_op("avatar::rope_into", mutates_args=("out",))
def _rope_into_op(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    layers, b, n = keys.shape[:3]
    c = keys[0, 0, 0].numel()
    if keys.numel():
        block, warps = _launch_shape(c, "rope_into")
        _rope_into_kernel[(layers * b * n,)](
            keys.contiguous(), cos.contiguous(), sin.contiguous(), out, c, n, b * n,
            out.stride(0), out.stride(1), out.stride(2), HALF_D=cos.shape[-1], FP8=out.dtype == E4M3,
            BLOCK=block, num_warps=warps,
        )  # fmt: skip


def _rms_rope_output(x, fp8):
    return x.new_empty(x.shape, dtype=E4M3 if fp8 else torch.bfloat16)


def _rms_rope_fp8_outputs(x):
    return _rms_rope_output(x, True), x.new_empty((1, 1, 1, 1), dtype=torch.float32)


@_rms_rope_op.register_fake
def _(x, weight, cos, sin, eps, fp8):
    return _rms_rope_output(x, fp8)


@_rms_rope_fp8_op.register_fake
def _(x, weight, cos, sin, eps):
    return _rms_rope_fp8_outputs(x)


@_kv_into_cache_op.register_fake
def _(k, v, weight, cos, sin, eps, keys, values, write):
    return None


@_rope_into_op.register_fake
def _(keys, cos, sin, out):
    return None


def _check_rope(x, cos, sin):
    n, c = x.shape[1], x.shape[2]
    if cos.shape != sin.shape or cos.shape[0] != n or c % (2 * cos.shape[-1]):
        raise ValueError(f"cos/sin must be [L, 1, D/2] for x {list(x.shape)}, got {list(cos.shape)}")


def rms_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, fp8: bool = False
) -> torch.Tensor:
    """RMSNorm (times weight) of each token of x [B, L, C] in bf16, then RoPE with cos/sin [L, 1, D/2]
    on each head's channel pairs; bf16 out, or e4m3 clamped to its range (the FP8 KV cache)."""
    _check_rope(x, cos, sin)
    return torch.ops.avatar.rms_rope(x, weight, cos, sin, eps, fp8)


def rms_rope_fp8(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 attention's queries in one pass: rms_rope in bf16, then e4m3 at one scale fixed by
    the norm's weight (descale = query_bound_per_weight(C) * max |weight| / 448: no value can
    overflow, so no reduction over the queries is needed first). Returns (codes [B, L, C],
    descale [1, 1, 1, 1] float32)."""
    _check_rope(x, cos, sin)
    return torch.ops.avatar.rms_rope_fp8(x, weight, cos, sin, eps)


def kv_into_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    write: int,
) -> None:
    """A block's keys (rms_rope of the key projection k [B, L, C]) and values (v [B, L, C]) in the
    cache's dtype, written straight into rows [write, write + L) of one layer's keys/values
    [B, T, H, D] (each token's H x D contiguous; the values may be keys-last instead, laid out
    [B, H, D, T] as the Triton FP8 attention reads them): one kernel for what was rms_rope, two
    casts and two copies into the cache (a second kernel for keys-last values)."""
    _check_rope(k, cos, sin)
    b, n, c = k.shape
    for name, buf in (("keys", keys), ("values", values)):
        rows_contiguous = buf.dim() == 4 and buf.stride(3) == 1 and buf.stride(2) == buf.shape[3]
        if name == "values" and buf.dim() == 4:
            rows_contiguous = rows_contiguous or keys_last(buf)
        if not rows_contiguous or buf.shape[0] != b or buf[0, 0].numel() != c:
            raise ValueError(
                f"{name} must be [B, T, H, D] with each token's H x D contiguous"
                + (" (or keys-last)" if name == "values" else "")
                + f", got {list(buf.shape)}"
            )
        if not 0 <= write <= buf.shape[1] - n:
            raise ValueError(f"rows [{write}, {write + n}) are outside {name}' {buf.shape[1]} rows")
    if v.shape != k.shape or keys.dtype != values.dtype:
        raise ValueError(f"v must be k's shape {list(k.shape)} and keys/values one dtype")
    torch.ops.avatar.kv_into_cache(k, v, weight, cos, sin, eps, keys, values, write)


def rope_into(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """The reference's stored keys [layers, B, L, H, D] (bf16 or e4m3) rotated with cos/sin
    [L, 1, D/2] into out (the same shape, each token's H x D contiguous, e.g. the sink's rows of
    one cache set) in out's dtype: rotated_reference_keys in one kernel that writes in place."""
    heads_dims = keys.shape[-2:]
    if out.shape != keys.shape or out.stride(-1) != 1 or out.stride(-2) != keys.shape[-1]:
        raise ValueError(f"out must be {list(keys.shape)} with each token's {list(heads_dims)} contiguous")
    if cos.shape != sin.shape or cos.shape[0] != keys.shape[2] or keys.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"cos/sin must be [L, 1, D/2] for keys {list(keys.shape)}, got {list(cos.shape)}")
    torch.ops.avatar.rope_into(keys, cos, sin, out)


def norm_quantize(
    x: torch.Tensor,
    mod: torch.Tensor,
    eps: float,
    *,
    shift: int = -1,
    scale: int = -1,
    residual: torch.Tensor | None = None,
    gate: int = -1,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    round_input: bool = False,
    round_norm: bool = False,
) -> tuple[torch.Tensor | None, FP8Rows]:
    """LayerNorm of x [B, L, C] (after x += residual * mod[gate] when a residual is given), the
    optional affine weight/bias, modulation h * (1 + mod[scale]) + mod[shift], then the FP8 codes
    of h in bf16. mod [B, G, K, C] float32: K modulation vectors per token group (L = G * n), e.g.
    a block's six; shift, scale and gate index them (-1: not applied).

    Returns (the float32 x after the residual add, or None; FP8Rows [B, L, C])."""
    b, n, c = x.shape
    if mod.dtype != torch.float32 or mod.dim() != 4 or mod.shape[0] != b or mod.shape[3] != c or n % mod.shape[1]:
        raise ValueError(f"mod must be float32 [B, G, K, C] with G dividing L, got {mod.dtype} {list(mod.shape)}")
    if max(shift, scale, gate) >= mod.shape[2]:
        raise ValueError(f"mod has {mod.shape[2]} vectors per group: shift/scale/gate {shift}/{scale}/{gate}")
    x_out, codes, scales = torch.ops.avatar.norm_quantize(
        x, mod, residual, weight, bias, eps, shift, scale, gate, round_input, round_norm
    )
    return (x_out if residual is not None else None), FP8Rows(codes, scales)


def gelu_quantize(x: torch.Tensor | RowProduct) -> FP8Rows:
    """The FP8 codes of GELU(x) (tanh form) in bf16, x [..., C] (the FFN's hidden layer), or of
    GELU(apply_scales(x)) for a product before its scales (FP8Linear.product), in one kernel."""
    if isinstance(x, RowProduct):
        if x.row_scale.shape != (*x.z.shape[:-1], 1) or x.col_scale.shape != x.z.shape[-1:]:
            raise ValueError(f"scales {tuple(x.row_scale.shape)}, {tuple(x.col_scale.shape)} for {tuple(x.z.shape)}")
        return FP8Rows(*torch.ops.avatar.gelu_quantize(x.z, x.row_scale, x.col_scale, x.bias))
    return FP8Rows(*torch.ops.avatar.gelu_quantize(x))
