"""Memory planner: FP8 or bf16 weights, where the encoders live and how the KV cache is kept.

From the GPU's free memory and a request, chosen before the job starts; a job that cannot fit is
refused with the numbers instead of running into CUDA out-of-memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from avatar.dit_config import DIT_CONFIGS, MAX_SAMPLE_STEPS
from avatar.errors import InvalidInput, ResourceExhausted
from avatar.presets import LATENT_FRAMES_PER_BLOCK, MODEL_DIMS, VAE_TIME_STRIDE

GB = 1e9
GiB = 2**30

# Parameter counts of the real checkpoints (tests/data/keys, ../shared/refs/keys/README.md).
DIT_PARAMS = 16_295_755_609
DIT_FP8_PARAMS = 15_938_355_200  # the linear weights of the 40 blocks and 12 audio injectors
T5_PARAMS = 5_680_910_336  # umT5-XXL encoder
WAV2VEC2_PARAMS = 317_000_000  # wav2vec2-large-xlsr-53 (without the CTC head)
VAE_PARAMS = 126_892_531

DIT = DIT_CONFIGS["s2v-14b"]  # the model the planner plans for: every dim below comes from it
VAE_SPACE_STRIDE = MODEL_DIMS["s2v-14b"].vae_stride[1]
VAE_DECODE_BYTES_PER_PIXEL = 11_700
# The light decoder (TAEHV taew2_1's decoder, --latent-decoder light): 9.84 M parameters; per latent
# frame its widest live tensors are 4 frames x 64 channels at full size (bf16, about three at once)
# plus the block's float32 pixels: ~2 kB per output pixel, derived from the layer shapes, not
# measured (bench/bench_decoders.py reports the peak).
LIGHT_DECODER_PARAMS = 9_844_611
LIGHT_DECODE_BYTES_PER_PIXEL = 2_000
WORKSPACE_BYTES = 0.7 * GB
CONTEXT_BYTES = 0.6 * GB  # CUDA context, cuBLAS/cuDNN workspaces
FRAGMENTATION = 0.02  # allocator slack on top of every estimate
ENCODER_TRANSIENT_BYTES = 7.4 * GB  # encoders on the GPU: measured, see encoder_bytes


@dataclass(frozen=True)
class MemoryRequest:
    """What a job needs to hold: output size, clip length (= KV window) and steps."""

    width: int
    height: int
    infer_frames: int = 48  # video frames per clip; the KV window is infer_frames / 4 latent frames
    sample_steps: int = 4
    num_blocks: int = 1
    online_decode: bool = True  # False: every frame's pixels are kept on the GPU until the end

    def __post_init__(self):
        if self.width <= 0 or self.height <= 0 or self.width % 16 or self.height % 16:
            raise InvalidInput(f"size {self.width}*{self.height}: sides must be positive multiples of 16")
        if self.infer_frames <= 0 or self.infer_frames % VAE_TIME_STRIDE:
            raise InvalidInput(f"infer_frames {self.infer_frames} must be a positive multiple of {VAE_TIME_STRIDE}")
        if not 1 <= self.sample_steps <= MAX_SAMPLE_STEPS:
            raise InvalidInput(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {self.sample_steps}")
        if self.num_blocks <= 0:
            raise InvalidInput("num_blocks must be positive")

    @classmethod
    def from_job(cls, job, online_decode: bool = True) -> MemoryRequest:
        """From an avatar.jobs.Job (or anything with the same fields, e.g. a JobSpec)."""
        return cls(
            width=job.width,
            height=job.height,
            infer_frames=job.infer_frames,
            sample_steps=job.sample_steps,
            num_blocks=max(1, job.num_blocks),
            online_decode=online_decode,
        )

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SPACE_STRIDE, self.width // VAE_SPACE_STRIDE

    @property
    def tokens_per_latent_frame(self) -> int:
        return DIT.frame_tokens(*self.latent_size)

    @property
    def sink_tokens(self) -> int:
        """Reference frame + FramePack motion context, as the model counts them."""
        return DIT.sink_tokens(*self.latent_size)

    @property
    def window_latent_frames(self) -> int:
        return self.infer_frames // VAE_TIME_STRIDE

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"


@dataclass(frozen=True)
class PlannerOptions:
    """What the engine on this machine can do, and what the user asked for."""

    precision: str = "auto"  # "auto" (bf16 when it fits, else FP8), "bf16", "fp8"
    fp8_capable: bool = True  # the card runs FP8 matmuls (compute capability >= 8.9)
    encoders_on_gpu: bool = True  # T5 + wav2vec2 may share this GPU (when False they stay on CPU)
    allow_single_kv_set: bool = True  # one KV cache set shared by the steps instead of one per step
    allow_fp8_kv: bool = False  # the engine can keep the KV cache in e4m3
    allow_kv_offload: bool = False  # the engine can keep the KV cache in pinned host memory
    vae_on_gpu: bool = True  # the decoder (VAE) shares this GPU
    light_decoder: bool = False  # the decoder runs the light latent decoder instead of the VAE's
    encoders_movable: bool = True  # False: the user placed the encoders (--encoder-device); never moved to the CPU

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp8"):
            raise InvalidInput(f"precision must be auto, bf16 or fp8, got {self.precision!r}")


@dataclass(frozen=True)
class MemoryPlan:
    """The choices, and the bytes each part takes on the GPU."""

    fp8: bool
    encoder_device: str  # "cuda" (same GPU) or "cpu"
    kv_sets: int  # KV cache sets: sample_steps (one per step) or 1
    kv_dtype: str  # "bfloat16" or "float8_e4m3fn"
    kv_offload: bool
    parts: dict = field(default_factory=dict)  # name -> bytes
    available: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def headroom(self) -> int:
        return self.available - self.total

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items())
        return (
            f"{'FP8' if self.fp8 else 'bf16'} DiT, encoders on {self.encoder_device}, "
            f"KV {self.kv_sets} set(s) {self.kv_dtype}{' offloaded' if self.kv_offload else ''}: "
            f"{self.total / GB:.1f} GB of {self.available / GB:.1f} GB ({parts})"
        )


def dit_bytes(fp8: bool) -> int:
    if not fp8:
        return DIT_PARAMS * 2
    # FP8 weights + a float32 scale per output row (negligible) + the rest in bf16
    return DIT_FP8_PARAMS + (DIT_PARAMS - DIT_FP8_PARAMS) * 2


def kv_set_bytes(req: MemoryRequest, dtype_bytes: int) -> int:
    """One cache set: keys + values of every layer over the window (a ring buffer)."""
    return DIT.num_layers * 2 * req.window_latent_frames * req.tokens_per_latent_frame * DIT.dim * dtype_bytes


def sink_bytes(req: MemoryRequest, dtype_bytes: int) -> int:
    """Keys + values of one copy of the sink (reference + motion tokens)."""
    return DIT.num_layers * 2 * req.sink_tokens * DIT.dim * dtype_bytes


def kv_cache_bytes(req: MemoryRequest, cache_sets: int, dtype_bytes: int) -> int:
    """The whole cache as services/generator/kv_cache.py lays it out: the rings, one sink copy per
    two sets (each sits between two rings so attention reads one slice), and the reference
    tokens' unrotated keys. Buffers are all alike, so an odd number of sets (above one) allocates
    the last buffer's second ring too, unused (tests/test_memory_planner.py holds this to the layout)."""
    buffers = (cache_sets + 1) // 2
    rings = 2 * buffers if cache_sets > 1 else 1
    ref_keys = DIT.num_layers * req.tokens_per_latent_frame * DIT.dim * dtype_bytes
    return kv_set_bytes(req, dtype_bytes) * rings + sink_bytes(req, dtype_bytes) * buffers + ref_keys


