"""Per-avatar LoRAs on the generator: what a switch costs, and what an unmerged LoRA costs per block.

Writes random LoRAs in LiveAvatar's layout (rank 128 on the 14B: 896 tensors, 676 M parameters,
stored bf16: 1.35 GB a file) to a temporary folder, registers them with a GeneratorEngine built
with full-size random weights (bf16, or --fp8), and measures:

- register: validating one file at registration (header only, against the meta-device DiT);
- switch: a session asking for a LoRA not held (read from the file, page cache warm, onto the
  device, the least recently used one dropped), and a hit (held: nothing moves), in seconds;
- remerge: for comparison, folding a LoRA into the bf16 weights in place and taking it out
  again (W += s B A; W -= s B A over the 448 layers), what a merge-per-switch design would pay;
- blocks: ms per block at each size for the plain model (no hooks: today's default path, also
  what `--lora_path` merged at start-up costs), with hooks but a session without a LoRA
  (lora_id ""), and with a LoRA (the low-rank delta added in each of the 448 layers).

    python3 bench/bench_lora_switch.py --out $OUT/lora.json                # H200: about 4 min
    python3 bench/bench_lora_switch.py --fp8 --out $OUT/lora-fp8.json      # FP8 base linears
    python3 bench/bench_lora_switch.py --fp8 --compile --sizes '704*384' --out $OUT/lora-fp8c.json
    python3 bench/bench_lora_switch.py --tiny --device cpu                 # CPU check of the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from avatar.jobs import Job
from avatar.presets import FRAMES_PER_BLOCK, ModelSpec
from avatar.services.generator.engine import GeneratorEngine, register_avatar_loras
from avatar.services.generator.lora import DEFAULT_TARGETS, PREFIX, is_target
from avatar.services.generator.weights import build_dit


def log(*a):
    print(*a, flush=True)


def write_random_lora(path: pathlib.Path, meta_dit: torch.nn.Module, rank: int, seed: int) -> int:
    """A LoRA on every q,k,v,o,ffn.0,ffn.2 linear, named as peft names them (bf16); returns its bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in meta_dit.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_target(name, DEFAULT_TARGETS):
            a = torch.randn(rank, mod.in_features, generator=gen) * 0.01
            b = torch.randn(mod.out_features, rank, generator=gen) * 0.01
            tensors[f"{PREFIX}{name}.lora_A.default.weight"] = a.to(torch.bfloat16)
            tensors[f"{PREFIX}{name}.lora_B.default.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(path))
    return path.stat().st_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_ms(engine: GeneratorEngine, size: tuple[int, int], lora_id: str, blocks: int, warm: int) -> float:
    """Median ms per block of one session (after `warm` blocks), its LoRA chosen by lora_id."""
    w, h = size
    c = engine.dit.config
    job = Job(
        width=w,
        height=h,
        infer_frames=48,
        sample_steps=4,
        num_blocks=blocks,
        total_frames=blocks * FRAMES_PER_BLOCK,
        model=engine.spec.name,
    )
    lat_h, lat_w = h // 8, w // 8
    session = engine.open_session(
        job,
        torch.randn(16, c.text_dim),
        torch.randn(c.in_dim, 1, lat_h, lat_w),
        torch.randn(c.in_dim, engine.dit.motion_latent_frames, lat_h, lat_w),
        lora_id=lora_id,
    )
    times = []
    try:
        for _ in range(blocks):
            session.generate_block(torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim))
            times.append(session.last_block_ms)
    finally:
        session.close()
    return statistics.median(times[warm:])


