"""The decoder's per-block work after the VAE: frames to the host and into H.264 + AAC fMP4.

Two variants per size (704*384 and 384*256 by default), on the decoder's device:
  rgb: pixels -> uint8 RGB on the device, copied to the host, swscale to yuv420p and x264 (the
       decoder's path on the CPU);
  yuv: pixels -> yuv420p planes on the device (services/decoder/engine.to_yuv420p), copied to
       the host (half the bytes), x264 (the decoder's path on a GPU).
Each block is 12 frames of a picture panned across assets/astronaut.png (x264's speed depends
on the content; noise would be its worst case) and 0.48 s of audio at 48 kHz. Reports the
median ms per block of the conversion + copy (`to_host_ms`) and of the muxer (`mux_ms`).

    python3 bench/bench_mux.py --device cuda --out $OUT/mux.json
    python3 bench/bench_mux.py --device cpu --sizes 64*64 --blocks 2   # CPU check of the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decoders import pan_clip  # noqa: E402

from avatar.services.decoder.engine import to_yuv420p  # noqa: E402
from avatar.services.decoder.fmp4 import FragmentedMp4Writer  # noqa: E402

FRAMES = 12
RATE = 48000


def to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """[3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3], as DecoderStream does on the CPU."""
    return ((pixels + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, clip: torch.Tensor, blocks: int, warm: int) -> dict:
    """Median ms per block of (conversion + copy to the host) and of write_block."""
    _, _, total, height, width = clip.shape
    writer = FragmentedMp4Writer(width, height, 25, RATE)
    convert = to_yuv420p if variant == "yuv" else to_rgb
    pcm = (np.sin(np.arange(FRAMES * RATE // 25) / 20) * 3000).astype(np.int16)
    to_host, mux, sizes = [], [], []
    for b in range(warm + blocks):
        start = (b * FRAMES) % (total - FRAMES + 1)
        pixels = clip[0, :, start : start + FRAMES]
        sync(clip.device)
        t0 = time.perf_counter()
        frames = convert(pixels).cpu().numpy()
        t1 = time.perf_counter()
        data = writer.write_block(frames, pcm)
        t2 = time.perf_counter()
        if b >= warm:
            to_host.append((t1 - t0) * 1e3)
            mux.append((t2 - t1) * 1e3)
            sizes.append(len(data))
    return {
        "to_host_ms": statistics.median(to_host),
        "mux_ms": statistics.median(mux),
        "total_ms": statistics.median(a + b for a, b in zip(to_host, mux)),
        "fragment_kib": statistics.median(sizes) / 1024,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="704*384,384*256", help='comma-separated "W*H"')
    ap.add_argument("--blocks", type=int, default=20, help="timed blocks per variant")
    ap.add_argument("--warm", type=int, default=2, help="untimed blocks first")
    ap.add_argument("--out", default=None, help="JSON result (written atomically)")
    args = ap.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.split("*")) for s in args.sizes.split(",")]
        if any(w <= 0 or h <= 0 or w % 16 or h % 16 for w, h in sizes):
            raise ValueError
    except ValueError:
        print(f"bench_mux: --sizes must be W*H multiples of 16, e.g. 704*384, got {args.sizes!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sizes": {},
    }
    for width, height in sizes:
        clip = pan_clip(width, height, 2 * FRAMES, device)
        row = {variant: measure(variant, clip, args.blocks, args.warm) for variant in ("rgb", "yuv")}
        result["sizes"][f"{width}*{height}"] = row
        for variant, r in row.items():
            print(
                f"{width}*{height} {variant}: to host {r['to_host_ms']:.1f} ms + mux {r['mux_ms']:.1f} ms "
                f"= {r['total_ms']:.1f} ms per block ({r['fragment_kib']:.0f} KiB)",
                flush=True,
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(out.suffix + ".part")
        part.write_text(json.dumps(result, indent=2))
        part.replace(out)  # never a half-written result
    return 0


if __name__ == "__main__":
    sys.exit(main())
