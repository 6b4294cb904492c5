"""Limits every service checks on what it receives: an internal service is reachable from the
cluster network, so none of them trusts the gateway to have checked (the gateway's planner
checks the same limits on the public request, with user-facing messages)."""

import math

from avatar.dit_config import MAX_SAMPLE_STEPS
from avatar.errors import InvalidInput
from avatar.media import MAX_SIZE_AREA
from avatar.presets import FPS, FRAMES_PER_BLOCK, LATENT_FRAMES_PER_BLOCK

MAX_PROMPT_CHARS = 4000  # umT5 reads 512 tokens; far longer text is a mistake or an attack
MAX_INFER_FRAMES = 1200
# The longest job any service runs: a live session (Converse) of 30 days, the limit of
# gateway.converse.MAX_SESSION_S (its frame count must fit an int32). Generate's jobs are far
# shorter (--max-audio-s, 600 s by default); 2^31-1 blocks are refused.
MAX_VIDEO_S = 30 * 24 * 3600
MAX_JOB_BLOCKS = math.ceil(MAX_VIDEO_S * FPS / FRAMES_PER_BLOCK)
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
MAX_AUDIO_RATE = 192_000


def check_prompt(prompt: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is too long: {len(prompt)} characters, the limit is {MAX_PROMPT_CHARS}")


def check_size(width: int, height: int, what: str = "job size") -> None:
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise InvalidInput(f"{what} must be positive multiples of {SIZE_MULTIPLE}, got {width}x{height}")
    if width * height > MAX_SIZE_AREA:
        raise InvalidInput(f"{what} {width}x{height} is over the largest area, {MAX_SIZE_AREA} pixels")


def check_job(job, *, sampling: bool = False, audio_rate: bool = False, open_ended: bool = False) -> None:
    """A JobSpec (avatar.v1) as the gateway's planner makes them: size, frame rate, block
    structure and length within bounds, so no service runs an unbounded job; with `sampling`
    also steps and clip length (the generator), with `audio_rate` the output audio (the decoder),
    with `open_ended` a job of no set length (num_blocks and total_frames 0: a live stream)."""
    check_size(job.width, job.height)
    if job.fps != FPS:
        raise InvalidInput(f"job fps must be {FPS}, got {job.fps}")
    if job.latent_frames_per_block != LATENT_FRAMES_PER_BLOCK:
        raise InvalidInput(
            f"latent_frames_per_block must be {LATENT_FRAMES_PER_BLOCK}, got {job.latent_frames_per_block}"
        )
    if sampling and not 1 <= job.sample_steps <= MAX_SAMPLE_STEPS:
        raise InvalidInput(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {job.sample_steps}")
    if sampling and not (0 < job.infer_frames <= MAX_INFER_FRAMES and job.infer_frames % FRAMES_PER_BLOCK == 0):
        raise InvalidInput(
            f"infer_frames must be a positive multiple of {FRAMES_PER_BLOCK} up to "
            f"{MAX_INFER_FRAMES}, got {job.infer_frames}"
        )
    if open_ended and job.num_blocks == 0 and job.total_frames == 0:
        pass  # a live stream (Converse): the decoder takes blocks until the stream ends
    # total_frames 0: whole blocks (avatar.jobs.Job)
    elif not 1 <= job.num_blocks <= MAX_JOB_BLOCKS:
        raise InvalidInput(
            f"num_blocks must be between 1 and {MAX_JOB_BLOCKS} ({MAX_VIDEO_S} s of video), got {job.num_blocks}"
        )
    if (
        job.total_frames
        and not (job.num_blocks - 1) * FRAMES_PER_BLOCK < job.total_frames <= job.num_blocks * FRAMES_PER_BLOCK
    ):
        raise InvalidInput(
            f"total_frames {job.total_frames} does not fit num_blocks {job.num_blocks} of {FRAMES_PER_BLOCK} frames"
        )
    if audio_rate and not 0 < job.audio_sample_rate <= MAX_AUDIO_RATE:
        raise InvalidInput(f"audio_sample_rate must be in 1..{MAX_AUDIO_RATE} Hz, got {job.audio_sample_rate}")
