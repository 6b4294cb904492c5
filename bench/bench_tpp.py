"""Multi-GPU generator benchmark: the same sessions on 1 GPU (GeneratorEngine) and on TPP groups of
R GPUs (TPPEngine, one DiT per rank), at the engine level, as the generator service drives them.

For every R in --ranks the script starts R processes as torchrun would (env rendezvous on
loopback, NCCL on GPUs with NVLink multicast off, gloo on the CPU; R=1 is one process running
the single-GPU engine), and rank 0 runs, for every k in --sessions, k sessions at once, each
streaming --blocks blocks with the service's pipelining (up to pipeline_depth blocks in flight).
Per (R, k) it reports: aggregate FPS (all blocks over the whole wall time) and steady FPS (after
every session's first --warm blocks), time to the first block (open + block 0: what a client's
first fragment waits for in the DiT), and each rank's peak GPU memory. --cap-gib caps every
rank with torch.cuda.set_per_process_memory_fraction (a 24 GiB card on a larger one); what
does not fit is reported as an error of that run, the other runs go on. JSON to --out
(default bench/results/<date>-tpp-<device>.json).

    # one GPU (the baseline; self-contained, about 3 min on an H200):
    python3 bench/bench_tpp.py --ranks 1 --out $OUT/tpp-r1.json
    # 1 vs 2 vs 4 GPUs, 1/2/4 sessions, and every rank capped at 24 GiB with FP8:
    python3 bench/bench_tpp.py --ranks 1,2,4 --out $OUT/tpp.json
    python3 bench/bench_tpp.py --ranks 1,2,4 --fp8 --cap-gib 24 --out $OUT/tpp-24g.json
    # CPU check of every code path (tiny model, gloo; what tests/test_tpp_bench.py runs):
    python3 bench/bench_tpp.py --dry-run --ranks 1,2 --sessions 1,2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from local_ranks import RanksTimedOut, run_ranks  # noqa: E402

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="group sizes to run, comma-separated (1: the single-GPU engine)")
    p.add_argument("--sessions", default="1,2,4", help="sessions in flight at once, comma-separated")
    p.add_argument("--size", default="704*384", help="width*height (default 704*384, the hd preset)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    p.add_argument("--infer-frames", type=int, default=48, help="frames a clip (default 48, the hd preset)")
    p.add_argument("--blocks", type=int, default=12, help="blocks each session streams (default 12)")
    p.add_argument("--warm", type=int, default=2, help="first blocks of each session left out of steady FPS")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers (compute capability >= 8.9)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype, e.g. float8_e4m3fn (default: the model's)")
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="R=1 without CUDA graphs (TPP ranks run without them: this isolates the parallelism)",
    )
    p.add_argument("--cap-gib", type=float, default=None, help="cap every rank's GPU memory (e.g. 24)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="s2v-14b", help="s2v-14b (full size, random weights) or tiny")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU over gloo, 64*64, 3 blocks")
    p.add_argument("--timeout", type=float, default=900, help="seconds a group may run (default 900)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-tpp-<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank of a group: its config file
    a = p.parse_args(argv)
    if a.dry_run:
        a.device, a.model, a.size, a.infer_frames, a.blocks, a.warm = "cpu", "tiny", "64*64", 24, 3, 1
    try:
        a.ranks = [int(r) for r in str(a.ranks).split(",")]
        a.sessions = [int(k) for k in str(a.sessions).split(",")]
        a.width, a.height = (int(v) for v in a.size.split("*"))
    except ValueError:
        p.error("--ranks and --sessions take integers separated by commas, --size width*height")
    if min(a.ranks) < 1 or min(a.sessions) < 1 or a.blocks <= a.warm:
        p.error("--ranks and --sessions must be >= 1 and --blocks > --warm")
    return a


# --------------------------------------------------------------------------- one rank


def peak_bytes(device) -> int:
    """This process's peak: GPU memory allocated on its device, else its resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_sessions(engine, cfg: dict, k: int, blocks: int) -> dict:
    """k sessions at once, each streaming `blocks` blocks the way GeneratorServicer does (up to
    pipeline_depth in flight); returns the timings of every block."""
    import torch

    from avatar.jobs import Job
    from avatar.presets import FRAMES_PER_BLOCK

    c, dit = engine.dit.config, engine.dit
    h, w = cfg["height"] // 8, cfg["width"] // 8
    job = Job(
        width=cfg["width"],
        height=cfg["height"],
        infer_frames=cfg["infer_frames"],
        sample_steps=cfg["steps"],
        num_blocks=blocks,
        total_frames=blocks * FRAMES_PER_BLOCK,
        model=cfg["model"],
    )
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(c.text_len, c.text_dim, generator=gen)
    ref = torch.randn(c.in_dim, 1, h, w, generator=gen)
    motion = torch.randn(c.in_dim, dit.motion_latent_frames, h, w, generator=gen)
    audio = torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim, generator=gen)
    start = time.perf_counter()

    def stream(i: int) -> dict:
        t0 = time.perf_counter()
        session = engine.open_session(dataclasses.replace(job, seed=i), text, ref, motion)
        opened = time.perf_counter() - t0
        done, queue = [], []
        try:
            for _ in range(blocks):
                queue.append(session.submit(audio))
                while len(queue) >= session.pipeline_depth:
                    queue.pop(0).result()
                    done.append(time.perf_counter() - start)
            for f in queue:
                f.result()
                done.append(time.perf_counter() - start)
            kv = session.kv_cache_bytes
        finally:
            session.close()
        return {"open_s": opened, "first_block_s": done[0] - (t0 - start), "done_s": done, "kv_cache_bytes": kv}

    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        streams = list(pool.map(stream, range(k)))
    return {"wall_s": time.perf_counter() - start, "streams": streams}


