"""The audio side of a live session: the client's queued speech, utterances, and blocks taken from it.

Pure logic, no gRPC: `SpeechQueue` holds what the client sent and has not been rendered yet, tagged
with utterance numbers and arrival times; `take_block` packs the next block (speech first, silence
after). `StreamResampler` converts the played track to the encoder's and the muxer's rates without
seams between blocks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import av
import numpy as np

INPUT_RATES = (16000, 24000)  # PCM s16le mono, what TTS engines and WebRTC stacks produce


@dataclass
class Segment:
    """A run of one utterance's samples inside a block."""

    utterance: int
    audio_start: int  # first sample in the client's audio timeline (all chunks concatenated)
    audio_end: int
    offset: int  # samples into the block where it plays


@dataclass
class TakenBlock:
    """One block's worth of audio at the input rate, and what it carries."""

    pcm: np.ndarray  # float32 [block_samples]
    segments: list[Segment] = field(default_factory=list)
    received_at: float | None = None  # arrival of the chunk holding its first speech sample
    finished: list[int] = field(default_factory=list)  # utterances whose last sample is in it

    @property
    def idle(self) -> bool:
        return not self.segments


@dataclass
class _Chunk:
    utterance: int
    audio_start: int
    samples: np.ndarray
    received_at: float


class SpeechQueue:
    """Audio received and not yet put into a block. Chunks join the open utterance; an
    end-of-utterance closes it and the next chunk opens a new one."""

    def __init__(self, rate: int):
        self.rate = rate
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self.samples = 0  # queued
        self.received = 0  # ever received: the client's audio timeline
        self.utterances = 0  # numbered from 1
        self.open: int | None = None  # utterance still receiving audio
        self.closed: set[int] = set()

    def push(self, samples: np.ndarray, now: float) -> int:
        """Queues a chunk; returns its utterance number."""
        if self.open is None:
            self.utterances += 1
            self.open = self.utterances
        if len(samples):
            self._chunks.append(_Chunk(self.open, self.received, samples, now))
            self.samples += len(samples)
            self.received += len(samples)
        return self.open

    def end_utterance(self) -> int | None:
        """Closes the open utterance; returns it (None when none was open)."""
        u, self.open = self.open, None
        if u is not None:
            self.closed.add(u)
        return u

    def queued_of(self, utterance: int) -> int:
        return sum(len(c.samples) for c in self._chunks if c.utterance == utterance)

    def front_utterance(self) -> int | None:
        return self._chunks[0].utterance if self._chunks else None

    def front_complete(self) -> bool:
        """The first queued utterance has all its audio here (closed): nothing to wait for."""
        return bool(self._chunks) and self._chunks[0].utterance in self.closed

    def clear(self) -> list[int]:
        """Drops everything queued (an interrupt); returns the utterances that lost audio."""
        lost = sorted({c.utterance for c in self._chunks})
        self._chunks.clear()
        self.samples = 0
        if self.open is not None:
            self.end_utterance()
        return lost

    def peek(self, n: int) -> np.ndarray:
        """The next n queued samples (fewer if fewer are queued), without taking them."""
        out, have = [], 0
        for c in self._chunks:
            if have >= n:
                break
            out.append(c.samples[: n - have])
            have += len(out[-1])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def take_block(self, n: int) -> TakenBlock:
        """Up to n queued samples from the front, padded with silence to n."""
        block = TakenBlock(pcm=np.zeros(n, np.float32))
        at = 0
        while at < n and self._chunks:
            c = self._chunks[0]
            k = min(n - at, len(c.samples))
            block.pcm[at : at + k] = c.samples[:k]
            seg = block.segments[-1] if block.segments else None
            if seg is not None and seg.utterance == c.utterance and seg.audio_end == c.audio_start:
                seg.audio_end += k
            else:
                block.segments.append(Segment(c.utterance, c.audio_start, c.audio_start + k, at))
            if block.received_at is None:
                block.received_at = c.received_at
            at += k
            self.samples -= k
            if k == len(c.samples):
                self._chunks.popleft()
            else:
                self._chunks[0] = _Chunk(c.utterance, c.audio_start + k, c.samples[k:], c.received_at)
        for seg in block.segments:
            if seg.utterance in self.closed and self.queued_of(seg.utterance) == 0:
                block.finished.append(seg.utterance)
        return block


class StreamResampler:
    """Resamples one continuous mono stream fed piece by piece: after n input samples exactly
    n * dst / src output samples have come out. libswresample holds back a few samples (its
    filter delay, 48 at 16 -> 48 kHz); they are paid once as leading silence (1 ms), so
    blocks join without seams."""

    def __init__(self, src: int, dst: int):
        if dst <= 0 or src <= 0:
            raise ValueError(f"bad rates {src} -> {dst}")
        self.src, self.dst = src, dst
        self._resampler = None if src == dst else av.AudioResampler(format="flt", layout="mono", rate=dst)
        self._fifo = np.zeros(0, np.float32)
        self._in = self._out = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, np.float32)
        if self._resampler is None:
            return samples.copy()
        self._in += len(samples)
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = self.src
        got = [f.to_ndarray()[0] for f in self._resampler.resample(frame)]
        self._fifo = np.concatenate([self._fifo, *got])
        want = self._in * self.dst // self.src - self._out
        if len(self._fifo) < want:  # only at the start: the filter's delay
            self._fifo = np.concatenate([np.zeros(want - len(self._fifo), np.float32), self._fifo])
        out, self._fifo = self._fifo[:want], self._fifo[want:]
        self._out += want
        return out


def pcm16_to_float(data: bytes) -> np.ndarray:
    """PCM s16le bytes -> float32 samples in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
