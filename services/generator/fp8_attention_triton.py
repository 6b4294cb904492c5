"""FP8 self-attention as one Triton kernel (`--fp8-attention-kernel triton`): the arithmetic of
cuDNN's (fp8_attention.py), written out so that its tiles, pipelining and the values' layout are
ours to choose, and so that FP8 attention needs neither the cuDNN frontend nor Hopper.

Measured (run P1, H100, docs/performance.md "A Triton FP8 attention"): at the DiT's 704*384 shape
(3168 queries over 15312 keys, 40 x 128) its fastest form takes 1.471 ms (675 TFLOP/s) where
cuDNN's takes 1.371-1.408, and writing a block's values keys-last costs 0.12 ms more a layer than
the usual layout: cuDNN's stays the default on Hopper. Same error against exact attention as
cuDNN's (0.0689 both); 2.3-2.6% from cuDNN's codes (where each rounds the probabilities).

FP8 tensor cores (Hopper's wgmma) read both operands of a product along its reduction: the keys
are (their head dim is contiguous), the values are not (P @ V sums over keys). So the kernel
reads the values from a cache that stores them keys-last (`KVCache(..., fp8_kernel="triton")`:
the same logical [.., tokens, H, D] tensor, laid out [.., H, D, tokens]), with TMA where the
addresses allow (Hopper); handed an ordinary layout it still runs, 2.3x slower at the same tiles (each tile
transposed through shared memory). Warp specialisation (Triton's Hopper pass) is a bench option:
slower here, and with more than 2 stages it gave wrong results with Triton 3.6 (refused).

Same numerics as fp8_attention.reference: e4m3 queries with one scale per call, the cache's e4m3
keys and values unscaled, products in float32, the running softmax numerators entering the second
product as e4m3 scaled by 256, the output as e4m3 codes at scale 1.
"""

from __future__ import annotations

import math
import os

import torch

from avatar.services.generator.kv_cache import keys_last

E4M3 = torch.float8_e4m3fn
P_LOG2 = 8.0  # log2 of fp8_attention.P_SCALE (256, cuDNN's scale_s): the same rounding of the probabilities
LOG2E = 1.4426950408889634

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: unavailable_reason() says so
    triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages): measured fastest at 704*384 on an H100 (run P1,
# bench/bench_attention.py --triton, docs/performance.md); others for the bench's sweep.
DEFAULT_CONFIG = (128, 64, 4, 3)
DEFAULT_WARP_SPECIALIZE = False  # the TMA kernel's producer/consumer warps (Triton's Hopper pass)
DEFAULT_FMA_EXP_EVERY = 0  # exponentials on the FMA pipe for every n-th key tile: slower (run T1)
SWEEP_CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)]
TMA_SWEEP = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3)]
WS_SWEEP = [(128, 128, 4, 2), (256, 128, 4, 2)]  # 4 warps: specialised (12); 2 stages (above)