def text_context_bytes() -> int:
    """The prompt's keys and values in every layer (bf16, 512 tokens), held by a session: run F
    measured +0.40 GiB at 704*384 and +0.43 at 384*256 over run D, which computed them per step."""
    return DIT.num_layers * 2 * DIT.text_len * DIT.dim * 2


def activation_bytes(req: MemoryRequest) -> int:
    """Peak transient memory of a block's forward over weights + cache: cuBLAS/cuDNN workspaces (a
    constant ~0.7 GB) plus the FFN hidden state and float32 residual copies of the block's tokens.
    Measured on an H100: 0.70-0.76 GiB at both 704*384 and 384*256 (docs/performance.md)."""
    block = LATENT_FRAMES_PER_BLOCK * req.tokens_per_latent_frame
    return int(WORKSPACE_BYTES + block * (DIT.ffn_dim * 2 * 2 + DIT.dim * 4 * 2))


def vae_bytes(req: MemoryRequest, light: bool = False) -> int:
    """VAE weights (bf16) + streaming decode of one block at full size: measured 3.17 GiB peak at
    704*384 on an H100 (docs/performance.md), i.e. about 11.7 kB per output pixel. light: the
    light decoder's instead (LIGHT_DECODE_BYTES_PER_PIXEL)."""
    if light:
        return LIGHT_DECODER_PARAMS * 2 + req.width * req.height * LIGHT_DECODE_BYTES_PER_PIXEL
    return VAE_PARAMS * 2 + req.width * req.height * VAE_DECODE_BYTES_PER_PIXEL


