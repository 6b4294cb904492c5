"""EncoderEngine: reference image -> VAE latents (+ CLIP identity embedding), prompt -> umT5 embeddings,
audio -> per-frame features (wav2vec2, or Whisper when loaded)."""

import hashlib
import logging
import time
from collections.abc import Iterator

import numpy as np
import torch

from avatar.cancellation import check_between_layers
from avatar.checkpoints import resolve_ckpt_dir
from avatar.errors import InvalidInput, WeightsError
from avatar.models.wan_vae import WanVAE
from avatar.presets import AUDIO_ENCODERS, DEFAULT_AUDIO_ENCODER, ModelSpec, dims_of
from avatar.result_cache import ResultCache
from avatar.services.encoder.audio_encoder import WAV2VEC2_LARGE, AudioEncoder
from avatar.services.encoder.text_encoder import UMT5_XXL, TextEncoder

log = logging.getLogger(__name__)

# Upstream (causal_s2v_pipeline.generate) feeds the reference image to the VAE as 5 identical
# frames and keeps the second latent; the motion context is those 5 frames repeated 73 times
# (365 frames), of which the FramePack motioner uses the last 19 latents.
REF_REPEAT = 5
CACHED_RESULTS = 16  # images and prompts remembered (a few MB each, host memory)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
)


