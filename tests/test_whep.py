"""WebRTC egress (gateway/web/whep.py): WHEP viewers of a live Converse session, on loopback.

A real Converse session runs through the tiny mesh (`avatar serve --role all`); the test publishes
its header and fragments into a LiveSession, as the WebSocket bridge does, and serves an aiohttp
app with just the WHEP routes. Viewers: an aiortc client (frames, fps, audio, the H.264 bytes
are the decoder's) and headless Chromium (getStats framesDecoded, <video> currentTime).
"""

import asyncio
import io
import json
import shutil
import statistics
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import soundfile
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.h264 import H264Decoder, H264Encoder

from avatar import grpc_util
from avatar.gateway.web import whep
from avatar.gateway.web.hub import SessionHub
from avatar.live_client import END_OF_UTTERANCE, converse, paced_chunks, pcm16
from avatar.services.decoder.fmp4 import FragmentedMp4Writer, split_annexb
from avatar.v1 import avatar_pb2
from tests.conftest import ASSETS, ROOT, Services, trim_speech

sys.path.insert(0, str(ROOT / "bench"))
from whep_viewer import Received, whep_viewer  # noqa: E402

IMAGE = (ASSETS / "astronaut.png").read_bytes()
RATE = 16000
TOKEN = "whep-test-token"
STATIC = Path(whep.__file__).parent / "static"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory, env):
    services = Services(tmp_path_factory.mktemp("whep"), env)
    try:
        yield services.start("all", "--live-idle-timeout-s", "30")
    finally:
        services.stop_all()


@asynccontextmanager
async def whep_app(hub: SessionHub, **kw):
    """An aiohttp app with only the WHEP routes (and the static files) on a free loopback port."""
    app = web.Application()
    endpoint = whep.add_whep_routes(app, hub, **kw)
    app.router.add_static("/static/", STATIC)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", endpoint
    finally:
        await runner.cleanup()


@dataclass
class Published:
    """What the Converse session put into the LiveSession, with publish times (loop clock)."""

    header: object = None
    fragments: list = field(default_factory=list)  # (published at, ConverseFragment)
    ended_at: float | None = None


async def live_session(address: str, hub: SessionHub, session, speech: Path, out: Published) -> None:
    """Speech fed in real time through Converse; its stream is published into `session`."""
    pcm, rate = soundfile.read(str(speech), dtype="float32")
    assert rate == RATE
    started = asyncio.Event()

    async def script():
        await started.wait()
        async for chunk in paced_chunks(pcm16(pcm), RATE, 100, realtime=True):
            yield chunk
        yield END_OF_UTTERANCE
        await asyncio.sleep(1.0)  # a few idle blocks after the speech

    hdr = avatar_pb2.ConverseHeader(image=IMAGE, size="64*64", sample_steps=2, sample_rate=RATE)
    loop = asyncio.get_running_loop()
    try:
        async with grpc_util.create_channel(address) as channel:
            async for msg in converse(channel, hdr, script(), timeout=120):
                kind = msg.WhichOneof("event")
                if kind == "header":
                    out.header = msg.header
                    session.publish_header(msg.header.init_segment, msg.header.mime_type)
                    started.set()
                elif kind == "fragment" and msg.fragment.data:
                    session.publish_fragment(msg.fragment.data)
                    out.fragments.append((loop.time(), msg.fragment))
    finally:
        out.ended_at = loop.time()
        hub.close(session)


def fragment_samples(init: bytes, fragment: bytes) -> list[bytes]:
    """The H.264 NAL units of a fragment's video samples (length-prefixed in the mdat)."""
    nals = []
    with av.open(io.BytesIO(init + fragment), format="mp4") as c:
        for packet in c.demux(video=0):
            data, i = bytes(packet), 0
            while i < len(data):
                n = int.from_bytes(data[i : i + 4], "big")
                nals.append(data[i + 4 : i + 4 + n])
                i += 4 + n
    return nals