def video_bytes(req: MemoryRequest) -> int:
    """Offline decode keeps every frame (bf16 RGB) until the end."""
    if req.online_decode:
        return 0
    frames = req.num_blocks * LATENT_FRAMES_PER_BLOCK * VAE_TIME_STRIDE
    return frames * req.width * req.height * 3 * 2


def encoder_bytes() -> int:
    """umT5 + wav2vec2 weights (bf16) and what encoding a request leaves in the caching allocator
    (the image's VAE encode, T5 and wav2vec2 activations): on an H100 the process had 36.7-37.4 GiB
    in use before its first KV cache where weights and context account for 30.5 (mesh runs of
    2026-11-25, docs/performance.md)."""
    return (T5_PARAMS + WAV2VEC2_PARAMS) * 2 + ENCODER_TRANSIENT_BYTES


def estimate(
    req: MemoryRequest,
    *,
    fp8: bool,
    encoder_device: str,
    kv_sets: int,
    kv_dtype: str = "bfloat16",
    kv_offload: bool = False,
    vae_on_gpu: bool = True,
    light_decoder: bool = False,
    available: int = 0,
) -> MemoryPlan:
    nbytes = 1 if kv_dtype == "float8_e4m3fn" else 2
    kv = kv_cache_bytes(req, kv_sets, nbytes)
    parts = {
        "dit": dit_bytes(fp8),
        # offloaded: two layers' worth stay on the GPU (the one in use and the next one in flight)
        "kv_cache": kv * 2 // DIT.num_layers if kv_offload else kv,
        "text": text_context_bytes(),
        "activations": activation_bytes(req),
        # the decoder runs beside the generator (next block's DiT while this block decodes)
        "vae": vae_bytes(req, light_decoder) if vae_on_gpu else 0,
        "encoders": encoder_bytes() if encoder_device == "cuda" else 0,
        "video": video_bytes(req),
    }
    parts["overhead"] = CONTEXT_BYTES + FRAGMENTATION * sum(parts.values())
    parts = {k: int(v) for k, v in parts.items() if v}
    return MemoryPlan(fp8, encoder_device, kv_sets, kv_dtype, kv_offload, parts, int(available))


def candidates(req: MemoryRequest, opts: PlannerOptions):
    """Configurations from fastest / most faithful to leanest, in the order they are tried."""
    weights = {"bf16": [False], "fp8": [True], "auto": [False, True]}[opts.precision]
    if not opts.fp8_capable:
        weights = [w for w in weights if not w]
    encoders = (["cuda", "cpu"] if opts.encoders_movable else ["cuda"]) if opts.encoders_on_gpu else ["cpu"]
    kv_sets = [req.sample_steps] + ([1] if opts.allow_single_kv_set and req.sample_steps > 1 else [])
    kv_dtypes = ["bfloat16"] + (["float8_e4m3fn"] if opts.allow_fp8_kv else [])
    offload = [False] + ([True] if opts.allow_kv_offload else [])
    # Cheapest sacrifice first: FP8 weights (faster; 3% latent error after 4 steps on random
    # weights), an FP8 cache (same speed, +0.01 points), then the encoders to the CPU (seconds
    # more before the first fragment), then one cache set (a fifth forward per block, -20%), and
    # offload last (PCIe-bound). All measured on an H100: docs/performance.md.
    for off in offload:
        for ks in kv_sets:
            for enc in encoders:
                for kd in kv_dtypes:
                    for w in weights:
                        yield dict(
                            fp8=w,
                            encoder_device=enc,
                            kv_sets=ks,
                            kv_dtype=kd,
                            kv_offload=off,
                            vae_on_gpu=opts.vae_on_gpu,
                            light_decoder=opts.light_decoder,
                        )