class EncoderEngine:
    """Everything the generator needs before the first block, built from a ModelSpec alone.

    `ModelSpec.encoder_options` names the audio encoders to load (requests choose one of them) and
    whether the CLIP vision model is loaded for `clip_embedding`.
    """

    def __init__(self, model: ModelSpec):
        self.spec = model
        self.dims = dims_of(model)
        enc_device = torch.device(model.encoder_device or model.device)
        self.vae = WanVAE.from_spec(model)
        layout = resolve_ckpt_dir(model.ckpt_dir) if model.from_files else None
        if layout is not None:
            # upstream keeps the T5 in bf16 wherever it runs (11 GB)
            self.text = TextEncoder.from_upstream(
                layout.t5, layout.tokenizer, enc_device, torch.bfloat16, max_len=self.dims.text_len
            )
        elif model.is_tiny:
            self.text = TextEncoder.tiny(model.seed, enc_device)
        elif model.random_weights:
            self.text = TextEncoder.random(UMT5_XXL, model.seed, enc_device, torch.bfloat16, max_len=self.dims.text_len)
        self.audio_encoders = {
            backend: _load_audio_encoder(model, backend, layout, enc_device)
            for backend in model.encoder_options.audio_encoders
        }
        self._check_dims()
        # A cancelled or timed-out RPC stops this work within one layer (avatar.cancellation):
        # a portrait's encode takes 24-29 s on a CPU and must not outlive its request.
        for module in (self.vae.model.encoder, self.text.model, *(a.model for a in self.audio_encoders.values())):
            check_between_layers(module, depth=3)
        self._images, self._prompts, self._clip_embeddings = (ResultCache(CACHED_RESULTS) for _ in range(3))
        self._inputs_warm = False  # warm_up ran the text and audio encoders once
        self.clip = _load_clip(model, enc_device) if model.encoder_options.clip_image else None
        audio = ", ".join(f"{name} {a.dims.layers + 1}x{a.dims.hidden}" for name, a in self.audio_encoders.items())
        log.info(
            "encoder ready: %s; VAE on %s (%s), umT5 %dx%d and %s on %s%s",
            model.describe(),
            self.vae.device,
            str(self.vae.dtype).removeprefix("torch."),
            self.text.dims.layers,
            self.text.dims.dim,
            audio,
            enc_device,
            ", CLIP on" if self.clip else "",
        )

    def _check_dims(self) -> None:
        if self.text.dims.dim != self.dims.text_dim:
            raise WeightsError(f"text encoder width {self.text.dims.dim} != the model's text_dim {self.dims.text_dim}")
        for name, audio in self.audio_encoders.items():
            if (audio.dims.hidden, audio.dims.layers + 1) != (self.dims.audio_dim, self.dims.audio_layers):
                raise WeightsError(
                    f"{name} audio encoder gives {audio.dims.layers + 1} x {audio.dims.hidden} "
                    f"hidden states; the model needs {self.dims.audio_layers} x {self.dims.audio_dim}"
                )

    def warm_up(self, sizes: list[tuple[int, int]]) -> list[str]:
        """Encodes a grey portrait at each (width, height), and once a prompt and a second of
        silence with every loaded audio encoder, before the server reports SERVING: a model's first
        call pays one-time costs (kernel selection, allocator growth) that the first request would
        otherwise wait for (on an H200 the first new portrait took 1.58 s at 704*384 and the next
        size's 0.61 s; the first audio 741 ms, later ones 75-171). The portraits skip the result
        cache (no request sends that picture). One line per size, then one for text and audio."""
        lines = []
        for width, height in sizes:
            start = time.perf_counter()
            self._encode_image(np.full((height, width, 3), 128, np.uint8))
            lines.append(f"{width}*{height}: portrait in {time.perf_counter() - start:.2f} s")
        if not self._inputs_warm:
            self._inputs_warm = True
            start = time.perf_counter()
            self.encode_text("")
            for backend in self.audio_encoders:
                for _ in self.encode_audio(np.zeros(16000, np.float32), 25, 25, backend=backend):
                    pass
            names = "+".join(self.audio_encoders)
            lines.append(f"prompt and 1 s of audio ({names}) in {time.perf_counter() - start:.2f} s")
        return lines

    # -- image ---------------------------------------------------------------------------------

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H, W, 3] at job size -> ref_latent [16, 1, h, w] and the still motion latent
        [16, 1, h, w] (float32): a still portrait's motion context is one steady-state latent that
        stands for each of the 19 motion latent frames (the generator's servicer repeats it). The
        same pixels again come from a cache (the tensors are shared: do not modify them)."""
        pixels = np.ascontiguousarray(pixels)
        return self._images.get_or_compute(_pixels_key(pixels), lambda: self._encode_image(pixels))

    def _encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = _image_tensor(pixels, 16)  # VAE stride 8 x DiT patch 2
        # The reference: latent 1 of upstream's 5-frame still video. The motion context: the last
        # 19 latents of the 365-frame one, all past the encoder's transient (latents 73-91; it
        # settles by latent 29), so each is the still video's steady state, one encoder pass; sent
        # once, not 19 times (5.1 MB -> 270 KB at 704*384, on the first fragment's path twice).
        ref = self.vae.encode(image.expand(-1, -1, REF_REPEAT, -1, -1))[0, :, 1:2]
        motion = self.vae.encode_steady(image)[0]
        return ref.cpu(), motion.contiguous().cpu()

    def clip_embedding(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> the portrait's CLIP identity embedding, float32 [hidden] (the vision
        model's pooled class token, e.g. 1024 for ViT-L/14; compare two with cosine similarity).
        The DiT does not read it: the checkpoint was trained on the VAE reference latent."""
        if self.clip is None:
            raise InvalidInput("this encoder has no CLIP vision model loaded: start it with --clip-image")
        _image_tensor(pixels, 1)
        pixels = np.ascontiguousarray(pixels)
        return self._clip_embeddings.get_or_compute(_pixels_key(pixels), lambda: self._clip_embedding(pixels))

    def _clip_embedding(self, pixels: np.ndarray) -> torch.Tensor:
        model, processor = self.clip
        p = next(model.parameters())
        inputs = processor(images=pixels, return_tensors="pt")["pixel_values"].to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            return model(pixel_values=inputs).pooler_output[0].float().cpu()

    # -- text / audio --------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> torch.Tensor:
        """prompt -> [L, text_dim], L <= text_len (512; tiny: 16) real tokens, </s> included (cached
        by prompt like images)."""
        return self._prompts.get_or_compute(prompt.encode(), lambda: self.text.encode(prompt))

    def encode_audio(
        self,
        pcm_16k: np.ndarray,
        fps: int,
        total_frames: int,
        chunk_frames: int = 12,
        backend: str = DEFAULT_AUDIO_ENCODER,
        timings: dict | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """16 kHz mono float PCM -> (first_frame, features [n, audio_layers, audio_dim]) per chunk;
        frames past the audio are zeros. `backend`: one of the loaded audio encoders. `timings`
        gets the audio model's wall ms so far ("model_ms") and its windows ("windows")."""
        return self.audio_encoder(backend).encode(pcm_16k, fps, total_frames, chunk_frames, timings)

    def audio_encoder(self, backend: str = DEFAULT_AUDIO_ENCODER):
        """The loaded audio encoder named `backend`; InvalidInput naming the flag if it is not loaded."""
        if backend not in AUDIO_ENCODERS:
            raise InvalidInput(f"unknown audio encoder {backend!r}: choose from {', '.join(AUDIO_ENCODERS)}")
        if backend not in self.audio_encoders:
            loaded = ",".join(self.audio_encoders)
            raise InvalidInput(
                f"the {backend} audio encoder is not loaded (this encoder loads {loaded}): start it "
                f"with --audio-encoders {loaded},{backend}"
            )
        return self.audio_encoders[backend]


def _pixels_key(pixels: np.ndarray) -> bytes:
    return hashlib.sha256(repr((pixels.shape, pixels.dtype.str)).encode() + pixels.tobytes()).digest()


def _load_audio_encoder(spec: ModelSpec, backend: str, layout, device: torch.device) -> AudioEncoder:
    """A folder when there is one (the checkpoint's wav2vec2, --whisper-dir), else random weights:
    tiny, or the full size for --random-weights (whisper-medium has wav2vec2-large's 1024 x 25)."""
    dtype = torch.float32 if spec.is_tiny or device.type == "cpu" else getattr(torch, spec.dtype)
    if backend == "whisper":
        folder = spec.encoder_options.whisper_dir
    else:
        folder = layout.wav2vec2 if layout is not None else None
    if folder:
        return AudioEncoder.from_pretrained(folder, backend, device, dtype)
    if spec.is_tiny:
        return AudioEncoder.tiny(spec.seed, backend, device)
    return AudioEncoder.random(WAV2VEC2_LARGE, spec.seed, backend, device, dtype)


def _image_tensor(pixels: np.ndarray, divisor: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, 1, H, W] in [-1, 1] (upstream: ToTensor, then * 2 - 1)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidInput(
            f"image must be uint8 [H, W, 3], got {getattr(pixels, 'dtype', type(pixels))} "
            f"{list(getattr(pixels, 'shape', []))}"
        )
    h, w = pixels.shape[:2]
    if h % divisor or w % divisor or h == 0 or w == 0:
        raise InvalidInput(f"image sides must be positive multiples of {divisor}, got {w}x{h}")
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0  # a copy: input may be read-only
    return (x * 2.0 - 1.0)[None, :, None]


def _load_clip(spec: ModelSpec, device: torch.device):
    """(CLIPVisionModel, CLIPImageProcessor) from --clip-image FOLDER, else random: tiny, or
    ViT-L/14's shape for --random-weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:  # the PIL backend is the one that works without torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    source = spec.encoder_options.clip_dir
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, spec.dtype)
    if source is None:
        config = TINY_CLIP if spec.is_tiny else CLIP_VIT_L14
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = CLIPVisionModel(CLIPVisionConfig(**config))
        side = config["image_size"]
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return model.eval().to(device=device, dtype=torch.float32 if spec.is_tiny else dtype), processor
    try:
        model = CLIPVisionModel.from_pretrained(source, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise WeightsError(f"{source}: cannot load the CLIP vision model ({type(e).__name__}: {e})") from e
    return model.eval().to(device=device, dtype=dtype), processor
