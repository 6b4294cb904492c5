"""One-call GPU benchmark of the generator path: DiT ms per step per block, VAE and mux ms per block, peak memory.

Builds the full-size causal S2V DiT with random weights directly on the GPU (FLOPs and bytes do
not depend on weight values) and runs the real block loop (sink prefill, KV ring cache, 4 Euler
steps per block) at 704*384 and 384*256 for each variant: bf16 eager, FP8 (e4m3 linears), FP8 +
torch.compile, and a 24 GiB mode (torch.cuda.set_per_process_memory_fraction). Times with CUDA
events after warm-up blocks and reports medians; prints a table and writes JSON.

    python bench/bench_generator.py --out $OUT/bench.json                 # everything (H100: < 10 min)
    python bench/bench_generator.py --only smoke --out $OUT/smoke.json    # a quick pass over every path
    python bench/bench_generator.py --tiny --device cpu                   # CPU check of the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar.jobs import Job
from avatar.presets import FPS, FRAMES_PER_BLOCK, LATENT_FRAMES_PER_BLOCK, VAE_TIME_STRIDE, GeneratorOptions, ModelSpec
from avatar.services.generator.causal_s2v_dit import CausalS2VDiT
from avatar.services.generator.engine import GeneratorEngine, build_generator_model, compile_blocks
from avatar.services.generator.scheduler import FlowMatchEuler

GiB = 2**30


def log(*a):
    print(*a, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Clock:
    """CUDA events on a GPU (no host sync until read), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1000


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / GiB if torch.device(device).type == "cuda" else float("nan")


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_guarded(results: dict, name: str, fn, device, save):
    """fn()'s result; a failure (OOM, missing kernel) goes to results["errors"] and the log instead
    of ending the run, so one variant failing does not lose the others. Saves the results after."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        results["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
        log(f"  !! {name}: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=6)
        free_memory(device)
    finally:
        log(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
        save()


# --------------------------------------------------------------------------- model


def build_dit(preset: str, device: str) -> CausalS2VDiT:
    """The engine's model builder with random weights: allocated once on the device in the
    engine's dtype (bf16 on a GPU, float32 on the CPU), never as a float32 copy on the host."""
    return build_generator_model(ModelSpec(name=preset, device=device, random_weights=preset != "tiny"))


@dataclass
class LoopConfig:
    width: int
    height: int
    steps: int = 4
    window_frames: int = 12  # latent frames in the ring = infer_frames / 4
    num_sets: int = 4  # one ring per step (timestep forcing) or 1 (+ a clean pass per block)
    kv_dtype: torch.dtype | None = None  # None: the model's dtype
    fp8_attention: bool = False  # self-attention with FP8 products over the FP8 cache
    fused_norms: bool = False  # the blocks' norms in fused_norms.py's kernels (FP8 linears only)
    seed: int = 0


class StepRecorder:
    """Stands in for a session's FlowMatchEuler and keeps the latents after every step."""

    def __init__(self, sampler: FlowMatchEuler):
        self.sampler, self.timesteps, self.latents = sampler, sampler.timesteps, []

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        out = self.sampler.step(sample, velocity, i)
        self.latents.append(out.float().cpu())
        return out


@contextlib.contextmanager
def timed_forwards(dit: CausalS2VDiT, clock: Clock, marks: list):
    """Clock marks around every DiT forward (`denoise`) while inside, appended to `marks`."""
    denoise = dit.denoise

    def timed(*args, **kwargs):
        start = clock.mark()
        out = denoise(*args, **kwargs)
        marks.append((start, clock.mark()))
        return out

    dit.denoise = timed
    try:
        yield
    finally:
        del dit.denoise


class TimedSession:
    """The engine's GeneratorSession on seeded random inputs, timed per block and per DiT forward
    (timestep forcing with one cache set per step, or one set refreshed by a clean t=0 pass), run
    as the service runs it, without CUDA graphs (bench_pipeline.py measures those) and without the
    planner's admission check (the bench measures what fits)."""

    def __init__(self, dit: CausalS2VDiT, cfg: LoopConfig, device: str, clock: Clock):
        self.dit, self.cfg, self.device, self.clock = dit, cfg, device, clock
        c = dit.config
        h, w = cfg.height // 8, cfg.width // 8
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        engine = GeneratorEngine(ModelSpec(device=device), dit=dit)  # the DiT given is the model
        engine.cache_sets = None if cfg.num_sets == cfg.steps else cfg.num_sets
        engine.kv_dtype = cfg.kv_dtype or dit.dtype
        engine.fp8_attention = cfg.fp8_attention
        engine.cuda_graphs, engine.free_memory = False, None
        dit.use_fused_norms(cfg.fused_norms)
        job = Job(
            width=cfg.width,
            height=cfg.height,
            infer_frames=cfg.window_frames * VAE_TIME_STRIDE,
            sample_steps=cfg.steps,
            num_blocks=1 << 20,
            seed=cfg.seed,
        )
        text = self._randn(c.text_len, c.text_dim)
        ref = self._randn(c.in_dim, 1, h, w)
        motion = self._randn(c.in_dim, dit.motion_latent_frames, h, w)
        t0 = clock.mark()
        self.session = engine.open_session(job, text, ref, motion)
        self.prefill_ms = clock.ms(t0, clock.mark())
        self.sampler = self.session.sampler

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device=self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return self.session.kv_cache_bytes

    def run_block(self, keep_steps: bool = False):
        """One block through the session: audio tokens, `steps` Euler steps (+ clean pass with one set).
        Returns (block_ms, [ms per DiT forward], latents [1, 16, 3, h, w], [latents after each step])."""
        c, ck = self.dit.config, self.clock
        audio = self._randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim)
        recorder = StepRecorder(self.sampler) if keep_steps else None
        self.session.sampler = recorder or self.sampler
        forwards: list = []
        with timed_forwards(self.dit, ck, forwards):
            start = ck.mark()
            x = self.session.generate_block(audio)
            end = ck.mark()
        self.session.sampler = self.sampler
        return ck.ms(start, end), [ck.ms(a, b) for a, b in forwards], x[None], recorder.latents if recorder else []

    def close(self):
        self.session.close()


