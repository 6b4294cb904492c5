"""Per-rank peak memory and block time of a generator layout: one GPU, or the DiT FSDP2-sharded over F.

Every rank is capped (torch.cuda.set_per_process_memory_fraction, default 24 GiB: the small cards
of issue 14) once its model is built, then one session of full-size random weights runs through
the serving path: GeneratorEngine on one GPU; with --parallel fsdp=F, rank 0's ShardedEngine and
the other ranks' worker loops, exactly as `avatar serve --role generator --parallel fsdp=F` runs
them. Each rank reports its weights at rest, its peak allocated/reserved memory over the session,
and rank 0 the session open, first block and steady block times; the memory planner's estimate
for the same layout (avatar.memory_planner.rank_bytes) is written beside them.

    source bench/device_setup.sh
    python3 bench/bench_shard.py --fp8 --cache-sets 1 --kv-fp8 --out $OUT/shard1.json       # baseline, 1 GPU
    torchrun --nproc-per-node 2 bench/bench_shard.py --parallel fsdp=2 --fp8 --cache-sets 1 --kv-fp8 \
        --out $OUT/fsdp2.json
    torchrun --nproc-per-node 2 bench/bench_shard.py --parallel fsdp=2 --tiny --device cpu   # CPU/gloo dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from avatar.errors import AvatarError
from avatar.jobs import Job
from avatar.presets import FRAMES_PER_BLOCK, GeneratorOptions, ModelSpec
from avatar.services.generator.distributed import leave_group

GiB = 2**30


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", default=None, help="fsdp=F under torchrun (default: one process, one GPU)")
    p.add_argument("--device", default="cuda", help="cuda (each rank on cuda:LOCAL_RANK) or cpu (gloo, dry run)")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64*64 (CPU dry run of the code paths)")
    p.add_argument("--size", default="704*384", help="W*H (the tiny model: 64*64)")
    p.add_argument("--infer-frames", type=int, default=48, help="video frames per clip (the KV window)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=8, help="blocks in the session (first one excluded from the median)")
    p.add_argument("--fp8", action="store_true", help="FP8 weights")
    p.add_argument("--cache-sets", type=int, choices=(1,), default=None, help="one KV cache set (clean context)")
    p.add_argument("--kv-fp8", action="store_true", help="KV cache in e4m3")
    p.add_argument("--cap-gib", type=float, default=24.0, help="per-rank memory cap after loading (0: none)")
    p.add_argument(
        "--load-on",
        choices=("host", "gpu"),
        default="host",
        help="fsdp: build the DiT in host memory "
        "(as 24 GiB cards must) or on each GPU (faster, needs a whole copy's room)",
    )
    p.add_argument("--out", default=None, help="JSON results (rank 0)")
    return p.parse_args(argv)


def make_job(width: int, height: int, infer_frames: int, steps: int, blocks: int, model: str) -> Job:
    return Job(
        width=width,
        height=height,
        infer_frames=infer_frames,
        sample_steps=steps,
        num_blocks=blocks,
        total_frames=blocks * FRAMES_PER_BLOCK,
        model=model,
        seed=420,
        request_id="bench-shard",
    )


def session_inputs(dit, width: int, height: int, blocks: int):
    """Seeded encoder outputs, as they arrive from the encoder service (the same on every rank)."""
    c, g = dit.config, torch.Generator().manual_seed(0)
    h, w = height // 8, width // 8
    return (
        torch.randn(min(77, c.text_len), c.text_dim, generator=g),
        torch.randn(c.in_dim, 1, h, w, generator=g),
        torch.randn(c.in_dim, dit.motion_latent_frames, h, w, generator=g),
        [torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim, generator=g) for _ in range(blocks)],
    )


def cap_memory(device: torch.device, cap_gib: float) -> float | None:
    """Caps this process on its GPU; returns the cap in GiB (None on the CPU or without a cap)."""
    if device.type != "cuda" or cap_gib <= 0:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), device)
    return cap_gib


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak allocated and reserved GiB since the last reset_peak (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
    }


def run_session(engine, job: Job, inputs) -> dict:
    """One session through the engine's serving interface: open, every block, close."""
    text, ref, motion, audio = inputs
    t0 = time.perf_counter()
    session = engine.open_session(job, text, ref, motion)
    open_ms = (time.perf_counter() - t0) * 1e3
    times = []
    try:
        for a in audio:
            t = time.perf_counter()
            session.generate_block(a)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        session.close()
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "open_ms": open_ms,
        "first_block_ms": times[0],
        "block_ms": steady,
        "block_ms_all": times,
        "dit_fps": FRAMES_PER_BLOCK / (steady / 1e3),
    }


