"""WebRTC egress, WHEP-style: a browser or any WHEP player watches a live session over WebRTC.

    POST   /v1/sessions/{id}/whep            Content-Type: application/sdp, body: the SDP offer
           -> 201, body: the SDP answer, Location: /v1/sessions/{id}/whep/{viewer}
    DELETE /v1/sessions/{id}/whep/{viewer}   -> 200, the viewer ends

No trickle ICE: aiortc gathers its candidates before it answers, so the answer is complete and a
PATCH is refused with 405 (the offer should carry the client's candidates too, or the server
learns them as peer-reflexive from the client's connectivity checks).

Nothing is encoded twice. Each viewer subscribes to the session's fMP4 fragments (SessionHub),
demuxes them with PyAV and hands the decoder's H.264 access units to aiortc as av.Packets, which
aiortc packetizes (RFC 6184) without encoding. The AAC audio is decoded and aiortc encodes it as
Opus (WebRTC has no AAC). Both tracks are paced by their media timestamps on one clock per viewer.
A viewer starts at the next fragment, which starts with an IDR frame (with SPS/PPS in front), so
it needs no keyframe request; a lost keyframe costs at most one block (0.48 s).

The decoder's stream is H.264 High profile, which aiortc's codec table does not list and which
Chromium offers as High 4:4:4 Predictive (f4001f, whose decoders decode High) but not as 64001f;
register_h264_profiles() adds the missing profiles and each viewer negotiates the first profile
in the offer whose decoders must decode the stream (H264_CARRIERS).
"""

from __future__ import annotations

import asyncio
import fractions
import hmac
import inspect
import io
import json
import logging
import secrets
from collections.abc import Awaitable, Callable

import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc import codecs as rtc_codecs
from aiortc import rtp as rtc_rtp
from aiortc import sdp as rtc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecCapability, RTCRtpCodecParameters
from opentelemetry.trace import Status, StatusCode
from prometheus_client import Counter, Gauge

from avatar import telemetry
from avatar.gateway.web.hub import LiveSession, SessionHub
from avatar.metrics import REGISTRY

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
MAX_OFFER_BYTES = 64 * 1024  # a browser offer is 4-10 kB
READY_TIMEOUT_S = 10.0  # a viewer may arrive just before the session's header
CONNECT_TIMEOUT_S = 30.0  # an answered viewer that never connects is dropped
MAX_LATE_S, MAX_EARLY_S = 0.5, 3.0  # beyond these a viewer's clock re-anchors (late or skipped fragments)
FEED_LEAD_S = 0.2  # a fragment is demuxed this long before its first frame is due

H264 = rtc_sdp.H264Profile
# Which negotiated H.264 profiles can carry a stream of a given profile: those whose decoders
# must decode it. Constrained High forbids B slices and interlace: the decoder's x264 runs with
# bframes=0 on progressive frames, so its High stream conforms and Safari (640c1f) can take it.
H264_CARRIERS = {
    H264.PROFILE_CONSTRAINED_BASELINE: tuple(H264),
    H264.PROFILE_BASELINE: (H264.PROFILE_BASELINE,),
    H264.PROFILE_MAIN: (H264.PROFILE_MAIN, H264.PROFILE_HIGH, H264.PROFILE_PREDICTIVE_HIGH_444),
    H264.PROFILE_CONSTRAINED_HIGH: (H264.PROFILE_CONSTRAINED_HIGH, H264.PROFILE_HIGH, H264.PROFILE_PREDICTIVE_HIGH_444),
    H264.PROFILE_HIGH: (H264.PROFILE_HIGH, H264.PROFILE_PREDICTIVE_HIGH_444, H264.PROFILE_CONSTRAINED_HIGH),
}
# profile-level-id of the table entry that stands for each profile (the level is not negotiated:
# level-asymmetry-allowed=1)
_PROFILE_LEVEL_IDS = {
    H264.PROFILE_CONSTRAINED_BASELINE: "42e01f",
    H264.PROFILE_BASELINE: "42001f",
    H264.PROFILE_MAIN: "4d001f",
    H264.PROFILE_CONSTRAINED_HIGH: "640c1f",
    H264.PROFILE_HIGH: "64001f",
    H264.PROFILE_PREDICTIVE_HIGH_444: "f4001f",
}

