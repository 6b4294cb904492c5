"""Audio features for the DiT: every hidden state of wav2vec2 (or Whisper), resampled and bucketed per video frame.

The resampling is upstream's (Wan2.2-S2V `audio_encoder.py`): the 50 Hz hidden states are linearly
interpolated (align_corners=True) to 30 Hz, then video frame i takes the 30 Hz frame
round(i * 30 / fps) (numpy's round-half-to-even); frames past the end of the audio are zeros.
At LiveAvatar's 25 fps the indices run 0, 1, 2, 4, 5, 6, 7, 8, 10, ...

Upstream runs wav2vec2 over the whole audio at once, so memory grows with its square. Up to
`window_s` (60 s) we do the same (identical features); longer audio is encoded in windows with
`context_s` of audio on each side that is discarded, and features stream out while later windows
are still to come, so hours of audio need the memory of one window.
"""

import dataclasses
import pathlib
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatar.errors import InvalidInput, WeightsError
from avatar.presets import ENCODER_AUDIO_RATE, MODEL_DIMS

FEATURE_RATE = 50  # hidden-state frames per second (320-sample stride at 16 kHz)
RESAMPLED_RATE = 30  # upstream's intermediate rate ("video_rate")
BACKENDS = ("wav2vec2", "whisper")
WHISPER_WINDOW_S = 30  # Whisper's encoder sees fixed 30 s windows
SAMPLES_PER_FRAME = ENCODER_AUDIO_RATE // FEATURE_RATE  # 320


def resample_features(z: torch.Tensor) -> torch.Tensor:
    """[layers, T50, dim] at 50 Hz -> [layers, int(T50 * 30 / 50), dim] at 30 Hz, float32."""
    n = int(z.shape[1] / FEATURE_RATE * RESAMPLED_RATE)
    if n == 0:
        return z.new_zeros((z.shape[0], 0, z.shape[2]), dtype=torch.float32)
    z = z.float().transpose(1, 2)
    return F.interpolate(z, size=n, mode="linear", align_corners=True).transpose(1, 2)


def frame_indices(first_frame: int, num_frames: int, fps: int) -> np.ndarray:
    """30 Hz feature index of each video frame (upstream's get_sample_indices with fixed_start=0)."""
    t = np.arange(first_frame, first_frame + num_frames, dtype=np.float64) / fps
    return np.round(t * RESAMPLED_RATE).astype(np.int64)


def bucket_features(z30: torch.Tensor, first_frame: int, num_frames: int, fps: int) -> torch.Tensor:
    """[layers, T30, dim] -> [num_frames, layers, dim]: one 30 Hz frame per video frame, zeros past the end."""
    idx = torch.from_numpy(frame_indices(first_frame, num_frames, fps))
    out = z30.new_zeros((num_frames, z30.shape[0], z30.shape[2]))
    valid = idx < z30.shape[1]
    out[valid] = z30[:, idx[valid]].transpose(0, 1)
    return out


