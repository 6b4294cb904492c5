"""`avatar livekit-worker`: the avatar participant of a LiveKit room, rendered by a live session.

It joins the room next to a LiveKit voice agent, takes the agent's speech from LiveKit's data
stream (DataStreamAudioReceiver: the agent sets `DataStreamAudioOutput` as its audio output) and
publishes the avatar's video and that speech with LiveKit's AvatarRunner, fed by
avatar.integrations.livekit.ConverseVideoGenerator. One process per room, as LiveKit's own avatar
workers; it runs until the agent or the worker leaves the room, the session ends or a signal
stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

DEFAULT_IDENTITY = "avatar-mesh"
URL_SCHEMES = ("ws://", "wss://", "http://", "https://")

log = logging.getLogger("avatar.livekit_worker")


def add_parser(sub) -> argparse.ArgumentParser:
    from avatar.security import add_security_args

    p = sub.add_parser(
        "livekit-worker",
        help="join a LiveKit room as a voice agent's avatar (needs the extra: pip install 'avatar-mesh[livekit]')",
        description="Joins a LiveKit room as the avatar participant of a LiveKit Agents voice agent: the agent's "
        "speech comes in over LiveKit's data stream, the avatar's video and that speech go out as the "
        "participant's tracks. LiveKit credentials come from the environment: LIVEKIT_URL, and "
        "LIVEKIT_API_KEY + LIVEKIT_API_SECRET (a token is made for --identity in --room) or a ready "
        "--livekit-token. See docs/clients.md, 'LiveKit Agents'.",
    )
    g = p.add_argument_group("LiveKit")
    g.add_argument(
        "--livekit-url", metavar="URL", help="LiveKit server, e.g. wss://my.livekit.cloud (default: $LIVEKIT_URL)"
    )
    g.add_argument("--room", required=True, help="the room the voice agent is in")
    g.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"the avatar's participant identity: DataStreamAudioOutput's destination (default {DEFAULT_IDENTITY})",
    )
    g.add_argument(
        "--agent-identity",
        metavar="ID",
        help="the voice agent's identity: whose audio to play, on whose behalf to publish (default: the first agent)",
    )
    g.add_argument(
        "--livekit-token",
        metavar="JWT",
        help="a ready access token for --identity (default: $LIVEKIT_TOKEN, else one made from LIVEKIT_API_KEY/SECRET)",
    )
    g = p.add_argument_group("avatar")
    g.add_argument("--image", required=True, help="portrait: PNG, JPEG or WebP")
    g.add_argument("--prompt", default="", help="text describing the scene")
    g.add_argument("--preset", choices=("preview", "standard", "hd"), default=None)
    g.add_argument("--size", default="", help='pixel area "W*H", e.g. 384*256')
    g.add_argument("--sample_steps", type=int, default=0, help="denoising steps per block (0: the preset's)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--sample-rate",
        type=int,
        default=24000,
        metavar="HZ",
        help="session audio rate, 16000 or 24000 (default 24000: LiveKit TTS output); other rates are resampled",
    )
    g.add_argument(
        "--audio-encoder",
        choices=("wav2vec2", "whisper"),
        default=None,
        help="audio encoder of the speech features (default wav2vec2); without --server the embedded mesh loads it",
    )
    p.add_argument("--server", metavar="ADDR", help="a running gateway (default: the mesh in this process)")
    add_security_args(p)
    return p


def _livekit_token(args) -> str:
    from avatar.app.cli import UserError

    token = (args.livekit_token or os.environ.get("LIVEKIT_TOKEN", "")).strip()
    if token:
        return token
    key, secret = os.environ.get("LIVEKIT_API_KEY", "").strip(), os.environ.get("LIVEKIT_API_SECRET", "").strip()
    if not key or not secret:
        raise UserError(
            "no LiveKit credentials: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET, or give --livekit-token "
            "(or $LIVEKIT_TOKEN)"
        )
    from livekit import api
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    token = (
        api.AccessToken(api_key=key, api_secret=secret)
        .with_kind("agent")
        .with_identity(args.identity)
        .with_grants(api.VideoGrants(room_join=True, room=args.room))
    )
    if args.agent_identity:  # the tracks show up as the agent's
        token = token.with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: args.agent_identity})
    return token.to_jwt()


def _check(args) -> str:
    """Everything that can be checked before a session starts; returns the LiveKit URL."""
    from avatar.app.cli import UserError

    try:
        import avatar.integrations.livekit  # noqa: F401
    except ImportError as exc:
        raise UserError(str(exc)) from None
    url = (args.livekit_url or os.environ.get("LIVEKIT_URL", "")).strip()
    if not url:
        raise UserError("no LiveKit server: give --livekit-url or set LIVEKIT_URL (e.g. wss://my.livekit.cloud)")
    if not url.startswith(URL_SCHEMES):
        raise UserError(f"--livekit-url must start with ws://, wss://, http:// or https://, got {url!r}")
    if args.sample_rate not in (16000, 24000):
        raise UserError(f"--sample-rate must be 16000 or 24000, got {args.sample_rate}")
    if not args.room.strip() or not args.identity.strip():
        raise UserError("--room and --identity must not be empty")
    return url


def exit_now(code: int):
    """Ends the process with `code` once its spans and output are out, without the interpreter's
    teardown: LiveKit's Rust runtime (livekit 1.1.21) can abort there ("panic in a function that
    cannot unwind", SIGABRT) after a failed connect, which turned a clean exit 1 into a crash in
    CI once (2026-12-04). The command's last act, after every cleanup of its own."""
    from avatar import telemetry

    telemetry.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def run(args) -> int:
    import grpc

    from avatar import grpc_util, telemetry
    from avatar.app.cli import UserError, _read, model_for
    from avatar.app.embedded import SetupError, gateway_for
    from avatar.logging_setup import setup_logging
    from avatar.v1 import avatar_pb2

    url = _check(args)
    token = _livekit_token(args)
    header = avatar_pb2.ConverseHeader(
        image=_read(args.image, "image"),
        prompt=args.prompt,
        preset=args.preset or "",
        size=args.size,
        sample_steps=args.sample_steps,
        seed=args.seed,
        sample_rate=args.sample_rate,
        audio_encoder=args.audio_encoder or "",
    )
    setup_logging("avatar-livekit-worker")
    from avatar.integrations.livekit import ConverseVideoGenerator

    async with gateway_for(args, None if args.server else model_for(args)) as gateway:
        try:
            creds = gateway.tls.channel_credentials()
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        async with grpc_util.create_channel(gateway.address, creds, gateway.token) as channel:
            # the session's trace on the mesh is a child of the worker's span
            with telemetry.span("livekit_worker", room=args.room, identity=args.identity) as span:
                gen = ConverseVideoGenerator(channel, header, metadata=telemetry.outgoing_metadata())
                try:
                    h = await gen.start()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise UserError(exc.details()) from None
                    print(f"avatar livekit-worker: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                span.set_attribute("request_id", h.request_id)
                try:
                    joined = await _in_room(args, url, token, gen)
                finally:
                    await gen.aclose()
                span.set_attribute("joined", joined)
                if not joined:
                    return 1
    if gen.error is not None:
        print(f"avatar livekit-worker: the live session failed: {gen.error}", file=sys.stderr)
        return 1
    reason = gen.status.reason if gen.status is not None else "left the room"
    print(f"avatar livekit-worker: done ({reason})", file=sys.stderr)
    return 0


async def _in_room(args, url: str, token: str, gen) -> bool:
    """Publishes the avatar in the room until the agent or the worker leaves it or the session
    ends; False (and the reason printed) when the room cannot be joined."""
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

    room = rtc.Room()
    left = asyncio.Event()
    room.on("disconnected", lambda *_: left.set())

    def agent_left(p: rtc.RemoteParticipant) -> None:  # the avatar has nobody to speak for
        if p.identity == args.agent_identity or (
            not args.agent_identity and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ):
            left.set()

    room.on("participant_disconnected", agent_left)
    try:
        await room.connect(url, token)
    except rtc.ConnectError as exc:
        print(f"avatar livekit-worker: cannot join room {args.room!r} at {url}: {exc}", file=sys.stderr)
        return False
    runner = AvatarRunner(
        room,
        audio_recv=DataStreamAudioReceiver(room, sender_identity=args.agent_identity),
        video_gen=gen,
        options=gen.options(),
    )
    try:
        await runner.start()
        h = gen.stream_header
        log.info(
            "avatar %r in room %r: %dx%d at %d fps, session %s",
            args.identity,
            args.room,
            h.width,
            h.height,
            h.fps,
            h.request_id,
        )
        waits = [asyncio.ensure_future(gen.ended.wait()), asyncio.ensure_future(left.wait())]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
    finally:
        await runner.aclose()
        await room.disconnect()
    return True
