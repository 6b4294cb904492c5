"""GeneratorEngine: the causal DiT generating latent blocks for one session after another.

A session follows upstream's single-GPU `generate()`: the sink (reference + motion tokens) is
prefilled at t=0, every block of 3 latent frames is denoised with N flow-matching Euler steps
while attending to the cached earlier blocks (a ring one clip long) and to the sink; after the
first clip the sink's reference is replaced by the first generated latent frame. Noise comes
from a CPU torch.Generator seeded with job.seed + clip index, so runs are reproducible.

GeneratorSession is the one block loop: the multi-GPU generator's ranks (distributed/tpp.py)
each run a session of one sampling step, and the benchmarks (bench/) run sessions too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from avatar.dit_config import MAX_SAMPLE_STEPS
from avatar.errors import InvalidInput, ResourceExhausted
from avatar.jobs import Job
from avatar.memory_planner import MemoryRequest, check_session_memory, gpu_available_bytes, session_oom_error
from avatar.presets import FRAMES_PER_BLOCK, VAE_TIME_STRIDE, ModelSpec
from avatar.services.generator import avatar_loras
from avatar.services.generator.attention import prefer_cudnn_attention
from avatar.services.generator.avatar_loras import LoraBank, LoraLease
from avatar.services.generator.block_times import BlockTimes
from avatar.services.generator.causal_s2v_dit import REF_ROPE_FRAME, CausalS2VDiT, TextContext, TimeEmbedding
from avatar.services.generator.fp8 import fp8_supported, swap_linears_to_fp8
from avatar.services.generator.fp8_attention import unavailable_reason as fp8_attention_unavailable
from avatar.services.generator.fused_norms import unavailable_reason as fused_norms_unavailable
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec, step_cache_spec
from avatar.services.generator.scheduler import FlowMatchEuler
from avatar.services.generator.sink_cache import SinkCache
from avatar.services.generator.step_graphs import StepGraphs
from avatar.services.generator.weights import build_dit, load_dit, random_dit, read_dit_config

log = logging.getLogger(__name__)

# Finished sessions' caches + CUDA graphs kept for the next session of their shapes: the warm-up's
# (hd, preview and each --warmup-shape) and one more; the warm-up's go last, as only a warm-up
# records a first clip.
IDLE_SLOTS = 3
SINK_AHEAD = (4, 30)  # upstream draws the reference token's RoPE lead (latent frames) per call


def model_dtype(model: ModelSpec) -> torch.dtype:
    """float32 on CPU (bf16 matmuls there are slow and the tiny model is for CI), else spec.dtype."""
    if torch.device(model.device).type == "cpu":
        return torch.float32
    dtype = getattr(torch, model.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"unknown dtype {model.dtype!r}")
    return dtype


def kv_cache_dtype(model: ModelSpec, default: torch.dtype) -> torch.dtype:
    """`GeneratorOptions.kv_dtype`: "float8_e4m3fn" stores the KV cache in e4m3 (half of bf16's
    bytes: what lets 704*384 fit 24 GB); unset: the model's dtype (validated by GeneratorOptions)."""
    name = model.generator_options.kv_dtype
    return default if name is None else getattr(torch, name)