def lerp_frames(hidden: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """hidden [layers, T, dim] on any device, in any dtype; lo, hi [n] frame indices into it; lam [n]
    float32 -> hidden[:, lo] * (1 - lam) + hidden[:, hi] * lam as [n, layers, dim] float32 on
    hidden's device. Only the gathered frames are widened (exact): no copy of the whole states."""
    device = hidden.device
    lam = lam.view(1, -1, 1).to(device)
    x0, x1 = hidden[:, lo.to(device)].float(), hidden[:, hi.to(device)].float()
    return (x0 * (1 - lam) + x1 * lam).transpose(0, 1)


@dataclasses.dataclass(frozen=True)
class AudioDims:
    hidden: int
    layers: int  # transformer layers; hidden states = layers + 1


WAV2VEC2_LARGE = AudioDims(hidden=1024, layers=24)
TINY_AUDIO = AudioDims(hidden=MODEL_DIMS["tiny"].audio_dim, layers=MODEL_DIMS["tiny"].audio_layers - 1)


def tiny_wav2vec2_config(dims: AudioDims = TINY_AUDIO) -> Wav2Vec2Config:
    """A small XLSR-style (stable layer norm) wav2vec2 that keeps the 320-sample stride, so 50 Hz."""
    return Wav2Vec2Config(
        vocab_size=32,
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=2,
        intermediate_size=2 * dims.hidden,
        conv_dim=(16,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        mask_time_prob=0.0,
        layerdrop=0.0,
    )


def whisper_config(dims: AudioDims = TINY_AUDIO) -> WhisperConfig:
    """A Whisper encoder of the given width and depth (1024 x 24 is whisper-medium's), one decoder layer."""
    heads = max(2, dims.hidden // 64)
    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=dims.hidden,
        encoder_layers=dims.layers,
        decoder_layers=1,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * dims.hidden,
        decoder_ffn_dim=4 * dims.hidden,
        max_source_positions=1500,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


class AudioEncoder:
    """16 kHz mono PCM -> per-video-frame features [n, layers + 1, hidden], streamed in chunks."""

    def __init__(self, backend: str, model, feature_extractor, window_s: float = 60.0, context_s: float = 5.0):
        if window_s <= 2 * context_s:
            raise ValueError(f"window_s ({window_s}) must exceed twice context_s ({context_s})")
        self.window_s, self.context_s = window_s, context_s
        if backend not in BACKENDS:
            raise ValueError(f"audio backend must be one of {BACKENDS}, not {backend!r}")
        self.backend = backend
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.dims = AudioDims(
            hidden=cfg.hidden_size if backend == "wav2vec2" else cfg.d_model,
            layers=cfg.num_hidden_layers if backend == "wav2vec2" else cfg.encoder_layers,
        )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder: str | pathlib.Path,
        backend: str = "wav2vec2",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "AudioEncoder":
        """wav2vec2: a Wav2Vec2ForCTC folder (upstream's wav2vec2-large-xlsr-53-english/);
        whisper: a WhisperModel folder (e.g. openai/whisper-medium: 1024 wide, 24 layers)."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"{folder}: {backend} audio encoder folder missing")
        try:
            if backend == "wav2vec2":
                fe = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
                model = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
            elif backend == "whisper":
                fe = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
                model = WhisperModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
            else:
                raise ValueError(f"audio backend must be one of {BACKENDS}, not {backend!r}")
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise WeightsError(f"{folder}: cannot load the {backend} audio encoder ({type(e).__name__}: {e})") from e
        return cls(backend, model.to(device), fe)

    @classmethod
    def tiny(cls, seed: int = 0, backend: str = "wav2vec2", device: str | torch.device = "cpu") -> "AudioEncoder":
        return cls.random(TINY_AUDIO, seed, backend, device, torch.float32)

    @classmethod
    def random(
        cls,
        dims: AudioDims = WAV2VEC2_LARGE,
        seed: int = 0,
        backend: str = "wav2vec2",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "AudioEncoder":
        """Random weights (seeded on CPU) with the given width and depth; no file needed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if backend == "wav2vec2":
                cfg = tiny_wav2vec2_config(dims)
                if dims == WAV2VEC2_LARGE:  # the real XLSR-53 large layout
                    cfg = Wav2Vec2Config(
                        vocab_size=33,
                        hidden_size=1024,
                        num_hidden_layers=24,
                        num_attention_heads=16,
                        intermediate_size=4096,
                        do_stable_layer_norm=True,
                        feat_extract_norm="layer",
                        mask_time_prob=0.0,
                        layerdrop=0.0,
                    )
                model = Wav2Vec2ForCTC(cfg)
                fe = Wav2Vec2FeatureExtractor(
                    feature_size=1,
                    sampling_rate=ENCODER_AUDIO_RATE,
                    padding_value=0.0,
                    do_normalize=True,
                    return_attention_mask=True,
                )
            elif backend == "whisper":
                model = WhisperModel(whisper_config(dims))
                fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=ENCODER_AUDIO_RATE)
            else:
                raise ValueError(f"audio backend must be one of {BACKENDS}, not {backend!r}")
        return cls(backend, model.to(device=device, dtype=dtype), fe)

    # -- features ------------------------------------------------------------------------------

    def num_feature_frames(self, num_samples: int) -> int:
        """50 Hz frames the model yields for `num_samples` samples (wav2vec2: its conv stack's output length)."""
        if self.backend == "whisper":
            return num_samples // SAMPLES_PER_FRAME
        n = num_samples
        for k, st in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - k) // st + 1
        return max(n, 0)

    def hidden_states(self, pcm_16k: np.ndarray) -> torch.Tensor:
        """All hidden states at 50 Hz: [layers + 1, T50, hidden], float32 on the CPU (whole audio in memory)."""
        return self.device_hidden_states(pcm_16k).float().cpu()

    def device_hidden_states(self, pcm_16k: np.ndarray) -> torch.Tensor:
        """hidden_states left where the model ran, in its dtype: a caller that needs a few frames
        of them gathers those there and copies only them to the host."""
        windows = [h for _, h in self._windows(_check_pcm(pcm_16k))]
        return windows[0] if len(windows) == 1 else torch.cat(windows, dim=1)

    @torch.no_grad()
    def _windows(self, pcm: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Consecutive (first 50 Hz frame, hidden states [layers + 1, n, hidden]) covering the
        audio, on the model's device in its dtype."""
        if self.backend == "whisper":
            yield from self._whisper_windows(pcm)
            return
        values = self.feature_extractor(pcm, sampling_rate=ENCODER_AUDIO_RATE, return_tensors="pt").input_values[0]
        if len(pcm) <= self.window_s * ENCODER_AUDIO_RATE:
            yield 0, self._wav2vec2(values)
            return
        # Normalised once over the whole audio (as upstream's single pass); frame j reads samples
        # [320 j, 320 j + 400), so a window of frames [a, b) needs samples [320 a, 320 (b - 1) + 400).
        total = self.num_feature_frames(len(pcm))
        ctx = int(self.context_s * FEATURE_RATE)
        core = int(self.window_s * FEATURE_RATE) - 2 * ctx
        cfg = self.model.config
        receptive, jump = 1, 1  # samples one frame reads (400 for wav2vec2's conv stack)
        for k, st in zip(cfg.conv_kernel, cfg.conv_stride):
            receptive, jump = receptive + (k - 1) * jump, jump * st
        for c0 in range(0, total, core):
            c1 = min(c0 + core, total)
            a, b = max(0, c0 - ctx), min(total, c1 + ctx)
            h = self._wav2vec2(values[a * SAMPLES_PER_FRAME : (b - 1) * SAMPLES_PER_FRAME + receptive])
            yield c0, h[:, c0 - a : c1 - a]

    def _timed_windows(self, pcm: np.ndarray, timings: dict) -> Iterator[tuple[int, torch.Tensor]]:
        """_windows, adding each window's wall time (the model's, waited for on its device) to
        timings["model_ms"] and counting timings["windows"]."""
        windows = self._windows(pcm)
        while True:
            start = time.perf_counter()
            window = next(windows, None)
            if window is None:
                return
            if window[1].is_cuda:  # this stream only: in one process the DiT's work is not ours to wait for
                torch.cuda.current_stream(window[1].device).synchronize()
            timings["model_ms"] = timings.get("model_ms", 0.0) + (time.perf_counter() - start) * 1e3
            timings["windows"] = timings.get("windows", 0) + 1
            yield window

    def _wav2vec2(self, values: torch.Tensor) -> torch.Tensor:
        out = self.model.wav2vec2(values[None].to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states)

    def _whisper_windows(self, pcm: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        # Whisper encodes fixed 30 s windows (1500 frames at 50 Hz); keep each window's real frames.
        window = WHISPER_WINDOW_S * ENCODER_AUDIO_RATE
        for start in range(0, len(pcm), window):
            piece = pcm[start : start + window]
            keep = len(piece) // SAMPLES_PER_FRAME
            if keep == 0:
                break
            mel = self.feature_extractor(piece, sampling_rate=ENCODER_AUDIO_RATE, return_tensors="pt").input_features
            out = self.model.encoder(mel.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
            yield start // SAMPLES_PER_FRAME, torch.cat(out.hidden_states)[:, :keep]

    def encode(
        self, pcm_16k: np.ndarray, fps: int, total_frames: int, chunk_frames: int = 12, timings: dict | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (first_frame, features [n, layers + 1, hidden]) for frames 0..total_frames-1,
        `chunk_frames` at a time (the last chunk may be shorter); frames past the audio are zeros.

        Features are computed window by window as the chunks need them; each video frame
        interpolates the two 50 Hz frames around its 30 Hz position, the same arithmetic as
        `resample_features` + `bucket_features` over the whole audio."""
        if fps <= 0 or total_frames < 0 or chunk_frames <= 0:
            raise InvalidInput(f"bad audio framing: fps {fps}, total_frames {total_frames}, chunk {chunk_frames}")
        pcm = _check_pcm(pcm_16k)
        return self._encode(pcm, fps, total_frames, chunk_frames, {} if timings is None else timings)

    def _encode(self, pcm, fps, total_frames, chunk_frames, timings: dict):
        t50 = self.num_feature_frames(len(pcm))
        t30 = int(t50 / FEATURE_RATE * RESAMPLED_RATE)
        # align_corners=True: 30 Hz frame j sits at 50 Hz position j * (t50 - 1) / (t30 - 1), in float32 as torch
        scale = torch.tensor((t50 - 1) / (t30 - 1) if t30 > 1 else 0.0, dtype=torch.float32)
        windows = self._timed_windows(pcm, timings)
        # The hidden states stay on the model's device, in its dtype: each chunk gathers its
        # frames there and copies only them to the host (a 7 s clip's 25 x 360 x 1024 would be
        # 37 MB to copy and concatenate before the first chunk). Widening to float32 after the
        # gather is exact, so the arithmetic is the same as on float32 copies. A window's states
        # stay on the device while its chunks are read (bf16: 18 MB for 7 s, 154 MB for 60 s).
        buf = None
        buf_start = 0
        for first in range(0, total_frames, chunk_frames):
            n = min(chunk_frames, total_frames - first)
            out = torch.zeros(n, self.dims.layers + 1, self.dims.hidden)
            idx = torch.from_numpy(frame_indices(first, n, fps))
            valid = idx < t30
            if valid.any():
                src = idx[valid].float() * scale
                lo = src.floor().long().clamp_(max=t50 - 1)
                hi = (lo + 1).clamp_(max=t50 - 1)
                while buf is None or buf_start + buf.shape[1] <= int(hi.max()):
                    _, h = next(windows)
                    buf = h if buf is None else torch.cat([buf, h], dim=1)
                drop = int(lo.min()) - buf_start  # positions only move forward: free what is behind
                if drop > 0:
                    buf, buf_start = buf[:, drop:], buf_start + drop
                out[valid] = lerp_frames(buf, lo - buf_start, hi - buf_start, src - lo.float()).cpu()
            yield first, out


def _check_pcm(pcm) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise InvalidInput(f"audio must be mono 1-D samples, got shape {list(pcm.shape)}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise InvalidInput(f"audio samples must be float in [-1, 1], got {pcm.dtype}")
    if len(pcm) < ENCODER_AUDIO_RATE // FEATURE_RATE * 2:
        raise InvalidInput(f"audio of {len(pcm)} samples is too short (at least 640 samples = 40 ms)")
    if not np.isfinite(pcm).all():
        raise InvalidInput("audio holds NaN or infinite samples")
    return pcm.astype(np.float32, copy=False)
