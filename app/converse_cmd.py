"""`avatar converse`: drives a live session from an audio file, as a TTS voice or a microphone would."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from avatar.app import arg_types

INPUT_RATE = 16000  # the file is sent as PCM s16le mono at 16 kHz


def add_parser(sub) -> argparse.ArgumentParser:
    from avatar.presets import AUDIO_ENCODERS
    from avatar.security import add_security_args

    p = sub.add_parser(
        "converse",
        help="live session: stream an audio file in (real time or faster), the video out, and report the latencies",
    )
    p.add_argument("--image", required=True, help="portrait: PNG, JPEG or WebP")
    p.add_argument("--audio", required=True, help="speech: WAV, FLAC, MP3, OGG or M4A, sent as 16 kHz PCM")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="send the audio at real-time pace, like a microphone (default: as fast as the server reads)",
    )
    p.add_argument("--chunk-ms", type=float, default=100.0, metavar="N", help="audio chunk length (default 100)")
    p.add_argument("--prompt", default="", help="text describing the scene")
    p.add_argument("--preset", choices=("preview", "standard", "hd"), default=None)
    p.add_argument("--size", default="", help='pixel area "W*H", e.g. 64*64')
    p.add_argument("--sample_steps", type=int, default=0, help="denoising steps per block (0: the preset's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--audio-encoder",
        choices=AUDIO_ENCODERS,
        default=None,
        help="audio encoder of the live speech features (default wav2vec2, what the model was trained with); "
        "without --server the embedded mesh loads it",
    )
    p.add_argument("--server", metavar="ADDR", help="a running gateway (default: the mesh in this process)")
    p.add_argument("--out", required=True, help="output video, e.g. out/live.mp4")
    p.add_argument(
        "--timeout", type=arg_types.positive_seconds, default=None, help="deadline of the session in seconds"
    )
    add_security_args(p)
    return p


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live sessions (Converse)")
    g.add_argument(
        "--live-idle-timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="end a live session after S seconds without a client message (default 60)",
    )
    g.add_argument(
        "--live-block-budget-ms",
        type=float,
        default=480.0,
        metavar="MS",
        help="refuse live sessions whose generator needs more than MS per block (default 480: real time)",
    )
    g.add_argument(
        "--live-max-session-s", type=float, default=4 * 3600.0, metavar="S", help="longest live session (default 4 h)"
    )


def live_config(args):
    from avatar.app.cli import UserError
    from avatar.gateway.converse import ConverseConfig

    try:
        return ConverseConfig(
            idle_timeout_s=args.live_idle_timeout_s,
            block_budget_ms=args.live_block_budget_ms,
            max_session_s=args.live_max_session_s,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


async def run(args) -> int:
    import grpc

    from avatar import grpc_util, media
    from avatar.app.cli import UserError, _read, model_for
    from avatar.app.embedded import SetupError, gateway_for
    from avatar.errors import InvalidInput
    from avatar.files import unlink_quietly
    from avatar.live_client import END_OF_UTTERANCE, converse, paced_chunks, pcm16
    from avatar.v1 import avatar_pb2

    if not 10 <= args.chunk_ms <= 10_000:
        raise UserError(f"--chunk-ms must be between 10 and 10000, got {args.chunk_ms:g}")
    try:
        audio = media.decode_audio(_read(args.audio, "audio"))
    except InvalidInput as exc:
        raise UserError(str(exc)) from None
    pcm = pcm16(media.resample(audio.samples, audio.sample_rate, INPUT_RATE))
    header = avatar_pb2.ConverseHeader(
        image=_read(args.image, "image"),
        prompt=args.prompt,
        preset=args.preset or "",
        size=args.size,
        sample_steps=args.sample_steps,
        seed=args.seed,
        sample_rate=INPUT_RATE,
        audio_encoder=args.audio_encoder or "",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = asyncio.Event()  # audio starts when the session does, as a voice agent's would

    async def requests():
        await started.wait()
        async for chunk in paced_chunks(pcm, INPUT_RATE, args.chunk_ms, realtime=args.realtime):
            yield chunk
        yield END_OF_UTTERANCE

    async with gateway_for(args, None if args.server else model_for(args)) as gateway:
        try:
            creds = gateway.tls.channel_credentials()
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        fd, part = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        status = header_msg = None
        t0 = time.monotonic()
        first_fragment_s = None
        try:
            async with grpc_util.create_channel(gateway.address, creds, gateway.token) as channel:
                with os.fdopen(fd, "wb") as f:
                    async for msg in converse(channel, header, requests(), timeout=args.timeout):
                        kind = msg.WhichOneof("event")
                        if kind == "header":
                            header_msg = msg.header
                            if "noise" in header_msg.model:
                                print(f"avatar converse: note: model is {header_msg.model}", file=sys.stderr)
                            f.write(msg.header.init_segment)
                            started.set()
                        elif kind == "fragment":
                            f.write(msg.fragment.data)
                            if first_fragment_s is None:
                                first_fragment_s = time.monotonic() - t0
                        elif kind == "degraded":
                            print(f"avatar converse: degraded: {msg.degraded.reason}", file=sys.stderr)
                        elif kind == "status":
                            status = msg.status
            if status is None:
                raise RuntimeError("the stream ended without a final status")
            os.chmod(part, 0o644)
            os.replace(part, out)
        except grpc.aio.AioRpcError as exc:
            unlink_quietly(part)
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UserError(exc.details()) from None
            print(f"avatar converse: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except BaseException:
            unlink_quietly(part)
            raise
    a, i = status.audio_to_fragment, status.interrupt_to_idle
    print(
        f"avatar converse: wrote {out} ({status.blocks} blocks, {status.idle_blocks} idle, {status.frames} frames, "
        f"{header_msg.width}x{header_msg.height}); generator {header_msg.measured_block_ms:.0f} ms per block "
        f"(budget {header_msg.block_budget_ms:.0f}); audio -> fragment p50 {a.p50_ms:.0f} ms, p95 {a.p95_ms:.0f} ms "
        f"over {a.count} blocks" + (f"; interrupt -> idle p50 {i.p50_ms:.0f} ms" if i.count else ""),
        file=sys.stderr,
    )
    return 0
