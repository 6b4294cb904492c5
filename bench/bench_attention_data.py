"""cuDNN's FP8 attention at the DiT's 704*384 shape on three kinds of data, with the GPU's SM clock
and power draw while each runs: whether the kernel's time depends on what it computes.

Why: run V1 timed the kernel alone at 1.224 ms (bench_diagonal.py: unit-normal e4m3 codes, a
query scale of 1/64, so a nearly uniform softmax) where the engine's profiles give 1.33-1.35 ms
a call and bench_attention.py 1.35-1.41 on H100s. An H100 at its power limit lowers its clock, and
the energy of a tensor-core product grows with how many of its operands' bits change. Run V3
(docs/performance.md): 1.228-1.259 ms at 1854-1892 MHz in all three cases; the engine's extra time
is its lower clock (bench/gpu_clocks.py), not its data.

Cases (same shapes, the same keys and values; only the queries differ):
- `uniform`: scores ~0, every probability the same e4m3 code;
- `model-like`: unit-RMS queries and keys (the q/k RMSNorm's output), scores of unit spread;
- `peaked`: the queries x4: a few keys take most of each row's weight.

    python3 bench/bench_attention_data.py [--size 704*384] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_attention import shapes as attention_shapes  # noqa: E402
from bench_norm_warps import graph_ms, save_results  # noqa: E402
from gpu_clocks import GpuSampler  # noqa: E402

from avatar.services.generator import fp8_attention  # noqa: F401  (registers torch.ops.avatar.fp8_sdpa)

E4M3 = torch.float8_e4m3fn
CASES = {"uniform": None, "model-like": 1.0, "peaked": 4.0}  # the queries' RMS; None: scale 1/64 on raw codes


def inputs(case: str, lq: int, lk: int, heads: int, head_dim: int, device):
    """(q8, k8, v8, descale) of a case: the keys and values unit-normal e4m3 codes in all three."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, lq, heads, head_dim, generator=g, device=device)
    k8 = torch.randn(1, lk, heads, head_dim, generator=g, device=device).to(E4M3)
    v8 = torch.randn(1, lk, heads, head_dim, generator=g, device=device).to(E4M3)
    rms = CASES[case]
    if rms is None:
        return q.to(E4M3), k8, v8, torch.full((1, 1, 1, 1), 1 / 64, device=device)
    q = q * rms
    descale = (q.abs().amax() / 448).reshape(1, 1, 1, 1)
    return (q / descale).to(E4M3), k8, v8, descale


def bench(
    width: int,
    height: int,
    device,
    calls: int = 20,
    reps: int = 150,
    heads: int = 40,
    head_dim: int = 128,
    shapes: tuple[int, int] | None = None,
    out: str | None = None,
) -> dict:
    lq, lk = shapes or attention_shapes(width, height)
    flops = 4 * lq * lk * heads * head_dim
    res: dict = {"size": f"{width}*{height}", "queries": lq, "keys": lk, "cases": {}}
    for case in CASES:
        q8, k8, v8, descale = inputs(case, lq, lk, heads, head_dim, device)
        with GpuSampler(device) as sampler:
            ms = graph_ms(lambda: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale), device, calls, reps)
        out8 = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale)
        row = {
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "distinct_output_codes": int(out8.view(torch.uint8).unique().numel()),
        }
        row |= sampler.summary()
        res["cases"][case] = row
        print(
            f"  {case:11s} {ms:7.3f} ms  {row['tflops']:5.0f} TFLOP/s  "
            + " ".join(f"{k}={v:.0f}" for k, v in row.items() if k in ("clock_mhz_median", "power_w_median")),
            flush=True,
        )
        save_results(res, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("*"))
    res = bench(width, height, args.device, out=args.out)
    save_results(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
