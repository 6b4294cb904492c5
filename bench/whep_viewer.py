"""An aiortc WHEP viewer of a live session, shared by bench/whep_gpu.py and tests/test_whep.py:
recvonly video and audio (or one of them), the SDP offer POSTed, every frame decoded recorded with its arrival
time on the event loop's clock."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar.gateway.web import whep


@dataclass
class Received:
    """What a viewer got, per track: (arrival, what `keep` kept of the frame); the tracks that ended."""

    video: list = field(default_factory=list)
    audio: list = field(default_factory=list)
    ended: set = field(default_factory=set)


async def whep_viewer(
    base: str,
    session_id: str,
    got: Received,
    token: str | None = None,
    keep: Callable = lambda frame: frame,
    kinds: tuple[str, ...] = ("video", "audio"),
) -> tuple[RTCPeerConnection, str]:
    """Joins session `session_id` at the gateway `base` (http://host:port), with `token` as the
    ?token= query when given; frames go into `got` until the tracks end. `keep` picks what is kept
    of each frame (a bench of many viewers keeps the pts, not every decoded picture); `kinds`, the
    tracks offered. Returns the connection (the caller closes it; the answer is its
    remoteDescription) and the viewer's resource (the answer's Location)."""
    whep.register_h264_profiles()  # an aiortc viewer must offer High profile to get the decoder's H.264
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    loop = asyncio.get_running_loop()

    @pc.on("track")
    def on_track(track):
        async def read():
            try:
                while True:
                    frame = await track.recv()
                    getattr(got, track.kind).append((loop.time(), keep(frame)))
            except MediaStreamError:
                got.ended.add(track.kind)

        asyncio.ensure_future(read())

    await pc.setLocalDescription(await pc.createOffer())
    query = f"?token={token}" if token is not None else ""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/v1/sessions/{session_id}/whep{query}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as resp:
            answer = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"offer refused: {resp.status} {answer}")
            if resp.content_type != "application/sdp":
                raise RuntimeError(f"the answer is {resp.content_type}, not application/sdp")
            location = resp.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, location
