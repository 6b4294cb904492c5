"""Client of live sessions: `converse(channel, header, audio)` streams speech in and video out.

`audio` is any async iterable of PCM s16le bytes (one AudioChunk each) or ready ConverseRequests
(END_OF_UTTERANCE, INTERRUPT); EndOfStream follows when it ends. The result is an async iterator
of ConverseResponse: header (with the init segment), fragments, utterance and idle events, status.
The semantics follow LiveKit Agents' avatar contract: push_audio = a chunk, flush = END_OF_UTTERANCE,
clear_buffer = INTERRUPT (answered by UtteranceFinished with the playback position, interrupted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import numpy as np

from avatar.v1 import avatar_pb2, avatar_pb2_grpc

END_OF_UTTERANCE = avatar_pb2.ConverseRequest(end_of_utterance=avatar_pb2.EndOfUtterance())
INTERRUPT = avatar_pb2.ConverseRequest(interrupt=avatar_pb2.Interrupt())
END_OF_STREAM = avatar_pb2.ConverseRequest(end=avatar_pb2.EndOfStream())


async def _requests(header: avatar_pb2.ConverseHeader, audio: AsyncIterable, call_of: dict) -> AsyncIterator:
    # Nothing is written before the server has accepted the call (its initial metadata): a message
    # still being sent when the server refuses (token, capacity) turns the refusal into a local
    # "Internal error from Core" instead of the server's status.
    call = call_of["call"]
    await call.initial_metadata()
    if call.done():
        return
    yield avatar_pb2.ConverseRequest(header=header)
    async for item in audio:
        if isinstance(item, (bytes, bytearray, memoryview)):
            yield avatar_pb2.ConverseRequest(audio=avatar_pb2.AudioChunk(pcm=bytes(item)))
        elif isinstance(item, avatar_pb2.ConverseRequest):
            yield item
        else:
            raise TypeError(f"audio items must be PCM bytes or ConverseRequest, got {type(item).__name__}")
    yield END_OF_STREAM


def converse(
    channel, header: avatar_pb2.ConverseHeader, audio: AsyncIterable, *, timeout: float | None = None, metadata=None
) -> AsyncIterator[avatar_pb2.ConverseResponse]:
    """Opens AvatarService/Converse on a grpc.aio channel; iterate the result for the responses.
    Cancel it (`.cancel()`) to leave: the server frees the session within one block."""
    stub = avatar_pb2_grpc.AvatarServiceStub(channel)
    call_of: dict = {}
    call_of["call"] = stub.Converse(_requests(header, audio, call_of), timeout=timeout, metadata=metadata)
    return call_of["call"]


def pcm16(samples: np.ndarray) -> bytes:
    """float [-1, 1] mono samples -> PCM s16le bytes."""
    return (np.clip(np.asarray(samples, np.float32), -1, 1) * 32767).round().astype("<i2").tobytes()


async def paced_chunks(
    pcm: bytes, rate: int, chunk_ms: float | Iterable[float], realtime: bool = True, start: float | None = None
) -> AsyncIterator[bytes]:
    """Cuts s16le bytes into chunks of chunk_ms (a number, or sizes to cycle through) and yields
    each when a live source would have it: at real-time pace from `start` (time.monotonic()),
    or as fast as the receiver takes them when realtime is False."""
    sizes = [chunk_ms] if isinstance(chunk_ms, (int, float)) else list(chunk_ms)
    start = time.monotonic() if start is None else start
    at, i = 0, 0
    while at < len(pcm):
        n = max(1, round(sizes[i % len(sizes)] * rate / 1000)) * 2
        piece = pcm[at : at + n]
        at += len(piece)
        i += 1
        if realtime:  # a chunk exists once its last sample has been "spoken"
            delay = start + at / 2 / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield piece