def plan_memory(req: MemoryRequest, available: int, opts: PlannerOptions = PlannerOptions()) -> MemoryPlan:
    """The first configuration that fits in `available` bytes, or ResourceExhausted that says how
    much is needed, how much there is, and what to lower (with the numbers for each rung)."""
    if opts.precision == "fp8" and not opts.fp8_capable:
        raise InvalidInput("FP8 was asked for but this GPU has no FP8 matmuls (needs compute capability >= 8.9)")
    leanest = None
    for c in candidates(req, opts):
        p = estimate(req, available=available, **c)
        if p.total <= available:
            return p
        leanest = p if leanest is None or p.total < leanest.total else leanest
    raise ResourceExhausted(_refusal(req, available, opts, leanest))


def session_bytes(req: MemoryRequest, cache_sets: int, kv_dtype_bytes: int = 2) -> dict[str, int]:
    """What opening one session adds on a GPU that already holds the model: its KV cache (ring sets
    + sink) and one block's transient memory."""
    return {
        "kv_cache": kv_cache_bytes(req, cache_sets, kv_dtype_bytes),
        "text": text_context_bytes(),
        "activations": activation_bytes(req),
    }


def check_session_memory(req: MemoryRequest, cache_sets: int, available: int, kv_dtype_bytes: int = 2) -> None:
    """Raise ResourceExhausted before a session allocates its cache when `available` bytes (free on
    the GPU, e.g. gpu_available_bytes()) cannot hold it; the message says what would fit."""
    if sum(session_bytes(req, cache_sets, kv_dtype_bytes).values()) > available:
        raise ResourceExhausted(
            _session_shortage(req, cache_sets, available, kv_dtype_bytes, "not enough free GPU memory to open")
        )


def session_oom_error(
    req: MemoryRequest, cache_sets: int, available: int, kv_dtype_bytes: int = 2, cause: BaseException | None = None
) -> ResourceExhausted:
    """The ResourceExhausted of a session that ran out of memory inside the model although it was
    admitted (the model is loaded: only the session's own memory counts; the other services on
    the GPU or other sessions took the rest): what it needs, what is free now, the ladder, CUDA's words."""
    msg = _session_shortage(req, cache_sets, available, kv_dtype_bytes, "ran out of GPU memory in")
    if cause is not None:
        msg += f"\n(CUDA: {str(cause).splitlines()[0][:200]})"
    return ResourceExhausted(msg)


def _session_shortage(req: MemoryRequest, cache_sets: int, available: int, kv_dtype_bytes: int, what: str) -> str:
    need = session_bytes(req, cache_sets, kv_dtype_bytes)
    total = sum(need.values())
    kv = "FP8" if kv_dtype_bytes == 1 else "bf16"
    lines = [
        f"{what} a {req.size} session (infer_frames {req.infer_frames}, {cache_sets} {kv} KV cache set(s)): "
        f"needs {total / GB:.1f} GB (KV cache {need['kv_cache'] / GB:.1f}, prompt {need['text'] / GB:.1f}, "
        f"activations {need['activations'] / GB:.1f}), {available / GB:.1f} GB free. Try:"
    ]
    ladder = []
    if cache_sets > 1:
        ladder.append(("one KV cache set (--cache-sets 1)", req, 1))
    if req.width * req.height > 384 * 256:
        ladder.append(("a smaller size, 384*256", replace(req, width=384, height=256), cache_sets))
    if req.infer_frames > 32:
        ladder.append(("infer_frames 32", replace(req, infer_frames=32), cache_sets))
    for rung, r, sets in ladder:
        n = sum(session_bytes(r, sets, kv_dtype_bytes).values())
        lines.append(f"  - {rung}: needs {n / GB:.1f} GB ({'fits' if n <= available else 'still too much'})")
    lines.append("  - fewer sessions at once on this GPU (each holds its own cache)")
    return "\n".join(lines)


