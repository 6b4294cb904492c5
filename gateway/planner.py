"""Request -> job: validates inputs, decodes media and plans the JobSpec every service follows."""

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from avatar import media
from avatar.dit_config import MAX_SAMPLE_STEPS
from avatar.errors import InvalidInput
from avatar.job_limits import MAX_INFER_FRAMES, MAX_PROMPT_CHARS  # the internal services' bounds too
from avatar.presets import (
    AUDIO_ENCODERS,
    DEFAULT_AUDIO_ENCODER,
    DEFAULT_JOB_PRESET,
    DEFAULT_SEED,
    ENCODER_AUDIO_RATE,
    FPS,
    FRAMES_PER_BLOCK,
    JOB_PRESETS,
    LATENT_FRAMES_PER_BLOCK,
    OUTPUT_AUDIO_RATE,
    ModelSpec,
    preset_area,
    whole_blocks,
)
from avatar.result_cache import ResultCache
from avatar.v1 import avatar_pb2, tensor_pb2

MIN_SIDE = 64  # FramePack's 4x motion projection is an 8x8-latent convolution


def plan_job(
    request: avatar_pb2.GenerateRequest,
    model: ModelSpec,
    audio_duration_s: float,
    image_size: tuple[int, int],
    request_id: str = "",
) -> tensor_pb2.JobSpec:
    """The job for a request, after defaults: size from the preset (or --size) with the image's
    aspect, one block per 12 frames of audio. Only the request's own num_clip caps the video (at
    num_clip clips of infer_frames frames): a preset never cuts the audio short."""
    preset_name = request.preset or DEFAULT_JOB_PRESET
    if preset_name not in JOB_PRESETS:
        raise InvalidInput(f"unknown preset {preset_name!r}: choose one of {', '.join(JOB_PRESETS)}")
    preset = JOB_PRESETS[preset_name]

    if request.num_clip < 0:
        raise InvalidInput(f"num_clip must be >= 0 (0: as many as the audio needs), got {request.num_clip}")
    if request.infer_frames < 0:
        raise InvalidInput(f"infer_frames must be positive (0: the preset's), got {request.infer_frames}")
    if request.infer_frames > MAX_INFER_FRAMES:
        raise InvalidInput(
            f"infer_frames {request.infer_frames} is too large: at most {MAX_INFER_FRAMES} "
            f"frames per clip (upstream uses 48 or 80)"
        )
    if request.audio_encoder and request.audio_encoder not in AUDIO_ENCODERS:
        raise InvalidInput(
            f"unknown audio_encoder {request.audio_encoder!r}: choose from {', '.join(AUDIO_ENCODERS)} "
            f"(empty: {DEFAULT_AUDIO_ENCODER})"
        )
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is too long: {len(request.prompt)} characters, the limit is {MAX_PROMPT_CHARS}")
    # A clip is whole causal blocks: 32 (preview) or upstream's 80 round up to 36 and 84 frames.
    infer_frames = whole_blocks(request.infer_frames or preset.infer_frames)
    sample_steps = request.sample_steps or preset.sample_steps
    if not 1 <= sample_steps <= MAX_SAMPLE_STEPS:
        raise InvalidInput(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {sample_steps}")

    area = media.parse_size(request.size) if request.size else preset_area(preset, model)
    width, height = media.plan_size(*image_size, *area, model.size_divisor)
    if min(width, height) < MIN_SIDE:
        raise InvalidInput(
            f"size {area[0]}*{area[1]} gives a {width}x{height} video for this image's aspect; "
            f"the model needs at least {MIN_SIDE} px on each side: choose a larger --size"
        )

    total_frames = round(audio_duration_s * FPS)
    if total_frames < 1:
        raise InvalidInput(
            f"the audio is too short ({audio_duration_s * 1000:.0f} ms): "
            f"it must last at least one video frame ({1000 / FPS:.0f} ms)"
        )
    if request.num_clip:
        total_frames = min(total_frames, request.num_clip * infer_frames)
    return tensor_pb2.JobSpec(
        width=width,
        height=height,
        fps=FPS,
        infer_frames=infer_frames,
        latent_frames_per_block=LATENT_FRAMES_PER_BLOCK,
        num_blocks=math.ceil(total_frames / FRAMES_PER_BLOCK),
        total_frames=total_frames,
        sample_steps=sample_steps,
        seed=request.seed if request.HasField("seed") else DEFAULT_SEED,
        model=model.name,
        audio_sample_rate=OUTPUT_AUDIO_RATE,
        request_id=request_id,
    )


@dataclass
class Plan:
    """A planned job with its decoded inputs."""

    job: tensor_pb2.JobSpec
    pixels: np.ndarray  # uint8 [height, width, 3], the portrait fitted to the job size
    pcm_16k: np.ndarray  # float32 mono at 16 kHz for the audio encoder, cut to the video length
    audio_duration_s: float  # of the input audio
    used_audio: np.ndarray  # float32 mono at audio_rate, the input cut to the video's length
    audio_rate: int

    @functools.cached_property
    def pcm_out(self) -> np.ndarray:
        """int16 mono at job.audio_sample_rate, exactly the video's length. Made on first use, not
        in prepare(): the encoders need only pcm_16k, and the muxer needs this one only once
        block 0 is decoded (the gateway makes it in a thread meanwhile, off the first
        fragment's path: 8 ms for 7 s of 16 kHz speech on a 2-core machine)."""
        n_out = self.job.total_frames * self.job.audio_sample_rate // self.job.fps
        out = media.resample(self.used_audio, self.audio_rate, self.job.audio_sample_rate)
        return media.to_pcm16(np.pad(out[:n_out], (0, max(0, n_out - len(out)))))

    @property
    def duration_s(self) -> float:
        return self.job.total_frames / self.job.fps

    @property
    def truncation(self) -> str:
        """Empty when the video covers the whole audio; else what cut it and how to get all of it."""
        if self.job.total_frames >= round(self.audio_duration_s * self.job.fps):
            return ""
        clips = self.job.total_frames // self.job.infer_frames
        return (
            f"num_clip {clips} x {self.job.infer_frames} frames cut the video to {self.duration_s:.2f} s of "
            f"the {self.audio_duration_s:.2f} s of audio; num_clip 0 renders all of it"
        )

    def sample_at(self, frame: int) -> int:
        """First output-audio sample of a video frame (exact at 48 kHz / 25 fps: 1920 per frame)."""
        return frame * self.job.audio_sample_rate // self.job.fps

    def kept_frames(self, index: int) -> int:
        """How many of block `index`'s frames the video keeps (the last block may keep fewer)."""
        first = index * FRAMES_PER_BLOCK
        if not 0 <= first < self.job.total_frames:
            raise ValueError(f"block {index} is outside the job's {self.job.num_blocks} blocks")
        return min(FRAMES_PER_BLOCK, self.job.total_frames - first)

    def block_audio(self, index: int) -> tuple[np.ndarray, int]:
        """PCM that plays during block `index`'s kept frames, and how many frames it keeps."""
        keep, first = self.kept_frames(index), index * FRAMES_PER_BLOCK
        return self.pcm_out[self.sample_at(first) : self.sample_at(first + keep)], keep


# A service speaking for one avatar gets the same image with every request, and decoding and
# fitting it again is on the first fragment's path (12 ms for a 704x384 PNG on a 2-core machine;
# a hash of its bytes, 0.3). Kept by the bytes' hash: the image's size, and its pixels fitted to
# each video size. Only images that decoded are kept, so a bad one is refused every time.
PORTRAIT_SIZES = ResultCache(16)
FITTED_PORTRAITS = ResultCache(16)


def prepare(
    request: avatar_pb2.GenerateRequest, model: ModelSpec, request_id: str = "", max_audio_s: float = media.MAX_AUDIO_S
) -> Plan:
    """Decodes and validates the request's image and audio, then plans the job."""
    digest = hashlib.sha256(request.image).digest()

    @functools.cache  # decoded at most once, and only when a cache misses
    def image():
        return media.load_image(request.image)

    image_size = PORTRAIT_SIZES.get_or_compute(digest, lambda: image().size)
    audio = media.decode_audio(request.audio, max_duration_s=max_audio_s)
    samples, rate = audio.samples, audio.sample_rate
    job = plan_job(request, model, audio.duration_s, image_size, request_id)
    fitted = FITTED_PORTRAITS.get_or_compute(
        (digest, job.width, job.height), lambda: media.fit_image(image(), job.width, job.height)
    )
    pixels = np.array(fitted)  # the plan's own and writable (torch.from_numpy warns otherwise)

    # Audio cut (or padded by < half a frame of silence, in pcm_out) to exactly the video's length.
    used = samples[: round(job.total_frames / job.fps * rate)]
    pcm_16k = media.resample(used, rate, ENCODER_AUDIO_RATE)
    return Plan(
        job=job,
        pixels=pixels,
        pcm_16k=pcm_16k.astype(np.float32),
        audio_duration_s=audio.duration_s,
        used_audio=used,
        audio_rate=rate,
    )
