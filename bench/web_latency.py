"""Latency of the web front (`avatar serve --http`) beside the gRPC API it translates.

Three paths, each fed the same speech at real-time pace in 100 ms chunks:
- gRPC Converse (avatar.live_client), the baseline;
- WebSocket /v1/converse (what the page uses): audio sent -> the fragment holding its first sample
  received, measured by the client exactly as the page shows it;
- HTTP job: POST /v1/jobs -> first video byte of GET /v1/jobs/{id}/video.mp4 (a whole file,
  not real time: time to first picture).
Prints p50/p95 per path and writes them as JSON (--out), with the server's own figure of the same
sessions (audio chunk received -> fragment sent, from the status): the difference is what the
transport (and, for the WebSocket, the bridge) adds, even on a machine too loaded for real time.

    avatar serve --http 8080 &            # the tiny model on CPU, or --random-weights --device cuda
    python3 bench/web_latency.py --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 --size 64*64 --steps 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
from pathlib import Path

import aiohttp
import numpy as np
import soundfile

from avatar import grpc_util
from avatar.live_client import END_OF_UTTERANCE, converse
from avatar.v1 import avatar_pb2

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
CHUNK_S = 0.1


def speech(seconds: float) -> bytes:
    pcm, rate = soundfile.read(str(ROOT / "assets" / "speech.wav"), dtype="int16")
    assert rate == RATE
    reps = int(np.ceil(seconds * RATE / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * RATE)].tobytes()


def summary(values_s: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
    }


class Sender:
    """Sends PCM chunks at real-time pace and remembers when each audio second left."""

    def __init__(self, pcm: bytes):
        self.pcm, self.sent = pcm, []  # (audio end s, monotonic time)

    async def chunks(self):
        n = int(CHUNK_S * RATE) * 2
        t0 = time.monotonic()
        for at in range(0, len(self.pcm), n):
            await asyncio.sleep(max(0.0, t0 + at / 2 / RATE - time.monotonic()))
            piece = self.pcm[at : at + n]
            self.sent.append(((at + len(piece)) / 2 / RATE, time.monotonic()))
            yield piece

    def sent_at(self, audio_s: float) -> float | None:
        """When the chunk holding the sample at audio_s left."""
        return next((t for end, t in self.sent if end > audio_s + 1e-6), None)


async def grpc_path(args, pcm: bytes) -> dict:
    sender, lat, started = Sender(pcm), [], asyncio.Event()
    header = avatar_pb2.ConverseHeader(
        image=args.image.read_bytes(),
        size=args.size,
        sample_steps=args.steps,
        sample_rate=RATE,
    )

    async def requests():
        await started.wait()
        async for chunk in sender.chunks():
            yield chunk
        yield END_OF_UTTERANCE  # then EndOfStream: the session ends with its status

    block_ms = server = None
    async with grpc_util.create_channel(args.grpc, token=args.token) as channel:
        async for msg in converse(channel, header, requests(), timeout=600):
            kind = msg.WhichOneof("event")
            if kind == "header":
                block_ms = msg.header.measured_block_ms
                started.set()
            elif kind == "fragment" and not msg.fragment.idle and msg.fragment.num_frames:
                if (t := sender.sent_at(msg.fragment.audio_start_s)) is not None:
                    lat.append(time.monotonic() - t)
            elif kind == "status":
                server = msg.status.audio_to_fragment
    # the generator's ms per block at the start: above 480 the machine cannot keep real time
    return {
        "audio_to_fragment": summary(lat),
        "server_audio_to_fragment": {"p50_ms": server.p50_ms, "p95_ms": server.p95_ms},
        "measured_block_ms": block_ms,
    }


async def websocket_path(args, pcm: bytes) -> dict:
    sender, lat, block_ms, server = Sender(pcm), [], None, {}
    header = {
        "image": base64.b64encode(args.image.read_bytes()).decode(),
        "size": args.size,
        "sample_steps": args.steps,
        "sample_rate": RATE,
    }
    protocols = ("avatar.v1", f"bearer.{args.token}") if args.token else ("avatar.v1",)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{args.http}/v1/converse", protocols=protocols, max_msg_size=0) as ws:
            await ws.send_str(json.dumps(header))

            async def feed():
                async for chunk in sender.chunks():
                    await ws.send_bytes(chunk)
                await ws.send_str('{"type": "end_of_utterance"}')
                await ws.send_str('{"type": "end"}')

            feeder = None
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                obj = json.loads(msg.data)
                if obj["type"] == "header":
                    block_ms = obj["measured_block_ms"]
                    feeder = asyncio.create_task(feed())
                elif obj["type"] == "fragment" and not obj["idle"] and obj["num_frames"]:
                    if (t := sender.sent_at(obj["audio_start_s"])) is not None:
                        lat.append(time.monotonic() - t)
                elif obj["type"] == "status":
                    server = obj["audio_to_fragment"]
                elif obj["type"] == "error":
                    raise RuntimeError(obj)
            if feeder:
                feeder.cancel()
    return {
        "audio_to_fragment": summary(lat),
        "server_audio_to_fragment": {"p50_ms": server.get("p50_ms"), "p95_ms": server.get("p95_ms")},
        "measured_block_ms": block_ms,
    }


async def http_job_path(args, runs: int = 3) -> dict:
    first_byte = []
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(runs):
            form = aiohttp.FormData()
            form.add_field("image", args.image.read_bytes(), filename=args.image.name)
            form.add_field("audio", (ROOT / "assets" / "speech.wav").read_bytes(), filename="speech.wav")
            form.add_field("size", args.size)
            form.add_field("steps", str(args.steps))
            t0 = time.monotonic()
            async with http.post(f"{args.http}/v1/jobs", data=form) as r:
                job = await r.json()
                assert r.status == 201, job
            async with http.get(job["url"]) as r:
                await r.content.readany()
                first_byte.append(time.monotonic() - t0)
                await r.read()
    return {"post_to_first_video_byte": summary(first_byte)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", default="127.0.0.1:50051", help="the gateway's gRPC address")
    p.add_argument("--http", default="http://127.0.0.1:8080", help="the web front's base URL")
    p.add_argument("--token", default=None, help="API token, if the server has one")
    p.add_argument("--size", default="64*64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--speech-s", type=float, default=15.0, help="seconds of speech per session")
    p.add_argument("--image", type=Path, default=ROOT / "assets" / "astronaut.png", help="the portrait")
    p.add_argument("--out", default=None, help="write the figures here as JSON")
    args = p.parse_args()
    pcm = speech(args.speech_s)
    result = {
        "size": args.size,
        "steps": args.steps,
        "speech_s": args.speech_s,
        "grpc_converse": await grpc_path(args, pcm),
        "websocket": await websocket_path(args, pcm),
        "http_job": await http_job_path(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
