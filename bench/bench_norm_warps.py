"""The fused norm kernels' launch width: each of fused_norms.py's kernels at one size's token count,
timed with every warps-per-program count, as the DiT runs them (GPU time of a CUDA graph of
`--calls` back-to-back launches, so the host's dispatch does not count). One short call, no model.

Why: the DiT's profile (run L1, docs/performance.md) has them at about half of the H100's memory
bandwidth (norm_quantize 63 us a call where its tensors' traffic needs ~35), 34 ms of a 704*384
block together. Prints a table per kernel and the fastest count of each; `--out` writes them as JSON
({"warps": {kernel: count}, ...}), which `bench_generator.py --norm-warps FILE` applies to the
engine and `fused_norms.LAUNCH_WARPS` takes as its defaults once measured.

    python3 bench/bench_norm_warps.py [--size 704*384] [--warps 2,4,8,16,32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_generator import time_fn  # noqa: E402

from avatar.presets import LATENT_FRAMES_PER_BLOCK
from avatar.services.generator import fused_norms
from avatar.services.generator.causal_s2v_dit import rope_grid
from avatar.services.generator.fp8 import RowProduct

E4M3 = torch.float8_e4m3fn


def cases(
    width: int, height: int, device: str, dim: int = 5120, ffn_dim: int = 13824, heads: int = 40, layers: int = 40
) -> dict:
    """name: (LAUNCH_WARPS key, one call as the DiT makes it, bytes it reads and writes, row width)."""
    m = LATENT_FRAMES_PER_BLOCK * (height // 16) * (width // 16)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, y, stream = rnd(1, m, dim), rnd(1, m, dim), rnd(1, m, dim, dtype=torch.float32)
    mod = rnd(1, LATENT_FRAMES_PER_BLOCK, 6, dim, dtype=torch.float32, scale=0.3)
    w, b, hidden = rnd(dim), rnd(dim), rnd(1, m, ffn_dim)
    rope = rope_grid(dim // heads, range(3), range(height // 16), range(width // 16), device)
    frame = (height // 16) * (width // 16)
    ref_keys = rnd(layers, 1, frame, heads, dim // heads)
    sink = torch.empty(layers, 1, frame, heads, dim // heads, dtype=E4M3, device=device)
    ref_rope = rope_grid(dim // heads, range(40, 41), range(height // 16), range(width // 16), device)
    keys, values = (torch.empty(1, 2 * m, heads, dim // heads, dtype=E4M3, device=device) for _ in range(2))
    # the FFN's first product before its scales (FP8Linear.product), as the model hands it over
    product = RowProduct(
        rnd(1, m, ffn_dim, scale=30.0),
        rnd(1, m, 1, dtype=torch.float32, scale=0.01).abs() + 1e-3,
        rnd(ffn_dim, dtype=torch.float32, scale=0.01).abs() + 1e-3,
        rnd(ffn_dim),
    )
    return {
        "norm1+modulate": (
            "norm_quantize",
            lambda: fused_norms.norm_quantize(x, mod, 1e-6, shift=0, scale=1, round_norm=True),
            m * dim * (2 + 1),
            dim,
        ),
        "gated residual+norm3": (
            "residual_norm_quantize",
            lambda: fused_norms.norm_quantize(x, mod, 1e-6, residual=y, gate=2, weight=w, bias=b, round_input=True),
            m * dim * (2 + 2 + 4 + 1),
            dim,
        ),
        "residual+norm2+modulate": (
            "residual_norm_quantize",
            lambda: fused_norms.norm_quantize(stream, mod, 1e-6, residual=y, shift=3, scale=4),
            m * dim * (4 + 2 + 4 + 1),
            dim,
        ),
        "gelu": ("gelu_quantize", lambda: fused_norms.gelu_quantize(hidden), m * ffn_dim * (2 + 1), ffn_dim),
        "gelu of a product": (
            "gelu_quantize",
            lambda: fused_norms.gelu_quantize(product),
            m * ffn_dim * (2 + 1),
            ffn_dim,
        ),
        "q rms+rope to FP8": (
            "rms_rope_fp8",
            lambda: fused_norms.rms_rope_fp8(x, w, rope.cos, rope.sin, 1e-6),
            m * dim * (2 + 1),
            dim,
        ),
        "k rms+rope and v into the FP8 cache": (
            "kv_into_cache",
            lambda: fused_norms.kv_into_cache(x, y, w, rope.cos, rope.sin, 1e-6, keys, values, m),
            m * dim * (2 + 2 + 1 + 1),
            dim,
        ),
        "reference keys rope_into the sink": (
            "rope_into",
            lambda: fused_norms.rope_into(ref_keys, ref_rope.cos, ref_rope.sin, sink),
            layers * frame * dim * (2 + 1),
            dim,
        ),
    }


def save_results(res: dict, out: str | None) -> None:
    """res as JSON into out (nothing without one), with the GPU's name where there is one: the
    kernel benches write their results so far after each case, and once more at the end."""
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name()
    if out:
        Path(out).write_text(json.dumps(res, indent=1))


def graph_ms(fn, device: str, calls: int, reps: int) -> float:
    """GPU ms per call of `calls` launches recorded in one CUDA graph (plain calls off CUDA)."""
    if torch.device(device).type != "cuda":
        return time_fn(fn, device, reps)
    fn()  # compiles this launch width outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_fn(graph.replay, device, reps) / calls


def sweep(table: dict, device: str, warps: list[int], calls: int, reps: int) -> dict:
    """Each case of `table` (cases()) at each count; "warps": the fastest count per kernel, by the
    summed time of its cases (two calls share norm_quantize's residual form)."""
    res: dict = {"calls_per_graph": calls, "kernels": {}, "warps": {}}
    totals: dict[str, dict[int, float]] = {}
    before = dict(fused_norms.LAUNCH_WARPS)
    for name, (key, fn, nbytes, width) in table.items():
        row = {}
        for w in warps:
            fused_norms.LAUNCH_WARPS[key] = w
            ms = graph_ms(fn, device, calls, reps)
            row[w] = {"us": ms * 1e3, "gb_s": nbytes / ms / 1e6}
            totals.setdefault(key, {}).setdefault(w, 0.0)
            totals[key][w] += ms
        fused_norms.LAUNCH_WARPS.pop(key)
        if key in before:
            fused_norms.LAUNCH_WARPS[key] = before[key]
        default = fused_norms._launch_shape(width, key)[1]
        res["kernels"][name] = {"key": key, "default_warps": default, "by_warps": row}
        cells = "  ".join(f"{w}: {r['us']:6.1f} us {r['gb_s']:5.0f} GB/s" for w, r in row.items())
        print(f"{name:36s} (default {default:2d})  {cells}", flush=True)
    for key, by in totals.items():
        res["warps"][key] = min(by, key=by.get)
    print("fastest warps per kernel:", json.dumps(res["warps"]), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warps", default="2,4,8,16,32", help="warps-per-program counts to try")
    ap.add_argument("--calls", type=int, default=20, help="launches per CUDA graph")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dims", default="5120,13824,40,40", help="model width, FFN width, heads, layers (the 14B's)")
    ap.add_argument("--out", help="write the results and the fastest counts as JSON")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("*"))
    if (reason := fused_norms.unavailable_reason(args.device)) is not None:
        print(f"bench_norm_warps: {reason}", file=sys.stderr)
        return 2
    warps = [int(w) for w in args.warps.split(",")]
    dim, ffn_dim, heads, layers = (int(v) for v in args.dims.split(","))
    table = cases(width, height, args.device, dim, ffn_dim, heads, layers)
    res = {"size": args.size, **sweep(table, args.device, warps, args.calls, args.reps)}
    if torch.device(args.device).type == "cuda":
        res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
