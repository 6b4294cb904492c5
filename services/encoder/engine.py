"""EncoderEngine: reference image -> VAE latents, prompt -> umT5 embeddings, audio -> per-frame features."""
import collections
import hashlib
import logging
import threading
from typing import Iterator

import numpy as np
import torch

from avatar.cancellation import check_between_layers
from avatar.checkpoints import resolve_ckpt_dir
from avatar.errors import InvalidInput, WeightsError
from avatar.models.wan_vae import TIME_STRIDE, WanVAE
from avatar.presets import ModelSpec, dims_of
from avatar.services.encoder.audio_encoder import WAV2VEC2_LARGE, AudioEncoder
from avatar.services.encoder.text_encoder import UMT5_XXL, TextEncoder

log = logging.getLogger(__name__)

# Upstream (causal_s2v_pipeline.generate) feeds the reference image to the VAE as 5 identical
# frames and keeps the second latent; the motion context is those 5 frames repeated 73 times
# (365 frames), of which the FramePack motioner uses the last 19 latents.
REF_REPEAT = 5
CACHED_RESULTS = 16   # images and prompts remembered (a few MB each, host memory)


class _ResultCache:
    """The last few results of a deterministic encoder, by content. A service answering for one
    avatar sends the same portrait and often the same prompt with every request: on an H100 the
    portrait's VAE encode alone took 1.5 s of the 2.7 s to the first fragment."""

    def __init__(self, size: int = CACHED_RESULTS):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_compute(self, key: bytes, compute):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = compute()        # outside the lock: requests for other inputs are not held up
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class EncoderEngine:
    """Everything the generator needs before the first block, built from a ModelSpec alone.

    extra keys: "audio_backend" ("wav2vec2" or "whisper"), "audio_model_dir" (a transformers folder
    for the audio model; default: the checkpoint's wav2vec2 folder), "clip_image" (True for the
    tiny model, or a CLIPVisionModel folder) to enable `encode_image_clip`.
    """

    def __init__(self, model: ModelSpec):
        self.spec = model
        self.dims = dims_of(model)
        enc_device = torch.device(model.encoder_device or model.device)
        backend = model.extra.get("audio_backend", "wav2vec2")
        audio_dtype = torch.float32 if model.is_tiny or enc_device.type == "cpu" else getattr(torch, model.dtype)
        self.vae = WanVAE.from_spec(model)
        if model.from_files:
            layout = resolve_ckpt_dir(model.ckpt_dir)
            # upstream keeps the T5 in bf16 wherever it runs (11 GB)
            self.text = TextEncoder.from_upstream(layout.t5, layout.tokenizer, enc_device, torch.bfloat16,
                                                  max_len=self.dims.text_len)
            audio_dir = model.extra.get("audio_model_dir") or layout.wav2vec2
            self.audio = AudioEncoder.from_pretrained(audio_dir, backend, enc_device, audio_dtype)
        elif model.is_tiny:
            self.text = TextEncoder.tiny(model.seed, enc_device)
            self.audio = AudioEncoder.tiny(model.seed, backend, enc_device)
        elif model.random_weights:
            self.text = TextEncoder.random(UMT5_XXL, model.seed, enc_device, torch.bfloat16,
                                           max_len=self.dims.text_len)
            self.audio = AudioEncoder.random(WAV2VEC2_LARGE, model.seed, backend, enc_device, audio_dtype)
        self._check_dims()
        # A cancelled or timed-out RPC stops this work within one layer (avatar.cancellation):
        # a portrait's encode takes 24-29 s on a CPU and must not outlive its request.
        for module in (self.vae.model.encoder, self.text.model, self.audio.model):
            check_between_layers(module, depth=3)
        self._images, self._prompts = _ResultCache(), _ResultCache()
        self.clip = _load_clip(model, enc_device) if model.extra.get("clip_image") else None
        log.info("encoder ready: %s; VAE on %s (%s), umT5 %dx%d and %s %dx%d on %s%s", model.describe(),
                 self.vae.device, str(self.vae.dtype).removeprefix("torch."), self.text.dims.layers,
                 self.text.dims.dim, backend, self.audio.dims.layers + 1, self.audio.dims.hidden, enc_device,
                 ", CLIP on" if self.clip else "")

    def _check_dims(self) -> None:
        if self.text.dims.dim != self.dims.text_dim:
            raise WeightsError(f"text encoder width {self.text.dims.dim} != the model's text_dim {self.dims.text_dim}")
        if (self.audio.dims.hidden, self.audio.dims.layers + 1) != (self.dims.audio_dim, self.dims.audio_layers):
            raise WeightsError(f"audio encoder gives {self.audio.dims.layers + 1} x {self.audio.dims.hidden} "
                               f"hidden states; the model needs {self.dims.audio_layers} x {self.dims.audio_dim}")

    # -- image ---------------------------------------------------------------------------------

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H, W, 3] at job size -> ref_latent [16, 1, h, w], motion_latents [16, 19, h, w] (float32).
        The same pixels again come from a cache (the tensors are shared: do not modify them)."""
        pixels = np.ascontiguousarray(pixels)
        key = hashlib.sha256(repr((pixels.shape, pixels.dtype.str)).encode() + pixels.tobytes()).digest()
        return self._images.get_or_compute(key, lambda: self._encode_image(pixels))

    def _encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = _image_tensor(pixels, 16)   # VAE stride 8 x DiT patch 2
        lat_motion = (self.dims.motion_frames + TIME_STRIDE - 1) // TIME_STRIDE
        # One pass serves both: the VAE is causal, so the still video's latent 1 (frames 1-4) is
        # the reference latent of upstream's 5-frame video, and its last latents are the motion
        # context of the 365-frame one.
        still = self.vae.encode_still(image, REF_REPEAT * self.dims.motion_frames)[0]
        return still[:, 1:2].cpu(), still[:, -lat_motion:].cpu()

    def encode_image_clip(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> CLIP-ViT tokens [1 + patches, hidden] (penultimate layer, as Wan's i2v uses)."""
        if self.clip is None:
            raise InvalidInput("CLIP image embedding is off for this encoder (ModelSpec.extra['clip_image'])")
        _image_tensor(pixels, 1)
        model, processor = self.clip
        p = next(model.parameters())
        inputs = processor(images=pixels, return_tensors="pt")["pixel_values"].to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            out = model(pixel_values=inputs, output_hidden_states=True)
        return out.hidden_states[-2][0].float().cpu()

    # -- text / audio --------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> torch.Tensor:
        """prompt -> [L, text_dim], L <= text_len (512; tiny: 16) real tokens, </s> included (cached
        by prompt like images)."""
        return self._prompts.get_or_compute(prompt.encode(), lambda: self.text.encode(prompt))

    def encode_audio(self, pcm_16k: np.ndarray, fps: int, total_frames: int,
                     chunk_frames: int = 12) -> Iterator[tuple[int, torch.Tensor]]:
        """16 kHz mono float PCM -> (first_frame, features [n, audio_layers, audio_dim]) per chunk;
        frames past the audio are zeros."""
        return self.audio.encode(pcm_16k, fps, total_frames, chunk_frames)