OPUS = RTCRtpCodecCapability(mimeType="audio/opus", clockRate=48000, channels=2)
RTX = RTCRtpCodecCapability(mimeType="video/rtx", clockRate=90000)  # retransmissions on their own stream

VIEWERS = Gauge("avatar_whep_viewers", "WebRTC (WHEP) viewers connected or connecting", registry=REGISTRY)
REFUSED = Counter("avatar_whep_refused", "WHEP offers refused, by reason", ["reason"], registry=REGISTRY)
RTP_PACKETS = Counter("avatar_whep_rtp_packets", "RTP packets sent to WHEP viewers", ["kind"], registry=REGISTRY)
RTP_BYTES = Counter("avatar_whep_rtp_bytes", "RTP payload bytes sent to WHEP viewers", ["kind"], registry=REGISTRY)

Auth = Callable[[web.Request], "Awaitable[None] | None"]
WHEP = web.AppKey("whep", "WhepEndpoint")  # app[WHEP]: the endpoint add_whep_routes added


def token_auth(tokens) -> Auth:
    """An auth callable accepting `Authorization: Bearer <token>` or `?token=<token>` (what a
    browser's WHEP player can send) for any of tokens; 401 with a JSON reason otherwise."""
    allowed = [t.encode() for t in tokens if t]
    if not allowed:
        raise ValueError("token_auth needs at least one non-empty token")

    def check(request: web.Request) -> None:
        header = request.headers.get("Authorization")
        token = request.query.get("token")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
        if token is None:
            reason = "missing API token: send 'Authorization: Bearer <token>' or ?token=<token>"
        elif token and any([hmac.compare_digest(token.encode(), t) for t in allowed]):
            return
        else:
            reason = "invalid API token"
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": reason}), content_type="application/json", headers={"WWW-Authenticate": "Bearer"}
        )

    return check


class OfferError(ValueError):
    """An offer this endpoint cannot answer; the message says why (HTTP 400)."""


def _h264_params(profile_level_id: str) -> dict:
    return {"level-asymmetry-allowed": "1", "packetization-mode": "1", "profile-level-id": profile_level_id}


def register_h264_profiles() -> None:
    """Adds the H.264 profiles aiortc's codec table lacks (Main, High, Constrained High, High
    4:4:4 Predictive; packetization-mode 1). Needed by the server and by an aiortc viewer that
    wants the decoder's High-profile stream; idempotent."""
    video = rtc_codecs.CODECS["video"]
    have = {c.parameters.get("profile-level-id") for c in video if c.mimeType == "video/H264"}
    for profile_level_id in _PROFILE_LEVEL_IDS.values():
        if profile_level_id in have:
            continue
        pt = max(c.payloadType for c in video) + 1  # aiortc's dynamic range starts at 97
        video += [
            RTCRtpCodecParameters(
                mimeType="video/H264",
                clockRate=90000,
                payloadType=pt,
                rtcpFeedback=[
                    RTCRtcpFeedback(type="nack"),
                    RTCRtcpFeedback(type="nack", parameter="pli"),
                    RTCRtcpFeedback(type="goog-remb"),
                ],
                parameters=_h264_params(profile_level_id),
            ),
            RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=pt + 1, parameters={"apt": pt}),
        ]


def accept_low_dynamic_payload_types() -> None:
    """Lets aiortc answer with the offer's payload type when it is in 35-63.

    Chromium numbers some formats below 96 (its High 4:4:4 Predictive H.264 is 41, say), as RFC
    3551 allows once 96-127 are taken; aiortc adopts an offered payload type only within 96-127
    and would answer with its own number, which the browser maps to another format (an RTX one):
    the viewer then receives packets but never assembles a frame. 64-95 stay out (they collide
    with RTCP packet types under rtcp-mux)."""
    rtc_rtp.DYNAMIC_PAYLOAD_TYPES = (*range(35, 64), *range(96, 128))


def stream_profile(init_segment: bytes) -> tuple[H264, str]:
    """The H.264 profile of a session's video (from its avcC) and its profile-level-id."""
    with av.open(io.BytesIO(init_segment), format="mp4") as container:
        if not container.streams.video:
            raise ValueError("the session's stream has no video track")
        avcc = bytes(container.streams.video[0].codec_context.extradata or b"")
    if len(avcc) < 4 or avcc[0] != 1:
        raise ValueError("the session's video has no avcC record")
    profile_level_id = avcc[1:4].hex()
    return rtc_sdp.parse_h264_profile_level_id(profile_level_id)[0], profile_level_id


