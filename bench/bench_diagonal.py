"""What a block's steps batched across blocks would save: the DiT's per-layer FP8 GEMMs and its
attention at one block's tokens against `--items` blocks' at once, in ms a block. One short call,
no model.

Why: with one KV cache set per sampling step (timestep forcing), step s of block b reads and writes
only set s, so step 0 of block b+3, step 1 of b+2, step 2 of b+1 and step 3 of b do not depend on
each other: one GPU could run them as one forward of batch 4 (the diagonal that TPP spreads over
ranks), a block coming out of each. At 704*384 (M = 3168 tokens) a 5120-wide GEMM is 7.6 waves of
128x128 tiles on 132 SMs and cuDNN's FP8 attention 15.2 waves of 64-query tiles: each could end in
a mostly empty wave, and at 4 x 3168 tokens both are near whole waves. Building the schedule is a
large change (per-item RoPE, cache writes and reference rotation, the sink refresh as a barrier,
CUDA graphs per diagonal), so this bench measures the bound first. Run V1 (H100,
docs/performance.md): 2.0 ms of a 551 ms block, the GEMMs no faster per token: not built.

- GEMMs: each projection a layer runs per step (self q, k, v, o; text cross q, o; FFN up, down) as
  the model's compiled blocks call torch._scaled_mm, at M and at items x M: 160 x the first
  against 40 x the second (40 layers, 4 steps; 4 items);
- self-attention (cuDNN's FP8 kernel over the sink and a full ring): batch 1 against batch
  `items` (each item its own keys: the cache sets laid out side by side), and `items` batch-1
  calls on as many CUDA streams (the cache as it is laid out now);
- the text cross-attention (bf16 SDPA over the prompt's 512 keys): batch 1 against `items`.

The norm kernels' work grows with the tokens, not the waves (not timed). GPU times of CUDA graphs
of `--calls` calls each.

    python3 bench/bench_diagonal.py [--size 704*384] [--items 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_attention import shapes as attention_shapes  # noqa: E402
from bench_gemm import compiled, gemm  # noqa: E402
from bench_norm_warps import graph_ms, save_results  # noqa: E402

from avatar.presets import LATENT_FRAMES_PER_BLOCK
from avatar.services.generator import fp8_attention  # noqa: F401  (registers torch.ops.avatar.fp8_sdpa)

E4M3 = torch.float8_e4m3fn
LAYERS, STEPS = 40, 4
PROMPT_TOKENS = 512


def layer_gemms(dim: int, ffn_dim: int) -> dict[str, tuple[int, int]]:
    """(K, N) of each projection a layer runs per step on the block's tokens (the text keys and
    values are projected once a session; the audio injections run in 12 of 40 layers, not here)."""
    square = (dim, dim)
    return {
        "self q": square,
        "self k": square,
        "self v": square,
        "self o": square,
        "cross q": square,
        "cross o": square,
        "ffn up": (dim, ffn_dim),
        "ffn down": (ffn_dim, dim),
    }


def fp8_inputs(b: int, lq: int, lk: int, heads: int, head_dim: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q8 = torch.randn(b, lq, heads, head_dim, generator=g, device=device).to(E4M3)
    k8 = torch.randn(b, lk, heads, head_dim, generator=g, device=device).to(E4M3)
    v8 = torch.randn(b, lk, heads, head_dim, generator=g, device=device).to(E4M3)
    return q8, k8, v8, torch.full((1, 1, 1, 1), 1 / 64, device=device)


def on_streams(calls: list, streams: list):
    """Each call on its own side stream, forked from and joined back into the current one (a CUDA
    graph captures the fork as parallel branches)."""

    def run():
        main = torch.cuda.current_stream()
        for call, stream in zip(calls, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                call()
        for stream in streams:
            main.wait_stream(stream)

    return run


def bench(
    width: int,
    height: int,
    device: str,
    items: int = 4,
    calls: int = 10,
    reps: int = 20,
    dim: int = 5120,
    ffn_dim: int = 13824,
    heads: int = 40,
    shapes: tuple[int, int] | None = None,
    out: str | None = None,
) -> dict:
    """shapes: (queries, keys) of the self-attention, the model's at this size when None. out: the
    results so far, rewritten after each part (a device call cut short keeps them)."""
    m = LATENT_FRAMES_PER_BLOCK * (height // 16) * (width // 16)
    lq, lk = shapes or attention_shapes(width, height)
    head_dim = dim // heads
    per_block = LAYERS * STEPS  # layer-steps a block runs one at a time; / items when batched
    res: dict = {"size": f"{width}*{height}", "tokens": m, "items": items, "queries": lq, "keys": lk, "parts": {}}

    def record(name: str, one_ms: float, batched_ms: float, how: str):
        row = {
            "one_ms": one_ms,
            "batched_ms": batched_ms,
            "ms_a_block_one": one_ms * per_block,
            "ms_a_block_batched": batched_ms * per_block / items,
            "how": how,
        }
        row["saves_ms_a_block"] = row["ms_a_block_one"] - row["ms_a_block_batched"]
        res["parts"][name] = row
        print(
            f"  {name:28s} {one_ms * 1e3:8.1f} us x1  {batched_ms * 1e3:8.1f} us x{items}  "
            f"{row['ms_a_block_one']:7.1f} -> {row['ms_a_block_batched']:7.1f} ms a block",
            flush=True,
        )
        save_results(res, out)

    for name, (k, n) in layer_gemms(dim, ffn_dim).items():
        one, batched = compiled(gemm(m, k, n, device)), compiled(gemm(items * m, k, n, device))
        record(f"gemm {name}", graph_ms(one, device, calls, reps), graph_ms(batched, device, calls, reps), "one call")

    sdpa = torch.ops.avatar.fp8_sdpa
    q8, k8, v8, descale = fp8_inputs(items, lq, lk, heads, head_dim, device)
    one = [(q8[i : i + 1], k8[i : i + 1], v8[i : i + 1]) for i in range(items)]
    record(
        "self-attention fp8",
        graph_ms(lambda: sdpa(*one[0], descale), device, calls, reps),
        graph_ms(lambda: sdpa(q8, k8, v8, descale), device, calls, reps),
        "one call of batch items",
    )
    if torch.device(device).type == "cuda":
        streams = [torch.cuda.Stream(device) for _ in range(items)]
        apart = on_streams([lambda i=i: sdpa(*one[i], descale) for i in range(items)], streams)
        record(
            "self-attention fp8, streams",
            res["parts"]["self-attention fp8"]["one_ms"],
            graph_ms(apart, device, calls, reps),
            "items batch-1 calls on as many streams",
        )

    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(items, heads, m, head_dim, generator=g, device=device).bfloat16()
    kv = torch.randn(items, heads, PROMPT_TOKENS, head_dim, generator=g, device=device).bfloat16()
    record(
        "text cross-attention bf16",
        graph_ms(lambda: F.scaled_dot_product_attention(q[:1], kv[:1], kv[:1]), device, calls, reps),
        graph_ms(lambda: F.scaled_dot_product_attention(q, kv, kv), device, calls, reps),
        "one call of batch items",
    )
    parts = [p for name, p in res["parts"].items() if not name.endswith(", streams")]
    res["saves_ms_a_block"] = sum(p["saves_ms_a_block"] for p in parts)
    streams = res["parts"].get("self-attention fp8, streams")
    if streams:  # the cache as laid out now: its attention on streams instead of batched
        batched_attention = res["parts"]["self-attention fp8"]["saves_ms_a_block"]
        res["saves_ms_a_block_with_streams"] = res["saves_ms_a_block"] - batched_attention + streams["saves_ms_a_block"]
    print(f"batching {items} blocks' steps saves {res['saves_ms_a_block']:.1f} ms a block (GEMMs and attention)")
    save_results(res, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--items", type=int, default=4, help="blocks' steps in one batch (the sampling steps)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("*"))
    res = bench(width, height, args.device, args.items, args.calls, args.reps, out=args.out)
    save_results(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