def _image_tensor(pixels: np.ndarray, divisor: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, 1, H, W] in [-1, 1] (upstream: ToTensor, then * 2 - 1)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidInput(f"image must be uint8 [H, W, 3], got {getattr(pixels, 'dtype', type(pixels))} "
                           f"{list(getattr(pixels, 'shape', []))}")
    h, w = pixels.shape[:2]
    if h % divisor or w % divisor or h == 0 or w == 0:
        raise InvalidInput(f"image sides must be positive multiples of {divisor}, got {w}x{h}")
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0   # a copy: input may be read-only
    return (x * 2.0 - 1.0)[None, :, None]


def _load_clip(spec: ModelSpec, device: torch.device):
    """(CLIPVisionModel, CLIPImageProcessor): tiny random for the tiny preset, else from a folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    try:   # the PIL backend is the one that works without torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    source = spec.extra["clip_image"]
    if spec.is_tiny and source is True:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return model.eval().to(device), processor
    if not isinstance(source, str):
        raise WeightsError("extra['clip_image'] must name a CLIPVisionModel folder for this model")
    try:
        model = CLIPVisionModel.from_pretrained(source, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{source}: cannot load the CLIP vision model ({e})") from e
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, spec.dtype)
    return model.eval().to(device=device, dtype=dtype), processor
