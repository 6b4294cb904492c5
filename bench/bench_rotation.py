"""Two per-forward costs of the DiT at one size, each the old way and the new, in one short call
(no model load): the reference keys' rotation into the sink (eager layer groups; compiled, as
--compile runs it since 2026-12-05; the Triton kernel of --fused-norms, since 2026-12-06) and the
FP8 attention output into the output projection (bf16 and re-quantised per row vs the e4m3 codes
as they are, with --fused-norms). Medians of bench_generator.time_fn (CUDA events on a GPU).

    python3 bench/bench_rotation.py [--size 704*384] [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_generator import time_fn  # noqa: E402

from avatar.services.generator import fused_norms
from avatar.services.generator.causal_s2v_dit import CausalS2VDiT, rope_grid
from avatar.services.generator.fp8 import FP8Linear, FP8Rows
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec

E4M3 = torch.float8_e4m3fn


class _Rotator(CausalS2VDiT):
    """Only what _rotate_reference needs (the real method, no weights)."""

    def __init__(self):  # noqa: D107 - deliberately not CausalS2VDiT's
        torch.nn.Module.__init__(self)
        self._rotate_compiled = None
        self._rotate_fused = False


def bench(width: int, height: int, device: str, layers: int, heads: int, head_dim: int, reps: int) -> dict:
    h, w = height // 16, width // 16  # tokens per side of one latent frame (VAE 8, patch 2)
    frame = h * w
    spec = KVCacheSpec(layers, heads, head_dim, frame_tokens=frame, window_frames=3, sink_tokens=frame, num_sets=4)
    kv = KVCache(spec, E4M3, device)
    kv.ref_k.copy_((torch.randn(kv.ref_k.shape, device=device) * 3).to(E4M3))
    rope = rope_grid(head_dim, range(40, 41), range(h), range(w), device)
    rot = _Rotator()
    res: dict = {"size": f"{width}*{height}", "reference_tokens": frame, "layers": layers}
    res["rotation_eager_ms"] = time_fn(lambda: rot._rotate_reference(kv, 1, rope, torch.bfloat16), device, reps)
    eager = kv.keys.clone()
    rot.compile_reference_rotation()
    res["rotation_compiled_ms"] = time_fn(lambda: rot._rotate_reference(kv, 1, rope, torch.bfloat16), device, reps)
    res["rotation_same_bytes"] = (kv.keys.view(torch.uint8) == eager.view(torch.uint8)).float().mean().item()
    if fused_norms.unavailable_reason(device) is None:  # a CUDA GPU (or Triton's interpreter)
        kv.keys.zero_()
        rot._rotate_fused = True  # with --fused-norms: one Triton kernel into the sink
        res["rotation_triton_ms"] = time_fn(lambda: rot._rotate_reference(kv, 1, rope, torch.bfloat16), device, reps)
        same = (kv.keys.view(torch.uint8) == eager.view(torch.uint8)).float().mean().item()
        res["rotation_triton_same_bytes"] = same
    del eager

    dim = heads * head_dim
    tokens = 3 * frame
    lin = torch.nn.Linear(dim, dim, device=device, dtype=torch.bfloat16)
    o = FP8Linear.from_linear(lin, "row")
    codes = (torch.randn(1, tokens, dim, device=device) * 2).to(E4M3)
    ones = torch.ones(1, tokens, 1, device=device)
    res["oproj_requantised_ms"] = time_fn(lambda: o(codes.to(torch.bfloat16)), device, reps)
    res["oproj_codes_as_they_are_ms"] = time_fn(lambda: o(FP8Rows(codes, ones)), device, reps)
    weight = o.weight_fp8.float() * o.weight_scale.reshape(-1, 1)
    exact = codes.float() @ weight.t() + o.bias.float()

    def err(y):
        return ((y.float() - exact).norm() / exact.norm()).item()

    res["oproj_error_requantised"] = err(o(codes.to(torch.bfloat16)))
    res["oproj_error_codes"] = err(o(FP8Rows(codes, ones)))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="704*384")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.split("*"))
    except ValueError:
        print(f"bench_rotation: --size must be W*H, got {args.size!r}", file=sys.stderr)
        return 2
    res = bench(width, height, args.device, args.layers, args.heads, args.head_dim, args.reps)
    res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res["torch"] = torch.__version__
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
