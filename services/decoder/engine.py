"""DecoderEngine: streaming Wan VAE decode of latent blocks, muxed with audio into fMP4 fragments.

The latent decoder is the full Wan2.1 VAE's (default) or the light one (TAEHV taew2_1,
light_decoder.py), as ModelSpec.decoder_options says. On a GPU every decode runs on the engine's
own CUDA stream at the lowest priority, so the DiT's kernels go first when both are queued.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from avatar.errors import InvalidInput
from avatar.jobs import Job
from avatar.models.wan_vae import WanVAE
from avatar.presets import LATENT_FRAMES_PER_BLOCK, VAE_TIME_STRIDE, ModelSpec
from avatar.services.decoder.fmp4 import FragmentedMp4Writer
from avatar.services.decoder.light_decoder import LightDecoder
from avatar.torch_compile import tolerate_tracing_in_other_threads

SPACE_STRIDE = 8
LOWEST_STREAM_PRIORITY = 0  # torch.cuda.Stream: a lower number is a higher priority; 0 is the lowest
log = logging.getLogger("avatar.decoder")


class DecodeStream:
    """Where the decoder's GPU work runs: its own CUDA stream with the lowest priority the device
    offers. CUDA's block scheduler then starts a queued DiT kernel (on a stream of higher
    priority) before this stream's next one, so a decode running beside a block's denoising takes
    the SMs the DiT leaves free instead of delaying it. A no-op on the CPU.

    Every call enters `active()`: the stream first waits for whatever the caller's stream queued
    (a latent produced on the GPU by another stream is complete before it is read), then the
    decode, its host copies and its causal caches all live on this one stream, in order; the
    `.cpu()` at the end of a block waits for this stream alone."""

    def __init__(self, device: torch.device):
        self.stream = None
        if device.type == "cuda":
            # 0 is CUDA's lowest stream priority (higher numbers map to it; -1, -2 ... rank above)
            self.stream = torch.cuda.Stream(device, priority=LOWEST_STREAM_PRIORITY)

    @property
    def priority(self) -> int | None:
        return None if self.stream is None else self.stream.priority

    @contextlib.contextmanager
    def active(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield


@dataclass(frozen=True)
class DecodedBlock:
    data: bytes  # one moof+mdat, starting with an IDR frame (a block's later part: where it left off)
    num_frames: int  # video frames in it
    vae_ms: float  # VAE decode time (the block's first part; 0 on a later part)
    mux_ms: float  # H.264/AAC encode + boxing time
    continued: bool = False  # more of this block follows (mux(..., frames=n))


@dataclass(frozen=True)
class DecodedFrames:
    """One block's frames on the host, decoded and not yet muxed (DecoderStream.decode_frames)."""

    frames: np.ndarray  # uint8: yuv420p [n, H * 3 // 2, W] from a GPU, else RGB [n, H, W, 3]
    pcm: np.ndarray  # int16 mono, the kept frames' audio
    keep_frames: int
    vae_ms: float


