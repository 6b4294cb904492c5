"""One-call GPU benchmark of the whole pipeline in one process: the generator and decoder engines as a server runs them.

What bench_generator.py measures at DiT level, measured here through the services' engines
(GeneratorEngine sessions, DecoderEngine streams: VAE decode + H.264/AAC fMP4 mux on a decoder
thread with its own CUDA stream, as `avatar serve --role all` runs them), with full-size random
weights. Per configuration: time to first fragment (warm: session open + sink prefill + first
block + its decode and mux, encoders excluded), sustained FPS (fragments out per second over the
blocks after the CUDA graphs are captured), DiT ms per block, VAE and mux ms per block, peak
GPU memory. Variants compared in the same run, on the same compiled model:

- FP8 + compile, CUDA graphs off vs on (DiT only, 704*384 and 384*256; latents compared);
- the whole pipeline with graphs at 704*384 and 384*256;
- the 24 GB mode: process capped at 24 GiB, FP8 weights with the text k/v projections in pinned
  CPU memory, one FP8 cache set, shorter clips (infer_frames 24 and 36: the KV ring);
- bf16 + compile with graphs (if the time budget allows).

    python bench/bench_pipeline.py --out $OUT/pipeline.json          # H100: about 6 minutes
    python bench/bench_pipeline.py --tiny --device cpu               # CPU check of the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from avatar.jobs import Job
from avatar.presets import FPS, FRAMES_PER_BLOCK
from avatar.presets import OUTPUT_AUDIO_RATE as RATE
from bench.bench_generator import GiB, free_memory, median, peak_gib, reset_peak, run_guarded

BLOCKS_PER_CLIP = 4  # infer_frames 48


def log(*a):
    print(*a, flush=True)


def make_job(
    width: int, height: int, blocks: int, seed: int = 420, infer_frames: int = FRAMES_PER_BLOCK * BLOCKS_PER_CLIP
) -> Job:
    return Job(
        width=width,
        height=height,
        infer_frames=infer_frames,
        sample_steps=4,
        num_blocks=blocks,
        seed=seed,
        total_frames=blocks * FRAMES_PER_BLOCK,
        model="s2v-14b",
        audio_sample_rate=RATE,
        request_id="bench",
    )


def session_inputs(dit, width: int, height: int, blocks: int, seed: int = 0):
    """Seeded encoder outputs on the host, as they arrive from the encoder service."""
    c, g = dit.config, torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    text = torch.randn(min(77, c.text_len), c.text_dim, generator=g)
    ref = torch.randn(16, 1, h, w, generator=g)
    motion = torch.randn(16, dit.motion_latent_frames, h, w, generator=g)
    audio = [torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim, generator=g) for _ in range(blocks)]
    pcm = (np.sin(np.arange(RATE * FRAMES_PER_BLOCK // FPS) * 2 * np.pi * 220 / RATE) * 8000).astype(np.int16)
    return text, ref, motion, audio, pcm


def run_session(
    eng,
    dec,
    width: int,
    height: int,
    blocks: int,
    warm: int,
    label: str,
    infer_frames: int = FRAMES_PER_BLOCK * BLOCKS_PER_CLIP,
) -> dict:
    """One session from open to last fragment. `dec` None: DiT only. Decoding runs on a thread
    with its own CUDA stream, fed through a queue of 3 blocks (the gateway's backpressure)."""
    device = eng.dit.device
    cuda = device.type == "cuda"
    job = make_job(width, height, blocks, infer_frames=infer_frames)
    text, ref, motion, audio, pcm = session_inputs(eng.dit, width, height, blocks)
    free_memory(device)
    reset_peak(device)
    done_at, parts, errors, latents = [], [], [], []
    t0 = time.perf_counter()
    sess = eng.open_session(job, text, ref, motion)
    stream = dec.open_stream(job, ref) if dec is not None else None
    q: queue.Queue = queue.Queue(maxsize=3)

    def decode_loop():
        side = torch.cuda.Stream(device) if cuda else None
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                stream.init_segment()
                while (lat := q.get()) is not None:
                    b = stream.decode_block(lat, pcm, FRAMES_PER_BLOCK)
                    done_at.append(time.perf_counter())
                    parts.append((b.vae_ms, b.mux_ms, len(b.data)))
        except Exception as e:  # reported, and the producer is not left blocked on a full queue
            errors.append(e)
            while q.get() is not None:
                pass

    thread = threading.Thread(target=decode_loop, daemon=True) if stream is not None else None
    if thread:
        thread.start()
    open_ms = (time.perf_counter() - t0) * 1e3
    dit_ms = []
    try:
        for i, a in enumerate(audio):
            lat = sess.generate_block(a)
            dit_ms.append(sess.last_block_ms)
            if thread:
                q.put(lat)
            else:
                done_at.append(time.perf_counter())
            if i >= blocks - 2:
                latents.append(lat.float().cpu())
    finally:
        if thread:
            q.put(None)
            thread.join()
        graphs = (sess.graphs.num_graphs, sess.graphs.replays) if sess.graphs is not None else (0, 0)
        sess.close()
        if stream is not None:
            stream.close()
    if errors:
        raise errors[0]
    steady = done_at[warm:]
    per_block = (steady[-1] - steady[0]) / (len(steady) - 1) * 1e3 if len(steady) > 1 else float("nan")
    res = {
        "label": label,
        "size": f"{width}*{height}",
        "blocks": blocks,
        "warm_blocks": warm,
        "infer_frames": infer_frames,
        "generator_options": asdict(eng.spec.generator_options),
        "decoder": dec is not None,
        "open_session_ms": open_ms,
        "first_fragment_s": done_at[0] - t0,
        "first_block_dit_ms": dit_ms[0],
        "dit_block_ms": median(dit_ms[warm:]),
        "wall_block_ms": per_block,
        "fps": FRAMES_PER_BLOCK / (per_block / 1e3),
        "dit_block_ms_all": [round(m, 1) for m in dit_ms],
        "graphs": graphs[0],
        "graph_replays": graphs[1],
        "peak_gib": peak_gib(device),
        "kv_cache_gib": None,
    }
    if parts:
        res.update(
            vae_ms=median([p[0] for p in parts[warm:]]),
            mux_ms=median([p[1] for p in parts[warm:]]),
            first_vae_ms=parts[0][0],
            first_mux_ms=parts[0][1],
            fragment_kb=median([p[2] for p in parts]) / 1e3,
        )
    res["_latents"] = latents
    log(
        f"  {label:28s} {res['size']:8s} first fragment {res['first_fragment_s']:.3f} s | "
        f"{res['wall_block_ms']:.1f} ms/block = {res['fps']:.1f} FPS | DiT {res['dit_block_ms']:.1f} ms/block"
        + (f" | VAE {res['vae_ms']:.1f} mux {res['mux_ms']:.1f}" if parts else "")
        + f" | graphs {graphs[0]} ({graphs[1]} replays) | peak {res['peak_gib']:.2f} GiB"
    )
    return res


def bench_vae(
    device, width: int, height: int, tiny: bool, blocks: int = 6, warm: int = 2, compile_too: bool = False
) -> dict:
    """Streaming decode of one block alone (time and the decode's own peak over the VAE's weights),
    eager and, optionally, with the decoder under torch.compile (measured only: the service does not
    compile the VAE, docs/operations.md)."""
    from avatar.models.wan_vae import S2V_14B_VAE, TINY_VAE, WanVAE
    from bench.bench_generator import Clock

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = WanVAE.random(TINY_VAE if tiny else S2V_14B_VAE, 0, device, dtype)
    g = torch.Generator(device=device).manual_seed(2)
    h, w = height // 8, width // 8
    prime = torch.randn(1, 16, 1, h, w, generator=g, device=device)
    lats = [torch.randn(1, 16, 3, h, w, generator=g, device=device) for _ in range(blocks)]
    clock = Clock(device)

    def run() -> dict:
        free_memory(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        reset_peak(device)
        dec = vae.stream_decoder()
        dec.decode(prime)
        ms, out = [], None
        for lat in lats:
            a = clock.mark()
            out = dec.decode(lat)
            ms.append(clock.ms(a, clock.mark()))
        peak = (torch.cuda.max_memory_allocated(device) - base) / GiB if device.type == "cuda" else float("nan")
        dec.close()
        return {"ms": median(ms[warm:]), "first_ms": ms[0], "decode_peak_gib": peak, "_last": out.float().cpu()}

    res = {
        "size": f"{width}*{height}",
        "weights_gib": sum(p.numel() * p.element_size() for p in vae.model.parameters()) / GiB,
    }
    res["eager"] = run()
    if compile_too:
        vae.model.decoder.compile()
        run()  # compiles (first call, then the cached shapes)
        res["compiled"] = run()
        res["compiled"]["max_abs_diff_vs_eager"] = (res["compiled"]["_last"] - res["eager"]["_last"]).abs().max().item()
    for k in list(res):
        if isinstance(res[k], dict):
            res[k].pop("_last", None)
            log(
                f"  vae {res['size']} {k:9s}: {res[k]['ms']:.1f} ms/block (first {res[k]['first_ms']:.0f}), "
                f"decode peak {res[k]['decode_peak_gib']:.2f} GiB over weights"
                + (
                    f", max |diff| vs eager {res[k]['max_abs_diff_vs_eager']:.4f}"
                    if "max_abs_diff_vs_eager" in res[k]
                    else ""
                )
            )
    vae = None  # frees the weights before the next part (run() holds the name)
    free_memory(device)
    return res


def max_diff(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return None
    pairs = list(zip(a["_latents"], b["_latents"]))
    return {
        "max_abs": max((x - y).abs().max().item() for x, y in pairs),
        "rel": max(((x - y).norm() / y.norm()).item() for x, y in pairs),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (CPU check of the code paths)")
    ap.add_argument("--sizes", default=None, help="W*H list (default 704*384,384*256; --tiny: 128*64,64*64)")
    ap.add_argument("--blocks", type=int, default=15, help="blocks per session (graphs are captured in blocks 3-6)")
    ap.add_argument("--warm", type=int, default=8, help="blocks before the steady-state figures")
    ap.add_argument("--mem-gib", type=float, default=24.0)
    ap.add_argument("--only", default="graphs,pipeline,24gb,vae,bf16")
    ap.add_argument("--time-budget", type=float, default=540)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_main = time.perf_counter()
    parts = set(args.only.split(","))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    sizes = args.sizes or ("128*64,64*64" if args.tiny else "704*384,384*256")
    sizes = [tuple(int(v) for v in s.split("*")) for s in sizes.split(",")]
    out_path = args.out or (os.path.join(os.environ["OUT"], "pipeline.json") if os.environ.get("OUT") else None)
    results: dict = {
        "command": " ".join(sys.argv),
        "commit": os.environ.get("BENCH_COMMIT", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": [],
        "errors": {},
    }
    if cuda:
        p = torch.cuda.get_device_properties(device)
        results["env"] = {
            "gpu": p.name,
            "memory_gib": p.total_memory / GiB,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    log(f"env: {results.get('env', 'cpu')}")

    def save():
        if out_path:
            clean = {
                **results,
                "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results["runs"]],
            }
            with open(out_path + ".tmp", "w") as f:
                json.dump(clean, f, indent=1, default=str)
            os.replace(out_path + ".tmp", out_path)

    def guarded(name, fn):
        def run_and_keep():
            r = fn()
            if r:
                results["runs"].append(r)
            return r

        return run_guarded(results, name, run_and_keep, device, save)

    from avatar.presets import GeneratorOptions, ModelSpec
    from avatar.services.decoder.engine import DecoderEngine
    from avatar.services.generator.engine import GeneratorEngine, build_generator_model

    name = "tiny" if args.tiny else "s2v-14b"
    base = ModelSpec(name=name, device=str(device), random_weights=not args.tiny, fp8=cuda, compile=cuda)
    dt = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    dit = build_generator_model(base)  # FP8 and compiled on a GPU
    free_memory(device)
    log(
        f"DiT ready in {time.perf_counter() - t0:.1f} s ({torch.cuda.memory_allocated() / GiB:.2f} GiB)"
        if cuda
        else "DiT ready"
    )

    def engine(**options):
        return GeneratorEngine(replace(base, generator_options=GeneratorOptions(**options)), dit=dit)

    n, warm = args.blocks, args.warm
    if args.tiny:
        n, warm = 7, 4
    # the first session at each size compiles every shape (the ring fills): a warm-up of its own
    for w, h in sizes:
        guarded(
            f"compile {w}*{h}",
            lambda w=w, h=h: run_session(
                engine(cuda_graphs=False), None, w, h, BLOCKS_PER_CLIP + 1, 1, "warm-up (compiles)"
            ),
        )
    tag = "fp8+compile" if cuda else "cpu"
    if "graphs" in parts:
        log("CUDA graphs off vs on, DiT only (GeneratorEngine):")
        for w, h in sizes:
            off = guarded(
                f"graphs off {w}*{h}",
                lambda w=w, h=h: run_session(engine(cuda_graphs=False), None, w, h, n, warm, f"{tag}"),
            )
            on = guarded(
                f"graphs on {w}*{h}",
                lambda w=w, h=h: run_session(engine(cuda_graphs=True), None, w, h, n, warm, f"{tag}+graphs"),
            )
            d = max_diff(off, on)
            results.setdefault("graphs_vs_eager_max_abs_diff", {})[f"{w}*{h}"] = d
            log(f"  latents with vs without graphs, last 2 blocks: max |diff| = {d}")
    dec = None
    if "pipeline" in parts or "24gb" in parts:
        dec = DecoderEngine(base)
    if "pipeline" in parts:
        log("Whole pipeline (generator + decoder engines, decode on its own stream/thread):")
        for w, h in sizes:
            guarded(
                f"pipeline {w}*{h}",
                lambda w=w, h=h: run_session(engine(cuda_graphs=True), dec, w, h, n, warm, f"{tag}+graphs, pipeline"),
            )
    if "24gb" in parts:
        w, h = sizes[0]
        log(f"24 GB mode: cap {args.mem_gib} GiB, text k/v projections on the CPU, 1 FP8 cache set, shorter clips:")
        free_memory(device)
        ctx_text = torch.randn(1, min(77, dit.config.text_len), dit.config.text_dim, device=device, dtype=dt)
        before = dit.embed_text(ctx_text)
        moved = dit.offload_text_projections()
        after = dit.embed_text(ctx_text)
        same = all(torch.equal(a, b) for pa, pb in zip(before.kv, after.kv) for a, b in zip(pa, pb))
        del before, after
        free_memory(device)
        results["offload_text_projections"] = {
            "moved_gib": moved / GiB,
            "text_kv_identical": same,
            "weights_gib_after": torch.cuda.memory_allocated() / GiB if cuda else None,
        }
        log(f"  text projections offloaded: {moved / GiB:.2f} GiB moved, same text keys/values: {same}")
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_gib * GiB / total), index)
        # The clip (= the KV ring) is the lever left: decoding the VAE in tiles did not lower its peak
        # (each tile's causal cache adds up to more than the frame's; run 2 in docs/performance.md).
        free_memory(device)
        mode = dict(cache_sets=1, kv_dtype="float8_e4m3fn")
        for infer, graphs in ((24, False), (24, True), (36, False)):
            guarded(
                f"24gb pipeline infer_frames={infer} graphs={graphs}",
                lambda i=infer, g=graphs: run_session(
                    engine(cuda_graphs=g, **mode),
                    dec,
                    w,
                    h,
                    n,
                    warm,
                    f"24gb{'+graphs' if g else ''}, pipeline, infer_frames {i}",
                    infer_frames=i,
                ),
            )
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    if "vae" in parts:
        w, h = sizes[0]
        left = args.time_budget - (time.perf_counter() - t_main)
        results["vae"] = run_guarded(
            results, "vae", lambda: bench_vae(device, w, h, args.tiny, compile_too=cuda and left > 200), device, save
        )
    if "bf16" in parts and cuda:
        left = args.time_budget - (time.perf_counter() - t_main)
        if left > 150:
            log(f"bf16 + compile + graphs ({left:.0f} s of the budget left):")
            del dit
            free_memory(device)
            bf16 = replace(base, fp8=False)
            dit = build_generator_model(bf16)
            w, h = sizes[0]

            def bf16_engine(graphs: bool):
                return GeneratorEngine(replace(bf16, generator_options=GeneratorOptions(cuda_graphs=graphs)), dit=dit)

            guarded(
                "bf16 warm-up",
                lambda: run_session(bf16_engine(False), None, w, h, BLOCKS_PER_CLIP + 1, 1, "bf16 warm-up (compiles)"),
            )
            for g in (False, True):
                guarded(
                    f"bf16 graphs={g}",
                    lambda g=g: run_session(
                        bf16_engine(g), None, w, h, n, warm, f"bf16+compile{'+graphs' if g else ''}"
                    ),
                )
        else:
            log(f"bf16 skipped: {left:.0f} s of the time budget left")
    save()
    log("\n| run | size | first fragment s | ms/block (wall) | FPS | DiT ms/block | VAE ms | mux ms | peak GiB |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        log(
            f"| {r['label']} | {r['size']} | {r['first_fragment_s']:.3f} | {r['wall_block_ms']:.1f} | {r['fps']:.1f} | "
            f"{r['dit_block_ms']:.1f} | {r.get('vae_ms', float('nan')):.1f} | {r.get('mux_ms', float('nan')):.1f} | "
            f"{r['peak_gib']:.2f} |"
        )
    if results["errors"]:
        log("errors: " + json.dumps(results["errors"], indent=1)[:3000])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