@contextlib.contextmanager
def legacy_kv_reads():
    """The KV reads before commit e7dbc31, for a before/after in one run: every layer rotated the
    whole sink's keys (reference + motion tokens) and concatenated ring + sink keys and values
    into fresh tensors. Emulated on today's layout with the same traffic and the same results:
    the ring and the (already rotated) sink are copied out, the sink rotated by the identity."""
    from avatar.services.generator import causal_s2v_dit as m

    orig = m.SelfAttention.forward
    identity: dict = {}

    def forward(self, x, rope, kv):
        if kv.prefill:
            return orig(self, x, rope, kv)
        n, dt = x.shape[1], x.dtype
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k_rot = m.apply_rope(q, rope), m.apply_rope(k, rope)
        s0, sink = kv.sink_start, kv.sink_tokens
        kv.keys[:, kv.write : kv.write + n] = m.to_cache_dtype(k_rot, kv.keys.dtype)
        kv.values[:, kv.write : kv.write + n] = m.to_cache_dtype(v, kv.keys.dtype)
        ring = slice(s0 + sink, kv.hi) if kv.lo == s0 else slice(kv.lo, s0)
        key = (sink, q.shape[-1], str(x.device))
        if key not in identity:
            ones = torch.ones(sink, 1, q.shape[-1] // 2, device=x.device)
            identity[key] = m.Rope(ones, torch.zeros_like(ones))
        keys = torch.cat([kv.keys[:, ring].to(dt), m.apply_rope(kv.keys[:, s0 : s0 + sink].to(dt), identity[key])], 1)
        values = torch.cat([kv.values[:, ring].to(dt), kv.values[:, s0 : s0 + sink].to(dt)], 1)
        return self.o(m.attention(q, keys, values))

    m.SelfAttention.forward = forward
    try:
        yield
    finally:
        m.SelfAttention.forward = orig


@contextlib.contextmanager
def legacy_injections(dit: CausalS2VDiT, compiled: bool):
    """The audio injections before 2026-12-05, for a before/after in one run: torch.compile took
    only each injection's cross-attention; its AdaLN and the residual add ran eagerly."""
    from avatar.services.generator import causal_s2v_dit as m

    orig = m.AudioInjector.forward

    def forward(self, idx, x, audio_tokens, audio_global):
        injection = self.injections[idx]
        b, f = audio_tokens.shape[:2]
        xf = x.reshape(b * f, -1, x.shape[-1])
        h = injection.adain(xf, audio_global.flatten(0, 1)[:, 0]).to(x.dtype)
        return x + injection.attn(h, audio_tokens.flatten(0, 1)).reshape(x.shape)

    attns = [injection.attn for injection in dit.audio_injector.injections]
    if compiled:
        for attn in attns:
            attn.compile(dynamic=True)
    m.AudioInjector.forward = forward
    try:
        yield
    finally:
        m.AudioInjector.forward = orig
        for attn in attns:
            attn._compiled_call_impl = None  # inside the whole injection's graph again


def steady_session(dit, cfg: LoopConfig, device, warm_blocks: int | None = None) -> TimedSession:
    """A TimedSession whose next block reads a full ring, as every block after the first clip
    does: a block of the first clip attends to fewer keys (at 704*384 the second block reads 8976,
    a steady one 15312), so its profile undercounts attention (runs F1/F2 read a 27 ms "gap"
    into that difference, docs/performance.md). `warm_blocks`: run that many instead (tests)."""
    loop = TimedSession(dit, cfg, device, Clock(device))
    for _ in range(loop.session.plan.blocks_per_clip if warm_blocks is None else warm_blocks):
        loop.run_block()
    return loop


def keys_read(session) -> int:
    """Keys (sink + filled ring) the session's next block attends to."""
    p, kv = session.plan, session.kv
    span = kv.block_span(0, session.block_index * p.block_frames, p.block_frames)
    return span.hi - span.lo


def profile_step(dit, cfg: LoopConfig, device, top: int = 25) -> dict:
    """torch.profiler over one steady block's DiT forwards (the ring full): GPU time per kernel
    name, grouped, largest first, so the gap between a step and its GEMM + attention floor is visible."""
    from torch.profiler import ProfilerActivity, profile

    loop = steady_session(dit, cfg, device)
    keys = keys_read(loop.session)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loop.run_block()
        torch.cuda.synchronize()
    loop.close()
    del loop
    free_memory(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:120], "calls": e.count, "ms_per_step": t / 1000 / cfg.steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    log(
        f"  profile {cfg.width}*{cfg.height}, a steady block ({keys} keys): {total:.1f} ms GPU time per step "
        "(incl. audio encoder / steps)"
    )
    for r in rows[:top]:
        log(f"    {r['ms_per_step']:7.2f} ms/step  x{r['calls'] // cfg.steps:4d}  {r['kernel'][:100]}")
    return {"size": f"{cfg.width}*{cfg.height}", "keys": keys, "gpu_ms_per_step": total, "kernels": rows[:60]}


# What a kernel's name says it computes, first match wins: ours (fused_norms.py), then inductor's
# (named after the ops they fuse, "triton_red_fused__scaled_mm_..." is a quantisation, not a
# GEMM), cuBLAS's Hopper GEMMs ("nvjet_*"), cuDNN's attention ("*sdpa*", "*fmha*")
KERNEL_KINDS = (
    ("fused norms", ("_norm_quantize_kernel", "_gelu_quantize_kernel", "_rms_rope_kernel")),
    ("inductor", ("triton_",)),
    ("gemm", ("nvjet", "gemm", "cutlass")),
    ("attention", ("sdpa", "fmha", "flash", "attn", "attention")),
    ("copy / memset", ("memcpy", "memset", "copy_kernel")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def gpu_timeline(trace_path: str, top: int = 12) -> dict:
    """From torch.profiler's chrome trace: how much of the span from the first kernel to the last
    the GPU ran kernels (summed by kind, and the largest kernels by name), and the idle gaps between
    them, each put down to what the host was in at the gap's middle (the innermost runtime call and
    torch op), summed per cause, largest first."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    work = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    if not work:
        return {"error": "no kernels in the trace"}
    busy, gaps = 0.0, []
    lo, hi, last = work[0][0], work[0][1], work[0][2]
    for start, end, name in work[1:]:
        if start > hi:
            busy += hi - lo
            gaps.append((hi, start, last, name))
            lo = start
        if end > hi:
            hi, last = end, name
    busy += hi - lo
    span = hi - work[0][0]
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for start, end, name in work:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + end - start
        k = by_name.setdefault(name, [0.0, 0])
        k[0] += end - start
        k[1] += 1
    host = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("cat"), e["name"])
        for e in events
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")
    )
    by_cause: dict[str, list] = {}
    largest = []
    active, i = [], 0
    for g0, g1, before, after in sorted(gaps, key=lambda g: (g[0] + g[1]) / 2):
        mid = (g0 + g1) / 2
        while i < len(host) and host[i][0] <= mid:
            active.append(host[i])
            i += 1
        active = [h for h in active if h[1] >= mid]
        runtime = min(
            (h for h in active if h[2] in ("cuda_runtime", "cuda_driver")), key=lambda h: h[1] - h[0], default=None
        )
        op = min((h for h in active if h[2] in ("cpu_op", "user_annotation")), key=lambda h: h[1] - h[0], default=None)
        cause = f"{runtime[3] if runtime else '(no runtime call)'} in {op[3][:60] if op else '(no torch op)'}"
        c = by_cause.setdefault(cause, [0.0, 0])
        c[0] += g1 - g0
        c[1] += 1
        largest.append(
            {
                "us": g1 - g0,
                "at_ms": (g0 - work[0][0]) / 1000,
                "cause": cause,
                "after": before[:70],
                "before": after[:70],
            }
        )
    largest.sort(key=lambda g: -g["us"])
    # which work each memset comes before: a library zeroing its output (or an accumulator) launches
    # it right ahead of the kernel that uses it
    after_memset: dict[str, int] = {}
    for (_, _, name), nxt in zip(work, work[1:] + [(0.0, 0.0, "(the end)")]):
        if name.startswith("Memset"):
            after_memset[nxt[2][:120]] = after_memset.get(nxt[2][:120], 0) + 1
    causes = sorted(
        ({"cause": k, "ms": v[0] / 1000, "gaps": v[1]} for k, v in by_cause.items()), key=lambda c: -c["ms"]
    )
    return {
        "span_ms": span / 1000,
        "gpu_busy_ms": busy / 1000,
        "idle_ms": (span - busy) / 1000,
        "gaps": len(gaps),
        "gaps_over_50us": sum(1 for g in gaps if g[1] - g[0] > 50),
        "idle_by_cause": causes[:top],
        "largest_gaps": largest[:top],
        "memsets_before": dict(sorted(after_memset.items(), key=lambda kv: -kv[1])[:top]),
        "kernel_ms_by_kind": {k: v / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernels": [
            {"kernel": n[:120], "ms": v[0] / 1000, "calls": v[1]}
            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: 2 * top]
        ],
    }


def run_variant(dit, cfg: LoopConfig, device, blocks: int, warm: int, label: str, flat_check: bool = False) -> dict:
    """Prefill + `blocks` blocks; medians over the blocks after `warm`."""
    clock = Clock(device)
    free_memory(device)
    reset_peak(device)
    loop = TimedSession(dit, cfg, device, clock)
    block_ms, fwd_ms = [], []
    for _ in range(blocks):
        b, s, _, _ = loop.run_block()
        block_ms.append(b)
        fwd_ms.append(s)
    res = {
        "variant": label,
        "size": f"{cfg.width}*{cfg.height}",
        "steps": cfg.steps,
        "kv_sets": cfg.num_sets,
        "window_frames": cfg.window_frames,
        "kv_dtype": str(cfg.kv_dtype or dit.dtype).split(".")[-1],
        "blocks": blocks,
        "warmup_blocks": warm,
        "prefill_ms": loop.prefill_ms,
        "first_block_ms": block_ms[0],
        "block_ms": median(block_ms[warm:]),
        # a denoising step: the median forward of the Euler steps (not the clean pass)
        "step_ms": median([s for f in fwd_ms[warm:] for s in f[: cfg.steps]]),
        "clean_pass_ms": median([f[cfg.steps] for f in fwd_ms[warm:]]) if cfg.num_sets == 1 else 0.0,
        "kv_cache_gib": loop.kv_cache_bytes / GiB,
        "peak_gib": peak_gib(device),
        "block_ms_all": [round(b, 2) for b in block_ms],
    }
    res["dit_fps"] = FRAMES_PER_BLOCK / (res["block_ms"] / 1000)
    window_blocks = cfg.window_frames // LATENT_FRAMES_PER_BLOCK
    if flat_check and blocks >= 3 * window_blocks + 1:
        clip2 = block_ms[window_blocks : 2 * window_blocks]  # blocks of the 2nd clip (ring just full)
        last = block_ms[-window_blocks:]  # the last clip run
        res["flat"] = {
            "clip2_block_ms": median(clip2),
            "last_clip": blocks // window_blocks,
            "last_clip_block_ms": median(last),
            "ratio": median(last) / median(clip2),
        }
    loop.close()
    del loop
    free_memory(device)
    log(
        f"  {label:14s} {res['size']:8s} sets={cfg.num_sets} win={cfg.window_frames} "
        f"step {res['step_ms']:.1f} ms  block {res['block_ms']:.1f} ms  ({res['dit_fps']:.1f} FPS DiT)  "
        f"prefill {res['prefill_ms']:.0f} ms  peak {res['peak_gib']:.1f} GiB"
        + (f"  flat x{res['flat']['ratio']:.3f}" if "flat" in res else "")
    )
    return res


def step_latents(dit, cfg: LoopConfig, device, blocks: int = 2) -> list[torch.Tensor]:
    """Latents after every Euler step of the first blocks (for FP8 vs bf16 comparisons)."""
    loop = TimedSession(dit, cfg, device, Clock(device))
    out = []
    for _ in range(blocks):
        out += [x.float().cpu() for x in loop.run_block(keep_steps=True)[3]]
    loop.close()
    free_memory(device)
    return out


# --------------------------------------------------------------------------- parts


def bench_gemms(device, m: int, reps: int = 30) -> list[dict]:
    """One layer's linears at a block's token count: bf16 vs FP8 (row / tensor scales), with the
    activation quantisation included."""
    from torch import nn

    from avatar.services.generator.fp8 import FP8Linear, quantize, quantize_rows_fused, quantize_tensor_fused

    out = []
    xt = torch.randn(m, 5120, device=device, dtype=torch.bfloat16)
    qa, sa = quantize_tensor_fused(xt)
    qb, sb = quantize(xt, "tensor")
    out.append(
        {
            "tensor_quantiser": {
                "scale_rel_diff": ((sa - sb).abs() / sb).item(),
                "q_mismatch_frac": (qa.float() != qb.float()).float().mean().item(),
                "fused_ms": time_fn(lambda: quantize_tensor_fused(xt), device, reps),
                "torch_ms": time_fn(lambda: quantize(xt, "tensor"), device, reps),
            }
        }
    )
    log(f"  tensor quantiser: {out[-1]['tensor_quantiser']}")
    # the FP8 product alone vs with its activation quantisation, across token counts: a block at
    # 384*256 (1152) and 704*384 (3168), the sinks (960, 2640), audio tokens (15), AdaLN (3)
    lin = nn.Linear(5120, 5120, device=device, dtype=torch.bfloat16)
    row, ten = FP8Linear.from_linear(lin, "row"), FP8Linear.from_linear(lin, "tensor")
    for mm in (3, 15, 960, 1152, 2640, 3168, 6336):
        x = torch.randn(mm, 5120, device=device, dtype=torch.bfloat16)
        xr, sr = quantize_rows_fused(x)
        xq, sq = quantize_tensor_fused(x)
        r = {
            "m": mm,
            "k": 5120,
            "n": 5120,
            "bf16_ms": time_fn(lambda: lin(x), device, reps),
            "row_layer_ms": time_fn(lambda: row(x), device, reps),
            "tensor_layer_ms": time_fn(lambda: ten(x), device, reps),
            "row_mm_only_ms": time_fn(
                lambda: torch._scaled_mm(
                    xr,
                    row.weight_fp8.t(),
                    scale_a=sr,
                    scale_b=row.weight_scale,
                    bias=row.bias,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=True,
                ),
                device,
                reps,
            ),
            "tensor_mm_only_ms": time_fn(
                lambda: torch._scaled_mm(
                    xq,
                    ten.weight_fp8.t(),
                    scale_a=sq,
                    scale_b=ten.weight_scale,
                    bias=ten.bias,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=True,
                ),
                device,
                reps,
            ),
        }
        out.append(r)
        log(
            f"  gemm m={mm:5d} 5120x5120: bf16 {r['bf16_ms']:.3f} | fp8 row layer {r['row_layer_ms']:.3f} "
            f"(mm {r['row_mm_only_ms']:.3f}) | fp8 tensor layer {r['tensor_layer_ms']:.3f} "
            f"(mm {r['tensor_mm_only_ms']:.3f}) ms"
        )
    x = torch.randn(m, 13824, device=device, dtype=torch.bfloat16) * 3
    q1, s1 = quantize_rows_fused(x)
    q2, s2 = quantize(x, "row")
    check = {
        "scale_max_rel_diff": ((s1 - s2).abs() / s2).max().item(),
        "q_mismatch_frac": (q1.float() != q2.float()).float().mean().item(),
        "fused_ms": time_fn(lambda: quantize_rows_fused(x), device, reps),
        "torch_ms": time_fn(lambda: quantize(x, "row"), device, reps),
    }
    log(
        f"  row quantiser {m}x13824: fused {check['fused_ms']:.3f} ms vs torch {check['torch_ms']:.3f} ms; "
        f"scale diff {check['scale_max_rel_diff']:.2e}, q mismatch {check['q_mismatch_frac']:.2e}"
    )
    out.append({"quantiser": check})
    for k, n in [(5120, 5120), (5120, 13824), (13824, 5120)]:
        lin = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        row, ten = FP8Linear.from_linear(lin, "row"), FP8Linear.from_linear(lin, "tensor")
        ref = lin(x).float()
        r = {"m": m, "k": k, "n": n}
        for name, f in [("bf16", lin), ("fp8_row", row), ("fp8_tensor", ten)]:
            r[name + "_ms"] = time_fn(lambda: f(x), device, reps)
            if name != "bf16":
                r[name + "_relerr"] = ((f(x).float() - ref).norm() / ref.norm()).item()
        flops = 2 * m * k * n
        r["bf16_tflops"] = flops / r["bf16_ms"] / 1e9
        r["fp8_row_tflops"] = flops / r["fp8_row_ms"] / 1e9
        out.append(r)
        log(
            f"  gemm {m}x{k}->{n}: bf16 {r['bf16_ms']:.3f} ms ({r['bf16_tflops']:.0f} TF/s)  "
            f"fp8 row {r['fp8_row_ms']:.3f} ms ({r['fp8_row_tflops']:.0f} TF/s, err {r['fp8_row_relerr']:.3f})  "
            f"fp8 tensor {r['fp8_tensor_ms']:.3f} ms (err {r['fp8_tensor_relerr']:.3f})"
        )
    return out


def time_fn(fn, device, reps: int = 20, warm: int = 3) -> float:
    clock = Clock(device)
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a = clock.mark()
        fn()
        ts.append(clock.ms(a, clock.mark()))
    return median(ts)


def bench_norm_kernels(device, width, height, dim: int = 5120, ffn_dim: int = 13824, heads: int = 40) -> dict:
    """One layer's four stretches between FP8 linears at a block's token count: the block's torch
    code compiled as the model compiles it (dynamic shapes) against fused_norms.py's kernels, with
    the share of FP8 codes equal to the eager torch code's (the CPU tests run the kernels in
    Triton's interpreter; this is the GPU's own arithmetic) and the bandwidth each reaches."""
    import torch.nn.functional as F

    from avatar.services.generator import fused_norms
    from avatar.services.generator.causal_s2v_dit import _gate, _modulate, apply_rope, rope_grid
    from avatar.services.generator.fp8 import quantize
    from avatar.services.generator.kv_cache import to_cache_dtype

    m = LATENT_FRAMES_PER_BLOCK * (height // 16) * (width // 16)
    g = torch.Generator(device=device).manual_seed(0)
    device_is_cuda = torch.device(device).type == "cuda"

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, y, stream = rnd(1, m, dim), rnd(1, m, dim), rnd(1, m, dim, dtype=torch.float32)
    mod = rnd(1, LATENT_FRAMES_PER_BLOCK, 6, dim, dtype=torch.float32, scale=0.3)
    w, b, hidden, fp8 = rnd(dim), rnd(dim), rnd(1, m, ffn_dim), torch.float8_e4m3fn
    mods = [mod[:, :, i] for i in range(6)]

    def rows(t):  # what FP8Linear does to its input
        return quantize(t.reshape(-1, t.shape[-1]), "row")

    def fused_rows(out):
        if isinstance(out, tuple) and len(out) == 3:  # rms_rope: codes without scales
            return out
        residual, r = out if isinstance(out, tuple) and not isinstance(out, fused_norms.FP8Rows) else (None, out)
        return residual, r.codes.reshape(-1, r.codes.shape[-1]), r.scale.reshape(-1, 1)

    def norm1():
        return None, *rows(
            _modulate(F.layer_norm(x.float(), (dim,), eps=1e-6).to(x.dtype), mods[0], mods[1]).bfloat16()
        )

    def norm3():
        r = x.float() + _gate(y, mods[2])
        return r, *rows(F.layer_norm(r.bfloat16().float(), (dim,), w.float(), b.float(), eps=1e-6).bfloat16())

    def norm2():
        r = stream + y.float()
        return r, *rows(_modulate(F.layer_norm(r, (dim,), eps=1e-6), mods[3], mods[4]).bfloat16())

    def gelu():
        return None, *rows(F.gelu(hidden, approximate="tanh"))

    rope = rope_grid(dim // heads, range(3), range(height // 16), range(width // 16), device)

    def key_rope():  # a block's keys as the FP8 cache stores them
        normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w
        return None, to_cache_dtype(apply_rope(normed.unflatten(-1, (heads, -1)), rope).flatten(2), fp8), None

    cases = {  # name: (the block's torch code, the fused kernel, bytes it reads and writes)
        "norm1+modulate": (
            norm1,
            lambda: fused_norms.norm_quantize(x, mod, 1e-6, shift=0, scale=1, round_norm=True),
            m * dim * (2 + 1),
        ),
        "gated residual+norm3": (
            norm3,
            lambda: fused_norms.norm_quantize(x, mod, 1e-6, residual=y, gate=2, weight=w, bias=b, round_input=True),
            m * dim * (2 + 2 + 4 + 1),
        ),
        "residual+norm2+modulate": (
            norm2,
            lambda: fused_norms.norm_quantize(stream, mod, 1e-6, residual=y, shift=3, scale=4),
            m * dim * (4 + 2 + 4 + 1),
        ),
        "gelu": (gelu, lambda: fused_norms.gelu_quantize(hidden), m * ffn_dim * (2 + 1)),
        "k rms+rope to the FP8 cache": (
            key_rope,
            lambda: (None, fused_norms.rms_rope(x, w, rope.cos, rope.sin, 1e-6, fp8=True), None),
            m * dim * (2 + 1),
        ),
    }
    res = {"size": f"{width}*{height}", "tokens": m}
    for name, (torch_code, fused, nbytes) in cases.items():
        # codes against the eager code: inductor skips the bf16 roundings inside its kernels
        (r_ref, q_ref, s_ref), (r_got, q_got, s_got) = torch_code(), fused_rows(fused())
        compiled, reps = torch.compile(torch_code, dynamic=True), 30 if device_is_cuda else 2
        t_compiled, t_fused = time_fn(compiled, device, reps), time_fn(fused, device, reps)
        res[name] = r = {
            "compiled_ms": t_compiled,
            "fused_ms": t_fused,
            "fused_gb_s": nbytes / t_fused / 1e6,
            "codes_equal": (q_ref.view(torch.uint8) == q_got.view(torch.uint8)).float().mean().item(),
            "scale_max_rel_diff": None if s_ref is None else (s_got / s_ref - 1).abs().max().item(),
            "residual_equal": None if r_ref is None else torch.equal(r_ref, r_got),
        }
        log(
            f"  {name} {width}*{height} ({m} tokens): torch.compile {t_compiled * 1e3:.0f} us, fused "
            f"{t_fused * 1e3:.0f} us ({r['fused_gb_s']:.0f} GB/s), codes equal {r['codes_equal']:.5f}, "
            f"scales within {r['scale_max_rel_diff']}, residual equal {r['residual_equal']}"
        )
    return res


def bench_attention(device, width, height) -> dict:
    """SDPA backends for one block's self-attention over a full window (DiT layout: [B, L, H, D]
    transposed views, as the model's attention function passes them)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from avatar.services.generator.attention import backend_for, prefer_cudnn_attention

    ft = (height // 16) * (width // 16)
    n, kv = 3 * ft, 12 * ft + int(2.5 * ft)
    q = torch.randn(1, n, 40, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, kv, 40, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, kv, 40, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    res = {"size": f"{width}*{height}", "q": n, "kv": kv, "default_backend": backend_for(q, k, v)}
    ref = None
    for name, be in [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        try:
            with sdpa_kernel(be):
                res[name + "_ms"] = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device, 20)
                o = F.scaled_dot_product_attention(q, k, v).float()
            ref = o if ref is None else ref
            res[name + "_relerr_vs_cudnn"] = ((o - ref).norm() / ref.norm()).item()
        except RuntimeError as e:
            res[name + "_ms"] = None
            res[name + "_error"] = str(e)[:200]
    res["chosen_after_prefer_cudnn"] = prefer_cudnn_attention(device)
    res["backend_for_dit_layout"] = backend_for(q, k, v)
    log(
        f"  attention {res['size']} q={n} kv={kv}: default {res['default_backend']} -> "
        f"{res['backend_for_dit_layout']};  "
        + "  ".join(f"{b} {res.get(b + '_ms') or float('nan'):.2f} ms" for b in ("cudnn", "flash", "efficient"))
    )
    return res


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] on the host (as the decoder does)."""
    x = ((pixels[0].permute(1, 2, 3, 0) + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.cpu().numpy()


def build_vae(tiny: bool, device, dtype):
    from avatar.models.wan_vae import S2V_14B_VAE, TINY_VAE, WanVAE

    dims = TINY_VAE if tiny else S2V_14B_VAE
    with torch.device(device):
        model = dims.build()
    return WanVAE(model.to(dtype), dims)


def bench_vae_and_mux(device, width, height, tiny: bool, blocks: int, warm: int, dtype) -> dict:
    """Streaming VAE decode of one block (3 latent frames -> 12 frames), the device->host uint8
    copy, and the H.264 + AAC fMP4 mux of those frames, per block."""
    from avatar.services.decoder.fmp4 import FragmentedMp4Writer

    clock = Clock(device)
    free_memory(device)
    reset_peak(device)
    vae = build_vae(tiny, device, dtype)
    h, w = height // 8, width // 8
    gen = torch.Generator(device=device).manual_seed(1)
    dec = vae.stream_decoder()
    dec.decode(torch.randn(1, 16, 1, h, w, generator=gen, device=device))  # prime with the reference
    vae_ms, host_ms, frames = [], [], []
    for _ in range(blocks):
        lat = torch.randn(1, 16, 3, h, w, generator=gen, device=device)
        a = clock.mark()
        px = dec.decode(lat)
        b = clock.mark()
        vae_ms.append(clock.ms(a, b))
        t0 = time.perf_counter()
        frames.append(to_frames(px))
        host_ms.append((time.perf_counter() - t0) * 1000)
    res = {
        "size": f"{width}*{height}",
        "vae_ms": median(vae_ms[warm:]),
        "vae_first_ms": vae_ms[0],
        "to_host_ms": median(host_ms[warm:]),
        "vae_peak_gib": peak_gib(device),
    }
    dec.close()
    if clock.cuda:  # cuDNN's autotuner for the 3-D convolutions (shapes repeat every block)
        torch.backends.cudnn.benchmark = True
        dec = vae.stream_decoder()
        dec.decode(torch.randn(1, 16, 1, h, w, generator=gen, device=device))
        ms = []
        for _ in range(blocks):
            lat = torch.randn(1, 16, 3, h, w, generator=gen, device=device)
            a = clock.mark()
            dec.decode(lat)
            ms.append(clock.ms(a, clock.mark()))
        res["vae_cudnn_benchmark_ms"] = median(ms[warm:])
        dec.close()
        torch.backends.cudnn.benchmark = False
    # mux: random latents decode to noise (x264's worst case); a moving gradient is closer to a face
    sr = 48000
    pcm = (np.sin(np.arange(sr * FRAMES_PER_BLOCK // FPS) * 2 * np.pi * 220 / sr) * 8000).astype(np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = [
        np.stack([((xx + 3 * i) % 256), ((yy + 2 * i) % 256), np.full_like(xx, 128)], -1).astype(np.uint8)
        for i in range(FRAMES_PER_BLOCK)
    ]
    for name, blocks_frames in [("noise", frames), ("smooth", [np.stack(smooth)] * len(frames))]:
        writer = FragmentedMp4Writer(width, height, FPS, sr)
        writer.init_segment()
        ms = []
        for f in blocks_frames:
            t0 = time.perf_counter()
            writer.write_block(f, pcm)
            ms.append((time.perf_counter() - t0) * 1000)
        writer.finish()
        res[f"mux_{name}_ms"] = median(ms[warm:])
    del vae, dec
    free_memory(device)
    log(
        f"  vae {res['size']}: decode {res['vae_ms']:.1f} ms/block (first {res['vae_first_ms']:.0f}; "
        f"cudnn.benchmark {res.get('vae_cudnn_benchmark_ms', float('nan')):.1f}), "
        f"to host {res['to_host_ms']:.1f} ms, mux noise {res['mux_noise_ms']:.1f} / smooth "
        f"{res['mux_smooth_ms']:.1f} ms/block, VAE peak {res['vae_peak_gib']:.2f} GiB"
    )
    return res


def bench_overlap(dit, cfg: LoopConfig, device, tiny: bool, blocks: int, warm: int) -> dict:
    """The real schedule on one GPU: block k's VAE decode on a second CUDA stream and its mux on a
    CPU thread, while the DiT runs block k+1. Wall-clock ms per block (host clock, synced)."""
    from avatar.services.decoder.fmp4 import FragmentedMp4Writer

    free_memory(device)
    reset_peak(device)
    vae = build_vae(tiny, device, torch.bfloat16 if device != "cpu" else torch.float32)
    dec = vae.stream_decoder()
    h, w = cfg.height // 8, cfg.width // 8
    dec.decode(torch.zeros(1, 16, 1, h, w, device=device).normal_())
    writer = FragmentedMp4Writer(cfg.width, cfg.height, FPS, 48000)
    pcm = np.zeros(48000 * FRAMES_PER_BLOCK // FPS, np.int16)
    side = torch.cuda.Stream() if device != "cpu" else None
    loop = TimedSession(dit, cfg, device, Clock(device))
    mux_thread, pending = None, None
    t_first = None
    walls = []
    t_start = time.perf_counter()
    for i in range(blocks + 1):
        t0 = time.perf_counter()
        if i < blocks:
            _, _, lat, _ = loop.run_block()  # queued on the main stream
            done = torch.cuda.Event() if side else None
            if side:
                done.record()
        if pending is not None:  # previous block: decode on the side stream
            plat, pdone = pending
            if side:
                side.wait_event(pdone)
                with torch.cuda.stream(side):  # decode + copy to pinned host memory, off the DiT's stream
                    px = dec.decode(plat)
                    frames_gpu = ((px[0].permute(1, 2, 3, 0) + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                    host = torch.empty(frames_gpu.shape, dtype=torch.uint8, pin_memory=True)
                    host.copy_(frames_gpu, non_blocking=True)
                side.synchronize()
                frames = host.numpy()
            else:
                frames = to_frames(dec.decode(plat))
            if mux_thread is not None:
                mux_thread.join()
            mux_thread = threading.Thread(target=writer.write_block, args=(frames, pcm))
            mux_thread.start()
            if t_first is None:
                mux_thread.join()
                t_first = time.perf_counter() - t_start
        pending = (lat, done) if i < blocks else None
        if device != "cpu":
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1000)
    mux_thread.join()
    loop.close()
    dec.close()
    del vae, loop
    free_memory(device)
    res = {
        "size": f"{cfg.width}*{cfg.height}",
        "wall_block_ms": median(walls[1 + warm : blocks]),
        "first_fragment_s_after_prefill": t_first,
        "peak_gib": peak_gib(device),
        "kv_sets": cfg.num_sets,
        "kv_dtype": str(cfg.kv_dtype or dit.dtype).split(".")[-1],
    }
    res["fps"] = FRAMES_PER_BLOCK / (res["wall_block_ms"] / 1000)
    log(
        f"  overlap {res['size']}: {res['wall_block_ms']:.1f} ms/block wall = {res['fps']:.1f} FPS "
        f"(DiT + VAE on a side stream + mux thread), peak {res['peak_gib']:.1f} GiB"
    )
    return res


def bench_engine(
    dit, width, height, device, blocks: int, warm: int, options: dict | None = None, timeline_blocks: int = 0
) -> dict:
    """Cross-check through the real GeneratorEngine (the service's code path): wall ms of
    open_session (sink prefill) and of generate_block (which syncs), on the same DiT. With
    `timeline_blocks`, that many more blocks run under torch.profiler and `gpu_timeline` says
    how much of their time the GPU idled, and why (the steady blocks replay CUDA graphs)."""
    c = dit.config
    h, w = height // 8, width // 8
    eng = GeneratorEngine(
        ModelSpec(
            name="s2v-14b", device=device, random_weights=True, generator_options=GeneratorOptions(**(options or {}))
        ),
        dit=dit,
    )
    job = Job(
        width=width,
        height=height,
        infer_frames=48,
        sample_steps=4,
        num_blocks=blocks,
        seed=420,
        total_frames=blocks * FRAMES_PER_BLOCK,
        model="s2v-14b",
        audio_sample_rate=48000,
        request_id="bench",
    )
    text = torch.randn(min(77, c.text_len), c.text_dim, device=device).to(dit.dtype)
    ref = torch.randn(16, 1, h, w, device=device)
    motion = torch.randn(16, dit.motion_latent_frames, h, w, device=device)
    free_memory(device)
    reset_peak(device)
    t0 = time.perf_counter()
    sess = eng.open_session(job, text, ref, motion)
    if device != "cpu":
        torch.cuda.synchronize()
    open_ms = (time.perf_counter() - t0) * 1000
    ms = []
    for _ in range(blocks):
        audio = torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim, device=device)
        t0 = time.perf_counter()
        sess.generate_block(audio)
        ms.append((time.perf_counter() - t0) * 1000)
    kv_bytes = sess.kv_cache_bytes
    timeline = None
    if timeline_blocks and device != "cpu":
        import tempfile

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(timeline_blocks):
                sess.generate_block(torch.randn(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim, device=device))
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1000 / timeline_blocks
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            timeline = gpu_timeline(f"{tmp}/trace.json")
        timeline["blocks"] = timeline_blocks
        timeline["wall_ms_per_block_profiled"] = wall
    sess.close()
    res = {
        "size": f"{width}*{height}",
        "generator_options": options or {},
        "kv_cache_gib": kv_bytes / GiB,
        "open_session_ms": open_ms,
        "first_block_ms": ms[0],
        "block_ms": median(ms[warm:]),
        "block_ms_all": [round(m, 1) for m in ms],
        "peak_gib": peak_gib(device),
    }
    res["fps"] = FRAMES_PER_BLOCK / (res["block_ms"] / 1000)
    if timeline:
        res["timeline"] = timeline
        n = timeline_blocks
        log(
            f"  engine {res['size']} under the profiler: {timeline['wall_ms_per_block_profiled']:.0f} ms per block; "
            f"GPU busy {timeline['gpu_busy_ms'] / n:.0f} ms, idle {timeline['idle_ms'] / n:.0f} ms per block "
            f"({timeline['gaps'] / n:.0f} gaps, {timeline['gaps_over_50us'] / n:.0f} over 50 us); idle by cause:"
        )
        for c in timeline["idle_by_cause"]:
            log(f"    {c['ms'] / n:7.2f} ms/block  x{c['gaps'] / n:6.0f}  {c['cause']}")
        kinds = ", ".join(f"{k} {ms / n:.1f}" for k, ms in timeline["kernel_ms_by_kind"].items())
        log(f"    kernels by kind, ms/block: {kinds}")
        for k in timeline["kernels"][:12]:
            log(f"    {k['ms'] / n:7.2f} ms/block  x{k['calls'] / n:5.0f}  {k['kernel'][:100]}")
        for g in timeline["largest_gaps"][:6]:
            log(
                f"    gap {g['us']:.0f} us at {g['at_ms']:.0f} ms: {g['cause']}"
                f" (after {g['after']}, before {g['before']})"
            )
    del sess, eng
    free_memory(device)
    log(
        f"  engine {res['size']}: open_session {open_ms:.0f} ms, first block {ms[0]:.0f} ms, "
        f"block {res['block_ms']:.1f} ms ({res['fps']:.1f} FPS), peak {res['peak_gib']:.1f} GiB"
    )
    return res


# --------------------------------------------------------------------------- main


def rel_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [((x - y).norm() / y.norm()).item() for x, y in zip(a, b)]


VARIANT_KEYS = {
    "ffn_products": bool,
    "qkv_gemm": bool,
    "warps": dict,
}


def engine_variants(text: str) -> list[dict]:
    """--variants: a JSON list of objects (inline, or a file's path), each key one of VARIANT_KEYS
    with a value of its type (warps: {kernel: a positive count}); ValueError says what is wrong."""
    inline = text.lstrip()[:1] in ("[", "{")
    try:
        variants = json.loads(text if inline else Path(text).read_text())
    except OSError as e:
        raise ValueError(f"neither JSON nor a readable file ({e.strerror}: {text})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants) or not variants:
        raise ValueError("expected a non-empty list of objects")
    for v in variants:
        for key, value in v.items():
            kind = VARIANT_KEYS.get(key)
            if kind is None:
                raise ValueError(f"unknown key {key!r} (one of {', '.join(VARIANT_KEYS)})")
            if type(value) is not kind:
                raise ValueError(f"{key} must be a {kind.__name__}, got {value!r}")
            if key == "warps" and not all(type(w) is int and w > 0 for w in value.values()):
                raise ValueError(f"warps must map kernels to positive ints, got {value!r}")
    return variants


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (CPU check of the code paths)")
    ap.add_argument(
        "--only",
        default="all",
        help="all | smoke | comma list of: env,gemm,attn,bf16,fp8,"
        "quality,vae,overlap,24gb,compile,compile-bf16,engine,legacy,profile,fp8-attention,fused-norms,engine-gaps "
        "(fp8-attention, fused-norms, engine-gaps: not in all)",
    )
    ap.add_argument("--sizes", default="704*384,384*256")
    ap.add_argument("--blocks", type=int, default=8, help="blocks per variant (the first --warm are warm-up)")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--flat-blocks", type=int, default=20, help="blocks of the flat-in-length run (bf16 704*384)")
    ap.add_argument("--mem-gib", type=float, default=24.0, help="per-process GPU memory cap of the 24 GB mode")
    ap.add_argument(
        "--compile-first",
        action="store_true",
        help="compile the blocks right after the FP8 swap: every FP8 variant runs compiled",
    )
    ap.add_argument(
        "--norm-warps",
        default=None,
        help="JSON of bench_norm_warps.py --out: engine-gaps then runs the fused norm kernels at the "
        "default launch widths and at these, instead of fused norms on and off",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="engine-gaps: the fused engine once per variant, a JSON list (or a file of one) of objects "
        "with any of ffn_products (true/false: the FFN's products before their scales, use_fused_norms), "
        "qkv_gemm (true/false: the self-attention's q, k and v as one GEMM, use_fused_norms) "
        "and warps ({kernel: warps a program} over fused_norms.LAUNCH_WARPS), e.g. "
        '\'[{}, {"ffn_products": false}, {"warps": {"gelu_quantize": 16}}]\'',
    )
    ap.add_argument(
        "--fp8-kernels",
        default=None,
        help="engine-gaps: run the engine with each of these FP8 attention kernels (e.g. 'triton,cudnn'), "
        "fused norms on, instead of fused norms on and off",
    )
    ap.add_argument(
        "--triton-attention",
        default=None,
        metavar="BM,BN,WARPS,STAGES[,ws|,fma1|,fma2]",
        help="the Triton FP8 attention's tiles and launch (and warp specialisation, or the softmax's "
        "exponentials on the FMA pipe for every or every second key tile) for this run, e.g. the "
        "fastest of bench_attention.py --triton",
    )
    ap.add_argument("--time-budget", type=float, default=540, help="seconds; optional parts are skipped past it")
    ap.add_argument("--out", default=None, help="JSON results (default $OUT/bench.json when $OUT is set)")
    args = ap.parse_args()
    try:
        variants = engine_variants(args.variants) if args.variants else None
    except ValueError as e:
        ap.error(f"--variants: {e}")
    t_main = time.perf_counter()
    if args.triton_attention:
        from avatar.services.generator import fp8_attention_triton

        parts = args.triton_attention.split(",")
        flag = parts.pop() if parts[-1] in ("ws", "fma1", "fma2") else ""
        fp8_attention_triton.DEFAULT_CONFIG = tuple(int(n) for n in parts)
        fp8_attention_triton.DEFAULT_WARP_SPECIALIZE = flag == "ws"
        fp8_attention_triton.DEFAULT_FMA_EXP_EVERY = int(flag[3:]) if flag.startswith("fma") else 0
    smoke = args.only == "smoke"
    parts = (
        set("env,gemm,attn,bf16,fp8,quality,vae,overlap,24gb,compile,engine,legacy,profile".split(","))
        if args.only in ("all", "smoke")
        else set(args.only.split(","))
    )
    if smoke:
        args.blocks, args.warm, args.flat_blocks = 3, 1, 0
        parts.discard("compile")
        parts.discard("overlap")
    device, dev_cuda = args.device, torch.device(args.device).type == "cuda"
    preset = "tiny" if args.tiny else "s2v-14b"
    sizes = [tuple(int(v) for v in s.split("*")) for s in args.sizes.split(",")]
    if args.tiny:
        sizes = [(w // 4 // 16 * 16, h // 4 // 16 * 16) for w, h in sizes]
    out_path = args.out or (os.path.join(os.environ["OUT"], "bench.json") if os.environ.get("OUT") else None)
    results: dict = {
        "command": " ".join(sys.argv),
        "commit": os.environ.get("BENCH_COMMIT", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": preset,
        "errors": {},
    }

    def save():
        if out_path:
            tmp = out_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, default=str)
            os.replace(tmp, out_path)

    def guarded(name, fn):
        return run_guarded(results, name, fn, device, save)

    # ---- environment
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if dev_cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            memory_gib=p.total_memory / GiB,
            sms=p.multi_processor_count,
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    results["env"] = env
    log(f"env: {env}")
    dt = torch.bfloat16 if dev_cuda else torch.float32

    if "gemm" in parts and dev_cuda:
        m = 3 * (384 // 16) * (704 // 16)
        results["gemm"] = guarded("gemm", lambda: bench_gemms(device, m))
    if "attn" in parts and dev_cuda:
        results["attention"] = [
            guarded(f"attn {w}*{h}", lambda w=w, h=h: bench_attention(device, w, h)) for w, h in sizes
        ]
    elif dev_cuda:
        from avatar.services.generator.attention import prefer_cudnn_attention

        results["sdpa_backend"] = prefer_cudnn_attention(device)

    if "vae" in parts:
        results["vae"] = [
            guarded(
                f"vae {w}*{h}",
                lambda w=w, h=h: bench_vae_and_mux(
                    device, w, h, args.tiny, max(args.blocks, 4) if dev_cuda else args.blocks, args.warm, dt
                ),
            )
            for w, h in sizes[:1]
        ]

    # ---- DiT
    t0 = time.perf_counter()
    reset_peak(device)
    dit = build_dit(preset, device)
    if dev_cuda:
        torch.cuda.synchronize()
    nparams = sum(p.numel() for p in dit.parameters())
    results["dit"] = {
        "params": nparams,
        "build_s": time.perf_counter() - t0,
        "weights_gib": torch.cuda.memory_allocated() / GiB if dev_cuda else None,
    }
    log(
        f"DiT {nparams / 1e9:.2f} B params built in {results['dit']['build_s']:.1f} s "
        f"({results['dit']['weights_gib']} GiB)"
    )
    runs = results.setdefault("runs", [])

    def variant(label, size, **kw):
        w, h = size
        flat = kw.pop("flat", 0)
        blocks = kw.pop("blocks", args.blocks)
        warm = kw.pop("warm", args.warm)
        cfg = LoopConfig(w, h, **kw)
        r = guarded(
            f"{label} {w}*{h}",
            lambda: run_variant(dit, cfg, device, max(blocks, flat), warm, label, flat_check=bool(flat)),
        )
        if r:
            runs.append(r)
        return r

    def latent_errors(into: dict, ref, got, what):
        """into[size]: the relative error per step of got's latents against ref's, each a
        (label, LoopConfig); nothing when either run failed (its error is in results)."""
        (ref_label, ref_cfg), (got_label, got_cfg), size = ref, got, f"{ref[1].width}*{ref[1].height}"
        expected = guarded(f"latents {ref_label} {size}", lambda: step_latents(dit, ref_cfg, device))
        actual = guarded(f"latents {got_label} {size}", lambda: step_latents(dit, got_cfg, device))
        if expected and actual:
            into[size] = errs = rel_errors(actual, expected)
            log(f"  {what} latents {size}, rel. error per step: " + " ".join(f"{e:.4f}" for e in errs))

    # compiled: the first clip (4 blocks) sees every ring fill level and compiles
    compiling = dict(warm=args.warm + 4, blocks=args.blocks + 4) if args.compile_first else {}
    ref_latents = {}
    if "quality" in parts:
        for w, h in sizes:
            ref_latents[(w, h)] = guarded(
                f"quality ref {w}*{h}", lambda w=w, h=h: step_latents(dit, LoopConfig(w, h), device)
            )
    if "bf16" in parts:
        log("bf16 eager:")
        for i, s in enumerate(sizes):
            variant("bf16", s, flat=args.flat_blocks if i == 0 else 0)
        variant("bf16", sizes[0], num_sets=1)
    if "overlap" in parts and "fp8" not in parts:
        results["overlap"] = guarded(
            "overlap", lambda: bench_overlap(dit, LoopConfig(*sizes[0]), device, args.tiny, args.blocks, args.warm)
        )

    if {"fp8", "24gb", "compile", "fp8-attention", "fused-norms", "engine-gaps"} & parts:
        from avatar.services.generator.fp8 import swap_linears_to_fp8

        t0 = time.perf_counter()
        swapped = swap_linears_to_fp8(dit)
        free_memory(device)
        results["fp8"] = {
            "swapped_linears": len(swapped),
            "swap_s": time.perf_counter() - t0,
            "weights_gib": torch.cuda.memory_allocated() / GiB if dev_cuda else None,
        }
        log(
            f"FP8: {len(swapped)} linears swapped in {results['fp8']['swap_s']:.1f} s, "
            f"weights now {results['fp8']['weights_gib']} GiB"
        )
        if ref_latents:
            results["quality"] = {}
            for (w, h), ref in ref_latents.items():
                if ref:
                    got = guarded(f"quality fp8 {w}*{h}", lambda w=w, h=h: step_latents(dit, LoopConfig(w, h), device))
                    if got:
                        errs = rel_errors(got, ref)
                        results["quality"][f"{w}*{h}"] = errs
                        log(
                            f"  FP8 vs bf16 latents {w}*{h}, rel. error per step: " + " ".join(f"{e:.4f}" for e in errs)
                        )
            w, h = sizes[0]
            if ref_latents.get((w, h)):
                got = guarded(
                    "quality fp8+fp8kv",
                    lambda: step_latents(dit, LoopConfig(w, h, kv_dtype=torch.float8_e4m3fn), device),
                )
                if got:
                    errs = rel_errors(got, ref_latents[(w, h)])
                    results["quality"][f"{w}*{h} fp8 weights + fp8 kv"] = errs
                    log(f"  FP8 weights + FP8 KV vs bf16 latents {w}*{h}: " + " ".join(f"{e:.4f}" for e in errs))
        if "legacy" in parts:
            log("FP8 eager: KV reads as now vs as before (per-layer sink rotation + ring/sink concatenation):")
            for sz in sizes:
                variant("fp8", sz)
                with legacy_kv_reads():
                    variant("fp8-legacy-kv", sz)
        tag = "fp8"
        if args.compile_first:
            compile_blocks(dit)
            tag = "fp8+compile"
        if "fp8" in parts:
            log(f"{tag}:")
            for i, s in enumerate(sizes):
                # compiled: the first clip (4 blocks) sees every ring fill level and compiles
                extra = (
                    dict(flat=args.flat_blocks if i == 0 else 0, warm=args.warm + 4, blocks=args.blocks + 4)
                    if args.compile_first
                    else {}
                )
                variant(tag, s, **extra)
            if args.compile_first:
                variant(tag, sizes[0])  # again, warm: prefill and first block without compilation
            variant(tag, sizes[0], num_sets=1)
        if "fp8-attention" in parts:
            fp8kv = torch.float8_e4m3fn
            log(f"{tag}: bf16 cache, FP8 cache (bf16 attention over an upcast slice), FP8 attention:")
            for s in sizes:
                variant(tag, s, **compiling)
                variant(f"{tag} kv-fp8", s, kv_dtype=fp8kv, **compiling)
                variant(f"{tag} fp8-attention", s, kv_dtype=fp8kv, fp8_attention=True, **compiling)
            results["fp8_attention_quality"] = {}
            for w, h in sizes:
                latent_errors(
                    results["fp8_attention_quality"],
                    ("kv-fp8", LoopConfig(w, h, kv_dtype=fp8kv)),
                    ("fp8-attention", LoopConfig(w, h, kv_dtype=fp8kv, fp8_attention=True)),
                    "FP8 attention vs bf16 attention (FP8 cache)",
                )
        if "fused-norms" in parts:
            results["norm_kernels"] = [
                guarded(
                    f"norm kernels {w}*{h}",
                    lambda w=w, h=h: bench_norm_kernels(
                        device, w, h, dit.config.dim, dit.config.ffn_dim, dit.config.num_heads
                    ),
                )
                for w, h in sizes
            ]
            from avatar.services.generator.fp8_attention import unavailable_reason

            best = dict(kv_dtype=torch.float8_e4m3fn, fp8_attention=unavailable_reason(device) is None)
            label = tag + (" fp8-attention" if best["fp8_attention"] else " kv-fp8")
            log(f"{label}: the blocks' norms by torch.compile, then by fused_norms.py's kernels:")
            for i, s in enumerate(sizes):
                variant(label, s, **best, **compiling)
                variant(f"{label} fused-norms", s, fused_norms=True, **best, **compiling)
                if i == 0 and dev_cuda:  # where each step's GPU time goes, both ways, before the rest
                    results["profile_unfused_norms"] = guarded(
                        "profile", lambda: profile_step(dit, LoopConfig(*s, **best), device)
                    )
                    results["profile_fused_norms"] = guarded(
                        "profile fused-norms",
                        lambda: profile_step(dit, LoopConfig(*s, fused_norms=True, **best), device),
                    )
            log(f"{label}, the audio injections as before 2026-12-05 (only their cross-attention compiled):")
            with legacy_injections(dit, compiled=args.compile_first):
                variant(f"{label} legacy-injections", sizes[0], **best, **compiling)
            results["fused_norms_quality"] = {}
            for w, h in sizes:
                latent_errors(
                    results["fused_norms_quality"],
                    (label, LoopConfig(w, h, **best)),
                    (f"{label} fused-norms", LoopConfig(w, h, fused_norms=True, **best)),
                    "fused norms vs torch's",
                )
        if "profile" in parts and dev_cuda:
            results["profile"] = [
                guarded(f"profile {w}*{h}", lambda w=w, h=h: profile_step(dit, LoopConfig(w, h), device))
                for w, h in sizes
            ]
        if "engine-gaps" in parts:  # the service's engine, graphs and all: where its GPU idles
            from avatar.services.generator.fp8_attention import unavailable_reason

            opts = dict(kv_dtype="float8_e4m3fn", fp8_attention=unavailable_reason(device) is None)
            from avatar.services.generator import fused_norms

            results["engine_gaps"] = []
            steady = 8 if dev_cuda else 0  # graphs replay from the third clip on (the CPU only checks the path)
            # (fused norms, their launch widths): on and off, or on at the default and the swept widths
            tuned = json.loads(Path(args.norm_warps).read_text())["warps"] if args.norm_warps else None
            runs = [(True, None, None, None), (False, None, None, None)]
            if tuned is not None:
                runs = [(True, None, None, None), (True, tuned, None, None)]
            if args.fp8_kernels:  # the kernels one after the other, each with the defaults
                runs = [(True, None, k, None) for k in args.fp8_kernels.split(",")]
            if variants:  # fused norms on, each variant's settings over the defaults
                runs = [(True, None, None, v) for v in variants]
            defaults = dict(fused_norms.LAUNCH_WARPS)
            for w, h in sizes:
                for fused, warps, kernel, variant in runs:  # the default first: a call cut short still measures it
                    variant = variant or {}
                    # every key but warps is one of use_fused_norms' switches (VARIANT_KEYS)
                    dit.use_fused_norms(fused, **{k: v for k, v in variant.items() if k != "warps"})
                    fused_norms.LAUNCH_WARPS.clear()
                    fused_norms.LAUNCH_WARPS.update(
                        {**(defaults if warps is None else warps), **variant.get("warps", {})}
                    )
                    label = f"fused norms {'on' if fused else 'off'}" + (f", warps {warps}" if warps else "")
                    label += f", {json.dumps(variant)}" if variant else ""
                    run_opts = dict(opts, **({"fp8_attention_kernel": kernel} if kernel else {}))
                    label += f", {kernel} FP8 attention" if kernel else ""
                    log(f"engine {w}*{h} {run_opts}, {label}:")
                    r = guarded(
                        f"engine gaps {w}*{h} {label}",
                        lambda w=w, h=h, o=run_opts: bench_engine(
                            dit, w, h, device, args.blocks + steady, args.warm + steady, o, timeline_blocks=2
                        ),
                    )
                    if r:
                        first = dit.blocks[0]
                        r["fused_norms"] = fused
                        r["variant"] = variant
                        r["ffn_products"] = first.ffn_products
                        r["qkv_gemm"] = bool(first.self_attn.qkv)
                        r["launch_warps"] = dict(fused_norms.LAUNCH_WARPS)
                        r["fp8_attention_kernel"] = kernel or "cudnn"
                        log(
                            f"  engine {r['size']} {label}: {r['block_ms']:.1f} ms a block ({r['fps']:.2f} FPS), "
                            f"blocks {r['block_ms_all']}, peak {r['peak_gib']:.1f} GiB"
                        )
                    results["engine_gaps"].append(r)
            fused_norms.LAUNCH_WARPS.clear()
            fused_norms.LAUNCH_WARPS.update(defaults)
            dit.use_fused_norms(False)
        if "engine" in parts:
            results["engine"] = [
                guarded(f"engine {w}*{h}", lambda w=w, h=h: bench_engine(dit, w, h, device, args.blocks, args.warm))
                for w, h in sizes
            ]
        if "overlap" in parts:
            results["overlap"] = guarded(
                "overlap", lambda: bench_overlap(dit, LoopConfig(*sizes[0]), device, args.tiny, args.blocks, args.warm)
            )
        if "24gb" in parts:
            log(f"24 GiB mode (FP8 weights, one cache set + clean pass, process capped at {args.mem_gib} GiB):")
            if dev_cuda:
                free_memory(device)
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_gib * GiB / total))
            for label, kvd, win in [("24gb-fp8kv", torch.float8_e4m3fn, 12), ("24gb-bf16kv", None, 6)]:
                variant(
                    label + ("+compile" if args.compile_first else ""),
                    sizes[0],
                    num_sets=1,
                    window_frames=win,
                    kv_dtype=kvd,
                    warm=args.warm + (4 if args.compile_first else 0),
                    blocks=args.blocks + (4 if args.compile_first else 0),
                )
            fp8kv = torch.float8_e4m3fn
            results["engine_24gb"] = guarded(
                "engine 24gb",
                lambda: bench_engine(
                    dit,
                    *sizes[0],
                    device,
                    args.blocks,
                    args.warm,
                    options={"cache_sets": 1, "kv_dtype": "float8_e4m3fn"},
                ),
            )
            results["overlap_24gb"] = guarded(
                "overlap 24gb",
                lambda: bench_overlap(
                    dit, LoopConfig(*sizes[0], num_sets=1, kv_dtype=fp8kv), device, args.tiny, args.blocks, args.warm
                ),
            )
            if dev_cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        t0 = time.perf_counter()
        if "compile" in parts and not args.compile_first:
            log("FP8 + torch.compile (blocks):")
            compile_blocks(dit)
            for s in sizes:
                # the first clip (4 blocks) sees every ring fill level: recompiles happen there
                r = variant("fp8+compile", s, blocks=args.blocks + 4, warm=args.warm + 4)
                if r:
                    r["note"] = "first blocks include compilation"
            results["compile_total_s"] = time.perf_counter() - t0
        wanted = "compile-bf16" in parts or (args.only == "all" and "compile" in parts)
        left = args.time_budget - (time.perf_counter() - t_main)
        if wanted and left > 120:
            log(f"bf16 + torch.compile (blocks), {left:.0f} s of the budget left:")
            del dit
            free_memory(device)
            dit = build_dit(preset, device)
            compile_blocks(dit)
            for s in sizes if "compile-bf16" in parts else sizes[:1]:
                r = variant("bf16+compile", s, blocks=args.blocks + 4, warm=args.warm + 4)
                if r:
                    r["note"] = "first blocks include compilation"
        elif wanted:
            log(f"bf16 + torch.compile skipped: {left:.0f} s of the time budget left")
    save()
    print_table(results)


def print_table(results):
    log("\n| variant | size | KV sets x window | ms/step | ms/block | DiT FPS | prefill ms | peak GiB |")
    log("|---|---|---|---|---|---|---|---|")
    for r in results.get("runs", []):
        log(
            f"| {r['variant']} | {r['size']} | {r['kv_sets']} x {r['window_frames']} ({r['kv_dtype']}) | "
            f"{r['step_ms']:.1f} | {r['block_ms']:.1f} | {r['dit_fps']:.1f} | {r['prefill_ms']:.0f} | "
            f"{r['peak_gib']:.1f} |"
        )
    for r in results.get("runs", []):
        if "flat" in r:
            f = r["flat"]
            log(
                f"flat in length ({r['variant']} {r['size']}): clip 2 {f['clip2_block_ms']:.1f} ms/block, "
                f"clip {f['last_clip']} {f['last_clip_block_ms']:.1f} ms/block, ratio {f['ratio']:.3f}"
            )
    for v in results.get("vae", []) or []:
        if v:
            log(
                f"VAE {v['size']}: {v['vae_ms']:.1f} ms/block decode + {v['to_host_ms']:.1f} ms to host; "
                f"mux {v['mux_noise_ms']:.1f} (noise) / {v['mux_smooth_ms']:.1f} (smooth) ms/block"
            )
    if results.get("errors"):
        log("errors: " + json.dumps(results["errors"], indent=1)[:3000])


if __name__ == "__main__":
    main()