def to_yuv420p(pixels: torch.Tensor) -> torch.Tensor:
    """RGB [3, n, H, W] in [-1, 1] -> uint8 [n, H * 3 // 2, W]: BT.709 limited-range Y, then the
    Cb and Cr planes averaged over 2x2 pixels (FragmentedMp4Writer's yuv420p frames)."""
    r, g, b = ((pixels.float() + 1.0) * 0.5).clamp_(0.0, 1.0).unbind(0)
    luma = 0.2126 * r + 0.7152 * g + 0.0722 * b
    n, h, w = luma.shape

    def chroma(diff: torch.Tensor, scale: float) -> torch.Tensor:
        return 128.0 + 224.0 / scale * torch.nn.functional.avg_pool2d(diff[:, None], 2)[:, 0]

    planes = (16.0 + 219.0 * luma, chroma(b - luma, 1.8556), chroma(r - luma, 1.5748))
    flat = torch.cat([p.reshape(n, -1) for p in planes], dim=1)
    return flat.round_().clamp_(0, 255).to(torch.uint8).reshape(n, h * 3 // 2, w)


class DecoderEngine:
    """Holds the latent decoder (the VAE's or the light one); every stream gets its own causal
    cache and MP4 writer."""

    def __init__(self, model: ModelSpec):
        self.model = model
        self.kind = model.decoder_options.kind
        # `vae`: whichever decoder runs; both have stream_decoder(module), decode(), device, z_dim
        if model.decoder_options.is_light:
            self.vae = LightDecoder.from_spec(model)
            self.z_dim = self.vae.z_dim
            module = self.vae.model
        else:
            self.vae = WanVAE.from_spec(model)
            self.z_dim = self.vae.dims.z_dim
            module = self.vae.model.decoder
        self.stream = DecodeStream(self.vae.device)
        log.info("latent decoder: %s%s", self.describe(), self._stream_note())
        # torch.compile of the VAE decoder: -29% per block at 704*384 on an H100 (217 -> 153 ms,
        # docs/performance.md). Compiled in warm_up, before the server reports SERVING, and used
        # only at the sizes warmed there: a compilation takes about 70 s, which no request waits for.
        self._compiled = None
        if model.compile:
            tolerate_tracing_in_other_threads()  # the DiT may still compile for a new aspect ratio
            self._compiled = torch.compile(module)
        self._compiled_sizes: set[tuple[int, int]] = set()

    def describe(self) -> str:
        """Which decoder runs, e.g. "full (Wan2.1 VAE)" or "light (TAEHV taew2_1, /w/taew2_1.pth)"."""
        return self.vae.describe() if isinstance(self.vae, LightDecoder) else "full (Wan2.1 VAE)"

    def _stream_note(self) -> str:
        p = self.stream.priority
        return "" if p is None else f", on its own CUDA stream (priority {p}, the lowest; the DiT's should be higher)"

    def decoder_for(self, width: int, height: int) -> torch.nn.Module | None:
        """The compiled decoder if this size was warmed up, else None (eager)."""
        return self._compiled if (width, height) in self._compiled_sizes else None

    def warm_up(self, sizes: list[tuple[int, int]]) -> list[str]:
        """With --compile: decodes a short stream of zeros at each (width, height), which compiles
        every shape a stream meets (the first frame, then full causal caches). One line per size."""
        if self._compiled is None:
            return []
        lines = []
        for width, height in sizes:
            start = time.perf_counter()
            h, w = height // SPACE_STRIDE, width // SPACE_STRIDE
            stream = self.vae.stream_decoder(self._compiled)
            try:
                with self.stream.active():
                    stream.decode(torch.zeros(1, self.z_dim, 1, h, w))
                    for _ in range(3):  # the cache holds one frame after the first call, two from then on
                        stream.decode(torch.zeros(1, self.z_dim, LATENT_FRAMES_PER_BLOCK, h, w))
                if self.vae.device.type == "cuda":
                    torch.cuda.synchronize(self.vae.device)
            except Exception as e:  # out of memory, or the compiler failed: this size stays eager
                reason = " ".join(str(e).split())[:200]
                lines.append(f"{width}*{height}: not compiled, decodes eagerly ({type(e).__name__}: {reason})")
                continue
            finally:
                stream.close()
            self._compiled_sizes.add((width, height))
            lines.append(f"{width}*{height}: compiled in {time.perf_counter() - start:.1f} s")
        return lines

    def open_stream(self, job: Job, prime_latent: torch.Tensor) -> DecoderStream:
        """A stream for one video; prime_latent [16, 1, h, w] is the reference image's latent."""
        return DecoderStream(self, job, prime_latent)


class DecoderStream:
    """Decodes one job's latent blocks in order: block k -> frames 12k..12k+11 -> one fragment."""

    def __init__(self, engine: DecoderEngine, job: Job, prime_latent: torch.Tensor):
        if job.width <= 0 or job.height <= 0 or job.width % 16 or job.height % 16:
            raise InvalidInput(f"job size must be positive multiples of 16, got {job.width}x{job.height}")
        if job.fps <= 0 or job.audio_sample_rate <= 0:
            raise InvalidInput(
                f"job fps and audio_sample_rate must be positive, got {job.fps}, {job.audio_sample_rate}"
            )
        self.job = job
        self.latent_hw = (job.height // SPACE_STRIDE, job.width // SPACE_STRIDE)
        self.latent_frames = job.latent_frames_per_block or LATENT_FRAMES_PER_BLOCK
        self._vae = engine.vae
        self._z = engine.z_dim
        self._stream = engine.stream
        # yuv420p on a GPU: ~free there, half the bytes to copy, and no swscale pass per frame
        # (half the mux time). On the CPU, swscale's SIMD beats torch: RGB goes to the muxer.
        self.yuv_on_device = torch.device(engine.vae.device).type == "cuda"
        self._check_latent(prime_latent, 1, "prime_latent")
        try:
            self._writer = FragmentedMp4Writer(job.width, job.height, job.fps, job.audio_sample_rate)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        self._decoder = self._vae.stream_decoder(engine.decoder_for(job.width, job.height))
        # the causal cache starts from the reference frame, as the generator's context does;
        # its one pixel frame is not part of the video
        with self._stream.active():
            self._decoder.decode(prime_latent[None])
        self.blocks = 0
        self.frames = 0
        self._pending: DecodedFrames | None = None  # decoded, not yet (all) muxed
        self._muxed = 0  # frames of the pending block muxed so far

    def init_segment(self) -> bytes:
        return self._writer.init_segment()

    def mime_type(self) -> str:
        return self._writer.mime_type()

    def decode_block(self, latent: torch.Tensor, pcm: np.ndarray, keep_frames: int) -> DecodedBlock:
        """latent [16, 3, h, w] + int16 mono pcm for the kept frames -> one fMP4 fragment.

        keep_frames (1..12) trims the last block to the audio's length. The job's last block
        (job.num_blocks) also carries the audio encoder's tail, so the stream ends complete.
        """
        return self.mux(self.decode_frames(latent, pcm, keep_frames))

    def decode_frames(self, latent: torch.Tensor, pcm: np.ndarray, keep_frames: int) -> DecodedFrames:
        """decode_block's first half, the device's: the block's frames on the host, for mux().
        A caller that learns the device is done can start the next block's device work while
        this one is encoded (the gateway does, for the first block)."""
        if self._decoder is None:
            raise RuntimeError("decode_block on a closed DecoderStream")
        if self._pending is not None:
            raise RuntimeError("decode_frames twice without mux(): blocks are muxed in order")
        if self.job.num_blocks and self.blocks >= self.job.num_blocks:
            raise InvalidInput(f"the job has {self.job.num_blocks} blocks; block {self.blocks} is extra")
        self._check_latent(latent, self.latent_frames, "latent")
        frames_per_block = self.latent_frames * VAE_TIME_STRIDE
        if not 1 <= keep_frames <= frames_per_block:
            raise InvalidInput(f"keep_frames must be in 1..{frames_per_block}, got {keep_frames}")
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise InvalidInput(f"pcm must be int16 mono [samples], got {pcm.dtype} {list(pcm.shape)}")
        rate, fps = self.job.audio_sample_rate, self.job.fps
        expected = self._block_samples(keep_frames)
        if abs(len(pcm) - expected) > rate // fps:  # more than a frame off: audio would drift
            raise InvalidInput(
                f"block {self.blocks}: {len(pcm)} audio samples for {keep_frames} "
                f"frames, expected {expected} at {rate} Hz / {fps} fps"
            )

        t0 = time.perf_counter()
        with self._stream.active():
            pixels = self._decoder.decode(latent[None])  # [1, 3, 12, H, W] in [-1, 1]
            # queued on the decoder's stream after the decode; .cpu() waits for that stream only
            if self.yuv_on_device:
                frames = to_yuv420p(pixels[0, :, :keep_frames]).cpu().numpy()
            else:
                frames = ((pixels[0, :, :keep_frames] + 1.0) * 127.5).round_().clamp_(0, 255)
                frames = frames.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()
        # .cpu() above waits for the GPU, so this is the decoder's time
        self._pending = DecodedFrames(frames, pcm, keep_frames, (time.perf_counter() - t0) * 1e3)
        return self._pending

    def mux(self, decoded: DecodedFrames, frames: int | None = None) -> DecodedBlock:
        """decode_block's second half, the CPU's: H.264 + AAC into one fMP4 fragment. `frames`:
        only the block's next that many frames (and their audio), so that a first fragment goes
        out sooner; the block stays pending and the next call goes on where this one stopped
        (None: the rest of the block)."""
        if decoded is not self._pending or self._writer is None:
            raise RuntimeError("mux() takes the block decode_frames() just returned")
        start, left = self._muxed, decoded.keep_frames - self._muxed
        if frames is not None and not 1 <= frames <= left:
            raise ValueError(f"frames must be in 1..{left} (the block's frames not muxed yet), got {frames}")
        end = decoded.keep_frames if frames is None else start + frames
        # audio by frame: the samples of frames [start, end) of this block, the rest in the last part
        first, last = self._block_samples(start), self._block_samples(end)
        pcm = decoded.pcm[first:] if end == decoded.keep_frames else decoded.pcm[first:last]
        t1 = time.perf_counter()
        continued = end < decoded.keep_frames
        final = not continued and bool(self.job.num_blocks) and self.blocks + 1 == self.job.num_blocks
        data = self._writer.write_block(decoded.frames[start:end], pcm, final=final, keyframe=start == 0)
        mux_ms = (time.perf_counter() - t1) * 1e3
        if continued:
            self._muxed = end
        else:
            self._pending, self._muxed = None, 0
            self.blocks += 1
            self.frames += decoded.keep_frames
        return DecodedBlock(
            data=data, num_frames=end - start, vae_ms=decoded.vae_ms if start == 0 else 0.0, mux_ms=mux_ms,
            continued=continued,
        )  # fmt: skip

    def finish(self) -> bytes:
        """The audio tail as a last fragment, for streams whose job did not say num_blocks
        (b"" when the last block already carried it)."""
        return self._writer.finish() if self._writer is not None else b""

    def close(self) -> None:
        """Frees the causal cache and the encoders; safe to call twice."""
        if self._decoder is not None:
            self._decoder.close()
        self._decoder = None
        self._writer = None

    def _block_samples(self, frames: int) -> int:
        """Audio samples that play during the current block's first `frames` frames (frame k of
        the video starts at sample k * rate // fps: no drift however many blocks)."""
        rate, fps = self.job.audio_sample_rate, self.job.fps
        return ((self.frames + frames) * rate // fps) - (self.frames * rate // fps)

    def _check_latent(self, latent: torch.Tensor, frames: int, what: str) -> None:
        want = (self._z, frames, *self.latent_hw)
        if not isinstance(latent, torch.Tensor) or tuple(latent.shape) != want:
            got = list(latent.shape) if hasattr(latent, "shape") else type(latent).__name__
            raise InvalidInput(f"{what} must be {list(want)} for a {self.job.width}x{self.job.height} job, got {got}")
        if not torch.isfinite(latent).all():
            raise InvalidInput(f"{what} contains NaN or infinite values")