def planner_estimate(args, req_size, world: int) -> dict | None:
    """What avatar.memory_planner.rank_bytes says for this layout (the full-size model only)."""
    if args.tiny:
        return None
    from avatar.memory_planner import MemoryRequest, rank_bytes

    req = MemoryRequest(*req_size, infer_frames=args.infer_frames, sample_steps=args.steps)
    layout, degree = ("fsdp", world) if world > 1 else ("single", 1)
    parts = rank_bytes(
        req,
        layout,
        degree,
        fp8=args.fp8,
        kv_sets=args.cache_sets,
        kv_dtype="float8_e4m3fn" if args.kv_fp8 else "bfloat16",
    )
    return {"total_gib": sum(parts.values()) / GiB, "parts_gib": {k: v / GiB for k, v in parts.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast reserves memory per communicator (docs/operations.md)
    from avatar.services.generator.distributed.parallel_config import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = ParallelConfig.for_world(args.parallel, world)
        if world > 1 and not config.sharded:
            raise ValueError("bench_shard measures --parallel fsdp=F (TPP has its own bench)")
        width, height = (int(v) for v in ("64*64" if args.tiny else args.size).split("*"))
    except ValueError as exc:
        log(f"bench_shard: {exc}")
        return 2
    options = GeneratorOptions(
        cache_sets=args.cache_sets, kv_dtype="float8_e4m3fn" if args.kv_fp8 else None, cuda_graphs=False
    )
    spec = ModelSpec(
        name="tiny" if args.tiny else "s2v-14b",
        random_weights=not args.tiny,
        device=args.device,
        fp8=args.fp8,
        generator_options=options,
    )
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    t0 = time.perf_counter()
    group = None
    if world > 1:
        from avatar.services.generator.distributed import sharding

        group, spec = sharding.init_shard_group(spec, config)
        load_on = "cpu" if args.load_on == "host" else spec.device
        engine = sharding.build_in_turn(group, spec, load_device=load_on)
        weights = sharding.local_weight_bytes(engine.dit)
        rank = group.rank
    else:
        from avatar.services.generator.engine import GeneratorEngine

        engine = GeneratorEngine(spec)
        weights = sum(t.numel() * t.element_size() for t in (*engine.dit.parameters(), *engine.dit.buffers()))
        rank = 0
    device = engine.dit.device
    load_s = time.perf_counter() - t0
    cap = cap_memory(device, args.cap_gib)
    reset_peak(device)
    mine = {"rank": rank, "device": str(device), "load_s": load_s, "weights_gib": weights / GiB}
    if device.type == "cuda":
        mine["allocated_after_load_gib"] = torch.cuda.memory_allocated(device) / GiB
    result: dict = {"errors": {}}
    inputs = session_inputs(engine.dit, width, height, args.blocks)
    job = make_job(width, height, args.infer_frames, args.steps, args.blocks, spec.name)
    if group is not None and rank:
        sharding.run_shard_worker(group, engine)
    else:
        serving = engine if group is None else sharding.ShardedEngine(group, engine)
        try:
            result["rank0"] = run_session(serving, job, inputs)
        except (AvatarError, torch.OutOfMemoryError) as exc:  # a layout that does not fit: recorded
            result["errors"]["session"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            log(f"bench_shard: session failed: {exc}")
        if group is not None:
            serving._call(sharding.Stop()).result(120)
    mine |= peak_memory(device)  # over the session, on top of the weights
    ranks = [mine]
    if group is not None:
        import torch.distributed as dist

        ranks = [None] * group.size
        dist.all_gather_object(ranks, mine, group=group.control)
        leave_group(group.control)
    if rank:
        return 0
    result |= {
        "layout": config.describe() if world > 1 else "single",
        "world_size": world,
        "size": f"{width}*{height}",
        "infer_frames": args.infer_frames,
        "steps": args.steps,
        "blocks": args.blocks,
        "fp8": args.fp8,
        "cache_sets": args.cache_sets or args.steps,
        "kv_dtype": options.kv_dtype or "bfloat16",
        "cap_gib": cap,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ranks": ranks,
        "planner": planner_estimate(args, (width, height), world),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(out.suffix + ".part")
        part.write_text(text)
        part.replace(out)  # never a half-written result
    return 0


if __name__ == "__main__":
    sys.exit(main())