def summarize(run: dict, k: int, blocks: int, warm: int) -> dict:
    from avatar.presets import FRAMES_PER_BLOCK

    streams, wall = run["streams"], run["wall_s"]
    t_warm = max(s["done_s"][warm - 1] for s in streams)
    t_end = max(s["done_s"][-1] for s in streams)
    steady = sum(1 for s in streams for t in s["done_s"] if t > t_warm)
    return {
        "sessions": k,
        "fps": round(k * blocks * FRAMES_PER_BLOCK / wall, 2),
        "steady_fps": round(steady * FRAMES_PER_BLOCK / (t_end - t_warm), 2) if t_end > t_warm else None,
        "first_block_s": round(min(s["first_block_s"] for s in streams), 3),
        "first_block_s_max": round(max(s["first_block_s"] for s in streams), 3),
        "open_s": round(max(s["open_s"] for s in streams), 3),
        "kv_cache_gib_per_session": round(streams[0]["kv_cache_bytes"] / GiB, 3),
        "wall_s": round(wall, 2),
    }


def worker(path: str) -> None:
    """One rank: R=1 runs GeneratorEngine; in a group rank 0 runs TPPEngine, the others run_worker.
    Every rank writes its peak memory; rank 0 writes the runs."""
    cfg = json.loads(Path(path).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg["dir"])
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from avatar.presets import GeneratorOptions, ModelSpec
    from avatar.services.generator.engine import GeneratorEngine

    spec = ModelSpec(
        name=cfg["model"],
        device=cfg["device"],
        random_weights=cfg["model"] != "tiny",
        fp8=cfg["fp8"],
        generator_options=GeneratorOptions(kv_dtype=cfg["kv_dtype"], cuda_graphs=cfg["cuda_graphs"]),
    )
    result: dict = {"rank": rank, "runs": [], "errors": {}}
    device = torch.device("cpu")
    try:
        if cfg["device"] == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            result["card"] = torch.cuda.get_device_name(device)
            if cfg["cap_gib"]:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cfg["cap_gib"] * GiB / total), device)
        if world == 1:
            engine = GeneratorEngine(spec.with_(device=str(device)))
        else:
            from avatar.services.generator.distributed import tpp

            group, spec = tpp.init_group(spec)
            if rank:
                try:
                    tpp.run_worker(group, GeneratorEngine(spec))
                finally:
                    torch.distributed.destroy_process_group()
                return
            engine = tpp.TPPEngine(group, GeneratorEngine(spec), max_sessions=max(cfg["sessions"]))
        result["model_gib"] = round(peak_bytes(device) / GiB, 2) if device.type == "cuda" else None
        try:
            run_sessions(engine, cfg, 1, cfg["warm"] + 1)  # warm-up: kernels, allocator, autotuning
            for k in cfg["sessions"]:
                try:
                    run = run_sessions(engine, cfg, k, cfg["blocks"])
                    result["runs"].append(summarize(run, k, cfg["blocks"], cfg["warm"]))
                    log(f"R={world} k={k}: {result['runs'][-1]}")
                except Exception as e:  # e.g. out of memory at k sessions: the next runs still go
                    result["errors"][f"sessions={k}"] = f"{type(e).__name__}: {str(e)[:500]}"
                    log(f"R={world} k={k}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            if world > 1:
                engine.close()
    except Exception as e:
        result["errors"]["start"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc(limit=8)
    finally:
        result["peak_gib"] = round(peak_bytes(device) / GiB, 3)
        (out / f"rank{rank}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- the launcher


def run_group(a: argparse.Namespace, world: int) -> dict:
    """R ranks as torchrun would start them; their JSON merged, each rank's peak memory listed."""
    with tempfile.TemporaryDirectory(prefix=f"tpp{world}-") as tmp:
        cfg = {
            "dir": tmp,
            "model": a.model,
            "device": a.device,
            "width": a.width,
            "height": a.height,
            "infer_frames": a.infer_frames,
            "steps": a.steps,
            "blocks": a.blocks,
            "warm": a.warm,
            "sessions": a.sessions,
            "fp8": a.fp8,
            "kv_dtype": a.kv_dtype,
            "cap_gib": a.cap_gib,
            "cuda_graphs": False if a.no_cuda_graphs else None,
        }
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        argv = [sys.executable, __file__, "--worker", str(path)]
        nvls_off = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast off: see docs/operations.md
        try:  # the ranks write to this process's output
            codes = [code for code, _ in run_ranks(world, argv, a.timeout, env=nvls_off, capture=False)]
        except RanksTimedOut as e:
            codes = ["timeout" if code is None else code for code in e.exit_codes]
        ranks = []
        for r in range(world):
            f = Path(tmp) / f"rank{r}.json"
            ranks.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "errors": {"exit": "no result"}})
    group = {"ranks": world, "exit_codes": codes, **{k: ranks[0].get(k) for k in ("card", "model_gib", "runs")}}
    group["peak_gib_per_rank"] = [r.get("peak_gib") for r in ranks]
    group["errors"] = {f"rank{r['rank']}.{k}": v for r in ranks for k, v in r.get("errors", {}).items()}
    return group


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        worker(a.worker)
        return {}
    date = datetime.datetime.now(datetime.UTC)
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"{date:%Y-%m-%d}-tpp-{a.device}.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results = {
        "date": date.isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in vars(a).items() if k not in ("worker", "out")},
        "groups": [],
    }
    for world in a.ranks:
        log(f"-- {world} rank(s)")
        t0 = time.perf_counter()
        results["groups"].append(run_group(a, world))
        results["groups"][-1]["group_wall_s"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)  # written after every group: a later group's failure keeps the earlier ones
    # speed-up of each group over one rank, at the same number of sessions
    base = {r["sessions"]: r for g in results["groups"] if g["ranks"] == 1 for r in g.get("runs") or []}
    for g in results["groups"]:
        for r in g.get("runs") or []:
            if r["sessions"] in base and base[r["sessions"]]["steady_fps"] and r["steady_fps"]:
                r["speedup_vs_1"] = round(r["steady_fps"] / base[r["sessions"]]["steady_fps"], 2)
    out.write_text(json.dumps(results, indent=1))
    log(f"{'R':>2} {'k':>2} {'FPS':>7} {'steady':>7} {'first s':>8} {'x1':>5}  peak GiB per rank")
    for g in results["groups"]:
        for r in g.get("runs") or []:
            log(
                f"{g['ranks']:>2} {r['sessions']:>2} {r['fps']:>7} {r['steady_fps'] or '-':>7} "
                f"{r['first_block_s']:>8} {r.get('speedup_vs_1', '-'):>5}  {g['peak_gib_per_rank']}"
            )
        for k, v in g["errors"].items():
            log(f"R={g['ranks']} {k}: {v[:200]}")
    log(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