def choose_video_codec(offer: rtc_sdp.SessionDescription, profile: H264) -> RTCRtpCodecCapability | None:
    """The H.264 entry of our codec table that answers the offer's first H.264 format able to carry
    a stream of `profile`; None when the offer has no video. OfferError when none fits."""
    video = [m for m in offer.media if m.kind == "video"]
    if not video:
        return None
    offered = []
    for codec in video[0].rtp.codecs:
        if codec.mimeType.lower() != "video/h264" or str(codec.parameters.get("packetization-mode", "0")) != "1":
            continue
        try:
            offered.append(
                rtc_sdp.parse_h264_profile_level_id(str(codec.parameters.get("profile-level-id", "42e01f")))[0]
            )
        except ValueError:
            continue
    # the stream's own profile first when offered, else the next profile whose decoders take it
    for carrier in H264_CARRIERS[profile]:
        if carrier in offered:
            return RTCRtpCodecCapability(
                mimeType="video/H264", clockRate=90000, parameters=_h264_params(_PROFILE_LEVEL_IDS[carrier])
            )
    wanted = ", ".join(_PROFILE_LEVEL_IDS[p] for p in H264_CARRIERS[profile])
    raise OfferError(
        f"the offer has no H.264 format (packetization-mode=1) that can carry this session's "
        f"{profile.name.removeprefix('PROFILE_').replace('_', ' ').lower()} profile video: "
        f"offer one of profile-level-id {wanted}"
    )


class FragmentDemuxer:
    """Cuts a session's fMP4 fragments into what aiortc sends: H.264 access units in Annex B
    (SPS/PPS before each IDR, as av.Packets with their media time) and decoded AAC audio as s16
    AudioFrames. The AAC decoder lives across fragments: a fresh one per fragment would lose the
    MDCT overlap and click at every block boundary."""

    def __init__(self, init_segment: bytes, audio: bool = True):
        self.init_segment, self.with_audio = init_segment, audio
        self._audio = av.CodecContext.create("aac", "r")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        self._audio_ready = False
        self._samples = 0  # continuous pts of the frames handed on (the Opus encoder counts them)

    def demux(self, fragment: bytes) -> tuple[list[tuple[float, av.Packet]], list[tuple[float, av.AudioFrame]]]:
        """(media seconds, packet) of each video access unit, (media seconds, frame) of the audio."""
        video, audio = [], []
        with av.open(io.BytesIO(self.init_segment + fragment), format="mp4") as container:
            vs = container.streams.video[0] if container.streams.video else None
            to_annexb = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", vs) if vs is not None else None
            for packet in container.demux():
                if packet.size == 0 or packet.pts is None:
                    continue
                if packet.stream.type == "video":
                    for unit in to_annexb.filter(packet):
                        video.append((float(unit.pts * unit.time_base), unit))
                elif packet.stream.type == "audio" and self.with_audio:
                    audio += self._decode_audio(packet)
        return video, audio

    def _decode_audio(self, packet: av.Packet) -> list[tuple[float, av.AudioFrame]]:
        if not self._audio_ready:
            source = packet.stream.codec_context
            self._audio.extradata = source.extradata  # AudioSpecificConfig
            self._audio.sample_rate, self._audio.layout = source.sample_rate, source.layout
            self._audio_ready = True
        at = float(packet.pts * packet.time_base)
        out = []
        for decoded in self._audio.decode(packet):
            for frame in self._resampler.resample(decoded):
                frame.pts, frame.time_base = self._samples, fractions.Fraction(1, 48000)
                self._samples += frame.samples
                out.append((at, frame))
        return out


class _Clock:
    """One viewer's mapping from media time to the event loop's clock, shared by its tracks so
    they stay in sync. It re-anchors when a fragment is far late (the producer stalled) or far
    early (fragments were skipped), instead of bursting or stalling."""

    def __init__(self):
        self._offset: float | None = None

    def due(self, media_s: float, now: float | None = None) -> float:
        """The loop time at which media time media_s is sent."""
        now = asyncio.get_running_loop().time() if now is None else now
        if self._offset is None or not -MAX_EARLY_S <= now - (media_s + self._offset) <= MAX_LATE_S:
            self._offset = now - media_s
        return media_s + self._offset


