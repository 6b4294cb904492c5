"""The Triton FP8 attention with and without its exponentials on the FMA pipe, beside cuDNN's
kernel, at the DiT's 704*384 shape (3168 queries over 15312 keys, 40 x 128): the shortest device
call that answers whether `fma_exp_every` pays (bench_attention.py --triton times every variant
and the errors; this times three forms at two tiles in about a minute with its setup). Times are
bench_attention.timed's (median of CUDA-event timings); run T1 (`efb21b8`) took the mean of 20
back-to-back calls by the host clock.

    python3 bench/bench_fma_exp.py   (after `source bench/serve_wheels.sh`; cuDNN's needs its frontend)
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from bench_attention import timed  # noqa: E402

from avatar.services.generator import fp8_attention  # noqa: E402, F401 (registers avatar::fp8_sdpa)
from avatar.services.generator.fp8_attention_triton import fp8_sdpa_triton  # noqa: E402

E4M3 = torch.float8_e4m3fn


def main() -> None:
    lq, lk, h, d = 3168, 15312, 40, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, lq, h, d, device="cuda", generator=g)
    k8 = torch.randn(1, lk, h, d, device="cuda", generator=g).to(E4M3)
    v8 = torch.randn(1, lk, h, d, device="cuda", generator=g).to(E4M3)
    descale = (q.abs().amax() / 448).reshape(1, 1, 1, 1)
    q8 = (q / descale).to(E4M3)
    keys_last = torch.empty(1, h, d, lk + 32, dtype=E4M3, device="cuda").permute(0, 3, 1, 2)[:, 16 : 16 + lk]
    keys_last.copy_(v8)
    flop = 4 * lq * lk * h * d
    res = {
        "gpu": torch.cuda.get_device_name(),
        "cudnn_ms": timed(lambda: torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale)),
    }
    cudnn = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale).float()
    print(f"cuDNN {res['cudnn_ms']:.3f} ms {flop / res['cudnn_ms'] / 1e9:.0f} TFLOP/s", flush=True)
    for every in (0, 2, 1):
        for config in ((128, 64, 4, 3), (128, 128, 8, 3)):

            def call(config=config, every=every):
                return fp8_sdpa_triton(q8, k8, keys_last, descale.reshape(1), config, tma=True, fma_exp_every=every)

            try:
                ms = timed(call)
                diff = ((call().float() - cudnn).norm() / cudnn.norm()).item()
            except Exception as e:  # a form that does not compile is reported, the rest go on
                print(f"fma_exp_every {every} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            res[f"every {every} {config}"] = {"ms": ms, "tflops": flop / ms / 1e9, "vs_cudnn": diff}
            print(
                f"fma_exp_every {every} {config}: {ms:.3f} ms {flop / ms / 1e9:.0f} TFLOP/s, {diff:.4f} from cuDNN's",
                flush=True,
            )
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fma_exp.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
