"""The DiT's FP8 GEMMs at one size's token count, alone (GPU time of a CUDA graph of `--calls`
back-to-back calls): each projection as the model runs it (torch._scaled_mm, per-row scales, bf16
out, fast accumulation) and the self-attention's q, k and v as one GEMM with their weights side by
side (N = 3 x 5120) or k and v as one (N = 2 x 5120): whether fusing them would pay, before any
model change. One short call, no model.

Why: the GEMMs are 241 of a 704*384 block's 578 ms on an H100 (run Q3, docs/performance.md),
1376 calls a block, all cuBLAS's 128x128 tiles; at M = 3168 tokens an N = 5120 GEMM is 7.6 waves
of tiles on 132 SMs, so each of the three separate q/k/v GEMMs ends in a part-empty wave.

--compiled also times each one-GEMM case through torch.compile as the model's blocks run it
(Inductor's default mode: its own call of the same cuBLAS product); --autotune through its
max-autotune, where Inductor picks between cuBLAS and its own Triton FP8 GEMM templates for the
shape. (Run U1: FFN down ran at ~1100 TFLOP/s called eagerly, ~1350 through max-autotune, which
chose cuBLAS's _scaled_mm all the same.)

    python3 bench/bench_gemm.py [--size 704*384] [--calls 20] [--compiled] [--autotune] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_norm_warps import graph_ms, save_results  # noqa: E402

from avatar.presets import LATENT_FRAMES_PER_BLOCK

E4M3 = torch.float8_e4m3fn


def shapes(dim: int = 5120, ffn_dim: int = 13824) -> dict[str, list[tuple[int, int]]]:
    """name: the (K, N) of each GEMM it runs, one after another."""
    return {
        "q, k, v apart": [(dim, dim)] * 3,
        "q|k|v as one": [(dim, 3 * dim)],
        "q, then k|v as one": [(dim, dim), (dim, 2 * dim)],
        "o (self or cross)": [(dim, dim)],
        "ffn up": [(dim, ffn_dim)],
        "ffn down": [(ffn_dim, dim)],
        "ffn down, as W @ x^T": [(ffn_dim, -dim)],  # the transposed product: y^T [dim, tokens]
    }


def gemm(m: int, k: int, n: int, device: str):
    """One FP8 projection as FP8Linear runs it: x [m, k] codes with row scales, weight [n, k];
    n < 0: the same product transposed, W @ x^T (cuBLAS tiles the other way)."""
    if n < 0:
        return gemm_transposed(m, k, -n, device)
    g = torch.Generator(device=device).manual_seed(k + n)
    x = torch.randn(m, k, generator=g, device=device).to(E4M3)
    w = torch.randn(n, k, generator=g, device=device).to(E4M3)
    xs, ws = torch.rand(m, 1, device=device) + 0.5, torch.rand(1, n, device=device) + 0.5
    bias = torch.randn(n, device=device).bfloat16()

    def call():
        return torch._scaled_mm(
            x, w.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    return call


def gemm_transposed(m: int, k: int, n: int, device: str):
    g = torch.Generator(device=device).manual_seed(k + n)
    x = torch.randn(m, k, generator=g, device=device).to(E4M3)
    w = torch.randn(n, k, generator=g, device=device).to(E4M3)
    ws, xs = torch.rand(n, 1, device=device) + 0.5, torch.rand(1, m, device=device) + 0.5

    def call():
        return torch._scaled_mm(w, x.t(), scale_a=ws, scale_b=xs, out_dtype=torch.bfloat16, use_fast_accum=True)

    return call


def autotuned(fn):
    """fn through torch.compile's max-autotune (Inductor times cuBLAS against its Triton templates)."""
    return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)


def compiled(fn):
    """fn through torch.compile's default mode, as compile_blocks compiles the model's blocks."""
    return torch.compile(fn, dynamic=False)


def bench(
    width: int,
    height: int,
    device: str,
    calls: int,
    reps: int,
    dim: int = 5120,
    ffn_dim: int = 13824,
    autotune: bool = False,
    out: str | None = None,
    compile_too: bool = False,
) -> dict:
    """out: the results so far, rewritten after each case (a device call cut short keeps them)."""
    m = LATENT_FRAMES_PER_BLOCK * (height // 16) * (width // 16)
    res: dict = {"size": f"{width}*{height}", "tokens": m, "calls_per_graph": calls, "cases": {}}
    cases = [(name, parts, None) for name, parts in shapes(dim, ffn_dim).items()]
    variants = [
        (v, wrap) for v, wrap, on in (("compiled", compiled, compile_too), ("max-autotune", autotuned, autotune)) if on
    ]
    cases += [(f"{name}, {v}", parts, wrap) for v, wrap in variants for name, parts, _ in cases if len(parts) == 1]
    for name, parts, wrap in cases:
        fns = [gemm(m, k, n, device) for k, n in parts]
        if wrap is not None:
            fns = [wrap(fn) for fn in fns]

        def run(fns=fns):
            for fn in fns:
                fn()

        ms = graph_ms(run, device, calls, reps)
        flop = sum(2 * m * k * abs(n) for k, n in parts)
        res["cases"][name] = {"ms": ms, "tflops": flop / ms / 1e9, "gemms": len(parts)}
        print(f"  {name:24s} {ms * 1000:8.1f} us  {flop / ms / 1e9:6.0f} TFLOP/s  ({len(parts)} GEMM)", flush=True)
        save_results(res, out)
    apart, fused = res["cases"]["q, k, v apart"]["ms"], res["cases"]["q|k|v as one"]["ms"]
    res["qkv_fused_saves_ms_per_block"] = (apart - fused) * 40 * 4  # 40 layers x 4 steps
    print(f"q|k|v as one saves {res['qkv_fused_saves_ms_per_block']:.2f} ms a block (40 layers, 4 steps)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compiled", action="store_true", help="also each one-GEMM case through torch.compile")
    ap.add_argument("--autotune", action="store_true", help="also each one-GEMM case through max-autotune")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("*"))
    res = bench(
        width,
        height,
        args.device,
        args.calls,
        args.reps,
        autotune=args.autotune,
        out=args.out,
        compile_too=args.compiled,
    )
    save_results(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