def timed(device: torch.device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def remerge_s(engine: GeneratorEngine, name: str) -> float | None:
    """Seconds to fold the held LoRA into the bf16 weights and take it out again (None with FP8)."""
    lora = engine.loras.registered[name]
    layers = {n: engine.dit.get_submodule(n) for n in lora.weights}
    if any(not isinstance(m, torch.nn.Linear) for m in layers.values()):
        return None

    def fold(sign: float):
        with torch.no_grad():
            for n, (a, b) in lora.weights.items():
                layers[n].weight.addmm_(b, a, alpha=sign)  # b holds scale * B

    return timed(engine.dit.device, lambda: (fold(1.0), fold(-1.0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (CPU check of the code paths)")
    ap.add_argument("--fp8", action="store_true", help="FP8 (e4m3) base linears, the LoRA delta in bf16 beside them")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (the hooks compile with them)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 128, LiveAvatar's; tiny: 4)")
    ap.add_argument("--loras", type=int, default=3, help="LoRAs registered (switches cycle through them)")
    ap.add_argument("--max-loras", type=int, default=2, help="held at once: every switch drops one")
    ap.add_argument("--switches", type=int, default=6, help="switches measured")
    ap.add_argument("--sizes", default="704*384,384*256")
    # 4 blocks a clip at 48 frames: CUDA graphs replay from the 5th block on, the steady state
    ap.add_argument("--blocks", type=int, default=10, help="blocks per session (the first --warm are warm-up)")
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the LoRA files go (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="JSON results (default $OUT/lora_switch.json when $OUT is set)")
    args = ap.parse_args()
    name = "tiny" if args.tiny else "s2v-14b"
    rank = args.rank or (4 if args.tiny else 128)
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("*")) for s in args.sizes.split(",")]
    if args.tiny:
        sizes = [(max(16, w // 4 // 16 * 16), max(16, h // 4 // 16 * 16)) for w, h in sizes]
    out_path = args.out or (os.path.join(os.environ["OUT"], "lora_switch.json") if os.environ.get("OUT") else None)
    results: dict = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": name,
        "fp8": args.fp8,
        "compile": args.compile,
        "rank": rank,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    folder = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="lora-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    meta = build_dit(name, device="meta")
    names = [f"avatar{i}" for i in range(args.loras)]
    t0 = time.perf_counter()
    sizes_bytes = [write_random_lora(folder / f"{n}.safetensors", meta, rank, seed=i) for i, n in enumerate(names)]
    log(f"wrote {len(names)} LoRAs of {sizes_bytes[0] / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
    spec = ModelSpec(
        name=name,
        random_weights=not args.tiny,
        device=str(device),
        fp8=args.fp8,
        compile=args.compile,
        avatar_loras=tuple((n, str(folder / f"{n}.safetensors")) for n in names),
        max_loras=args.max_loras,
    )
    t0 = time.perf_counter()
    register_avatar_loras(spec)
    results["register_s_per_lora"] = (time.perf_counter() - t0) / len(names)
    t0 = time.perf_counter()
    engine = GeneratorEngine(spec)
    results["build_s"] = time.perf_counter() - t0
    log(f"engine built in {results['build_s']:.1f} s; registering one LoRA: {results['register_s_per_lora']:.3f} s")

    # switches: cycle through more LoRAs than are held, so every acquire of the next one loads it
    loads, hits = [], []
    for i in range(args.switches + 1):
        lora_id = names[i % len(names)]
        held = lora_id in engine.loras.loaded()
        seconds = timed(device, lambda: engine.loras.acquire(lora_id).release())
        if i:  # the first also pays for the allocator's first touch
            (hits if held else loads).append(seconds)
        seconds = timed(device, lambda: engine.loras.acquire(lora_id).release())
        hits.append(seconds)
    lora = engine.loras.registered[engine.loras.loaded()[0]]
    results["switch"] = {
        "load_s_median": statistics.median(loads) if loads else None,
        "load_s_all": loads,
        "hit_s_median": statistics.median(hits),
        "device_mib_per_lora": lora.nbytes / 2**20,
        "file_mib": sizes_bytes[0] / 2**20,
        "evictions": engine.loras.evictions,
    }
    results["remerge_s"] = remerge_s(engine, lora.name)
    log(f"switch: {results['switch']}; remerge (fold in + out): {results['remerge_s']}")

    results["blocks"] = []
    held = engine.loras.loaded()[0]
    for size in sizes:
        row = {"size": f"{size[0]}*{size[1]}"}
        row["lora_ms"] = block_ms(engine, size, held, args.blocks, args.warm)
        row["hooks_no_lora_ms"] = block_ms(engine, size, "", args.blocks, args.warm)
        engine.loras.detach()
        row["plain_ms"] = block_ms(engine, size, "", args.blocks, args.warm)
        engine.loras.attach(engine.dit)
        row["lora_overhead_pct"] = 100 * (row["lora_ms"] / row["plain_ms"] - 1)
        results["blocks"].append(row)
        log(f"blocks: {row}")

    text = json.dumps(results, indent=1)
    if out_path:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out_path)
    log(text)
    if not args.dir:
        for n in names:
            (folder / f"{n}.safetensors").unlink()
        folder.rmdir()
    return results


if __name__ == "__main__":
    main()
