"""Latency of the LiveKit path: audio pushed into ConverseVideoGenerator -> the first video frame
that plays it, as a LiveKit avatar worker sees it (no LiveKit server: the frames are read as fast
as they come, which is the session's real-time pace).

Each utterance is pushed as LiveKit hands it over (100 ms rtc.AudioFrames at 24 kHz), either at
real-time pace (a streaming TTS) or all at once (--burst: a TTS faster than real time), then an
AudioSegmentEnd and a pause that the avatar fills with idle blocks. Also measured: the adapter's
own share, the PyAV decode of a fragment into rtc.VideoFrames.

CPU, tiny model (the figure in docs/clients.md):
    .venv/bin/avatar serve --listen 127.0.0.1:50051 &
    .venv/bin/python bench/livekit_latency.py --server 127.0.0.1:50051 --size 64*64 --steps 2
GPU (device machine, after `source bench/serve_gpu.sh`, with the [livekit] wheels carried):
    python3 bench/livekit_latency.py --server 127.0.0.1:50051 --size 384*256 --steps 4 --out $OUT/livekit.json
"""

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd

from avatar import grpc_util, media
from avatar.integrations import livekit as lk
from avatar.v1 import avatar_pb2

ROOT = Path(__file__).resolve().parent.parent
RATE = 24000  # LiveKit TTS output; the session runs at this rate too


def speech(seconds: float, offset_s: float) -> np.ndarray:
    pcm, rate = soundfile.read(str(ROOT / "assets" / "speech.wav"), dtype="float32", always_2d=True)
    mono = media.resample(pcm.mean(axis=1), rate, RATE)
    mono = np.tile(mono, int(np.ceil((seconds + offset_s) * RATE / len(mono))))
    start = round(offset_s * RATE)
    return (mono[start : start + round(seconds * RATE)] * 32767).astype(np.int16)


async def main(args) -> dict:
    decode_ms = []
    decode = lk.decode_video

    def timed_decode(init, fragment):
        t = time.perf_counter()
        frames = decode(init, fragment)
        decode_ms.append((time.perf_counter() - t) * 1e3)
        return frames

    lk.decode_video = timed_decode
    image = (ROOT / "assets" / "astronaut.png").read_bytes()
    header = avatar_pb2.ConverseHeader(image=image, size=args.size, sample_steps=args.steps, sample_rate=RATE)
    async with grpc_util.create_channel(args.server) as channel:
        gen = lk.ConverseVideoGenerator(channel, header)
        h = await gen.start()
        first_speaking: list[float] = []
        previous_video = None

        async def read():
            nonlocal previous_video
            async for item in gen:
                if isinstance(item, rtc.VideoFrame):
                    previous_video = time.monotonic()
                elif isinstance(item, rtc.AudioFrame) and previous_video is not None:
                    if len(first_speaking) < len(pushed_at):  # the first audio of this utterance
                        first_speaking.append(previous_video)

        pushed_at: list[float] = []
        reader = asyncio.create_task(read())
        await asyncio.sleep(1.0)  # the session idles first, as it does before the agent speaks
        for u in range(args.utterances):
            pcm = speech(args.speech_s, offset_s=u * 2.0)
            n = RATE // 10
            frames = [
                rtc.AudioFrame(pcm[i : i + n].tobytes(), RATE, 1, len(pcm[i : i + n])) for i in range(0, len(pcm), n)
            ]
            start = time.monotonic()
            pushed_at.append(start)
            for i, frame in enumerate(frames):
                await gen.push_audio(frame)
                if not args.burst:
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))
            await gen.push_audio(AudioSegmentEnd())
            deadline = time.monotonic() + args.speech_s + 30
            while len(first_speaking) <= u and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(args.speech_s + args.gap_s)  # it plays, then idles
        await gen.end()
        await asyncio.wait_for(reader, 120)
    lat = sorted((v - p) * 1e3 for p, v in zip(pushed_at, first_speaking))
    s = gen.status
    return {
        "size": f"{h.width}x{h.height}",
        "sample_steps": h.sample_steps,
        "model": h.model,
        "pace": "burst" if args.burst else "real time",
        "utterances": args.utterances,
        "audio_pushed_to_first_video_ms": [round(v) for v in lat],
        "audio_pushed_to_first_video_p50_ms": round(statistics.median(lat)) if lat else None,
        "fragment_decode_ms_p50": round(statistics.median(decode_ms), 2) if decode_ms else None,
        "server_audio_to_fragment_p50_ms": s.audio_to_fragment.p50_ms if s else None,
        "generator_block_ms_p50": s.block_ms.p50_ms if s else None,
        "blocks": s.blocks if s else None,
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="a running gateway, e.g. 127.0.0.1:50051")
    ap.add_argument("--size", default="64*64")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--utterances", type=int, default=3)
    ap.add_argument("--speech-s", type=float, default=3.0)
    ap.add_argument("--gap-s", type=float, default=1.5)
    ap.add_argument("--burst", action="store_true", help="push each utterance at once instead of in real time")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    result = asyncio.run(main(args))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
