"""Job presets (preview / standard / hd, as in the LiveAvatar article) and model presets."""

import re
from dataclasses import dataclass, replace

from avatar.errors import InvalidInput

FPS = 25  # LiveAvatar renders at 25 fps (Wan2.2-S2V upstream: 16)
LATENT_FRAMES_PER_BLOCK = 3  # one causal block = 3 latent frames
VAE_TIME_STRIDE = 4  # = 12 video frames per block
FRAMES_PER_BLOCK = LATENT_FRAMES_PER_BLOCK * VAE_TIME_STRIDE
DEFAULT_SEED = 420  # upstream --base_seed
OUTPUT_AUDIO_RATE = 48000  # Hz of the AAC track muxed into the video
ENCODER_AUDIO_RATE = 16000  # Hz wav2vec2 expects


def whole_blocks(frames: int) -> int:
    """`frames` rounded up to whole blocks, e.g. the preview preset's 32 frames per clip -> 36."""
    return -(-frames // FRAMES_PER_BLOCK) * FRAMES_PER_BLOCK


@dataclass(frozen=True)
class JobPreset:
    """Generation defaults a user picks by name. Sizes are pixel areas "W*H" as upstream."""

    name: str
    size: tuple[int, int]  # (width, height) area for s2v-14b
    num_clip: int
    sample_steps: int
    infer_frames: int
    online_decode: bool = True


JOB_PRESETS = {
    "preview": JobPreset("preview", (384, 256), num_clip=10, sample_steps=3, infer_frames=32),
    "standard": JobPreset("standard", (688, 368), num_clip=100, sample_steps=4, infer_frames=48),
    "hd": JobPreset("hd", (704, 384), num_clip=1000, sample_steps=4, infer_frames=48),
}
DEFAULT_JOB_PRESET = "preview"


KV_DTYPES = ("float8_e4m3fn",)
# --fp8-attention's kernels: cudnn and triton the same arithmetic, flashinfer FlashInfer's (docs/performance.md)
FP8_ATTENTION_KERNELS = ("cudnn", "triton", "flashinfer")
DEFAULT_FP8_ATTENTION_KERNEL = "cudnn"
AUDIO_ENCODERS = ("wav2vec2", "whisper")
DEFAULT_AUDIO_ENCODER = "wav2vec2"  # what the LiveAvatar checkpoint was trained with


@dataclass(frozen=True)
class GeneratorOptions:
    """How the generator runs the DiT: memory and speed trade-offs that leave the video unchanged
    (up to FP8 rounding). Read by the generator engine and the memory planner."""

    cache_sets: int | None = None  # 1: one KV set, refreshed by a clean pass per block; None: one per step
    kv_dtype: str | None = None  # "float8_e4m3fn": the KV cache in e4m3; None: the model's dtype
    cuda_graphs: bool | None = None  # replay steady-state steps from CUDA graphs; None: on for CUDA devices
    offload_text_projections: bool = False  # text k/v projections in pinned CPU memory (they run once per session)
    fp8_attention: bool = False  # self-attention with FP8 products over the FP8 cache (an approximation)
    fp8_attention_kernel: str = DEFAULT_FP8_ATTENTION_KERNEL  # its kernel: "cudnn", "triton" or "flashinfer"
    # residual + norm + modulation + FP8 quantisation in one Triton kernel (needs fp8); None: on with
    # fp8 where they run as measured (a CUDA GPU, bf16, CUDA graphs, no per-avatar LoRAs, not FSDP)
    fused_norms: bool | None = None

    def __post_init__(self):
        if self.cache_sets is not None and self.cache_sets != 1:
            raise InvalidInput(f"cache_sets must be 1 (or unset: one set per sampling step), got {self.cache_sets!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise InvalidInput(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or unset), got {self.kv_dtype!r}")
        if self.fp8_attention_kernel not in FP8_ATTENTION_KERNELS:
            kernels = ", ".join(FP8_ATTENTION_KERNELS)
            raise InvalidInput(f"fp8_attention_kernel must be one of {kernels}, got {self.fp8_attention_kernel!r}")
        if self.fp8_attention and self.kv_dtype != "float8_e4m3fn":
            raise InvalidInput("fp8_attention reads the KV cache as FP8: it needs kv_dtype float8_e4m3fn (--kv-fp8)")


@dataclass(frozen=True)
class EncoderOptions:
    """Which optional encoders the encoder service loads. wav2vec2 and the VAE reference latent
    are what the DiT was trained on; Whisper features and the CLIP embedding are options a
    request asks for, served only when loaded here."""

    audio_encoders: tuple[str, ...] = (DEFAULT_AUDIO_ENCODER,)  # loaded audio backends, e.g. ("wav2vec2", "whisper")
    whisper_dir: str | None = None  # WhisperModel folder (e.g. whisper-medium); None: random (tiny / random weights)
    clip_image: bool = False  # load a CLIPVisionModel for the portrait's identity embedding
    clip_dir: str | None = None  # its folder (e.g. clip-vit-large-patch14); None: random (tiny / random weights)

    def __post_init__(self):
        if not self.audio_encoders:
            raise InvalidInput(f"audio_encoders must name at least one of {', '.join(AUDIO_ENCODERS)}")
        unknown = [name for name in self.audio_encoders if name not in AUDIO_ENCODERS]
        if unknown:
            raise InvalidInput(f"unknown audio encoder {unknown[0]!r}: choose from {', '.join(AUDIO_ENCODERS)}")
        if len(set(self.audio_encoders)) != len(self.audio_encoders):
            raise InvalidInput(f"audio_encoders names one twice: {','.join(self.audio_encoders)}")
        if self.whisper_dir and "whisper" not in self.audio_encoders:
            raise InvalidInput("--whisper-dir is given but whisper is not loaded: add it to --audio-encoders")
        if self.clip_dir and not self.clip_image:
            raise InvalidInput("clip_dir is given but clip_image is off")


LATENT_DECODERS = ("full", "light")
DEFAULT_LATENT_DECODER = "full"  # the Wan2.1 VAE: what the checkpoint was trained and judged with


@dataclass(frozen=True)
class DecoderOptions:
    """Which latent decoder the decoder service runs: "full", the Wan2.1 VAE's decoder, or "light",
    TAEHV's tiny decoder for Wan 2.1 latents (taew2_1, an approximation: docs/performance.md,
    "Light decoder"). Both give the same frames per block, so the choice changes quality and
    speed, never the stream's shape."""

    kind: str = DEFAULT_LATENT_DECODER
    light_path: str | None = None  # taew2_1.pth / .safetensors; None: random (tiny / random weights)

    def __post_init__(self):
        if self.kind not in LATENT_DECODERS:
            raise InvalidInput(f"latent decoder must be one of {', '.join(LATENT_DECODERS)}, got {self.kind!r}")
        if self.light_path and self.kind != "light":
            raise InvalidInput(
                "--light-decoder-path is given but the latent decoder is not light: add --latent-decoder light"
            )

    @property
    def is_light(self) -> bool:
        return self.kind == "light"


LORA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a registered avatar LoRA's name (lora_id)


def check_lora_id(lora_id: str) -> str:
    """A request's lora_id: empty (the base model) or a name an avatar LoRA can be registered under."""
    if lora_id and not LORA_ID.match(lora_id):
        raise InvalidInput(
            f"lora_id {lora_id[:80]!r} cannot name an avatar LoRA: 1 to 64 letters, digits, '.', '_' or '-'"
        )
    return lora_id


DEFAULT_MAX_LORAS = 4  # per-avatar LoRAs a generator holds at once (about 1.35 GB each for the 14B in bf16)


@dataclass(frozen=True)
class ModelSpec:
    """Which model a service runs and how. Every service builds its part from this alone.

    name: "tiny" (same classes, small dims, random seeded weights: runs on CPU, renders noise)
          or "s2v-14b" (Wan2.2-S2V-14B + LiveAvatar LoRA from ckpt_dir / lora_path).
    """

    name: str = "tiny"
    ckpt_dir: str | None = None  # folder holding Wan2.2-S2V-14B/ layout files
    lora_path: str | None = None  # liveavatar.safetensors (or any PEFT LoRA for the DiT)
    random_weights: bool = False  # s2v-14b shapes with random values (benchmarks)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    encoder_device: str | None = None  # where T5 / wav2vec2 run; None: same as device
    decoder_device: str | None = None  # where the decoder's VAE runs (e.g. its own GPU); None: same as device
    dtype: str = "bfloat16"  # parameter/activation dtype on GPU; tiny on CPU uses float32
    fp8: bool = False  # FP8 linear layers in the DiT
    compile: bool = False  # torch.compile the DiT blocks
    seed: int = 0  # seed of random weights (tiny / random_weights)
    generator_options: GeneratorOptions = GeneratorOptions()
    encoder_options: EncoderOptions = EncoderOptions()
    decoder_options: DecoderOptions = DecoderOptions()
    # (name, path) of per-avatar LoRAs a request picks by lora_id, applied unmerged on top of the
    # base (services/generator/avatar_loras.py); () : none, the generator's forward is unchanged
    avatar_loras: tuple[tuple[str, str], ...] = ()
    max_loras: int = DEFAULT_MAX_LORAS  # avatar LoRAs held on the device at once (least recently used dropped)

    def __post_init__(self):
        names = [name for name, _ in self.avatar_loras]
        bad = next((n for n in names if not LORA_ID.match(n)), None)
        if bad is not None:
            raise InvalidInput(
                f"avatar LoRA name {bad[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidInput(f"avatar LoRA {twice[0]} is registered twice")
        if self.max_loras < 1:
            raise InvalidInput(f"--max-loras must be at least 1, got {self.max_loras}")
        if self.generator_options.fused_norms and not self.fp8:
            raise InvalidInput("--fused-norms writes the FP8 linears' inputs: it needs --fp8")
        if self.generator_options.fused_norms and self.avatar_loras:
            raise InvalidInput(
                "--fused-norms hands the linears FP8 inputs, which per-avatar LoRAs (--avatar-lora) cannot read"
            )
        # Weights from files never fall back to random ones: each optional encoder needs its folder.
        enc = self.encoder_options
        if self.from_files and "whisper" in enc.audio_encoders and not enc.whisper_dir:
            raise InvalidInput(
                "the whisper audio encoder needs --whisper-dir FOLDER (a WhisperModel checkpoint "
                "such as whisper-medium) when the weights come from --ckpt_dir"
            )
        if self.from_files and enc.clip_image and not enc.clip_dir:
            raise InvalidInput(
                "--clip-image needs a CLIPVisionModel folder (--clip-image FOLDER) when the weights "
                "come from --ckpt_dir"
            )
        if self.from_files and self.decoder_options.is_light and not self.decoder_options.light_path:
            raise InvalidInput(
                "--latent-decoder light needs --light-decoder-path FILE (taew2_1.pth from "
                "github.com/madebyollin/taehv) when the weights come from --ckpt_dir"
            )

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def from_files(self) -> bool:
        """Weights come from ckpt_dir (any preset's dims: tests load tiny checkpoints this way)."""
        return bool(self.ckpt_dir) and not self.random_weights

    @property
    def size_divisor(self) -> int:
        """Output sides are multiples of this: 64 upstream; 16 (VAE 8 x patch 2) for tiny."""
        return 16 if self.is_tiny else 64

    def describe(self) -> str:
        return self._describe_weights() + self._describe_decoder()

    def _describe_decoder(self) -> str:
        # said wherever the model is named (serve's banner, StreamHeader.model): never silent
        if not self.decoder_options.is_light:
            return ""
        source = self.decoder_options.light_path or "random weights"
        return f", light latent decoder (TAEHV taew2_1, {source})"

    def _describe_weights(self) -> str:
        if self.from_files:
            lora = f" + LoRA {self.lora_path}" if self.lora_path else ""
            return f"{self.name} from {self.ckpt_dir}{lora}"
        if self.is_tiny:
            return "tiny (random weights: the video is noise)"
        if self.random_weights:
            return "s2v-14b (random weights: for benchmarks, the video is noise)"
        return "s2v-14b (no --ckpt_dir given)"

    def with_(self, **kw) -> "ModelSpec":
        return replace(self, **kw)


MODEL_NAMES = ("tiny", "s2v-14b")
TINY_SIZE_SCALE = 4  # the tiny model renders each preset's area at 1/4 of each side


def preset_area(preset: JobPreset, model: ModelSpec) -> tuple[int, int]:
    """The (width, height) area a preset means for a model: tiny scales each side by 1/4."""
    w, h = preset.size
    if model.is_tiny:
        d = model.size_divisor
        return (max(d, round(w / TINY_SIZE_SCALE / d) * d), max(d, round(h / TINY_SIZE_SCALE / d) * d))
    return w, h


@dataclass(frozen=True)
class ModelDims:
    """Dimensions that cross service boundaries; each model file derives the rest itself."""

    text_dim: int  # T5 embedding width fed to the DiT's text_embedding
    audio_dim: int  # wav2vec2 hidden size
    audio_layers: int  # wav2vec2 hidden states used (embeddings + every layer)
    latent_channels: int = 16
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    patch: tuple[int, int, int] = (1, 2, 2)
    motion_frames: int = 73  # video frames of motion context (FramePack), = 19 latent frames
    text_len: int = 512  # most prompt tokens (T5 output rows) the DiT's text context holds


MODEL_DIMS = {
    "s2v-14b": ModelDims(text_dim=4096, audio_dim=1024, audio_layers=25),
    "tiny": ModelDims(text_dim=32, audio_dim=32, audio_layers=5, text_len=16),
}


def dims_of(model: ModelSpec) -> ModelDims:
    return MODEL_DIMS[model.name]
