"""WebRTC (WHEP) viewers of a live session against a running gateway: what WebRTC adds.

One Converse session (speech at real-time pace) whose header and fragments are published into a
SessionHub, as the web front's WebSocket bridge does; an aiohttp app with the WHEP routes on
loopback; N aiortc viewers joining it. Per viewer count: fragment published -> its first frame
decoded at the viewer (p50/p95), frames received / frames fed, frame gaps, and the CPU seconds
this process spent per second of session (server side and the viewers' H.264/Opus decoding
together: an upper bound of the server's cost).

    python3 bench/whep_gpu.py --server 127.0.0.1:50051 --size 384*256 --steps 4 \
        --speech-s 20 --viewers 1,4,8 --out $OUT/whep.json
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from aiohttp import web

from avatar import grpc_util
from avatar.gateway.web import whep
from avatar.gateway.web.hub import SessionHub
from avatar.live_client import END_OF_UTTERANCE, converse, paced_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH (device_setup.sh) leaves bench/ out
from converse_gpu import PORTRAIT, RATE, header, speech  # noqa: E402
from whep_viewer import Received, whep_viewer  # noqa: E402


async def run(address: str, size: str, steps: int, speech_s: float, n_viewers: int, image: Path = PORTRAIT) -> dict:
    whep.register_h264_profiles()
    hub = SessionHub()
    session = hub.open()
    app = web.Application()
    endpoint = whep.add_whep_routes(app, hub, max_viewers=max(32, n_viewers), max_viewers_per_session=max(8, n_viewers))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    loop = asyncio.get_running_loop()
    published: list = []  # (time, pts_s)
    started = asyncio.Event()

    async def audio():
        await started.wait()
        async for chunk in paced_chunks(speech(speech_s), RATE, 100):
            yield chunk
        yield END_OF_UTTERANCE
        await asyncio.sleep(2.0)

    async def produce():
        try:
            async with grpc_util.create_channel(address) as channel:
                async for msg in converse(channel, header(size, steps, image), audio(), timeout=speech_s + 300):
                    kind = msg.WhichOneof("event")
                    if kind == "header":
                        session.publish_header(msg.header.init_segment, msg.header.mime_type)
                        started.set()
                    elif kind == "fragment" and msg.fragment.data:
                        session.publish_fragment(msg.fragment.data)
                        if msg.fragment.num_frames:
                            published.append((loop.time(), msg.fragment.pts_s))
        finally:
            hub.close(session)

    producer = asyncio.ensure_future(produce())
    await session.wait_ready(300)
    viewers = []
    for _ in range(n_viewers):
        got = Received()  # video: (arrival, pts in 1/90000 from the first frame)
        pc, _ = await whep_viewer(base, session.id, got, keep=lambda frame: frame.pts)
        viewers.append((pc, got.video))
    watched = list(endpoint.viewers.values())
    proc = psutil.Process()
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    await producer
    await asyncio.sleep(2.0)
    cpu_per_s = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    for pc, _ in viewers:
        await pc.close()
    await runner.cleanup()

    latencies, ratios, gaps = [], [], []
    for (_, frames), served in zip(viewers, watched):
        if not frames or served.first_video_pts_s is None:
            continue
        arrival = {round(served.first_video_pts_s + pts / 90000, 2): at for at, pts in frames}
        latencies += [arrival[round(p, 2)] - at for at, p in published if round(p, 2) in arrival]
        ratios.append(len(frames) / max(1, served.video_frames))
        gaps += list(np.diff([at for at, _ in frames]))
    lat = sorted(latencies)
    return {
        "viewers": n_viewers,
        "fragments_published": len(published),
        "latency_p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "latency_p95_ms": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1) if lat else None,
        "frames_received_of_fed_min": round(min(ratios), 4) if ratios else None,
        "frame_gap_median_ms": round(float(np.median(gaps)) * 1000, 1) if gaps else None,
        "frame_gap_max_ms": round(float(np.max(gaps)) * 1000, 1) if gaps else None,
        "process_cpu_s_per_s": round(cpu_per_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--size", default="384*256")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--speech-s", type=float, default=20.0)
    p.add_argument("--viewers", default="1,4,8", help="viewer counts to run, one session each")
    p.add_argument("--image", type=Path, default=PORTRAIT, help="the portrait (default: the square sample)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = []
    for n in (int(x) for x in args.viewers.split(",")):
        result = asyncio.run(run(args.server, args.size, args.steps, args.speech_s, n, args.image))
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"size": args.size, "steps": args.steps, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
