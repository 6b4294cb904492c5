"""GPU benchmark of the DiT's self-attention over the KV cache: bf16 against FP8 kernels.

At each size the shapes are the model's (s2v-14b: 40 heads of 128; a block's 3 latent frames of
queries over the sink and a full ring of 12 latent frames of keys). Variants:
- `sdpa-bf16`: torch SDPA (cuDNN on Hopper) on a bf16 cache, the default path;
- `sdpa-from-fp8`: the same after upcasting an FP8 cache's slice (what `--kv-fp8` runs today);
- `fp8-attention`: services/generator/fp8_attention.py (cuDNN's FP8 attention through the cuDNN
  frontend, `nvidia-cudnn-frontend`), with the query quantisation and the output's conversion
  that the model runs around it (fused by torch.compile in the model), and the kernel alone;
  then the kernel against the torch reference of its arithmetic (what the CPU tests run).
Errors are ||out - ref|| / ||ref|| against float32 SDPA on the same (bf16) inputs, for random
queries (nearly uniform attention) and for queries x4 (peaked attention).

    python3 bench/bench_attention.py                 # writes $OUT/attention.json when OUT is set
    python3 bench/bench_attention.py --cross --sizes '704*384'   # + the text cross-attention's shape
    python3 bench/bench_attention.py --triton --sizes '704*384'  # + our Triton FP8 kernel, each config
    python3 bench/bench_attention.py --flashinfer fp8_attention_flashinfer.so --sizes '704*384'

`--triton` times services/generator/fp8_attention_triton.py on the same codes as cuDNN's kernel
alone, at each (BLOCK_M, BLOCK_N, warps, stages) of its sweep, with the values as the cache holds
them today ([tokens, H, D]) and keys-last ([H, D, tokens], a slice of a larger buffer as the cache's
is); then what writing a block's values costs in each layout, and the Triton output against cuDNN's.

`--flashinfer LIB` times FlashInfer's Hopper FP8 attention (its FlashAttention-3-derived template)
at each tile shape built into LIB (`python3 -m avatar.services.generator.fp8_attention_flashinfer
--build DIR`), on the same codes: bf16 output, the probabilities into e4m3 scaled by 448 (cuDNN's
and ours: 256), the query's scale per head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import traceback

import torch
import torch.nn.functional as F

from avatar.dit_config import DIT_CONFIGS
from avatar.services.generator.attention import prefer_cudnn_attention
from avatar.services.generator.fp8_attention import fp8_attention, reference
from avatar.services.generator.fused_norms import query_bound_per_weight

E4M3 = torch.float8_e4m3fn


def log(*a):
    print(*a, flush=True)


def shapes(width: int, height: int, window: int = 12, block: int = 3) -> tuple[int, int]:
    cfg = DIT_CONFIGS["s2v-14b"]
    lh, lw = height // 8, width // 8
    ft = cfg.frame_tokens(lh, lw)
    return block * ft, cfg.sink_tokens(lh, lw) + window * ft


def timed(fn, reps: int = 30) -> float:
    """Median ms over `reps` calls (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().flatten(), ref.float().flatten()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def sdpa(q, k, v):  # [B, L, H, D] -> [B, Lq, H*D]
    return (
        F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        .transpose(1, 2)
        .flatten(2)
    )


def bench_size(
    width: int,
    height: int,
    device,
    heads: int,
    head_dim: int,
    keys: int | None = None,
    triton: bool = False,
    flashinfer: str | None = None,
    triton_variants: str | None = None,
) -> dict:
    """keys: the self-attention's (sink + full ring) when None; else that many (the prompt's, for
    the text cross-attention: bf16 today, timed in FP8 to see whether it would be worth it)."""
    lq, lk = shapes(width, height)
    lk = lk if keys is None else keys
    res = {"size": f"{width}*{height}", "queries": lq, "keys": lk, "heads": heads, "head_dim": head_dim, "variants": {}}
    flops = 4 * lq * lk * heads * head_dim
    log(f"{width}*{height}: {lq} queries over {lk} keys, {heads} x {head_dim}")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, lq, heads, head_dim, device=device, generator=g).bfloat16()
    k = torch.randn(1, lk, heads, head_dim, device=device, generator=g).bfloat16()
    v = torch.randn(1, lk, heads, head_dim, device=device, generator=g).bfloat16()
    k8, v8 = k.to(E4M3), v.to(E4M3)
    refs = {t: sdpa((q.float() * t), k.float(), v.float()) for t in (1, 4)}

    def record(name, ms, outs):
        errs = {f"q_x{t}": rel(o, refs[t]) for t, o in outs.items()}
        res["variants"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": errs}
        log(
            f"  {name:34s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  err "
            + " ".join(f"{k}={e:.4f}" for k, e in errs.items())
        )

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # a variant that does not run is reported, the rest go on
            res["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()

    guarded(
        "sdpa-bf16", lambda: record("sdpa-bf16", timed(lambda: sdpa(q, k, v)), {t: sdpa(q * t, k, v) for t in (1, 4)})
    )
    guarded(
        "sdpa-from-fp8",
        lambda: record(
            "sdpa-from-fp8",
            timed(lambda: sdpa(q, k8.to(torch.bfloat16), v8.to(torch.bfloat16))),
            {t: sdpa(q * t, k8.to(torch.bfloat16), v8.to(torch.bfloat16)) for t in (1, 4)},
        ),
    )
    guarded(
        "fp8-attention",
        lambda: record(
            "fp8-attention",
            timed(lambda: fp8_attention(q, k8, v8)),
            {t: fp8_attention(q * t, k8, v8) for t in (1, 4)},
        ),
    )
    descale = (q.abs().amax().float() / 448).reshape(1, 1, 1, 1)
    q8 = (q.float() / descale).to(E4M3)
    guarded(
        "fp8-attention, cuDNN kernel alone",
        lambda: record(
            "fp8-attention, cuDNN kernel alone",
            timed(lambda: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale)),
            {1: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale).to(torch.bfloat16).flatten(2)},
        ),
    )
    # the queries at the fixed scale of --fused-norms (fused_norms.rms_rope_fp8: a bound from the q-norm's
    # weight, here 1 for q's unit-RMS rows and 4 for q * 4) instead of their amax: the error it costs
    fixed = {t: torch.tensor(t * query_bound_per_weight(heads * head_dim) / 448, device=device) for t in (1, 4)}
    fixed_q8 = {t: (q.float() * t / fixed[t]).clamp(-448, 448).to(E4M3) for t in (1, 4)}
    guarded(
        "fp8-attention, queries at the norm's fixed scale",
        lambda: record(
            "fp8-attention, queries at the norm's fixed scale",
            timed(lambda: torch.ops.avatar.fp8_sdpa(fixed_q8[1], k8, v8, fixed[1].reshape(1, 1, 1, 1))),
            {
                t: torch.ops.avatar.fp8_sdpa(fixed_q8[t], k8, v8, fixed[t].reshape(1, 1, 1, 1)).bfloat16().flatten(2)
                for t in (1, 4)
            },
        ),
    )
    # every plan cuDNN offers for these shapes, timed on them; the fastest against the heuristics' choice
    from avatar.services.generator.fp8_attention import _CudnnFp8Sdpa

    def every_plan():
        built = _CudnnFp8Sdpa(q8, k8, v8, every_plan=True)
        plans = res["cudnn_plans_ms"] = {}  # by plan name
        ms_by_index = {}
        for index in range(built.graph.get_execution_plan_count()):
            name = built.graph.get_plan_name_at_index(index)
            try:
                built.use_plan(index)
                plans[name] = ms_by_index[index] = timed(lambda: built(q8, k8, v8, descale))
            except Exception as e:  # a plan that built but does not run these shapes
                log(f"    plan {name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            log(f"    plan {name}: {plans[name]:.3f} ms ({flops / plans[name] / 1e9:.0f} TFLOP/s)")
        if ms_by_index:
            fastest = min(ms_by_index, key=ms_by_index.get)
            res["cudnn_fastest_plan"] = built.graph.get_plan_name_at_index(fastest)
            built.use_plan(fastest)
            record(
                "fp8-attention, fastest cuDNN plan",
                ms_by_index[fastest],
                {1: built(q8, k8, v8, descale).to(torch.bfloat16).flatten(2)},
            )

    guarded("fp8-attention, fastest cuDNN plan", every_plan)
    if triton:
        bench_triton(res, q8, k8, v8, descale, record, guarded, triton_variants)
    if flashinfer:
        bench_flashinfer(flashinfer, res, q8, k8, v8, descale, record, guarded)
    # the CPU reference (what the tests check) against cuDNN, on the first 256 queries
    sub = slice(0, 256)
    got = torch.ops.avatar.fp8_sdpa(q8[:, sub], k8, v8, descale).float()
    ref = reference(q8[:, sub].cpu(), k8.cpu(), v8.cpu(), descale.cpu()).float()
    res["cudnn_vs_reference"] = rel(got.cpu(), ref)
    log(f"  cuDNN FP8 attention vs the torch reference of its arithmetic: {res['cudnn_vs_reference']:.4f}")
    return res


def bench_triton(res, q8, k8, v8, descale, record, guarded, only: str | None = None) -> None:
    """The Triton FP8 kernels at each config of their sweep: pointer loads with the values as
    cached and keys-last; TMA loads (keys-last), without and with warp specialisation, and with
    some or all of the softmax's exponentials on the FMA pipe."""
    from avatar.services.generator.fp8_attention_triton import SWEEP_CONFIGS, TMA_SWEEP, WS_SWEEP, fp8_sdpa_triton

    b, lk, h, d = v8.shape
    spare = 1056  # the keys-last values as a slice of a longer buffer, as the cache's span is
    buf = torch.zeros(b, h, d, lk + 2 * spare, dtype=E4M3, device=v8.device)
    v8_keys_last = buf.permute(0, 3, 1, 2)[:, spare : spare + lk]
    v8_keys_last.copy_(v8)
    cudnn_out = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale).float()
    wide = [(256, 64, 8, 3)]
    variants = [
        ("pointers keys-last", v8_keys_last, {"tma": False}, SWEEP_CONFIGS),
        ("pointers as cached", v8, {"tma": False}, SWEEP_CONFIGS[:2]),
        ("tma", v8_keys_last, {"tma": True}, TMA_SWEEP),
        ("tma warp-specialized", v8_keys_last, {"tma": True, "warp_specialize": True}, WS_SWEEP),
        # exponentials as a polynomial on the FMA pipe: every second key tile's, or all of them
        # (256-query tiles: two warpgroups share each key/value tile)
        ("tma fma-exp every 2nd tile", v8_keys_last, {"tma": True, "fma_exp_every": 2}, TMA_SWEEP + wide),
        ("tma fma-exp every tile", v8_keys_last, {"tma": True, "fma_exp_every": 1}, TMA_SWEEP[1:]),
        ("tma", v8_keys_last, {"tma": True}, wide),
    ]
    if only:  # the variants whose label is one of these (comma-separated), e.g. "tma,tma fma-exp every 2nd tile"
        variants = [v for v in variants if v[0] in only.split(",")]
    for label, values, kwargs, configs in variants:
        for cfg in configs:
            name = f"triton {label} {cfg}"

            def run(cfg=cfg, values=values, kwargs=kwargs, name=name):
                ms = timed(lambda: fp8_sdpa_triton(q8, k8, values, descale, cfg, **kwargs))
                out = fp8_sdpa_triton(q8, k8, values, descale, cfg, **kwargs)
                record(name, ms, {1: out.to(torch.bfloat16).flatten(2)})
                res["variants"][name]["vs_cudnn"] = rel(out.float(), cudnn_out)

            guarded(name, run)
    # a block's new values into the cache: the layout's cost on the write side
    n = q8.shape[1]
    new = torch.randn(b, n, h, d, device=v8.device, dtype=torch.bfloat16)
    res["values_write_ms"] = {
        "as cached": timed(lambda: v8[:, :n].copy_(new)),
        "keys-last": timed(lambda: v8_keys_last[:, :n].copy_(new)),
    }
    # a block's keys and values into the cache as the fused-norm model writes them (one op)
    from avatar.services.generator import fused_norms

    k_new, v_new = (torch.randn(b, n, h * d, device=v8.device, dtype=torch.bfloat16) for _ in "kv")
    w = torch.ones(h * d, device=v8.device, dtype=torch.bfloat16)
    angles = torch.rand(n, 1, d // 2, device=v8.device)
    cos, sin = angles.cos(), angles.sin()
    keys = torch.empty_like(k8)
    for name, values in (("kv_into_cache as cached", v8), ("kv_into_cache keys-last", v8_keys_last)):
        res["values_write_ms"][name] = timed(
            lambda values=values: fused_norms.kv_into_cache(k_new, v_new, w, cos, sin, 1e-6, keys, values, 0)
        )
    log(f"  a block's values into the cache: {res['values_write_ms']}")


def bench_flashinfer(lib_path, res, q8, k8, v8, descale, record, guarded) -> None:
    """FlashInfer's FP8 kernel (fp8_attention_flashinfer.py) at each tile shape built into LIB."""
    from avatar.services.generator import fp8_attention_flashinfer as fi

    os.environ[fi.LIB_ENV] = lib_path
    cudnn_out = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale).float()
    for config in fi.CONFIGS:
        if not hasattr(fi.library(config), config):
            continue
        name = f"flashinfer {config}"

        def run(config=config, name=name):
            ms = timed(lambda: fi.fp8_sdpa_flashinfer(q8, k8, v8, descale, config))
            out = fi.fp8_sdpa_flashinfer(q8, k8, v8, descale, config)
            record(name, ms, {1: out.flatten(2)})
            res["variants"][name]["vs_cudnn"] = rel(out.float(), cudnn_out)

        guarded(name, run)
    # through the codes op, its output rounded to e4m3 as the other kernels write it (what the model
    # called in run Q1; it now takes the bf16 output, as timed per tile shape above)
    guarded(
        "fp8-attention, flashinfer op",
        lambda: record(
            "fp8-attention, flashinfer op",
            timed(lambda: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale, "flashinfer")),
            {1: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale, "flashinfer").to(torch.bfloat16).flatten(2)},
        ),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="704*384,384*256")
    p.add_argument(
        "--cross",
        action="store_true",
        help="also the text cross-attention's shape: a block's queries over the prompt's 512 tokens",
    )
    p.add_argument("--triton", action="store_true", help="also the Triton FP8 kernel (fp8_attention_triton.py)")
    p.add_argument(
        "--triton-variants", default=None, help="with --triton: only these variants (labels, comma-separated)"
    )
    p.add_argument("--flashinfer", default=None, metavar="LIB", help="also FlashInfer's FP8 kernel, built into LIB")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    backend = prefer_cudnn_attention(device)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, SDPA backend {backend}")
    try:
        import cudnn

        log(f"cudnn frontend {getattr(cudnn, '__version__', '?')}, backend {cudnn.backend_version()}")
    except Exception as e:
        log(f"cudnn frontend: {type(e).__name__}: {e}")
    cfg = DIT_CONFIGS["s2v-14b"]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sizes": []}
    for size in args.sizes.split(","):
        w, h = (int(x) for x in size.split("*"))
        results["sizes"].append(
            bench_size(
                w,
                h,
                device,
                cfg.num_heads,
                cfg.dim // cfg.num_heads,
                triton=args.triton,
                flashinfer=args.flashinfer,
                triton_variants=args.triton_variants,
            )
        )
        if args.cross:
            results.setdefault("cross", []).append(
                bench_size(w, h, device, cfg.num_heads, cfg.dim // cfg.num_heads, keys=cfg.text_len)
            )
    out = args.out or (os.path.join(os.environ["OUT"], "attention.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