def unavailable_reason(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if triton is None:
        return "the Triton FP8 attention needs Triton (installed with the CUDA builds of torch)"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            return f"FP8 tensor cores need compute capability 8.9 or newer; {device} is not"
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton FP8 attention runs on a CUDA GPU, not on {device}"


if triton is not None:

    @triton.jit
    def _exp2_fma(x):
        # 2^x on the FMA and integer pipes, not the special-function unit (which computes one
        # exp2 per 1/16 clock an SM: at head dim 128 an FP8 tile's exponentials take as long as
        # its two products). x <= 8 here; x + 1.5 * 2^23 rounds x to an integer j in the low
        # bits, 2^f for f = x - j in [-0.5, 0.5] is a cubic (relative error 1.1e-4, far inside
        # e4m3's 6% rounding of the probabilities), and j goes into the exponent field. Measured
        # slower (run T1): this kernel is bound by the instructions around its products instead.
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        p = 1.0 + f * (0.69336869 + f * (0.24221838 + f * 0.05459283))
        j = t.to(tl.int32, bitcast=True) - 0x4B400000
        return (p.to(tl.int32, bitcast=True) + (j << 23)).to(tl.float32, bitcast=True)

    @triton.jit
    def _online_softmax(s, m_i, l_i, scale, P_LOG2: tl.constexpr, FMA_EXP: tl.constexpr = False):
        # s: a tile's raw scores q8 . k8 in float32; the running max m_i is kept in those units
        # (scale > 0), so each score costs one FMA and one exp2: exp2(s * scale - m * scale + 8)
        # is 256 x the softmax numerator, the e4m3 value that enters P @ V, and l_i sums them.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        bias = m_new * scale - P_LOG2
        if FMA_EXP:
            p = _exp2_fma(s * scale - bias[:, None])
        else:
            p = tl.math.exp2(s * scale - bias[:, None])
        alpha = tl.math.exp2((m_i - m_new) * scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        return p.to(tl.float8e4nv), alpha, m_new, l_i

    @triton.jit
    def _fp8_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        descale_ptr,
        stride_qb,
        stride_ql,
        stride_qh,
        stride_kb,
        stride_kl,
        stride_kh,
        stride_vb,
        stride_vl,
        stride_vh,
        stride_vd,
        stride_ob,
        stride_ol,
        stride_oh,
        n_queries,
        n_keys,
        n_heads,
        sm_scale_log2,
        P_LOG2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # One program: BLOCK_M queries of one head against every key, the softmax online (exp2).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < n_queries

        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        # keys as K^T [HEAD_DIM, BLOCK_N] (head dim contiguous: the product's reduction axis)
        k_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kl + offs_d[:, None]
        v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
        scale = tl.load(descale_ptr) * sm_scale_log2  # q's descale x 1/sqrt(D) x log2(e), > 0

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        full_tiles = n_keys // BLOCK_N
        for _ in range(0, full_tiles):
            k = tl.load(k_ptrs)
            p8, alpha, m_i, l_i = _online_softmax(tl.dot(q, k), m_i, l_i, scale, P_LOG2)
            v = tl.load(v_ptrs)
            acc = tl.dot(p8, v, acc * alpha[:, None])
            k_ptrs += BLOCK_N * stride_kl
            v_ptrs += BLOCK_N * stride_vl
        if full_tiles * BLOCK_N < n_keys:  # the last, partial tile: keys past the end weigh 0
            key_ok = full_tiles * BLOCK_N + offs_n < n_keys
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
            s = tl.where(key_ok[None, :], tl.dot(q, k), float("-inf"))
            p8, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, scale, P_LOG2)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            acc = tl.dot(p8, v, acc * alpha[:, None])

        out = acc / l_i[:, None]
        out = tl.clamp(out, -448.0, 448.0).to(tl.float8e4nv)
        tl.store(
            o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
            out,
            mask=row_ok[:, None],
        )


if triton is not None:

    @triton.jit
    def _tma_tile(q, k_desc, vt_desc, start, column, acc, m_i, l_i, scale, P_LOG2: tl.constexpr, FMA_EXP: tl.constexpr):
        # one full key tile at `start` of the TMA kernel: scores, online softmax, P @ V into acc
        k = k_desc.load([start, column])
        p8, alpha, m_i, l_i = _online_softmax(tl.dot(q, k.T), m_i, l_i, scale, P_LOG2, FMA_EXP)
        vt = vt_desc.load([column, start])
        return tl.dot(p8, vt.T, acc * alpha[:, None]), m_i, l_i

    @triton.jit
    def _fp8_attention_tma_kernel(
        q_ptr,
        k_ptr,
        vt_ptr,
        o_ptr,
        descale_ptr,
        stride_qb,
        stride_ql,
        stride_kb,
        stride_kl,
        stride_vb,
        stride_vd,
        stride_ob,
        stride_ol,
        n_queries,
        n_keys,
        n_heads,
        sm_scale_log2,
        P_LOG2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
        FMA_EXP_EVERY: tl.constexpr,
    ):
        # The same program as _fp8_attention_kernel, its tiles moved by TMA (tensor descriptors),
        # the values read keys-last as V^T [H*D, keys]; optionally warp-specialised (producer
        # warps load while the others multiply). Rows and keys past the end load as zeros.
        # FMA_EXP_EVERY n > 0: every n-th full tile's exponentials by _exp2_fma (0: none).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        hd = n_heads * HEAD_DIM
        q_desc = tl.make_tensor_descriptor(
            q_ptr + b * stride_qb, shape=[n_queries, hd], strides=[stride_ql, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        k_desc = tl.make_tensor_descriptor(
            k_ptr + b * stride_kb, shape=[n_keys, hd], strides=[stride_kl, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        vt_desc = tl.make_tensor_descriptor(
            vt_ptr + b * stride_vb, shape=[hd, n_keys], strides=[stride_vd, 1], block_shape=[HEAD_DIM, BLOCK_N]
        )
        o_desc = tl.make_tensor_descriptor(
            o_ptr + b * stride_ob, shape=[n_queries, hd], strides=[stride_ol, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        q = q_desc.load([pid_m * BLOCK_M, h * HEAD_DIM])
        scale = tl.load(descale_ptr) * sm_scale_log2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        full_end = (n_keys // BLOCK_N) * BLOCK_N
        if WARP_SPECIALIZE:  # Triton's Hopper pass splits one loop and nothing after it: mask in it
            for start in tl.range(0, n_keys, BLOCK_N, warp_specialize=True):
                k = k_desc.load([start, h * HEAD_DIM])
                s = tl.where((start + tl.arange(0, BLOCK_N) < n_keys)[None, :], tl.dot(q, k.T), float("-inf"))
                p8, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, scale, P_LOG2)
                vt = vt_desc.load([h * HEAD_DIM, start])
                acc = acc * alpha[:, None]
                acc = tl.dot(p8, vt.T, acc)
            full_end = n_keys
        elif FMA_EXP_EVERY == 2:  # tiles in pairs: the second's exponentials on the FMA pipe
            pairs_end = (n_keys // (2 * BLOCK_N)) * 2 * BLOCK_N
            for start in tl.range(0, pairs_end, 2 * BLOCK_N):
                acc, m_i, l_i = _tma_tile(q, k_desc, vt_desc, start, h * HEAD_DIM, acc, m_i, l_i, scale, P_LOG2, False)
                acc, m_i, l_i = _tma_tile(
                    q, k_desc, vt_desc, start + BLOCK_N, h * HEAD_DIM, acc, m_i, l_i, scale, P_LOG2, True
                )
            if pairs_end < full_end:
                acc, m_i, l_i = _tma_tile(
                    q, k_desc, vt_desc, pairs_end, h * HEAD_DIM, acc, m_i, l_i, scale, P_LOG2, False
                )
        else:  # FMA_EXP_EVERY 0: every exponential on the special-function unit; 1: none
            for start in tl.range(0, full_end, BLOCK_N):
                acc, m_i, l_i = _tma_tile(
                    q, k_desc, vt_desc, start, h * HEAD_DIM, acc, m_i, l_i, scale, P_LOG2, FMA_EXP_EVERY == 1
                )
        if full_end < n_keys:
            key_ok = full_end + tl.arange(0, BLOCK_N) < n_keys
            k = k_desc.load([full_end, h * HEAD_DIM])
            s = tl.where(key_ok[None, :], tl.dot(q, k.T), float("-inf"))
            p8, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, scale, P_LOG2)
            vt = vt_desc.load([h * HEAD_DIM, full_end])
            acc = tl.dot(p8, vt.T, acc * alpha[:, None])
        out = acc / l_i[:, None]
        o_desc.store([pid_m * BLOCK_M, h * HEAD_DIM], tl.clamp(out, -448.0, 448.0).to(tl.float8e4nv))


def tma_ready(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> bool:
    """Whether the TMA kernel can read these: values keys-last, and every base address and row
    stride a multiple of 16 bytes (what TMA requires)."""
    aligned = all(t.data_ptr() % 16 == 0 for t in (q8, k8, v8))
    strides = (q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1), v8.stride(0), v8.stride(3))
    return keys_last(v8) and aligned and all(s % 16 == 0 for s in strides) and q8.is_contiguous()


def fp8_sdpa_triton(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    config: tuple[int, int, int, int] | None = None,
    tma: bool | None = None,
    warp_specialize: bool | None = None,
    fma_exp_every: int | None = None,
) -> torch.Tensor:
    """Unmasked attention of e4m3 [B, L, H, D] (q scaled by descale_q, k and v by 1) -> e4m3
    [B, Lq, H, D], contiguous. q and k must have a contiguous head dim; v may be laid out either
    way (keys-last is the fast one on Hopper). tma: the TMA kernel (None: wherever tma_ready).
    fma_exp_every (TMA kernel): every n-th key tile's exponentials as a polynomial on the FMA
    pipe (1: all, 2: every second; 0 or None: DEFAULT_FMA_EXP_EVERY)."""
    b, lq, h, d = q8.shape
    lk = k8.shape[1]
    if q8.stride(-1) != 1 or k8.stride(-1) != 1:
        raise ValueError("the Triton FP8 attention needs q and k with a contiguous head dim")
    if d not in (16, 32, 64, 128, 256) or v8.shape[-1] != d:
        raise ValueError(f"head dim {d} (and the values' {v8.shape[-1]}): the kernel takes a power of two, 16-256")
    block_m, block_n, warps, stages = config or DEFAULT_CONFIG
    out = torch.empty((b, lq, h, d), dtype=E4M3, device=q8.device)
    grid = (triton.cdiv(lq, block_m), b * h)
    if tma is None:  # TMA: Hopper (and the interpreter)
        tma = tma_ready(q8, k8, v8) and (not q8.is_cuda or torch.cuda.get_device_capability(q8.device) >= (9, 0))
    if warp_specialize is None:
        warp_specialize = DEFAULT_WARP_SPECIALIZE
    if warp_specialize and not tma:
        raise ValueError("warp specialisation is the TMA kernel's (values keys-last, 16-byte aligned, Hopper)")
    if fma_exp_every is None:
        fma_exp_every = DEFAULT_FMA_EXP_EVERY if tma and not warp_specialize else 0
    if fma_exp_every not in (0, 1, 2) or (fma_exp_every and (warp_specialize or not tma)):
        raise ValueError(f"fma_exp_every {fma_exp_every}: 0, 1 or 2, in the TMA kernel without warp specialisation")
    if warp_specialize and stages > 2:
        raise ValueError("the warp-specialised kernel gave wrong results at more than 2 stages (Triton 3.6, run P1)")
    if tma:
        # global memory for the descriptors tl.make_tensor_descriptor builds, on q's device
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=q8.device))
        _fp8_attention_tma_kernel[grid](
            q8,
            k8,
            v8,
            out,
            descale_q,
            q8.stride(0),
            q8.stride(1),
            k8.stride(0),
            k8.stride(1),
            v8.stride(0),
            v8.stride(3),
            out.stride(0),
            out.stride(1),
            lq,
            lk,
            h,
            LOG2E / math.sqrt(d),
            P_LOG2=P_LOG2,
            HEAD_DIM=d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            WARP_SPECIALIZE=warp_specialize,
            FMA_EXP_EVERY=fma_exp_every,
            num_warps=warps,
            num_stages=stages,
        )
        return out
    _fp8_attention_kernel[grid](
        q8,
        k8,
        v8,
        out,
        descale_q,
        q8.stride(0),
        q8.stride(1),
        q8.stride(2),
        k8.stride(0),
        k8.stride(1),
        k8.stride(2),
        v8.stride(0),
        v8.stride(1),
        v8.stride(2),
        v8.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lq,
        lk,
        h,
        LOG2E / math.sqrt(d),
        P_LOG2=P_LOG2,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
    )
    return out
