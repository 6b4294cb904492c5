"""Live audio features: wav2vec2 over a sliding window with left context, one video block at a time.

Offline (`AudioEncoder.encode`) runs the model over the whole audio; a live session only knows the
audio up to the block being decided. Here every block of 12 video frames (7680 samples at 16 kHz
and 25 fps) is encoded together with up to `context_s` of the audio before it, and the block's
frames are taken from the right end of that window. The model is bidirectional, so a frame sees
less context than offline: the difference shrinks with the distance from the window's edges
(docs/model.md gives the measured figure). Video frame i reads the 30 Hz frame round(1.2 i) as
upstream, placed at 50 Hz position j * 5 / 3: the limit of upstream's align_corners scale
(t50 - 1) / (t30 - 1), which depends on the total length a live stream does not have.

Two things a window cannot know: the audio after it (the last ~0.16 s of a block read the right
edge; the caller passes what it already has queued as `lookahead`, 0.2 s removes the effect)
and the level of the whole recording, which wav2vec2's input normalisation uses offline: here
the mean and variance are running statistics of the stream so far, converging to the offline ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from avatar.errors import InvalidInput
from avatar.presets import ENCODER_AUDIO_RATE
from avatar.services.encoder.audio_encoder import (
    FEATURE_RATE,
    RESAMPLED_RATE,
    SAMPLES_PER_FRAME,
    WHISPER_WINDOW_S,
    AudioEncoder,
    frame_indices,
    lerp_frames,
)

WHISPER_SEGMENT = WHISPER_WINDOW_S * ENCODER_AUDIO_RATE  # samples
DEFAULT_CONTEXT_S = 3.84  # left context per window (8 blocks); longer gains < 0.1% (docs/model.md)
LOOKAHEAD_S = 0.2  # right context worth passing: past it the block's frames no longer change
MAX_LOOKAHEAD_S = 1.0


def feature_positions(first_frame: int, num_frames: int, fps: int) -> torch.Tensor:
    """50 Hz position (fractional) that video frame first_frame.. reads, [num_frames] float64."""
    j = torch.from_numpy(frame_indices(first_frame, num_frames, fps)).double()
    return j * (FEATURE_RATE / RESAMPLED_RATE)


def interpolate_frames(hidden: torch.Tensor, first_50hz: int, positions: torch.Tensor) -> torch.Tensor:
    """hidden [layers, T, dim] holding 50 Hz frames first_50hz.. -> [len(positions), layers, dim]
    float32 on hidden's device, linear between the two frames around each position (frames past
    the end are clamped)."""
    last = first_50hz + hidden.shape[1] - 1
    lo = positions.floor().long().clamp(first_50hz, last)
    hi = (lo + 1).clamp(max=last)
    lam = (positions - lo.double()).clamp(0, 1).float()
    return lerp_frames(hidden, lo - first_50hz, hi - first_50hz, lam).contiguous()


class StreamingAudioFeatures:
    """Feeds one stream's 16 kHz audio block by block: push(pcm of one block) -> its features
    [frames_per_block, layers + 1, hidden]. Keeps `context_s` of past audio, nothing more."""

    def __init__(self, encoder: AudioEncoder, fps: int, frames_per_block: int, context_s: float = DEFAULT_CONTEXT_S):
        if fps <= 0 or frames_per_block <= 0:
            raise InvalidInput(f"bad audio framing: fps {fps}, frames per block {frames_per_block}")
        block = frames_per_block * ENCODER_AUDIO_RATE / fps
        if block != int(block) or int(block) % SAMPLES_PER_FRAME:
            raise InvalidInput(
                f"a block of {frames_per_block} frames at {fps} fps is {block} samples at 16 kHz; "
                f"it must be a whole multiple of {SAMPLES_PER_FRAME}"
            )
        self.encoder, self.fps, self.frames_per_block = encoder, fps, frames_per_block
        self.block_samples = int(block)
        # whole blocks of context, so every window starts on a 50 Hz frame boundary
        self.context_blocks = max(0, round(context_s * ENCODER_AUDIO_RATE / self.block_samples))
        if encoder.backend == "whisper":  # its context is the 30 s segment a block is in, as offline
            self.context_blocks = max(self.context_blocks, math.ceil(WHISPER_SEGMENT / self.block_samples) + 1)
        self._history: list[np.ndarray] = []  # the last context_blocks blocks
        self._count, self._sum, self._sum_sq = 0, 0.0, 0.0  # running input statistics
        self.blocks = 0

    @property
    def context_s(self) -> float:
        return self.context_blocks * self.block_samples / ENCODER_AUDIO_RATE

    def push(self, pcm_16k: np.ndarray, lookahead: np.ndarray | None = None) -> torch.Tensor:
        """Features of the next block from its float32 mono samples (exactly one block);
        `lookahead`: samples known to follow it (right context only, up to MAX_LOOKAHEAD_S)."""
        pcm = _check_block(pcm_16k, "block audio")
        if len(pcm) != self.block_samples:
            raise InvalidInput(f"a block of audio must be [{self.block_samples}] samples at 16 kHz, got [{len(pcm)}]")
        ahead = _check_block(lookahead if lookahead is not None else np.zeros(0, np.float32), "lookahead")
        if len(ahead) > MAX_LOOKAHEAD_S * ENCODER_AUDIO_RATE:
            raise InvalidInput(f"lookahead of {len(ahead)} samples is over {MAX_LOOKAHEAD_S} s")
        self._count += len(pcm)
        self._sum += float(pcm.sum(dtype=np.float64))
        self._sum_sq += float(np.square(pcm, dtype=np.float64).sum())
        window = np.concatenate([*self._history, pcm, ahead])
        first_sample = (self.blocks - len(self._history)) * self.block_samples
        positions = feature_positions(self.blocks * self.frames_per_block, self.frames_per_block, self.fps)
        if self.encoder.backend == "whisper":
            hidden, first_50hz = self._whisper_segments(window, first_sample, positions)
        else:
            hidden, first_50hz = self._hidden_states(window), first_sample // SAMPLES_PER_FRAME
        out = interpolate_frames(hidden, first_50hz, positions).cpu()  # gathered on the model's device
        self._history.append(pcm.copy())
        del self._history[: max(0, len(self._history) - self.context_blocks)]
        self.blocks += 1
        return out

    def _whisper_segments(self, window: np.ndarray, first_sample: int, positions: torch.Tensor):
        """Whisper adds absolute position embeddings over fixed 30 s segments, so a frame's features
        depend on where it sits in its segment: encode each segment the block's frames read from
        its start (kept as context) to what is known, as the offline pass encodes the whole segment.
        Returns (hidden states [layers + 1, T, hidden], their first 50 Hz frame)."""
        lo = int(positions.min().floor()) * SAMPLES_PER_FRAME
        hi = (int(positions.max().ceil()) + 1) * SAMPLES_PER_FRAME
        end = first_sample + len(window)
        first_segment = lo // WHISPER_SEGMENT
        parts = []
        for k in range(first_segment, (min(hi, end) - 1) // WHISPER_SEGMENT + 1):
            a, b = max(k * WHISPER_SEGMENT, first_sample), min((k + 1) * WHISPER_SEGMENT, end)
            parts.append(self.encoder.device_hidden_states(window[a - first_sample : b - first_sample]))
        return torch.cat(parts, dim=1), max(first_segment * WHISPER_SEGMENT, first_sample) // SAMPLES_PER_FRAME

    @torch.no_grad()
    def _hidden_states(self, window: np.ndarray) -> torch.Tensor:
        enc = self.encoder
        if enc.backend != "wav2vec2" or not getattr(enc.feature_extractor, "do_normalize", False):
            return enc.device_hidden_states(window)
        # wav2vec2's extractor normalises by the statistics of what it is given: the whole file
        # offline; here the stream's running statistics stand in for them (not the window's).
        mean = self._sum / self._count
        var = max(self._sum_sq / self._count - mean * mean, 0.0)
        values = torch.from_numpy((window - mean) / np.sqrt(var + 1e-7)).float()
        out = enc.model.wav2vec2(values[None].to(enc.device, enc.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states)


def _check_block(pcm, what: str) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim != 1 or not np.issubdtype(pcm.dtype, np.floating):
        raise InvalidInput(f"{what} must be mono float samples, got {pcm.dtype} {list(pcm.shape)}")
    if not np.isfinite(pcm).all():
        raise InvalidInput(f"{what} holds NaN or infinite samples")
    return pcm.astype(np.float32, copy=False)


def offline_reference(encoder: AudioEncoder, pcm_16k: np.ndarray, fps: int, frames_per_block: int) -> torch.Tensor:
    """What StreamingAudioFeatures would give with unlimited context: one pass over the whole
    audio, the same frame positions. [whole blocks x frames_per_block, layers + 1, hidden]."""
    hidden = encoder.hidden_states(np.asarray(pcm_16k, np.float32))
    block = frames_per_block * ENCODER_AUDIO_RATE // fps
    frames = len(pcm_16k) // block * frames_per_block
    return interpolate_frames(hidden, 0, feature_positions(0, frames, fps))
