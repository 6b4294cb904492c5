"""LiveKit Agents' avatar contract over a live session: `ConverseVideoGenerator` is a VideoGenerator
for `livekit.agents.voice.avatar.AvatarRunner`, rendered by this mesh's Converse RPC.

This serves Alibaba's open LiveAvatar model. It is not HeyGen's hosted product of the same name,
whose LiveKit plugin is `livekit-plugins-liveavatar` (`livekit.plugins.liveavatar`).

The contract, as AvatarRunner uses it: push_audio() gets the agent's speech frames and an
AudioSegmentEnd after each utterance (-> AudioChunk, EndOfUtterance); clear_buffer() is barge-in
(-> Interrupt); iterating yields the avatar's rtc.VideoFrames at 25 fps with the rtc.AudioFrames
they play, and an AudioSegmentEnd right after an utterance's last sample. The runner counts the
audio frames' durations as the playback position it reports to the agent (playback started,
finished, interrupted), so audio frames carry speech only: idle blocks, and the silence after an
utterance's end inside its last block, are video alone (LiveKit's audio track is silent between
frames). The audio is the agent's own samples at the session rate, cut where each fragment says
it plays them ([audio_start_s, audio_end_s) from the fragment's first frame): the same audio as the
fragment's AAC track, sample-exact and without a second lossy encode. Video frames are decoded
from the fragments (H.264 in fMP4) with PyAV. Converse keeps the avatar idling when no audio
comes, so the video never stalls.

Needs the extra: pip install 'avatar-mesh[livekit]'.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
from collections.abc import AsyncIterator

import av
import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator
except ImportError as exc:  # the optional extra is missing
    raise ImportError("avatar.integrations.livekit needs LiveKit Agents: pip install 'avatar-mesh[livekit]'") from exc

from avatar.live_client import END_OF_STREAM, END_OF_UTTERANCE, INTERRUPT, converse
from avatar.v1 import avatar_pb2

log = logging.getLogger(__name__)

SESSION_RATES = (16000, 24000)  # what Converse takes (ConverseHeader.sample_rate)
MAX_UNSENT_S = 2.0  # agent audio held here before push_audio waits (the server queues 30 s more)
MAX_CHUNK_S = 1.0  # AudioChunks are cut to this (the server takes up to 10 s)
KEEPALIVE_S = 10.0  # a quiet agent must not hit the session's idle timeout (60 s by default)


class ConverseVideoGenerator(VideoGenerator):
    """One Converse session on `channel` (a grpc.aio channel to the gateway, with its TLS and
    token), as a LiveKit VideoGenerator. `header` is the session's ConverseHeader (portrait,
    prompt, preset/size, steps; sample_rate 16000 or 24000, which is also the rate of the audio
    frames it yields). Call `await start()` first: it opens the session and learns the video size
    (`options()` gives the AvatarOptions to run it with); `aclose()` leaves."""

    def __init__(self, channel, header: avatar_pb2.ConverseHeader, *, metadata=None):
        if header.sample_rate not in SESSION_RATES:
            raise ValueError(f"header.sample_rate must be 16000 or 24000 (Converse's rates), got {header.sample_rate}")
        self._channel, self._header, self._metadata = channel, header, metadata
        self.rate = header.sample_rate
        self.stream_header: avatar_pb2.ConverseStreamHeader | None = None
        self.status: avatar_pb2.ConverseStatus | None = None  # the session's last message
        self.ended = asyncio.Event()  # the output stream is over (status, aclose() or error)
        self.error: BaseException | None = None  # what ended it, if not the status or aclose()
        self._call = None
        self._closed = False
        # requests not yet given to gRPC: PCM bytes or ConverseRequests; `_unsent` samples of PCM
        self._outbox: collections.deque = collections.deque()
        self._unsent = 0
        self._wake = asyncio.Condition()
        # The agent's audio on the session's timeline (samples at self.rate, every one sent):
        # _pcm holds [_pcm_start, _pushed) until its fragment has played it.
        self._pcm = np.zeros(0, np.int16)
        self._pcm_start = 0
        self._pushed = 0  # samples pushed and not dropped by clear_buffer (sent or in the outbox)
        self._open = False  # an utterance is receiving audio
        self._ends: collections.deque[int] = collections.deque()  # timeline positions of utterance ends
        self._cut_at = 0  # speech before this position was interrupted: never played
        self._resampler: rtc.AudioResampler | None = None
        self._resampler_rate = 0

    # ---- session -------------------------------------------------------------------------------

    async def start(self) -> avatar_pb2.ConverseStreamHeader:
        """Opens the session and waits for its stream header (video size, fps, init segment).
        A refused header raises grpc.aio.AioRpcError (INVALID_ARGUMENT, FAILED_PRECONDITION...)."""
        if self._call is not None:
            raise RuntimeError("start() was called already")
        self._call = converse(self._channel, self._header, self._requests(), metadata=self._metadata)
        async for msg in self._call:
            if msg.WhichOneof("event") == "header":
                self.stream_header = msg.header
                return msg.header
        raise RuntimeError("the session ended before its header")

    def options(self) -> AvatarOptions:
        """What AvatarRunner needs to publish this avatar's tracks."""
        h = self._started()
        return AvatarOptions(
            video_width=h.width, video_height=h.height, video_fps=h.fps, audio_sample_rate=self.rate, audio_channels=1
        )

    async def end(self) -> None:
        """The agent is done: the session plays what it has, then iteration ends (with `status`)."""
        self._check_open()
        self._flush_resampler()
        if self._open:  # EndOfStream ends the open utterance too
            self._open = False
            self._ends.append(self._pushed)
        await self._send(END_OF_STREAM)
        self._closed = True

    async def aclose(self) -> None:
        """Leaves now: the server frees the session within one block."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        async with self._wake:
            self._wake.notify_all()

    # ---- VideoGenerator: audio in --------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        self._check_open()
        if isinstance(frame, AudioSegmentEnd):
            self._flush_resampler()
            if self._open:  # an empty segment is no utterance
                self._open = False
                self._ends.append(self._pushed)
                await self._send(END_OF_UTTERANCE)
            return
        if not isinstance(frame, rtc.AudioFrame):
            raise TypeError(f"push_audio takes rtc.AudioFrame or AudioSegmentEnd, got {type(frame).__name__}")
        samples = self._to_session_rate(frame)
        step = round(MAX_CHUNK_S * self.rate)
        for at in range(0, len(samples), step):
            await self._send_pcm(samples[at : at + step])

    async def clear_buffer(self) -> None:
        """Barge-in: the current utterance stops at once (its frames not yet yielded are dropped,
        its audio not yet sent never leaves), and the session drops what it queued; the next
        frames are idle within one block. The runner then reports the interrupted playback."""
        if self._closed or self._call is None:
            return
        unsent = [item for item in self._outbox if isinstance(item, bytes)]
        self._outbox = collections.deque(item for item in self._outbox if item is INTERRUPT)
        self._pushed -= sum(len(b) // 2 for b in unsent)
        self._unsent = 0
        self._resampler = None  # the samples it holds belong to the cut utterance
        self._open = False
        self._ends.clear()
        self._cut_at = self._pushed
        self._pcm, self._pcm_start = np.zeros(0, np.int16), self._pushed
        await self._send(INTERRUPT)

    # ---- VideoGenerator: video and audio out ---------------------------------------------------

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self):
        self._started()
        init = self.stream_header.init_segment
        per_frame = self.rate // self.stream_header.fps  # samples of audio per video frame
        try:
            async for msg in self._call:
                # An utterance whose end came after all its audio had played (a TTS that flushes
                # late): its end is due now, not with the next speech.
                while self._ends and self._ends[0] <= self._pcm_start:
                    self._ends.popleft()
                    yield AudioSegmentEnd()
                kind = msg.WhichOneof("event")
                if kind == "fragment" and msg.fragment.num_frames:
                    f = msg.fragment
                    a0, a1 = round(f.audio_start_s * self.rate), round(f.audio_end_s * self.rate)
                    frames = await asyncio.to_thread(decode_video, init, f.data)
                    for item in self._play(frames, a0, a1, per_frame):
                        # Checked before every item: the runner may call clear_buffer() while it
                        # holds the one before, and nothing of the cut speech may follow that call.
                        if a1 > a0 and a0 < self._cut_at:  # speech an Interrupt cut (also mid-block)
                            break
                        yield item
                    if a1 > a0 and a0 >= self._cut_at:
                        self._release(a1)
                elif kind == "degraded":
                    log.warning("live session degraded: %s", msg.degraded.reason)
                elif kind == "status":
                    self.status = msg.status
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task and task.cancelling()):
                return  # our aclose() cancelled the call
            raise
        except Exception as exc:
            self.error = exc
            raise
        finally:
            self.ended.set()

    def _play(self, frames: list[rtc.VideoFrame], a0: int, a1: int, per_frame: int):
        """A fragment's video frames, each followed by the agent's samples it plays ([a0, a1))."""
        for i, video in enumerate(frames):
            yield video
            yield from self._speech(a0 + i * per_frame, min(a1, a0 + (i + 1) * per_frame))

    def _speech(self, lo: int, hi: int):
        """The agent's samples [lo, hi) as AudioFrames, with AudioSegmentEnd where an utterance ends."""
        while lo < hi:
            end = self._ends[0] if self._ends and self._ends[0] <= hi else hi
            if end > lo:
                pcm = self._pcm[max(0, lo - self._pcm_start) : max(0, end - self._pcm_start)]
                yield rtc.AudioFrame(pcm.tobytes(), self.rate, 1, len(pcm))
            lo = max(lo, end)
            if self._ends and self._ends[0] <= lo:
                self._ends.popleft()
                yield AudioSegmentEnd()

    # ---- helpers -------------------------------------------------------------------------------

    def _started(self) -> avatar_pb2.ConverseStreamHeader:
        if self.stream_header is None:
            raise RuntimeError("call `await start()` first")
        return self.stream_header

    def _check_open(self) -> None:
        self._started()
        if self._closed:
            raise RuntimeError("the live session is closed: no audio can be pushed after end() or aclose()")

    def _to_session_rate(self, frame: rtc.AudioFrame) -> np.ndarray:
        """A frame as mono int16 at the session rate; resampled in one stream per input rate."""
        if frame.sample_rate <= 0 or frame.num_channels <= 0:
            raise ValueError(f"bad audio frame: {frame.sample_rate} Hz, {frame.num_channels} channels")
        data = np.frombuffer(frame.data, np.int16)[: frame.samples_per_channel * frame.num_channels]
        if frame.num_channels > 1:
            data = data.reshape(-1, frame.num_channels).mean(axis=1).round().astype(np.int16)
        if frame.sample_rate == self.rate:
            return data
        if self._resampler is None or self._resampler_rate != frame.sample_rate:
            self._flush_resampler()  # the agent changed its rate: the old stream's tail first
            self._resampler = rtc.AudioResampler(frame.sample_rate, self.rate, num_channels=1)
            self._resampler_rate = frame.sample_rate
        mono = rtc.AudioFrame(data.tobytes(), frame.sample_rate, 1, len(data))
        return _joined(self._resampler.push(mono))

    def _flush_resampler(self) -> None:
        """The resampler's held-back samples end the utterance (queued for sending now)."""
        if self._resampler is None:
            return
        tail, self._resampler = _joined(self._resampler.flush()), None
        if len(tail):
            self._queue_pcm(tail)

    def _queue_pcm(self, samples: np.ndarray) -> None:
        self._pcm = np.concatenate([self._pcm, samples])
        self._pushed += len(samples)
        self._unsent += len(samples)
        self._open = True
        self._outbox.append(samples.tobytes())

    async def _send_pcm(self, samples: np.ndarray) -> None:
        if not len(samples):
            return  # an empty chunk would open an utterance on the server
        async with self._wake:
            await self._wake.wait_for(lambda: self._closed or self._unsent < MAX_UNSENT_S * self.rate)
            self._check_open()
            self._queue_pcm(samples)
            self._wake.notify_all()

    async def _send(self, request: avatar_pb2.ConverseRequest) -> None:
        async with self._wake:
            self._outbox.append(request)
            self._wake.notify_all()

    def _release(self, upto: int) -> None:
        """Forgets the agent's samples before `upto` (played)."""
        drop = min(max(0, upto - self._pcm_start), len(self._pcm))
        self._pcm, self._pcm_start = self._pcm[drop:], self._pcm_start + drop

    async def _requests(self):
        """What live_client.converse sends after the header: the outbox, in order; when the
        agent is quiet, an EndOfUtterance now and then (a no-op with no utterance open) keeps the
        session from its idle timeout."""
        while True:
            async with self._wake:
                try:
                    # Not wait_for: Python 3.11's drops a cancel (the call's end) that comes as the wait ends
                    async with asyncio.timeout(KEEPALIVE_S):
                        await self._wake.wait_for(lambda: self._outbox or self._closed)
                except TimeoutError:
                    if not self._open:
                        self._outbox.append(END_OF_UTTERANCE)
                    continue
                if not self._outbox:
                    return  # closed
                item = self._outbox.popleft()
                if isinstance(item, bytes):
                    self._unsent -= len(item) // 2
                self._wake.notify_all()
            if item is END_OF_STREAM:
                return  # live_client sends EndOfStream itself when this ends
            yield item


def _joined(frames: list) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.int16)
    return np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])


def decode_video(init_segment: bytes, fragment: bytes) -> list[rtc.VideoFrame]:
    """The video frames of one fMP4 fragment (it starts with a keyframe) as RGBA rtc.VideoFrames."""
    with av.open(io.BytesIO(init_segment + fragment), format="mp4") as container:
        return [
            rtc.VideoFrame(f.width, f.height, rtc.VideoBufferType.RGBA, f.to_ndarray(format="rgba").tobytes())
            for f in container.decode(video=0)
        ]
