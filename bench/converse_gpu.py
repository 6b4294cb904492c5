"""A live session (AvatarService/Converse) against a running gateway, as a voice agent drives it.

One session: speech at real-time pace in 100 ms chunks, end of utterance, a silence (idle
blocks), a second utterance interrupted half-way, a short idle tail. Then a session at a size the
generator cannot keep up with, which the real-time guard must refuse with its numbers.
Prints and writes (--out) the figures issue 11's targets name: p50/p95 audio -> fragment,
interrupt -> idle, the longest gap between fragments (a stall), the lag of fragments behind
their presentation time in the first and the last minute (drift), and the guard's answer.
`--soak-s 600` repeats the cycle for 10 minutes (the soak target: 30 s silences with --gap-s 30).

    python3 bench/converse_gpu.py --server 127.0.0.1:50051 --size 384*256 --steps 4 \
        --speech-s 20 --gap-s 30 --refuse-size 704*384 --out $OUT/converse.json
"""

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile

from avatar.live_client import END_OF_UTTERANCE, INTERRUPT, converse, paced_chunks, pcm16
from avatar.v1 import avatar_pb2

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000


def speech(seconds: float) -> bytes:
    """The sample speech at 16 kHz mono, looped to `seconds`."""
    pcm, rate = soundfile.read(str(ROOT / "assets" / "speech.wav"), dtype="float32", always_2d=True)
    mono = pcm.mean(axis=1)
    mono = np.interp(np.arange(0, len(mono), rate / RATE), np.arange(len(mono)), mono).astype(np.float32)
    reps = int(np.ceil(seconds * RATE / len(mono)))
    return pcm16(np.tile(mono, reps)[: int(seconds * RATE)])


PORTRAIT = ROOT / "assets" / "astronaut.png"  # square: the 384*256 area gives a 256*256 video


def header(size: str, steps: int, image: Path = PORTRAIT) -> avatar_pb2.ConverseHeader:
    """The session's header; `image` decides the video's aspect (--image: a 3:2 portrait at
    384*256 gives exactly the size the server warmed up)."""
    image = Path(image).read_bytes()
    return avatar_pb2.ConverseHeader(image=image, size=size, sample_steps=steps, sample_rate=RATE)


async def live_session(
    address: str,
    size: str,
    steps: int,
    speech_s: float,
    gap_s: float,
    soak_s: float = 0.0,
    audio_encoder: str = "",
    image: Path = PORTRAIT,
) -> dict:
    first, second = speech(speech_s), speech(max(2.0, speech_s / 2))

    async def audio():
        t_start = time.monotonic()
        while True:  # one cycle; --soak-s repeats it until that many seconds have passed
            async for chunk in paced_chunks(first, RATE, 100):
                yield chunk
            yield END_OF_UTTERANCE
            await asyncio.sleep(gap_s)  # nothing to say: the avatar idles
            start = time.monotonic()
            async for chunk in paced_chunks(second, RATE, 100, start=start):
                yield chunk
                if time.monotonic() - start > len(second) / 2 / RATE / 2:
                    break
            yield INTERRUPT  # barge-in half-way through the second utterance
            await asyncio.sleep(3.0)
            if time.monotonic() - t_start >= soak_s:
                break

    arrivals, fragments, events, status, hdr = [], [], [], None, None
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        hdr_in = header(size, steps, image)
        hdr_in.audio_encoder = audio_encoder
        async for msg in converse(ch, hdr_in, audio(), timeout=speech_s + gap_s + soak_s + 600):
            kind = msg.WhichOneof("event")
            now = time.monotonic() - t0
            if kind == "header":
                hdr = msg.header
            elif kind == "fragment":
                arrivals.append(now)
                f = msg.fragment
                fragments.append((f.pts_s, f.idle, f.audio_start_s, f.audio_end_s))
            elif kind == "status":
                status = msg.status
            else:
                events.append((round(now, 3), kind))
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.array([0.0])
    block_s = hdr.frames_per_block / hdr.fps
    pts = [p for p, *_ in fragments]
    # arrival - presentation time: constant while the stream keeps real time; growing = drift
    lag = np.array(arrivals) - np.array(pts) if pts else np.zeros(1)
    minute = max(1, int(60 / block_s))
    return {
        "size": f"{hdr.width}*{hdr.height}",
        "sample_steps": hdr.sample_steps,
        "model": hdr.model,
        "measured_block_ms": hdr.measured_block_ms,
        "blocks": len(fragments),
        "idle_blocks": sum(1 for _, idle, *_ in fragments if idle),
        "pts_continuous": bool(np.allclose(np.diff(pts), block_s, atol=1e-3)) if len(pts) > 1 else True,
        "first_fragment_s": arrivals[0] if arrivals else None,
        "max_gap_between_fragments_s": float(gaps.max()),
        "p99_gap_between_fragments_s": float(np.percentile(gaps, 99)),
        "lag_first_minute_s": float(np.median(lag[:minute])),
        "lag_last_minute_s": float(np.median(lag[-minute:])),
        "audio_encoder": audio_encoder or "wav2vec2",
        "audio_to_fragment_ms": {
            "p50": status.audio_to_fragment.p50_ms,
            "p95": status.audio_to_fragment.p95_ms,
            "count": status.audio_to_fragment.count,
        },
        "interrupt_to_idle_ms": {
            "p50": status.interrupt_to_idle.p50_ms,
            "p95": status.interrupt_to_idle.p95_ms,
            "count": status.interrupt_to_idle.count,
        },
        "generator_block_ms": {"p50": status.block_ms.p50_ms, "p95": status.block_ms.p95_ms},
        "utterances": status.utterances,
        "interrupted": status.interrupted,
        "session_s": status.total_s,
        "events": events,
    }


async def refused(address: str, size: str, steps: int, image: Path = PORTRAIT) -> dict:
    async def audio():
        async for chunk in paced_chunks(speech(3.0), RATE, 100):
            yield chunk
        yield END_OF_UTTERANCE

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        try:
            async for _ in converse(ch, header(size, steps, image), audio(), timeout=300):
                pass
        except grpc.aio.AioRpcError as e:
            return {"size": size, "code": e.code().name, "details": e.details()}
    return {"size": size, "code": "OK", "details": "the session was not refused"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--size", default="384*256")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--speech-s", type=float, default=20.0)
    ap.add_argument("--gap-s", type=float, default=30.0)
    ap.add_argument("--refuse-size", default="", help="a size the guard should refuse, e.g. 704*384")
    ap.add_argument("--soak-s", type=float, default=0.0, help="repeat the cycle until S seconds (e.g. 600)")
    ap.add_argument("--audio-encoder", default="", help="wav2vec2 (default) or whisper")
    ap.add_argument("--image", type=Path, default=PORTRAIT, help="the portrait (default: the square sample)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        live = asyncio.run(
            live_session(
                args.server,
                args.size,
                args.steps,
                args.speech_s,
                args.gap_s,
                args.soak_s,
                args.audio_encoder,
                args.image,
            )
        )
    except grpc.aio.AioRpcError as e:  # e.g. the real-time guard's FAILED_PRECONDITION, with its numbers
        live = {"size": args.size, "code": e.code().name, "details": e.details()}
    result = {"live": live}
    if args.refuse_size:
        result["guard"] = asyncio.run(refused(args.server, args.refuse_size, args.steps, args.image))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
