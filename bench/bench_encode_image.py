"""GPU benchmark of a new portrait's encode: the reference latent (upstream's 5-frame still video)
and the motion context (the tail of its 365-frame still video).

Per size, the two ways to the motion context: `WanVAE.encode_still` (groups of 4 frames until the
causal caches reach their fixed point, then copies: how many groups, the largest change of the
latent between consecutive groups, ms) and `WanVAE.encode_steady` (one pass of the encoder with
its temporal kernels summed), their difference, and ms for what `EncoderEngine.encode_image`
runs now (a 5-frame encode + encode_steady). Random full-size weights (the bytes and FLOPs of
the real ones), a real photo for pixels.

    python3 bench/bench_encode_image.py          # writes $OUT/encode_image.json when OUT is set
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from avatar.models.wan_vae import S2V_14B_VAE, WanVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, flush=True)


def portrait(width: int, height: int) -> np.ndarray:
    from PIL import Image

    im = Image.open(os.path.join(ROOT, "assets", "astronaut.png")).convert("RGB").resize((width, height))
    return np.asarray(im)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="704*384,384*256")
    p.add_argument("--frames", type=int, default=365)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    vae = WanVAE.random(S2V_14B_VAE, device=device, dtype=torch.bfloat16)
    encoder = vae.model.encoder
    vae.encode_steady(torch.zeros(1, 3, 1, 16, 16, device=device))  # builds its encoder copy first
    forward = encoder.forward
    outs: list[torch.Tensor] = []

    def counting(*a, **k):
        out = forward(*a, **k)
        outs.append(out)
        return out

    encoder.forward = counting
    results = {"device": torch.cuda.get_device_name(), "frames": args.frames, "sizes": []}
    for size in args.sizes.split(","):
        w, h = (int(x) for x in size.split("*"))
        image = torch.from_numpy(portrait(w, h)).permute(2, 0, 1).float().div(127.5).sub(1)[None, :, None].to(device)
        times = []
        for _ in range(4):
            outs.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vae.encode_still(image, args.frames)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        groups = len(outs)
        tail = vae.encode_still(image, args.frames)[:, :, -19:]
        steady = vae.encode_steady(image)
        new_ms = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vae.encode(image.expand(-1, -1, 5, -1, -1))
            vae.encode_steady(image)
            torch.cuda.synchronize()
            new_ms.append((time.perf_counter() - t0) * 1000)
        change = [(outs[i] - outs[i - 1]).abs().max().item() for i in range(2, groups)]
        scale = outs[-1].abs().max().item()
        r = {
            "size": size,
            "groups_run": groups,
            "groups_total": 1 + (args.frames - 1) // 4,
            "ms": statistics.median(times[1:]),
            "first_ms": times[0],
            "ms_per_group": statistics.median(times[1:]) / groups,
            "max_change_per_group": change,
            "output_absmax": scale,
            "encode_image_ms_now": statistics.median(new_ms[1:]),
            "encode_image_first_ms_now": new_ms[0],
            "steady_vs_still_max_abs": (steady - tail).abs().max().item(),
            "still_tail_absmax": tail.abs().max().item(),
        }
        results["sizes"].append(r)
        log(
            f"{size}: {groups} of {r['groups_total']} groups run, {r['ms']:.0f} ms "
            f"({r['ms_per_group']:.1f} ms per group; first call {times[0]:.0f} ms), latent |max| {scale:.3g}"
        )
        log("  max change between consecutive groups: " + " ".join(f"{c:.2g}" for c in change))
        log(
            f"  now (5-frame encode + encode_steady): {r['encode_image_ms_now']:.0f} ms (first {new_ms[0]:.0f}); "
            f"steady state vs encode_still's tail: max |diff| {r['steady_vs_still_max_abs']:.3g} "
            f"(latents up to {r['still_tail_absmax']:.3g})"
        )
    out = args.out or (os.path.join(os.environ["OUT"], "encode_image.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
