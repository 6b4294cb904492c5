"""GPU benchmark of the latent decoders: the full Wan2.1 VAE vs the light decoder (TAEHV taew2_1).

Per size (704*384 and 384*256 by default) and variant (full eager, full compiled, light eager,
light compiled): ms per block (3 latent frames -> 12 frames, the streaming decoders the decoder
service runs, a primed stream as in DecoderStream) and the peak GPU memory of the decode, then the
light decoder's error against the full VAE on the same latents (PSNR over all frames, in dB, on
[-1, 1] pixels), and each decoder's PSNR against the source clip. On a GPU, also one block's decode
on the decoder's low-priority stream beside a stand-in DiT on its own stream, at the same and at a
higher priority (`overlap`): what the stream priority buys.

The latents are the full VAE's encoding of a clip panned across assets/astronaut.png (a moving
picture, not Gaussian noise, which no decoder was trained on). The error means something only
with the real weights of both decoders:

    python3 bench/bench_decoders.py --full-vae CKPT/Wan2.2-S2V-14B/Wan2.1_VAE.pth --light taew2_1.pth
    python3 bench/bench_decoders.py                       # random weights: speed and memory only
    python3 bench/bench_decoders.py --device cpu --tiny   # CPU check of the code paths

Times are medians of CUDA-event timings after warm-up blocks; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

from avatar.models.wan_vae import S2V_14B_VAE, TINY_VAE, WanVAE
from avatar.presets import LATENT_FRAMES_PER_BLOCK
from avatar.services.decoder.light_decoder import TAEW2_1, TINY_LIGHT, LightDecoder

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, flush=True)


def pan_clip(width: int, height: int, frames: int, device) -> torch.Tensor:
    """[1, 3, frames, H, W] in [-1, 1]: a window moving 2 px per frame across the sample portrait."""
    from PIL import Image

    im = Image.open(os.path.join(ROOT, "assets", "astronaut.png")).convert("RGB")
    scale = max((width + 2 * frames) / im.width, height / im.height)
    im = im.resize((math.ceil(im.width * scale), math.ceil(im.height * scale)))
    arr = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
    top = (arr.shape[1] - height) // 2
    clip = torch.stack([arr[:, top : top + height, 2 * i : 2 * i + width] for i in range(frames)], dim=1)
    return clip[None].to(device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB on [-1, 1] pixels (peak-to-peak 2)."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


def timed_stream(decoder, module, prime, blocks, warm: int, device) -> tuple[list[float], float, torch.Tensor]:
    """(ms per timed block, peak GiB during the decode, all frames) of one primed stream."""
    cuda = torch.device(device).type == "cuda"
    stream = decoder.stream_decoder(module)
    stream.decode(prime)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, frames = [], []
    for i, block in enumerate(blocks):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = stream.decode(block)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = stream.decode(block)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warm:
            times.append(ms)
        frames.append(out.cpu())
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
    stream.close()
    return times, peak, torch.cat(frames, dim=2)


def overlap(decoder, prime, block, device, matmuls: int) -> dict:
    """A stand-in DiT (bf16 8192^3 matmuls, about the DiT's arithmetic intensity) queued on its own
    stream together with one block's decode on the decoder engine's stream (DecodeStream, priority
    0), as in one serving process: the DiT's and the decode's times alone, then side by side with
    the DiT at the same priority (0) and at a higher one (-1). Times from CUDA events per stream."""
    from avatar.services.decoder.engine import DecodeStream

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    dec_stream = DecodeStream(device)
    stream = decoder.stream_decoder()
    with dec_stream.active():
        stream.decode(prime)

    def run(dit_stream, decode: bool, dit: bool) -> tuple[float, float]:
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        if dit:
            with torch.cuda.stream(dit_stream):
                ev[0].record()
                for _ in range(matmuls):
                    torch.mm(a, b)
                ev[1].record()
        if decode:
            with dec_stream.active(), torch.no_grad():
                ev[2].record()
                stream.decode(block)
                ev[3].record()
        torch.cuda.synchronize()
        return (
            ev[0].elapsed_time(ev[1]) if dit else float("nan"),
            ev[2].elapsed_time(ev[3]) if decode else float("nan"),
        )

    same, high = torch.cuda.Stream(device, priority=0), torch.cuda.Stream(device, priority=-1)
    run(same, True, True)  # warm-up: cuBLAS, the decoder's kernels
    dit_alone, _ = run(same, False, True)
    _, decode_alone = run(same, True, False)
    dit_same, decode_same = run(same, True, True)
    dit_high, decode_high = run(high, True, True)
    stream.close()
    r = lambda v: round(v, 2)  # noqa: E731
    return {
        "dit_alone_ms": r(dit_alone),
        "decode_alone_ms": r(decode_alone),
        "same_priority": {"dit_ms": r(dit_same), "decode_ms": r(decode_same)},
        "dit_higher_priority": {"dit_ms": r(dit_high), "decode_ms": r(decode_high)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny decoders, 64*64 and 32*32 (CPU check of the code)")
    ap.add_argument("--sizes", default=None, help="W*H list (default 704*384,384*256; --tiny: 64*64,32*32)")
    ap.add_argument("--full-vae", metavar="PATH", help="Wan2.1_VAE.pth (real weights: the error is measured)")
    ap.add_argument("--light", metavar="PATH", help="taew2_1.pth or .safetensors (real weights)")
    ap.add_argument("--blocks", type=int, default=8, help="blocks per variant, the first --warm untimed")
    ap.add_argument("--warm", type=int, default=3, help="untimed blocks (compiled: the cache-shape changes)")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument(
        "--overlap-matmuls",
        type=int,
        default=150,
        help="GPU only: the stand-in DiT's 8192^3 matmuls queued beside one decode (0: skip that part)",
    )
    ap.add_argument("--out", default=None, help="JSON results (default $OUT/bench_decoders.json when $OUT is set)")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sizes = args.sizes or ("64*64,32*32" if args.tiny else "704*384,384*256")
    sizes = [tuple(int(v) for v in s.split("*")) for s in sizes.split(",")]
    out_path = args.out or (os.path.join(os.environ["OUT"], "bench_decoders.json") if os.environ.get("OUT") else None)
    real = bool(args.full_vae and args.light)
    if args.full_vae:
        full = WanVAE.from_upstream(args.full_vae, device, dtype)
    else:
        full = WanVAE.random(TINY_VAE if args.tiny else S2V_14B_VAE, 0, device, dtype)
    light = (
        LightDecoder.from_file(args.light, device, dtype)
        if args.light
        else LightDecoder.random(TINY_LIGHT if args.tiny else TAEW2_1, 0, device, dtype)
    )
    variants = [("full", "eager"), ("light", "eager")]
    if not args.no_compile:
        variants += [("full", "compiled"), ("light", "compiled")]
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights": {"full": args.full_vae or "random", "light": args.light or "random"},
        "dtype": str(dtype),
        "sizes": {},
        "errors": {},
    }
    if not real:
        results["error_note"] = "not measured: random weights (give --full-vae and --light for the real files)"
    compiled = {
        "full": torch.compile(full.model.decoder) if not args.no_compile else None,
        "light": torch.compile(light.model) if not args.no_compile else None,
    }

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=2)

    for width, height in sizes:
        h, w = height // 8, width // 8
        frames = 1 + 4 * LATENT_FRAMES_PER_BLOCK * args.blocks
        with torch.no_grad():
            clip = pan_clip(width, height, frames, device).to(dtype)
            latents = full.encode(clip)  # [1, 16, 1 + 3 * blocks, h, w], normalised
        prime = latents[:, :, :1]
        blocks = [latents[:, :, 1 + 3 * i : 4 + 3 * i] for i in range(args.blocks)]
        row = results["sizes"][f"{width}*{height}"] = {"latent": [16, latents.shape[2], h, w]}
        decoded = {}
        for kind, mode in variants:
            name = f"{kind} {mode}"
            decoder = full if kind == "full" else light
            t0 = time.perf_counter()
            try:
                times, peak, pixels = timed_stream(
                    decoder, compiled[kind] if mode == "compiled" else None, prime, blocks, args.warm, device
                )
            except Exception as e:  # out of memory, a compiler failure: the other variants still run
                results["errors"][f"{width}*{height} {name}"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"  !! {width}*{height} {name}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc(limit=6)
                save()
                continue
            ms = statistics.median(times) if times else float("nan")
            row[name] = {"ms_per_block": round(ms, 2), "fps": round(12_000 / ms, 1), "peak_gib": round(peak, 3)}
            decoded.setdefault(kind, pixels)
            log(
                f"{width}*{height} {name:15s} {ms:8.2f} ms/block ({12_000 / ms:6.1f} FPS), peak {peak:.2f} GiB "
                f"({time.perf_counter() - t0:.0f} s with warm-up)"
            )
            save()
        if "full" in decoded and "light" in decoded:
            source = clip[:, :, 1 : 1 + decoded["full"].shape[2]].float().cpu()
            err = {
                "light_vs_full_psnr_db": round(psnr(decoded["light"], decoded["full"]), 2),
                "full_vs_source_psnr_db": round(psnr(decoded["full"], source), 2),
                "light_vs_source_psnr_db": round(psnr(decoded["light"], source), 2),
            }
            if real:
                row["error"] = err
                log(f"{width}*{height} error: {err}")
            else:
                row["error"] = "not measured (random weights)"
                log(f"{width}*{height} error: not measured (random weights; give --full-vae and --light)")
        if device.type == "cuda" and args.overlap_matmuls > 0:
            for kind, decoder in (("full", full), ("light", light)):
                try:
                    row[f"{kind} beside a DiT"] = o = overlap(decoder, prime, blocks[0], device, args.overlap_matmuls)
                    log(f"{width}*{height} {kind} eager beside a stand-in DiT: {o}")
                except Exception as e:
                    results["errors"][f"{width}*{height} {kind} overlap"] = f"{type(e).__name__}: {str(e)[:500]}"
                    traceback.print_exc(limit=6)
        save()
    log(json.dumps(results, indent=1))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