@pytest.mark.mesh
def test_aiortc_viewer_receives_the_decoders_h264_and_the_audio(server, tmp_path, monkeypatch):
    speech = trim_speech(tmp_path / "speech.wav", 0.5, 4.0)
    received_units, encoded = [], []
    decode, encode_frame = H264Decoder.decode, H264Encoder._encode_frame
    # what reaches the viewer's decoder, depayloaded; and whether anyone encodes video
    monkeypatch.setattr(H264Decoder, "decode", lambda self, f: received_units.append(f.data) or decode(self, f))
    monkeypatch.setattr(H264Encoder, "_encode_frame", lambda *a: encoded.append(1) or encode_frame(*a))

    async def main():
        hub = SessionHub()
        session = hub.open()
        pub, got = Published(), Received()
        async with whep_app(hub, auth=whep.token_auth([TOKEN])) as (base, endpoint):
            producer = asyncio.ensure_future(live_session(server.address, hub, session, speech, pub))
            assert await session.wait_ready(60)
            pc, location = await whep_viewer(base, session.id, got, TOKEN)
            (viewer,) = endpoint.viewers.values()
            assert location == f"/v1/sessions/{session.id}/whep/{viewer.id}"
            assert whep.VIEWERS._value.get() == 1
            await asyncio.wait_for(producer, 120)
            for _ in range(100):  # the tracks end after the session did
                if got.ended == {"video", "audio"}:
                    break
                await asyncio.sleep(0.1)
            state = (got.ended, dict(endpoint.viewers), whep.VIEWERS._value.get())
            await pc.close()
        return pub, got, viewer, state

    packets_before = whep.RTP_PACKETS.labels(kind="video")._value.get()
    pub, got, viewer, (ended, viewers_left, gauge) = asyncio.run(main())
    assert ended == {"video", "audio"} and not viewers_left and gauge == 0

    # video: the session's size, 25 fps in media time and on arrival, every frame of the
    # fragments the viewer was fed (it joined mid-session: from the next fragment on)
    frames = [f for _, f in got.video]
    assert {(f.width, f.height) for f in frames} == {(pub.header.width, pub.header.height)} == {(64, 64)}
    # (aiortc's jitter buffer hands a frame on when the next one starts: the very last stays)
    assert viewer.video_frames >= 96 and len(frames) == viewer.video_frames - 1, (len(frames), viewer.video_frames)
    assert {b.pts - a.pts for a, b in zip(frames, frames[1:])} == {90000 // 25}
    # paced at 25 fps, not sent in block-sized bursts; and keeping up with the session (which on
    # a loaded CPU may itself run slower than real time)
    arrivals = np.array([t for t, _ in got.video])
    gap_ms = float(np.median(np.diff(arrivals))) * 1000
    assert 30 <= gap_ms <= 50, gap_ms
    fed = [at for at, f in pub.fragments if f.num_frames and f.pts_s >= viewer.first_video_pts_s - 1e-6]
    assert arrivals[-1] - arrivals[0] <= max(fed[-1] - fed[0], len(frames) / 25) + 1.0
    # audio: Opus decoded by the viewer, 48 kHz, about as long as the video
    samples = sum(f.samples for _, f in got.audio)
    assert {f.sample_rate for _, f in got.audio} == {48000}
    assert abs(samples / 48000 - len(frames) / 25) < 0.5, (samples / 48000, len(frames) / 25)
    audio_level = np.sqrt(np.mean(np.concatenate([f.to_ndarray().reshape(-1) for _, f in got.audio]) ** 2.0))
    assert audio_level > 100  # speech, not silence (s16)

    # no second encode: every access unit received is, NAL for NAL, a sample of a published
    # fragment (SPS/PPS in front of each IDR), and no video encoder ever ran
    init = pub.header.init_segment
    samples_sent = {nal for _, f in pub.fragments for nal in fragment_samples(init, f.data)}
    vcl = [nal for unit in received_units for nal in split_annexb(unit) if nal[0] & 0x1F in (1, 5)]
    assert len(vcl) == len(frames) and all(nal in samples_sent for nal in vcl)
    assert sum(nal[0] & 0x1F == 5 for nal in vcl) == viewer.video_frames // 12  # one IDR per fragment
    first_unit = [n[0] & 0x1F for n in split_annexb(received_units[0])]  # e.g. SEI, SPS, PPS, IDR
    assert vcl[0][0] & 0x1F == 5 and first_unit.index(7) < first_unit.index(8) < first_unit.index(5), first_unit
    assert not encoded
    assert whep.RTP_PACKETS.labels(kind="video")._value.get() > packets_before

    # latency: a fragment published -> its first frame at the viewer
    first_media = viewer.first_video_pts_s
    arrival_of = {round(first_media + f.pts / 90000, 2): t for t, f in got.video}
    lat = [arrival_of[round(frag.pts_s, 2)] - at for at, frag in pub.fragments if round(frag.pts_s, 2) in arrival_of]
    assert len(lat) == viewer.video_frames // 12
    print(
        f"\nWHEP latency fragment published -> first frame received: p50 {statistics.median(lat) * 1000:.0f} ms, "
        f"max {max(lat) * 1000:.0f} ms over {len(lat)} fragments; median frame gap {gap_ms:.1f} ms, "
        f"{len(frames) / (arrivals[-1] - arrivals[0]):.2f} fps received while the session published "
        f"{12 * (len(fed) - 1) / (fed[-1] - fed[0]):.2f} fps"
    )
    assert statistics.median(lat) < 1.0, lat


# --- headless Chromium ---------------------------------------------------------------------------


@pytest.mark.mesh
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_chromium_watches_a_live_session_over_webrtc(server, tmp_path):
    from playwright.async_api import async_playwright

    speech = trim_speech(tmp_path / "speech.wav", 0.5, 5.0)

    async def main():
        hub = SessionHub()
        session = hub.open()
        pub = Published()
        async with whep_app(hub, auth=whep.token_auth([TOKEN])) as (base, endpoint):
            producer = asyncio.ensure_future(live_session(server.address, hub, session, speech, pub))
            assert await session.wait_ready(60)
            async with async_playwright() as p:
                browser = await p.chromium.launch(
                    executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
                )
                try:
                    page = await browser.new_page()
                    await page.goto(f"{base}/static/whep_test.html?session={session.id}&token={TOKEN}")
                    await page.evaluate("window.viewer.then(() => true)")
                    samples = []
                    for _ in range(40):
                        samples.append(
                            await page.evaluate(
                                """async () => {
                                  const v = await window.viewer;
                                  let decoded = 0, audio = 0, codec = '';
                                  (await v.pc.getStats()).forEach((s) => {
                                    if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded;
                                    if (s.type === 'inbound-rtp' && s.kind === 'audio') audio = s.packetsReceived;
                                    if (s.type === 'codec' && s.mimeType.startsWith('video/')) codec = s.sdpFmtpLine;
                                  });
                                  const el = document.getElementById('video');
                                  return {decoded, audio, codec, time: el.currentTime, w: el.videoWidth};
                                }"""
                            )
                        )
                        if len(samples) > 8 and samples[-1]["time"] > 1.0:
                            break
                        await asyncio.sleep(0.25)
                    viewers_while_live = len(endpoint.viewers)
                    await page.evaluate("window.viewer.then((v) => v.stop())")
                    for _ in range(50):
                        if not endpoint.viewers:
                            break
                        await asyncio.sleep(0.1)
                    viewers_after_stop = len(endpoint.viewers)
                finally:
                    await browser.close()
            await asyncio.wait_for(producer, 120)
        return samples, viewers_while_live, viewers_after_stop

    samples, live, after = asyncio.run(main())
    last = samples[-1]
    assert live == 1 and after == 0  # stop() DELETEs the viewer resource
    assert last["decoded"] > 0 and last["audio"] > 0 and last["w"] == 64, samples
    times = [s["time"] for s in samples]
    assert times[-1] > 1.0 and times[-1] > times[len(times) // 2] > 0, times
    assert "profile-level-id=" in last["codec"], last


# --- bad input -------------------------------------------------------------------------------------


def synthetic_session(hub: SessionHub, blocks: int = 0):
    """A LiveSession with a real init segment (and optionally fragments), no mesh needed."""
    writer = FragmentedMp4Writer(64, 64, 25, 48000)
    session = hub.open()
    session.publish_header(writer.init_segment(), writer.mime_type())
    return session, writer


async def offer_sdp(video_profiles: tuple[str, ...] | None = None) -> str:
    whep.register_h264_profiles()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    video = pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    if video_profiles is not None:
        from aiortc import RTCRtpSender

        caps = RTCRtpSender.getCapabilities("video").codecs
        video.setCodecPreferences([c for c in caps if c.parameters.get("profile-level-id") in video_profiles])
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@pytest.mark.mesh
def test_bad_offers_are_refused_with_a_reason(monkeypatch):
    monkeypatch.setattr(whep, "READY_TIMEOUT_S", 0.3)

    async def main():
        hub = SessionHub()
        session, _ = synthetic_session(hub)
        silent = hub.open()  # no header yet
        good = await offer_sdp()
        results = {}
        async with whep_app(hub, auth=whep.token_auth([TOKEN]), max_viewers_per_session=1) as (base, endpoint):
            url = f"{base}/v1/sessions/{session.id}/whep"
            sdp = {"Content-Type": "application/sdp"}
            auth = {"Authorization": f"Bearer {TOKEN}"}

            async def post(path, body, headers):
                async with http.post(path, data=body, headers=headers) as r:
                    return r.status, (await r.json() if r.content_type == "application/json" else await r.text())

            async with aiohttp.ClientSession() as http:
                results["no token"] = await post(url, good, sdp)
                results["wrong token"] = await post(url, good, {**sdp, "Authorization": "Bearer nope"})
                results["wrong query token"] = await post(url + "?token=nope", good, sdp)
                results["not sdp type"] = await post(url, good, {**auth, "Content-Type": "text/plain"})
                results["not sdp"] = await post(url, "hello", {**auth, **sdp})
                results["sendonly"] = await post(url, good.replace("a=recvonly", "a=sendonly"), {**auth, **sdp})
                results["too big"] = await post(url, "v=0\r\n" + "a=x\r\n" * 20000, {**auth, **sdp})
                results["unknown session"] = await post(f"{base}/v1/sessions/nope/whep", good, {**auth, **sdp})
                results["not ready"] = await post(f"{base}/v1/sessions/{silent.id}/whep", good, {**auth, **sdp})
                baseline_only = await offer_sdp(("42001f", "42e01f"))
                results["baseline only"] = await post(url, baseline_only, {**auth, **sdp})
                results["first"] = await post(url, good, {**auth, **sdp})
                results["second"] = await post(url, good, {**auth, **sdp})
                (viewer,) = endpoint.viewers.values()
                resource = f"{base}/v1/sessions/{session.id}/whep/{viewer.id}"
                async with http.patch(resource, data="a=candidate", headers=auth) as r:
                    results["patch"] = r.status, await r.json()
                async with http.delete(resource) as r:
                    results["delete no token"] = r.status, None
                async with http.delete(resource, headers=auth) as r:
                    results["delete"] = r.status, None
                async with http.delete(resource, headers=auth) as r:
                    results["delete again"] = r.status, await r.json()
                results["viewers after delete"] = len(endpoint.viewers), whep.VIEWERS._value.get()
                hub.close(session)
                results["ended session"] = await post(url, good, {**auth, **sdp})
        return results

    r = asyncio.run(main())
    assert r["no token"][0] == 401 and "missing API token" in r["no token"][1]["error"]
    assert r["wrong token"] == (401, {"error": "invalid API token"}) == r["wrong query token"]
    assert r["not sdp type"][0] == 415 and "application/sdp" in r["not sdp type"][1]["error"]
    assert r["not sdp"][0] == 400 and "not an SDP offer" in r["not sdp"][1]["error"]
    assert r["sendonly"][0] == 400 and "receive" in r["sendonly"][1]["error"]
    assert r["too big"][0] == 413
    assert r["unknown session"] == (404, {"error": "no live session 'nope'"})
    assert r["not ready"][0] == 409 and "not started" in r["not ready"][1]["error"]
    assert r["baseline only"][0] == 400 and "64001f" in r["baseline only"][1]["error"], r["baseline only"]
    assert r["first"][0] == 201 and r["first"][1].startswith("v=0")
    assert r["second"][0] == 429 and "1 WebRTC viewers" in r["second"][1]["error"]
    assert r["patch"][0] == 405 and "trickle" in r["patch"][1]["error"]
    assert r["delete no token"][0] == 401 and r["delete"][0] == 200 and r["delete again"][0] == 404
    assert r["viewers after delete"] == (0, 0)
    assert r["ended session"][0] == 404


def test_viewer_limits_are_checked():
    with pytest.raises(ValueError, match="max_viewers_per_session"):
        whep.WhepEndpoint(SessionHub(), max_viewers=2, max_viewers_per_session=3)
    with pytest.raises(ValueError, match="non-empty token"):
        whep.token_auth([""])


@pytest.mark.mesh
def test_an_audio_only_viewer_gets_opus_and_its_track_ends_with_the_session(tmp_path, monkeypatch):
    from avatar import telemetry

    provider = telemetry.make_provider("whep-test", str(tmp_path / "spans.jsonl"))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))

    async def main():
        hub = SessionHub()
        session, writer = synthetic_session(hub)
        tone = (3000 * np.sin(2 * np.pi * 220 * np.arange(23040) / 48000)).astype(np.int16)
        got = Received()
        async with whep_app(hub) as (base, endpoint):
            pc, _ = await whep_viewer(base, session.id, got, kinds=("audio",))
            answer = pc.remoteDescription.sdp
            assert "m=video" not in answer and "opus/48000" in answer
            (viewer,) = endpoint.viewers.values()
            for _ in range(100):  # connected: the viewer subscribed to the session
                if session.viewers:
                    break
                await asyncio.sleep(0.05)
            frames = np.zeros((12, 64, 64, 3), np.uint8)
            for _ in range(5):
                session.publish_fragment(writer.write_block(frames, tone))
                await asyncio.sleep(0.48)
            hub.close(session)
            for _ in range(100):
                if got.ended:
                    break
                await asyncio.sleep(0.05)
            await pc.close()
            return got, viewer, len(endpoint.viewers)

    got, viewer, left = asyncio.run(main())
    assert got.ended == {"audio"} and left == 0 and viewer.video_frames == 0
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for _, f in got.audio]).astype(np.float32)
    assert len(pcm) / 2 / 48000 > 1.5  # stereo s16 from Opus: most of the 2.4 s
    assert np.sqrt(np.mean(pcm**2)) > 500  # the tone, not silence
    provider.shutdown()
    (span,) = [json.loads(x) for x in (tmp_path / "spans.jsonl").read_text().splitlines()]
    attrs = span["attributes"]
    assert span["name"] == "whep_viewer" and attrs["end_reason"] == "session ended", span
    assert attrs["fragments"] == 5 and attrs["video_frames"] == 0 and attrs["rtp_audio_packets"] > 50


def test_a_viewers_clock_paces_by_media_time_and_re_anchors_when_far_off():
    clock = whep._Clock()
    assert clock.due(10.0, now=100.0) == 100.0  # anchored on the first item
    assert clock.due(10.48, now=100.1) == pytest.approx(100.48)  # early: waits for its slot
    assert clock.due(10.96, now=100.96 + whep.MAX_LATE_S - 0.01) == pytest.approx(100.96)  # a bit late: sent now
    # the producer stalled: later than MAX_LATE_S, the clock moves instead of bursting to catch up
    assert clock.due(11.44, now=102.5) == 102.5 and clock.due(11.92, now=102.5) == pytest.approx(102.98)
    # fragments were skipped (media jumped ahead): re-anchored instead of a long wait
    assert clock.due(30.0, now=103.0) == 103.0