def build_generator_model(model: ModelSpec, load_device: torch.device | None = None) -> CausalS2VDiT:
    """The DiT a ModelSpec names: tiny (random, seeded), s2v-14b random, or loaded (+ LoRA).
    `load_device`: build it there (in the dtype of model.device) instead, e.g. in host memory for
    FSDP2 to shard onto the GPUs (services/generator/distributed/sharding.py)."""
    device, dtype = torch.device(model.device), model_dtype(model)
    if model.fp8 and not fp8_supported(device):
        raise InvalidInput(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {device} has none")
    at = device if load_device is None else load_device
    if model.from_files:
        dit = load_dit(model.ckpt_dir, device=at, dtype=dtype)
        if model.lora_path:
            from avatar.services.generator.lora import load_lora

            report = load_lora(dit, model.lora_path)  # merged before any FP8 swap, as upstream
            log.info("%s", report.describe())
    elif model.is_tiny:
        dit = random_dit("tiny", at, dtype, seed=model.seed)
    elif model.random_weights:
        dit = random_dit("s2v-14b", at, dtype, seed=model.seed)
    else:
        raise InvalidInput("s2v-14b needs --ckpt_dir (or --random-weights for benchmarks)")
    if model.fp8:
        swapped = swap_linears_to_fp8(dit)
        log.info("FP8 linear layers: %d", len(swapped))
    if fused_norms_wanted(model, device, dtype, sharded=load_device is not None):
        try:
            dit.use_fused_norms()
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        log.info("fused norms: on%s", "" if model.generator_options.fused_norms else " (the default with --fp8)")
    if device.type == "cuda":
        prefer_cudnn_attention(device)
    if model.generator_options.offload_text_projections:
        moved = dit.offload_text_projections()
        log.info("text k/v projections in pinned CPU memory: %.2f GiB off the GPU", moved / 2**30)
    if model.compile:
        compile_blocks(dit)
    return dit


def register_avatar_loras(model: ModelSpec, dit: CausalS2VDiT | None = None) -> LoraBank:
    """The spec's avatar LoRAs, each validated against the DiT's shapes (a meta-device twin:
    names and shapes only); WeightsError naming the first bad one."""
    if dit is not None:
        config = dict(dit.config)
    elif model.from_files:
        from avatar.checkpoints import resolve_ckpt_dir

        config = read_dit_config(resolve_ckpt_dir(model.ckpt_dir).root)
    else:
        config = "tiny" if model.is_tiny else "s2v-14b"
    meta = build_dit(config, device="meta")
    where = (dit.device, dit.dtype) if dit is not None else (torch.device(model.device), model_dtype(model))
    bank = LoraBank(model.max_loras, *where)
    for name, path in model.avatar_loras:
        bank.register(name, path, meta)
    return bank


def cuda_graphs_wanted(model: ModelSpec, device: torch.device) -> bool:
    """`GeneratorOptions.cuda_graphs`: replay each steady-state step from a CUDA graph
    (services/generator/step_graphs.py); default on for CUDA devices."""
    wanted = model.generator_options.cuda_graphs
    return device.type == "cuda" and (wanted is None or bool(wanted))


def fused_norms_wanted(model: ModelSpec, device: torch.device, dtype: torch.dtype, sharded: bool = False) -> bool:
    """`GeneratorOptions.fused_norms`: True runs the fused kernels or fails saying what is missing;
    None (the default) runs them with --fp8 wherever they run as measured: a CUDA GPU, a bf16
    model, CUDA graphs (without them each kernel's launch costs more host time than it saves at
    384*256), no per-avatar LoRAs, the whole model on the GPU (not FSDP's shards). They cut a
    704*384 block from 672 to 597 ms (runs F1, F2, docs/performance.md)."""
    asked = model.generator_options.fused_norms
    if asked is not None:
        return asked
    return (
        model.fp8
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and cuda_graphs_wanted(model, device)
        and not model.avatar_loras
        and not sharded
        and fused_norms_unavailable(device) is None
    )


def compile_blocks(dit: CausalS2VDiT) -> None:
    """torch.compile every transformer block and audio injection (AdaLN, cross-attention, residual:
    one graph shared by all of a kind, parameters as inputs) and the reference keys' rotation,
    with dynamic shapes from the start,
    because the ring fill, the slot and the latent size change between calls
    (bench/bench_generator.py measures this)."""
    import torch._dynamo

    from avatar.torch_compile import tolerate_tracing_in_other_threads

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    tolerate_tracing_in_other_threads()
    for module in (*dit.blocks, *dit.audio_injector.injections):
        module.compile(dynamic=True)
    dit.compile_reference_rotation()


class GeneratorEngine:
    """Owns the DiT; sessions own their KV caches. `GeneratorOptions.cache_sets`: 1 for the
    clean-context variant (less memory, one extra forward per block), default one per step;
    `GeneratorOptions.kv_dtype`: see kv_cache_dtype.

    `free_memory()` gives the bytes a new session may use (on CUDA: the GPU's free memory, capped by
    the process's memory fraction; None on the CPU: no check). Sessions check it before allocating
    their KV cache and raise ResourceExhausted with the numbers instead of running out of memory.
    """

    def __init__(self, model: ModelSpec, dit: CausalS2VDiT | None = None):
        self.spec = model
        # per-avatar LoRAs are validated before the (slow) model load: a bad file fails at once
        self.loras = register_avatar_loras(model, dit) if model.avatar_loras else None
        self.dit = dit if dit is not None else build_generator_model(model)
        if self.loras is not None:
            log.info("per-avatar LoRAs: %d linear layers hooked", self.loras.attach(self.dit))
        self.cache_sets = model.generator_options.cache_sets
        self.kv_dtype = kv_cache_dtype(model, self.dit.dtype)
        self.fp8_attention = model.generator_options.fp8_attention
        self.fp8_kernel = model.generator_options.fp8_attention_kernel
        if self.fp8_attention and (reason := fp8_attention_unavailable(self.dit.device, self.fp8_kernel)):
            raise InvalidInput(reason)
        self.cuda_graphs = cuda_graphs_wanted(model, self.dit.device)
        self.block_times = BlockTimes()  # steady blocks by size: what the live guard reads
        # the last portraits' sinks (services/generator/sink_cache.py); on a GPU, where the sink's
        # forward is on the first fragment's path
        self.sinks = SinkCache() if self.dit.device.type == "cuda" else None
        self._idle: list[_Slot] = []  # most recently kept last
        self._idle_lock = threading.Lock()
        self.free_memory: Callable[[], int] | None = None
        if self.dit.device.type == "cuda":
            index = self.dit.device.index if self.dit.device.index is not None else torch.cuda.current_device()
            self.free_memory = lambda: gpu_available_bytes(index)

    def open_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor, lora_id: str = ""
    ) -> GeneratorSession:
        """`lora_id`: a registered avatar LoRA the session renders with (loaded now if not held); "": the base."""
        lease = self._acquire_lora(lora_id)
        try:
            return GeneratorSession(self, job, text, ref_latent, motion_latents, cache_sets=self.cache_sets, lora=lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    def take_slot(self, key: tuple) -> _Slot | None:
        """A finished session's cache and graphs for these shapes (None: there is none)."""
        with self._idle_lock:
            matching = [slot for slot in self._idle if slot.key == key]
            if not matching:
                return None
            taken = max(matching, key=lambda slot: slot.graphs.first_clip)  # the warm-up's if there is one
            self._idle.remove(taken)
            self._report_kept()
            return taken

    def keep_slot(self, slot: _Slot) -> None:
        with self._idle_lock:
            self._idle.append(slot)
            dropped = []
            # the oldest, a request's before a warm-up's; every warmed shape's stays (--warmup-shape
            # may warm more than IDLE_SLOTS - 1), and one more for a request's. A session short of
            # memory frees them, smallest first, until it fits (drop_idle_slots).
            warmed = sum(slot.graphs.first_clip for slot in self._idle)
            while len(self._idle) > max(IDLE_SLOTS, warmed + 1):
                dropped.append(min(self._idle, key=lambda s: s.graphs.first_clip))
                self._idle.remove(dropped[-1])
            self._report_kept()
        for old in dropped:
            old.free()

    def keep_sink(self, kv: KVCache, inputs: tuple[torch.Tensor, ...]) -> None:
        """Keeps the session's sink; short of memory for its copy, the older kept sinks make way
        (once), and without memory even then none is kept: never fail a session for an optimisation."""
        for attempt in range(2):
            try:
                self.sinks.keep(kv, inputs)
                break
            except torch.OutOfMemoryError:
                freed = self.sinks.clear()
                if attempt or not freed:
                    log.warning("kept no sink for this portrait: out of GPU memory for its copy")
                    break
                if self.dit.device.type == "cuda":
                    torch.cuda.empty_cache()
        with self._idle_lock:
            self._report_kept()

    def drop_idle_slots(self, enough: Callable[[], bool] | None = None) -> int:
        """Frees kept caches, graphs and sinks for a session that needs their memory: the sinks,
        then the caches smallest first (the cheapest to rebuild: a 704*384 clip's graphs took ~4 s
        to capture again on an H100, a 384*256 one's ~1 s), until `enough()` (None: all of them).
        Returns their bytes."""
        freed = 0
        while not (enough is not None and enough()):
            if not (step := self.free_next_kept()):
                break
            freed += step
        return freed

    def free_next_kept(self) -> int:
        """Frees the next of what drop_idle_slots frees, in its order; its bytes (0: nothing was kept)."""
        with self._idle_lock:
            freed = self.sinks.clear() if self.sinks is not None else 0
            smallest = None
            if not freed and self._idle:
                smallest = min(self._idle, key=lambda slot: slot.nbytes)
                self._idle.remove(smallest)
            self._report_kept()
        if smallest is not None:
            freed = max(1, smallest.nbytes)
            smallest.free()
        if freed and self.dit.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def _report_kept(self) -> None:  # under _idle_lock
        from avatar import metrics

        metrics.KEPT_CACHE_BYTES.set(self._kept_bytes())

    def _kept_bytes(self) -> int:  # under _idle_lock
        return sum(slot.nbytes for slot in self._idle) + (self.sinks.nbytes if self.sinks is not None else 0)

    @property
    def idle_slot_bytes(self) -> int:
        """GPU memory the kept caches and prompt keys/values hold (the graphs' own pools come on top)."""
        with self._idle_lock:
            return self._kept_bytes()

    def loaded_loras(self) -> list[str]:
        """Avatar LoRA ids held on the device now, most recently used first: a session of one of
        them starts without loading anything (what a router prefers); [] without avatar LoRAs."""
        return self.loras.loaded() if self.loras is not None else []

    def _acquire_lora(self, lora_id: str) -> LoraLease | None:
        if not lora_id:
            return None
        if self.loras is None:
            raise InvalidInput(f"lora_id {lora_id[:80]!r}: {avatar_loras.NOT_SERVED}")
        return self.loras.acquire(lora_id)

    def open_step_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor, step: int
    ) -> GeneratorSession:
        """Sampling step `step` of every block only, on that step's cache set (a TPP rank's share)."""
        return GeneratorSession(self, job, text, ref_latent, motion_latents, step=step)

    def warm_up(self, sizes: list[tuple[int, int, int, int]]) -> list[str]:
        """Runs a short session of zeros per (width, height, infer_frames, sample_steps): two clips
        and two blocks more, so every shape a session meets (the ring filling up, then full) has
        run once, every CUDA graph is captured (the first clip's too: the session is kept, and the
        next of its size replays from its first block), and the last two blocks, replayed,
        measure the size's steady block time (block_times: what the live guard reads). With
        --compile that is where compilation happens (a minute at 704*384, seconds for the next
        size), before the server reports SERVING: no request waits for it, and no
        other thread's model call runs while torch.compile traces (docs/operations.md).
        Returns one line per size; a size that cannot run here (memory) is skipped with its reason."""
        c, lines = self.dit.config, []
        for width, height, infer_frames, steps in sizes:
            blocks = 2 * (infer_frames // FRAMES_PER_BLOCK) + 2
            job = Job(
                width=width,
                height=height,
                infer_frames=infer_frames,
                sample_steps=steps,
                num_blocks=blocks,
                total_frames=blocks * FRAMES_PER_BLOCK,
                model=self.spec.name,
            )
            h, w = height // 8, width // 8
            start = time.perf_counter()
            try:
                session = self.open_session(
                    job,
                    torch.zeros(1, c.text_dim),
                    torch.zeros(c.in_dim, 1, h, w),
                    torch.zeros(c.in_dim, self.dit.motion_latent_frames, h, w),
                )
                session.record_first_clip = True  # kept for the next session of this size
                try:
                    for _ in range(blocks):
                        session.generate_block(torch.zeros(FRAMES_PER_BLOCK, c.audio_layers, c.audio_dim))
                finally:
                    session.close()
            except (InvalidInput, ResourceExhausted) as e:
                lines.append(f"{width}*{height}: skipped ({str(e).splitlines()[0]})")
                continue
            steady = session.steady_block_ms()
            lines.append(
                f"{width}*{height}: {blocks} blocks in {time.perf_counter() - start:.1f} s"
                + (f", steady {steady:.0f} ms per block at {steps} steps" if steady else "")
            )
        if self.sinks is not None:  # the warm-up's sinks are of zeros, which no request sends
            self.sinks.clear()  # (1.08 GB each at 704*384: room for the requests' own)
            with self._idle_lock:
                self._report_kept()
        return lines


@dataclass(frozen=True)
class SessionPlan:
    h: int
    w: int
    block_frames: int  # latent frames per block
    clip_frames: int  # latent frames per clip (= the ring)
    steps: int
    cache_sets: int

    @property
    def blocks_per_clip(self) -> int:
        return self.clip_frames // self.block_frames

    @property
    def forwards_per_block(self) -> int:
        """DiT forwards of a block: one per step, plus the clean t=0 pass with a single cache set."""
        return self.steps + (1 if self.cache_sets == 1 else 0)


def _fits(check: Callable[[int], None], available: int) -> bool:
    try:
        check(available)
    except ResourceExhausted:
        return False
    return True


@dataclass
class _Slot:
    """What a session's CUDA graphs read by address: its KV cache, its text context's tensors and
    the graphs. A finished session leaves it to the engine, and the next session of the same
    shapes (size, steps, cache layout) starts with every graph already captured: a capture costs
    a block about twice its time, and a session captures one graph per (cache set, ring slot)."""

    key: tuple
    kv: KVCache
    context: TextContext
    graphs: StepGraphs

    @property
    def nbytes(self) -> int:
        """The cache's and the prompt keys/values' bytes (the graphs' memory pool comes on top)."""
        return self.kv.nbytes + self.context.nbytes

    def free(self) -> None:
        self.graphs.close()
        self.kv.free()


class GeneratorSession:
    """One stream: the block loop. generate_block() once per block of audio, in order; close()
    frees the caches.

    `step=None` runs every sampling step of each block. `step=k` is one TPP rank's share
    (services/generator/distributed): it holds one cache set, laid out as set k of the full
    session's, and denoise_block() runs sampling step k only; chained over k = 0..N-1 the
    steps give the full session's latents bit for bit."""

    pipeline_depth = 1  # blocks in flight before the first result: one, run in the caller's thread

    def __init__(
        self,
        engine: GeneratorEngine,
        job: Job,
        text: torch.Tensor,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        cache_sets: int | None = None,
        sink_ahead: tuple[int, int] = SINK_AHEAD,
        refresh_sink: bool = True,
        step: int | None = None,
        lora: LoraLease | None = None,
    ):
        self.open_ms: dict[str, float] = {}  # wall ms of the opening's stages (the servicer's span shows them)
        opened = time.perf_counter()
        self.engine = engine
        self.lora_lease = lora  # released at close: the LoRA may be dropped for another from then on
        self.lora = lora.lora if lora is not None else None  # every model call of this session runs with it
        self.dit = dit = engine.dit
        self.plan = plan = plan_session(job, dit, ref_latent, motion_latents, text, cache_sets)
        self.size = (job.width, job.height)
        if step is not None and not (0 <= step < plan.steps and plan.cache_sets == plan.steps):
            raise InvalidInput(f"step {step} out of range for {plan.steps} sampling steps with a cache set each")
        self.step = step
        self.session_steps = range(plan.steps) if step is None else range(step, step + 1)  # the steps it runs
        self.seed = int(job.seed)
        self.sampler = FlowMatchEuler.create(plan.steps)
        self.sink_ahead = sink_ahead
        self.refresh_sink = refresh_sink
        self._rng = random.Random(self.seed)  # the sink's RoPE lead, drawn per forward as upstream
        self._times: dict[float, TimeEmbedding] = {}  # embed_time of each timestep this session used
        self.device, self.dtype = dit.device, dit.dtype
        self._closed = False
        self.kv = None
        self._clip_noise: tuple[int, torch.Tensor] | None = None  # (clip, its noise)
        self._first_frame: torch.Tensor | None = None
        self.context = self.motion = None
        self._graphs: StepGraphs | None = None
        if step is None:
            spec = KVCacheSpec.for_model(dit, plan.h, plan.w, plan.clip_frames, plan.cache_sets)
            self._cache_set_of_step = (lambda i: i) if plan.cache_sets > 1 else (lambda i: 0)
        else:
            spec, cache_set = step_cache_spec(dit, plan.h, plan.w, plan.clip_frames, step, plan.steps)
            self._cache_set_of_step = lambda i: cache_set
        # TPP step sessions run without graphs (not measured on a multi-GPU group yet); a LoRA's
        # weights are read by the graphs too, so only base-model sessions hand theirs on.
        graphs = engine.cuda_graphs and step is None
        kv_key = (spec, engine.kv_dtype, engine.fp8_attention, engine.fp8_kernel)
        self._slot_key = kv_key if graphs and self.lora is None else None
        self._failed = False
        self.record_first_clip = False  # the warm-up's: graphs for the first clip's blocks too
        slot = engine.take_slot(self._slot_key) if self._slot_key is not None else None
        # The planner's numbers are the full-size model's (avatar/memory_planner.py).
        self._memory_request = MemoryRequest.from_job(job) if job.width % 16 == 0 == job.height % 16 else None
        if slot is None and engine.free_memory is not None and self._memory_request is not None:
            sets = spec.num_sets if step is None else 1
            check = functools.partial(
                check_session_memory, self._memory_request, sets, kv_dtype_bytes=engine.kv_dtype.itemsize
            )
            try:
                check(engine.free_memory())
            except ResourceExhausted:
                # finished sessions' caches go first, only as many as it takes
                if not engine.drop_idle_slots(enough=lambda: _fits(check, engine.free_memory())):
                    raise
                check(engine.free_memory())
        self.block_index = 0
        self.last_block_ms = 0.0
        opened = self._opened("admit_ms", opened)
        if slot is not None:  # the session owns them from here: a failure below frees them
            self.kv, self._graphs = slot.kv, slot.graphs
        self.sink_restored = False  # the sink of a recent session with these inputs, copied
        received = (ref_latent, motion_latents, text)  # the sink cache matches these, on the host
        with self._freed_on_failure(), avatar_loras.active(self.lora):
            text = text.to(self.device)
            context = dit.embed_text(text[None])
            if slot is not None:
                self.context = slot.context.copy_(context)
            else:
                self.kv = KVCache(
                    spec, engine.kv_dtype, self.device, fp8_attention=engine.fp8_attention, fp8_kernel=engine.fp8_kernel
                )
                self.context = context
            self.motion = motion_latents.to(self.device, self.dtype)[None]
            ref = ref_latent.to(self.device, self.dtype)[None]
            opened = self._opened("inputs_ms", opened)
            # an avatar LoRA changes the sink; TPP ranks (step sessions) keep their memory for the ring
            sinks = engine.sinks if self.lora is None and step is None else None
            self.sink_restored = sinks is not None and sinks.restore(self.kv, received)
            if not self.sink_restored:
                dit.prefill_sink(ref, self.motion, self.context, self.kv)
                if sinks is not None:
                    engine.keep_sink(self.kv, received)
            self._opened("sink_ms", opened)
        if graphs and self._graphs is None:
            self._graphs = StepGraphs(dit, self.context, self.kv, capture=self.device.type == "cuda")

    def _opened(self, stage: str, since: float) -> float:
        """Records a stage of the opening (host wall time: device work queued and not waited for
        lands in the first block) and returns now, the next stage's start."""
        now = time.perf_counter()
        self.open_ms[stage] = round((now - since) * 1e3, 3)
        return now

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv.nbytes

    @property
    def graphs(self) -> StepGraphs | None:
        """The session's CUDA graphs of its steps (None: plain forwards)."""
        return self._graphs

    @contextlib.contextmanager
    def _freed_on_failure(self):
        """A failure inside the model frees this session's memory at once (the service stays up);
        out of memory raises the planner's ResourceExhausted with the ladder and CUDA's message.

        Closing alone is not enough: the exception's traceback keeps the failed frames' locals,
        among them views of the KV cache (gigabytes), alive until a garbage collection; the
        frames are cleared here (measured: a failed 704*384 session held 21 GiB after its close)."""
        try:
            yield
        except InvalidInput:
            raise  # refused before any model work: the session is intact
        except Exception as e:
            self._failed = True  # its cache and graphs are freed, not handed on
            self.close()
            traceback.clear_frames(e.__traceback__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not isinstance(e, torch.OutOfMemoryError):
                raise
            req = self._memory_request or MemoryRequest(384, 256)
            available = self.engine.free_memory() if self.engine.free_memory is not None else 0
            sets = self.plan.cache_sets if self.step is None else 1
            raise session_oom_error(req, sets, available, self.engine.kv_dtype.itemsize, cause=e) from e

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [frames_per_block, audio_layers, audio_dim] -> latent [16, block_frames, h, w]."""
        if self.step is not None:
            raise RuntimeError("a session of one sampling step runs denoise_block, not generate_block")
        start = time.perf_counter()
        x = self.denoise_block(self.block_noise(self.block_index), audio)
        if self.device.type == "cuda":
            # this stream only: a decoder sharing the process (--role all) keeps its own queue going
            torch.cuda.current_stream(self.device).synchronize()
        self.last_block_ms = (time.perf_counter() - start) * 1e3
        if self.block_index > 2 * self.plan.blocks_per_clip:  # caches full, graphs captured: steady
            self.engine.block_times.record(*self.size, self.last_block_ms, self.plan.forwards_per_block)
        return x[0]

    def steady_block_ms(self) -> float | None:
        """This session's steady block time as measured on its engine at its size (None: not yet)."""
        return self.engine.block_times.block_ms(*self.size, self.plan.forwards_per_block)

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        """generate_block, run now in the caller's thread; the future holds its latent (or error)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(self.generate_block(audio))
        except Exception as e:
            done.set_exception(e)
        return done

    def block_noise(self, index: int) -> torch.Tensor:
        """Block `index`'s starting noise [1, 16, block_frames, h, w]: its slice of the clip's noise."""
        p = self.plan
        clip, in_clip = divmod(index, p.blocks_per_clip)
        if self._clip_noise is None or self._clip_noise[0] != clip:
            self._clip_noise = clip, clip_noise(self.seed, clip, p).to(self.device, self.dtype)
        f0 = in_clip * p.block_frames
        return self._clip_noise[1][:, :, f0 : f0 + p.block_frames]

    def check_audio(self, audio: torch.Tensor) -> None:
        """InvalidInput unless audio is one block's features [frames_per_block, audio_layers, audio_dim]."""
        want = (self.plan.block_frames * VAE_TIME_STRIDE, self.dit.config.audio_layers, self.dit.config.audio_dim)
        if tuple(audio.shape) != want:
            raise InvalidInput(f"audio features must be {list(want)}, got {list(audio.shape)}")

    def needs_first_frame(self, index: int) -> bool:
        """Whether block `index` refreshes the sink with a first frame this session has not seen
        (a TPP step before the last never sees a finished block: rank 0 passes it on)."""
        return self.refresh_sink and index == self.plan.blocks_per_clip and self._first_frame is None

    def denoise_block(
        self, x: torch.Tensor, audio: torch.Tensor, first_frame: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This session's sampling steps on the next block: latents x [1, 16, block_frames, h, w]
        (noise, or the previous step's output) -> after them. `first_frame` [1, 16, 1, h, w]:
        block 0's finished first frame, for a step session whose needs_first_frame() says so."""
        if self._closed:
            raise InvalidInput("the generator session is closed")
        with self._freed_on_failure(), avatar_loras.active(self.lora):
            return self._denoise_block(x, audio, first_frame)

    def _denoise_block(self, x: torch.Tensor, audio: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
        p = self.plan
        self.check_audio(audio)
        index = self.block_index
        sink_ref = None
        if self.refresh_sink and index == p.blocks_per_clip:
            # Upstream re-prefills the sink after the first clip, with its first generated frame
            # as the reference (the motion context stays: it would need the VAE here).
            sink_ref = self._first_frame if self._first_frame is not None else first_frame
            if sink_ref is None:
                raise RuntimeError("the first clip's first frame did not arrive for the sink refresh")
        # Every block draws the leads of all its forwards, in order, whichever steps this session
        # runs: a TPP step session then sees the same draws as the full session's step.
        sink_frames = [self._sink_frame(index * p.block_frames) for _ in range(p.forwards_per_block)]
        while True:
            try:
                return self._run_block(x, audio, sink_ref, sink_frames)
            except torch.OutOfMemoryError as e:
                # Other sessions' kept caches (an optimisation) give way before this session fails:
                # one at a time, smallest first, and the block runs again from its start (it
                # rewrites the same cache rows from the same inputs and draws, so the same latents).
                traceback.clear_frames(e.__traceback__)  # the failed attempt's tensors go now
                freed = self.engine.free_next_kept()
                if not freed:
                    raise
                log.warning(
                    "out of GPU memory in a %dx%d block; freed %.2f GiB of kept caches and run it again",
                    *self.size,
                    freed / 2**30,
                )

    def _run_block(self, x, audio, sink_ref: torch.Tensor | None, sink_frames: list[int]) -> torch.Tensor:
        p, dit = self.plan, self.dit
        index = self.block_index
        if sink_ref is not None:
            dit.prefill_sink(sink_ref.to(self.device, self.dtype), self.motion, self.context, self.kv)
        frame = index * p.block_frames
        features = audio.to(self.device).permute(1, 2, 0)[None]
        tokens = dit.encode_audio(features) if self._graphs is None else self._graphs.encode_audio(features)
        x = x.to(self.device, self.dtype)
        for i in self.session_steps:
            v = self._denoise(x, self.sampler.timesteps[i], tokens, self._cache_set_of_step(i), frame, sink_frames[i])
            x = self.sampler.step(x, v, i)
        if p.cache_sets == 1:
            # clean context: re-encode the finished block at t=0 into the single cache set
            self._denoise(x, 0.0, tokens, 0, frame, sink_frames[-1])
        if index == 0 and self.session_steps[-1] == p.steps - 1:
            self._first_frame = x[:, :, :1].clone()
        self.block_index += 1
        return x

    def _denoise(self, x: torch.Tensor, t: float, tokens, cache_set: int, frame: int, sink_frame: int) -> torch.Tensor:
        """One forward of the DiT at timestep t: through the session's CUDA graphs when it has them."""
        time = self._times.get(t)
        if time is None:  # every block walks the same timesteps: each is embedded once a session
            time = self._times[t] = self.dit.embed_time(torch.full((1, x.shape[2]), t, device=self.device))
        pos = self.dit.positions(
            self.kv, cache_set, frame, x.shape[2], self.plan.h, self.plan.w, sink_frame, self.device
        )
        if self._graphs is not None:
            return self._graphs.run(x, time, tokens, pos, record_filling=self.record_first_clip)
        return self.dit.denoise(x, time, self.context, tokens, self.kv, pos)

    def _sink_frame(self, frame: int) -> int:
        """RoPE frame of the sink's reference token: at least REF_ROPE_FRAME, and a random
        lead of SINK_AHEAD latent frames ahead of the current block (upstream's behaviour)."""
        return max(REF_ROPE_FRAME, frame + self._rng.randint(*self.sink_ahead))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            reusable = (
                self._slot_key is not None
                and not self._failed
                and self._graphs is not None
                and self._graphs.enabled
                and self.kv is not None
                and self.kv.nbytes > 0
            )
            if reusable:  # the next session of these shapes replays these graphs
                self.engine.keep_slot(_Slot(self._slot_key, self.kv, self.context, self._graphs))
            else:
                if self._graphs is not None:
                    self._graphs.close()
                if self.kv is not None:
                    self.kv.free()
            self._graphs = None
            self._clip_noise = self._first_frame = self.context = self.motion = None
            if self.lora_lease is not None:
                self.lora_lease.release()


def clip_noise(seed: int, clip: int, plan: SessionPlan) -> torch.Tensor:
    """The starting noise of a clip [1, 16, clip_frames, h, w], from a CPU generator seeded with
    seed + clip (upstream seeds seed + clip too), so every device and rank draws the same."""
    gen = torch.Generator(device="cpu").manual_seed(seed + clip)
    return torch.randn((1, 16, plan.clip_frames, plan.h, plan.w), generator=gen)


def plan_session(job: Job, dit: CausalS2VDiT, ref_latent, motion_latents, text, cache_sets) -> SessionPlan:
    """Validates a session's inputs against the model and derives its shapes (shared with TPP ranks)."""
    text_dim = dit.config.text_dim
    if job.width % 8 or job.height % 8 or job.width <= 0 or job.height <= 0:
        raise InvalidInput(f"job size {job.width}x{job.height} must be positive multiples of 8")
    h, w = job.height // 8, job.width // 8
    try:
        dit.check_latent_size(h, w)
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    c = dit.config.in_dim
    if ref_latent.ndim != 4 or tuple(ref_latent.shape) != (c, 1, h, w):
        raise InvalidInput(f"ref_latent must be [{c}, 1, {h}, {w}], got {list(ref_latent.shape)}")
    if motion_latents.ndim != 4 or motion_latents.shape[0] != c or tuple(motion_latents.shape[2:]) != (h, w):
        raise InvalidInput(f"motion_latents must be [{c}, T, {h}, {w}], got {list(motion_latents.shape)}")
    if text.ndim != 2 or text.shape[1] != text_dim or not 1 <= text.shape[0] <= dit.config.text_len:
        raise InvalidInput(f"text embeddings must be [1..{dit.config.text_len}, {text_dim}], got {list(text.shape)}")
    block = job.latent_frames_per_block
    if block < 1:
        raise InvalidInput(f"latent_frames_per_block must be positive, got {block}")
    if job.infer_frames % (block * VAE_TIME_STRIDE) or job.infer_frames <= 0:
        raise InvalidInput(
            f"infer_frames {job.infer_frames} must be a positive multiple of "
            f"{block * VAE_TIME_STRIDE} (latent_frames_per_block {block} x {VAE_TIME_STRIDE})"
        )
    steps = job.sample_steps
    if not 1 <= steps <= MAX_SAMPLE_STEPS:
        raise InvalidInput(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {steps}")
    sets = steps if cache_sets is None else int(cache_sets)
    if sets not in (1, steps):
        raise InvalidInput(f"cache_sets must be 1 (clean context) or sample_steps ({steps}), got {sets}")
    return SessionPlan(
        h=h, w=w, block_frames=block, clip_frames=job.infer_frames // VAE_TIME_STRIDE, steps=steps, cache_sets=sets
    )