class _PacedTrack(MediaStreamTrack):
    """A track whose items (H.264 packets or audio frames) are released when their time comes."""

    def __init__(self, kind: str, viewer: Viewer):
        super().__init__()
        self.kind = kind
        self._viewer = viewer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.drained = asyncio.Event()

    async def recv(self):
        self._viewer.start()  # the sender asks for media once the connection is up
        item = await self.queue.get()
        if item is None:
            self.drained.set()
            self.stop()
            raise MediaStreamError
        due, data = item
        delay = due - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        return data


class Viewer:
    """One WHEP viewer of one live session: its peer connection, its two tracks and the task that
    feeds them from the session's fragments."""

    def __init__(self, endpoint: WhepEndpoint, session: LiveSession, profile: H264):
        self.id = secrets.token_urlsafe(9)
        self.endpoint, self.session = endpoint, session
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=endpoint.ice_servers))
        self.video = _PacedTrack("video", self)
        self.audio = _PacedTrack("audio", self)
        self.demuxer: FragmentDemuxer | None = None  # made by answer(), once the tracks are known
        self.clock = _Clock()
        self.fragments = 0  # fed to the tracks
        self.video_frames = 0  # H.264 access units fed
        self.first_video_pts_s: float | None = None  # media time of the first frame sent
        self.closed = asyncio.Event()
        self._feeder: asyncio.Task | None = None
        self._sent: dict[str, tuple[int, int]] = {}
        self.span = telemetry.tracer().start_span(
            "whep_viewer", attributes={"viewer": self.id, "h264_profile": profile.name}
        )

        @self.pc.on("connectionstatechange")
        async def _state():
            self.span.add_event(f"connection {self.pc.connectionState}")
            if self.pc.connectionState in ("failed", "closed"):
                await self.close(f"connection {self.pc.connectionState}", self.pc.connectionState == "failed")

    async def answer(self, offer: str, video_codec: RTCRtpCodecCapability | None, has_audio: bool) -> str:
        """Sets the offer, answers with our send-only tracks; ICE gathering completes first."""
        if video_codec is not None:
            self.pc.addTransceiver(self.video, direction="sendonly").setCodecPreferences([video_codec, RTX])
        if has_audio:
            self.pc.addTransceiver(self.audio, direction="sendonly").setCodecPreferences([OPUS])
        self.demuxer = FragmentDemuxer(self.session.init_segment, audio=has_audio)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self._connect_deadline)
        return self.pc.localDescription.sdp

    def _connect_deadline(self) -> None:
        if self._feeder is None and not self.closed.is_set():
            asyncio.ensure_future(self.close("not connected in time", error=True))

    def start(self) -> None:
        if self._feeder is None and not self.closed.is_set():
            self.span.add_event("media started")
            self._feeder = asyncio.ensure_future(self._feed())

    async def _feed(self) -> None:
        reason, error = "session ended", False
        try:
            async for fragment in self.session.fragments():
                video, audio = self.demuxer.demux(fragment)
                if not self._uses(self.video):  # an audio-only viewer
                    video = []
                if not video and not audio:
                    continue
                first = min(t for t, _ in video[:1] + audio[:1])
                wait = self.clock.due(first) - FEED_LEAD_S - asyncio.get_running_loop().time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if video and self.first_video_pts_s is None:
                    self.first_video_pts_s = video[0][0]
                for t, packet in video:
                    self.video.queue.put_nowait((self.clock.due(t), packet))
                for t, frame in audio:
                    self.audio.queue.put_nowait((self.clock.due(t), frame))
                self.fragments += 1
                self.video_frames += len(video)
                await self._count_sent()
        except Exception as exc:  # a fragment PyAV cannot read: end this viewer, not the session
            log.exception("WHEP viewer %s: feeding failed", self.id)
            self.span.record_exception(exc)
            reason, error = f"feeding failed: {type(exc).__name__}: {exc}", True
        finally:
            for track in (self.video, self.audio):
                track.queue.put_nowait(None)
        # the tracks end (RTCP BYE) once they have sent what is queued; then the connection goes
        sending = [t for t in (self.video, self.audio) if self._uses(t)]
        try:
            await asyncio.wait_for(asyncio.gather(*(t.drained.wait() for t in sending)), 5.0)
        except TimeoutError:
            pass
        await self.close(reason, error)

    def _uses(self, track: _PacedTrack) -> bool:
        return any(s.track is track for s in self.pc.getSenders())

    async def _count_sent(self) -> None:
        """Adds the RTP packets and bytes sent since the last call to the Prometheus counters."""
        for sender in self.pc.getSenders():
            kind = sender.kind
            for stat in (await sender.getStats()).values():
                if getattr(stat, "type", "") != "outbound-rtp":
                    continue
                packets, octets = self._sent.get(kind, (0, 0))
                RTP_PACKETS.labels(kind=kind).inc(stat.packetsSent - packets)
                RTP_BYTES.labels(kind=kind).inc(stat.bytesSent - octets)
                self._sent[kind] = (stat.packetsSent, stat.bytesSent)

    async def close(self, reason: str, error: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.endpoint._forget(self)
        if self._feeder is not None and self._feeder is not asyncio.current_task():
            self._feeder.cancel()
        try:
            await self._count_sent()
        except Exception:  # stats of a half-built connection: nothing was sent
            pass
        await self.pc.close()
        self.span.set_attributes(
            {
                "fragments": self.fragments,
                "video_frames": self.video_frames,
                **{f"rtp_{k}_packets": n for k, (n, _) in self._sent.items()},
            }
        )
        self.span.set_attribute("end_reason", reason)
        if error:
            self.span.set_status(Status(StatusCode.ERROR, reason))
        self.span.end()


def _refuse(status: int, reason: str, tag: str, **headers) -> web.Response:
    REFUSED.labels(reason=tag).inc()
    return web.json_response({"error": reason}, status=status, headers=headers or None)


class WhepEndpoint:
    """The viewers of every session, with their limits; add_whep_routes puts it on an app."""

    def __init__(
        self,
        hub: SessionHub,
        auth: Auth | None = None,
        max_viewers: int = 32,
        max_viewers_per_session: int = 8,
        ice_servers: list | None = None,
    ):
        if not 1 <= max_viewers_per_session <= max_viewers:
            raise ValueError(
                f"need 1 <= max_viewers_per_session ({max_viewers_per_session}) <= max_viewers ({max_viewers})"
            )
        self.hub, self.auth = hub, auth
        self.max_viewers, self.max_viewers_per_session = max_viewers, max_viewers_per_session
        # No STUN server by default: aiortc would otherwise ask Google's, which a LAN or loopback
        # deployment neither needs nor may reach. Pass RTCIceServer entries for viewers behind NAT.
        self.ice_servers = list(ice_servers or [])
        self.viewers: dict[str, Viewer] = {}

    def _forget(self, viewer: Viewer) -> None:
        if self.viewers.pop(viewer.id, None) is not None:
            VIEWERS.dec()

    def _of_session(self, session_id: str) -> list[Viewer]:
        return [v for v in self.viewers.values() if v.session.id == session_id]

    async def _check_auth(self, request: web.Request) -> None:
        if self.auth is None:
            return
        try:
            result = self.auth(request)
            if inspect.isawaitable(result):
                await result
        except web.HTTPException:
            REFUSED.labels(reason="auth").inc()
            raise

    async def offer(self, request: web.Request) -> web.StreamResponse:
        await self._check_auth(request)
        session_id = request.match_info["session_id"]
        if request.content_type != SDP_TYPE:
            return _refuse(415, f"Content-Type must be {SDP_TYPE} (an SDP offer), got {request.content_type!r}", "type")
        if (request.content_length or 0) > MAX_OFFER_BYTES:
            return _refuse(413, f"an SDP offer is at most {MAX_OFFER_BYTES} bytes", "size")
        body = await request.content.read(MAX_OFFER_BYTES + 1)
        if len(body) > MAX_OFFER_BYTES:
            return _refuse(413, f"an SDP offer is at most {MAX_OFFER_BYTES} bytes", "size")
        try:
            text = body.decode("utf-8")
            offer = rtc_sdp.SessionDescription.parse(text)
        except Exception as exc:
            return _refuse(400, f"the body is not an SDP offer: {type(exc).__name__}: {exc}", "sdp")
        if not text.startswith("v=0") or not offer.media:
            return _refuse(400, "the body is not an SDP offer: it must start with 'v=0' and have m= lines", "sdp")
        media = [m for m in offer.media if m.kind in ("audio", "video")]
        if not media or any(m.direction not in (None, "recvonly", "sendrecv") for m in media):
            return _refuse(
                400, "the offer must ask to receive audio and/or video (recvonly or sendrecv m= lines)", "sdp"
            )

        session = self.hub.get(session_id)
        if session is None:
            return _refuse(404, f"no live session {session_id!r}", "session")
        try:
            ready = await session.wait_ready(READY_TIMEOUT_S)
        except TimeoutError:
            return _refuse(409, f"the session has not started its stream within {READY_TIMEOUT_S:g} s", "not_ready")
        if not ready or session.ended:
            return _refuse(410, "the session has ended", "ended")
        # checked after the wait, so that offers waiting together cannot pass the limit together
        if len(self.viewers) >= self.max_viewers:
            return _refuse(
                429, f"{self.max_viewers} WebRTC viewers are watching already", "capacity", **{"Retry-After": "5"}
            )
        if len(self._of_session(session_id)) >= self.max_viewers_per_session:
            return _refuse(
                429,
                f"this session has {self.max_viewers_per_session} WebRTC viewers already",
                "capacity",
                **{"Retry-After": "5"},
            )
        try:
            profile, _ = stream_profile(session.init_segment)
            video_codec = choose_video_codec(offer, profile)
        except OfferError as exc:
            return _refuse(400, str(exc), "codec")
        has_audio = any(m.kind == "audio" for m in offer.media)
        if has_audio and not any(
            c.mimeType.lower() == "audio/opus" for m in offer.media if m.kind == "audio" for c in m.rtp.codecs
        ):
            return _refuse(400, "the offer's audio has no Opus format (the avatar's audio is sent as Opus)", "codec")

        viewer = Viewer(self, session, profile)
        self.viewers[viewer.id] = viewer
        VIEWERS.inc()
        try:
            answer = await viewer.answer(text, video_codec, has_audio)
        except Exception as exc:
            await viewer.close(f"offer failed: {exc}", error=True)
            return _refuse(400, f"cannot answer the offer: {type(exc).__name__}: {exc}", "sdp")
        location = f"/v1/sessions/{session_id}/whep/{viewer.id}"
        log.info("WHEP viewer %s joined (%s)", viewer.id, profile.name)
        return web.Response(status=201, text=answer, content_type=SDP_TYPE, headers={"Location": location})

    async def delete(self, request: web.Request) -> web.StreamResponse:
        await self._check_auth(request)
        viewer = self.viewers.get(request.match_info["viewer_id"])
        if viewer is None or viewer.session.id != request.match_info["session_id"]:
            return web.json_response({"error": "no such WebRTC viewer (ended already?)"}, status=404)
        await viewer.close("deleted by the client")
        return web.Response(status=200)

    async def patch(self, request: web.Request) -> web.StreamResponse:
        await self._check_auth(request)
        return web.json_response(
            {"error": "trickle ICE is not supported: the answer carries all of the server's candidates"},
            status=405,
            headers={"Allow": "DELETE"},
        )

    async def close_all(self, _app: web.Application | None = None) -> None:
        await asyncio.gather(*(v.close("server shutting down") for v in list(self.viewers.values())))


def add_whep_routes(
    app: web.Application,
    hub: SessionHub,
    *,
    auth: Auth | None = None,
    max_viewers: int = 32,
    max_viewers_per_session: int = 8,
    ice_servers: list | None = None,
) -> WhepEndpoint:
    """Adds POST /v1/sessions/{id}/whep and DELETE/PATCH /v1/sessions/{id}/whep/{viewer} to app.

    auth(request) refuses a request by raising an aiohttp HTTPException (e.g. 401); it may be a
    coroutine function; None leaves auth to the app's middleware (or to no one).
    """
    register_h264_profiles()
    accept_low_dynamic_payload_types()
    endpoint = WhepEndpoint(hub, auth, max_viewers, max_viewers_per_session, ice_servers)
    app.router.add_post("/v1/sessions/{session_id}/whep", endpoint.offer)
    app.router.add_delete("/v1/sessions/{session_id}/whep/{viewer_id}", endpoint.delete)
    app.router.add_patch("/v1/sessions/{session_id}/whep/{viewer_id}", endpoint.patch)
    app.on_shutdown.append(endpoint.close_all)
    app[WHEP] = endpoint
    return endpoint