def _refusal(req: MemoryRequest, available: int, opts: PlannerOptions, leanest: MemoryPlan) -> str:
    lines = [
        f"not enough GPU memory for {req.size}, infer_frames {req.infer_frames}, "
        f"{req.sample_steps} steps: needs {leanest.total / GB:.1f} GB at least "
        f"({leanest.describe()}), {available / GB:.1f} GB available. Try:"
    ]
    ladder = []
    if (req.width, req.height) != (384, 256) and req.width * req.height > 384 * 256:
        ladder.append(("a smaller size, 384*256", replace(req, width=384, height=256)))
    if req.infer_frames > 32:
        ladder.append(("infer_frames 32", replace(req, infer_frames=32)))
    if not req.online_decode:
        ladder.append(("online decode", replace(req, online_decode=True)))
    if not req.online_decode and req.num_blocks > 1:
        ladder.append(("fewer clips", replace(req, num_blocks=max(1, req.num_blocks // 2))))
    for what, r in ladder:
        need = min(estimate(r, available=available, **c).total for c in candidates(r, opts))
        verdict = "fits" if need <= available else "still too much"
        lines.append(f"  - {what}: needs {need / GB:.1f} GB ({verdict})")
    if opts.precision == "bf16" and opts.fp8_capable:
        lines.append(
            f"  - FP8 weights (--fp8): the DiT drops from {dit_bytes(False) / GB:.1f} to {dit_bytes(True) / GB:.1f} GB"
        )
    return "\n".join(lines)


def gpu_available_bytes(device_index: int = 0) -> int:
    """Free memory of the GPU as the driver reports it (nvidia-ml-py), capped by this process's
    torch memory fraction when one is set; memory torch already caches counts as available."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_index))
            free, total = int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (containers without the library): ask the CUDA runtime
        free, total = torch.cuda.mem_get_info(device_index)
    reserved = torch.cuda.memory_reserved(device_index) if torch.cuda.is_initialized() else 0
    allocated = torch.cuda.memory_allocated(device_index) if torch.cuda.is_initialized() else 0
    free += reserved - allocated
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None and torch.cuda.is_initialized():
        cap = int(getter(device_index) * total) - allocated
        free = min(free, cap)
    return max(0, free)


def planning_requests() -> list[MemoryRequest]:
    """What a server plans for at start-up, largest first: the hd, standard and preview presets
    (preview's 32 frames per clip run as 36: whole blocks)."""
    from avatar.presets import JOB_PRESETS, whole_blocks

    return [
        MemoryRequest(
            *JOB_PRESETS[name].size,
            infer_frames=whole_blocks(JOB_PRESETS[name].infer_frames),
            sample_steps=JOB_PRESETS[name].sample_steps,
        )
        for name in ("hd", "standard", "preview")
    ]


def apply_plan(spec, plan: MemoryPlan):
    """The ModelSpec that runs a MemoryPlan: FP8 weights, encoder placement, cache sets and dtype."""
    options = spec.generator_options
    if plan.kv_sets == 1:
        options = replace(options, cache_sets=1)
    if plan.kv_dtype != "bfloat16":
        options = replace(options, kv_dtype=plan.kv_dtype)
    encoder_device = "cpu" if plan.encoder_device == "cpu" else spec.encoder_device
    return spec.with_(fp8=plan.fp8, encoder_device=encoder_device, generator_options=options)


def plan_for_device(spec, available: int | None = None, fp8_capable: bool | None = None):
    """(ModelSpec, MemoryPlan, MemoryRequest) for the GPU the spec names, from its free memory,
    before any weight is loaded: for the largest preset that can fit, bf16 with everything on the
    GPU when it fits, else down the ladder (encoders to CPU, FP8 weights, one cache set, FP8 cache).
    Larger jobs are then refused per session with the numbers; ResourceExhausted when not even
    the preview preset fits."""
    import torch

    index = torch.device(spec.device).index or 0
    if available is None:
        available = gpu_available_bytes(index)
    if fp8_capable is None:
        fp8_capable = torch.cuda.get_device_capability(index) >= (8, 9)
    # --encoder-device / --decoder-device on another device: not this GPU's memory, and kept there
    encoders_here = not _elsewhere(spec.encoder_device, spec.device)
    vae_here = not _elsewhere(spec.decoder_device, spec.device)
    opts = PlannerOptions(
        fp8_capable=fp8_capable,
        allow_fp8_kv=True,
        encoders_on_gpu=encoders_here,
        vae_on_gpu=vae_here,
        encoders_movable=spec.encoder_device is None,
        light_decoder=spec.decoder_options.is_light,
    )
    requests = planning_requests()
    for req in requests:
        try:
            plan = plan_memory(req, available, opts)
        except ResourceExhausted:
            if req is requests[-1]:
                raise
            continue
        planned = apply_plan(spec, plan)
        return (
            (planned if spec.encoder_device is None else planned.with_(encoder_device=spec.encoder_device)),
            plan,
            req,
        )


def _elsewhere(device: str | None, main: str) -> bool:
    """Whether `device` is set and names another device than `main` ("cuda" is cuda:0)."""
    if device is None:
        return False

    def norm(d: str) -> str:
        return "cuda:0" if d == "cuda" else d

    return norm(device) != norm(main)


# --- per rank, for the multi-GPU layouts (docs/operations.md, "Memory per rank") ------------------

LAYOUTS = ("single", "tpp", "fsdp", "ulysses")
COLLECTIVE_BYTES = (
    0.5 * GB
)  # NCCL's channels and buffers on a rank of a group: an allowance until bench_shard measures it


def dit_unit_params() -> dict[str, int]:
    """Parameters of the DiT's FSDP2 units (services/generator/distributed/sharding.py), from its
    config: a transformer block (its text k/v projections included: units of their own, in
    `text_projections`), an audio injector (cross-attention + AdaLN), and the root: what is left
    (embeddings, head, audio encoder, FramePack), kept whole on every rank."""
    d, f = DIT.dim, DIT.ffn_dim
    block = 8 * d * d + 2 * d * f + 21 * d + f  # self- and cross-attention (+ qk norms), norm3, FFN, modulation
    injector = (4 * d * d + 6 * d) + (2 * d * d + 2 * d)
    blocks, injectors = DIT.num_layers * block, len(DIT.audio_inject_layers) * injector
    return {
        "block": block,
        "block_linear_weights": 8 * d * d + 2 * d * f,
        "text_projections": 2 * d * d + 3 * d,
        "injector": injector,
        "injector_linear_weights": 6 * d * d,
        "blocks": blocks,
        "injectors": injectors,
        "root": DIT_PARAMS - blocks - injectors,
    }


def _unit_bytes(params: int, linear_weights: int, fp8: bool) -> int:
    """bf16, or FP8 linear weights (1 byte) with the rest (biases, norms, modulation) in bf16."""
    return params * 2 - (linear_weights if fp8 else 0)


def sharded_dit_bytes(fp8: bool, shards: int) -> dict[str, int]:
    """One FSDP2 rank's weights: its 1/shards of the blocks and injectors, the whole root, and the
    units gathered at once while a block runs (this block, the next one prefetched, an injector)."""
    u = dit_unit_params()
    block = _unit_bytes(u["block"], u["block_linear_weights"], fp8)
    injector = _unit_bytes(u["injector"], u["injector_linear_weights"], fp8)
    sharded = DIT.num_layers * block + len(DIT.audio_inject_layers) * injector
    return {"shards": -(-sharded // shards), "root": u["root"] * 2, "gathered": 2 * block + injector}


def rank_bytes(
    req: MemoryRequest,
    layout: str,
    degree: int = 1,
    *,
    fp8: bool,
    kv_sets: int | None = None,
    kv_dtype: str = "bfloat16",
    vae_on_gpu: bool = False,
    encoders_on_gpu: bool = False,
) -> dict[str, int]:
    """Bytes one rank holds (the busiest: rank 0, with the VAE and encoders when they share it):

    - single: one GPU, the DiT and the session's cache (kv_sets: sample_steps or 1);
    - tpp: a full DiT per rank; each rank keeps only its steps' cache sets (steps / degree);
    - fsdp: 1/degree of the weights (sharded_dit_bytes), the whole cache on every rank;
    - ulysses: a full DiT per rank; the sequence, its attention heads and so the cache, the text
      keys/values and the block's activations split degree ways (estimated: not built)."""
    if layout not in LAYOUTS:
        raise InvalidInput(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if degree < 1 or (layout == "single" and degree != 1):
        raise InvalidInput(f"layout {layout} with degree {degree}")
    nbytes = 1 if kv_dtype == "float8_e4m3fn" else 2
    sets = req.sample_steps if kv_sets is None else kv_sets
    split = degree if layout == "ulysses" else 1
    if layout == "tpp":
        sets = -(-req.sample_steps // degree)  # its own steps' sets (no single shared set: each step has its own)
    if layout == "fsdp":
        weights = sharded_dit_bytes(fp8, degree)
        parts = {"dit_shards": weights["shards"], "dit_root": weights["root"], "dit_gathered": weights["gathered"]}
    else:
        parts = {"dit": dit_bytes(fp8)}
    transient = activation_bytes(req) - WORKSPACE_BYTES
    parts |= {
        "kv_cache": kv_cache_bytes(req, sets, nbytes) // split,
        "text": text_context_bytes() // split,
        "activations": WORKSPACE_BYTES + transient / split,
        "vae": vae_bytes(req) if vae_on_gpu else 0,
        "encoders": encoder_bytes() if encoders_on_gpu else 0,
        "collectives": COLLECTIVE_BYTES if layout != "single" else 0,
    }
    parts["overhead"] = CONTEXT_BYTES + FRAGMENTATION * sum(parts.values())
    return {k: int(v) for k, v in parts.items() if v}
