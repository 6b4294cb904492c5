"""Client of the public API (AvatarService.Generate): the one place that knows how to talk to a gateway.

    async with AvatarClient("127.0.0.1:50051", token=token) as client:
        async for event in client.generate(request, timeout_s=300):   # avatar_pb2.GenerateResponse
            ...
        saved = await client.generate_to_file(request, "out/talk.mp4")   # + out/talk.json

    saved = generate_to_file("127.0.0.1:50051", request, "out/talk.mp4")   # the same, synchronous

`generate` yields the API's own messages (header, init_segment, fragment, progress, status). The
header and the init segment are handed over together with the first fragment: a call refused
before that (UNAVAILABLE; RESOURCE_EXHAUSTED with the gateway's `retry-after-ms` hint) is
retried unseen, and a failure after it is final. Before anything is sent the audio is decoded
once with the gateway's own checks (bad or too long audio fails here, before any upload), and
audio that would push the request over PUBLIC_MAX_REQUEST_BYTES is re-encoded: mono FLAC
(lossless), or Opus at a speech-transparent bitrate when FLAC is still too large.
Errors are GenerateError (InvalidRequest for input the gateway or this client refuses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import av
import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from opentelemetry.trace import SpanKind

from avatar import media, telemetry
from avatar.admission import retry_after_ms
from avatar.errors import InvalidInput
from avatar.files import unlink_quietly, write_json_atomic
from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES, create_channel
from avatar.presets import OUTPUT_AUDIO_RATE
from avatar.security import channel_credentials, plaintext_token_warning
from avatar.v1 import avatar_pb2, avatar_pb2_grpc

OPUS_BITRATE = 64_000  # bit/s, mono: transparent for speech (Opus is near-transparent for music at 96k)
MAX_INPUT_FILE_BYTES = 1 << 30  # a file read into memory for one request; larger is not a portrait or speech
_PROTO_SLACK = 64  # bytes of tags and length prefixes around the audio field


class GenerateError(Exception):
    """The call failed with a gRPC status (after any retries); str() is 'CODE: details'."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 0):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.attempts = code, details, attempts
        self.retry_after_ms: int | None = None  # the gateway's hint with RESOURCE_EXHAUSTED, if any


class InvalidRequest(GenerateError):
    """The input is wrong (INVALID_ARGUMENT from the gateway, or refused here before upload);
    `details` says why in words a person can act on."""

    def __init__(self, details: str, attempts: int = 0):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details, attempts)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed before its first fragment: UNAVAILABLE after 1, 2, 4 ... s,
    RESOURCE_EXHAUSTED when the gateway says when (`retry-after-ms`); never past the deadline."""

    retries: int = 3
    backoff_s: float = 1.0
    max_wait_s: float = 60.0

    def wait_s(self, error: grpc.aio.AioRpcError, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the error is final."""
        if attempt > self.retries:
            return None
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return min(self.backoff_s * 2 ** (attempt - 1), self.max_wait_s)
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # without a hint it is not a busy queue (a job too large for memory, a message limit)
            hint = retry_after_ms(error)
            return None if hint is None else min(hint / 1000, self.max_wait_s)
        return None


# --- requests that fit -----------------------------------------------------------------------


def read_input(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file, or InvalidRequest saying why they cannot be read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_FILE_BYTES:
            raise InvalidRequest(
                f"the {what} {path} is {size / 2**20:.0f} MiB; files up to {MAX_INPUT_FILE_BYTES >> 20} MiB are read"
            )
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _encode_mono(samples: np.ndarray, rate: int, container: str, codec: str, bit_rate: int | None = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        step = 1 << 16
        for start in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[None, start : start + step]), format="flt", layout="mono"
            )
            frame.sample_rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fit_request(
    request: avatar_pb2.GenerateRequest,
    *,
    max_bytes: int = PUBLIC_MAX_REQUEST_BYTES,
    max_audio_s: float | None = media.MAX_AUDIO_S,
) -> tuple[avatar_pb2.GenerateRequest, str | None]:
    """The request as it will be sent, and a note when its audio had to be re-encoded to fit.

    Decodes the audio with the gateway's checks (InvalidRequest for bad or too long audio, so
    nothing is uploaded in vain). Under `max_bytes` the request is sent as given; over it the
    audio becomes mono FLAC at the rate the video keeps (at most 48 kHz: lossless for what the
    video plays), and if that is still too large, Opus at OPUS_BITRATE."""
    try:
        audio = media.decode_audio(request.audio, max_duration_s=max_audio_s or float("inf"))
    except InvalidInput as exc:
        raise InvalidRequest(str(exc)) from None
    total = request.ByteSize()
    if total <= max_bytes:
        return request, None
    budget = max_bytes - (total - len(request.audio)) - _PROTO_SLACK
    if budget <= 0:
        raise InvalidRequest(
            f"the request is {_mib(total)} and the limit is {_mib(max_bytes)}, but the "
            f"portrait alone is {_mib(len(request.image))}: send a smaller image"
        )
    rate = min(audio.sample_rate, OUTPUT_AUDIO_RATE)
    samples = media.resample(audio.samples, audio.sample_rate, rate)
    was = f"{_mib(len(request.audio))} of audio ({audio.duration_s:.1f} s)"
    encoded = _encode_mono(samples, rate, "flac", "flac")
    note = (
        f"{was} would not fit the {_mib(max_bytes)} request limit: sent as mono FLAC at {rate} Hz "
        f"({_mib(len(encoded))}, lossless for the video's sound)"
    )
    if len(encoded) > budget:
        # libopus takes 48 kHz (or 8/12/16/24); the video's sound is 48 kHz anyway
        encoded = _encode_mono(
            media.resample(audio.samples, audio.sample_rate, 48_000), 48_000, "ogg", "libopus", OPUS_BITRATE
        )
        note = (
            f"{was} would not fit the {_mib(max_bytes)} request limit, nor as lossless FLAC: sent as "
            f"Opus {OPUS_BITRATE // 1000} kbit/s mono ({_mib(len(encoded))}; transparent for speech)"
        )
    if len(encoded) > budget:
        raise InvalidRequest(
            f"the audio does not fit the {_mib(max_bytes)} request limit even as Opus "
            f"({_mib(len(encoded))}): send a smaller image or shorter audio"
        )
    fitted = avatar_pb2.GenerateRequest()
    fitted.CopyFrom(request)
    fitted.audio = encoded
    return fitted, note


# --- the call --------------------------------------------------------------------------------


class GenerateCall:
    """One Generate call: iterate it (once) for the gateway's messages. After iteration,
    `request` is what was sent, `audio_note` says whether its audio was re-encoded, and
    `attempts` counts the calls made."""

    def __init__(
        self,
        client: AvatarClient,
        request: avatar_pb2.GenerateRequest,
        timeout_s: float | None,
        span_name: str,
        on_retry: Callable[[GenerateError, float], None] | None = None,
    ):
        self.request, self.audio_note, self.attempts = request, None, 0
        self._client, self._timeout_s, self._span_name, self._on_retry = client, timeout_s, span_name, on_retry

    def __aiter__(self) -> AsyncIterator[avatar_pb2.GenerateResponse]:
        return self._events()

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise GenerateError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call could be made", self.attempts
            )
        return left

    async def _events(self):
        client = self._client
        deadline = time.monotonic() + self._timeout_s if self._timeout_s is not None else None
        self.request, self.audio_note = await asyncio.to_thread(
            fit_request, self.request, max_bytes=client.max_request_bytes, max_audio_s=client.max_audio_s
        )
        span = telemetry.tracer().start_span(self._span_name, kind=SpanKind.CLIENT)
        try:
            while True:
                self.attempts += 1
                held: list[avatar_pb2.GenerateResponse] = []  # header, init segment: until a fragment
                call = client.stub.Generate(
                    self.request, timeout=self._remaining(deadline), metadata=telemetry.outgoing_metadata(span)
                )
                try:
                    async for msg in call:
                        kind = msg.WhichOneof("event")
                        if held is not None and kind in ("header", "init_segment"):
                            held.append(msg)
                            continue
                        if held:
                            for early in held:
                                yield early
                        held = None
                        yield msg
                        if kind == "status":
                            return
                except grpc.aio.AioRpcError as exc:
                    wait = client.retry.wait_s(exc, self.attempts) if held is not None else None
                    if wait is not None and (deadline is None or time.monotonic() + wait < deadline):
                        if self._on_retry is not None:
                            self._on_retry(_error(exc, self.attempts), wait)
                        await asyncio.sleep(wait)
                        continue
                    raise _error(exc, self.attempts) from None
                finally:
                    call.cancel()  # a consumer that stops early ends the gateway's job too
                raise GenerateError(grpc.StatusCode.DATA_LOSS, "the stream ended without a final status", self.attempts)
        finally:
            span.end()


def _error(exc: grpc.aio.AioRpcError, attempts: int) -> GenerateError:
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(exc.details() or "", attempts)
    error = GenerateError(exc.code(), exc.details() or "", attempts)
    error.retry_after_ms = retry_after_ms(exc)
    return error


@dataclasses.dataclass
class SavedVideo:
    """A finished video on disk and what the gateway said about it; `sidecar()` is OUT.json."""

    path: Path
    header: avatar_pb2.StreamHeader
    status: avatar_pb2.FinalStatus
    bytes: int
    sha256: str
    attempts: int
    audio_note: str | None
    server: str
    client_time_to_first_fragment_s: float | None
    total_s: float
    started: str
    finished: str

    def sidecar(self, **extra) -> dict:
        """Everything about the video as JSON: the planned job, timings, file digest; `extra`
        (a caller's parameters, profile, model details) is merged over it."""
        h, s = self.header, self.status
        data = {
            "status": "done",
            "output": str(self.path),
            "server": self.server,
            "request_id": h.request_id,
            "trace_id": s.trace_id,
            "seed": h.job.seed,
            "model": {"name": h.job.model, "description": h.model},
            "job": MessageToDict(h.job, preserving_proto_field_name=True),
            "width": h.width,
            "height": h.height,
            "fps": h.fps,
            "duration_s": h.duration_s,
            "audio_duration_s": s.audio_duration_s,
            "truncation": s.truncation,
            "blocks": s.blocks,
            "frames": s.frames,
            "timings_ms": {t.stage: {"ms": t.ms, "count": t.count} for t in s.timings},
            "time_to_first_fragment_s": s.time_to_first_fragment_s,
            "client_time_to_first_fragment_s": self.client_time_to_first_fragment_s,
            "server_total_s": s.total_s,
            "total_s": self.total_s,
            "attempts": self.attempts,
            "audio_note": self.audio_note,
            "video": {"file": self.path.name, "bytes": self.bytes, "sha256": self.sha256},
            "started": self.started,
            "finished": self.finished,
        }
        if h.HasField("clip_embedding"):
            from avatar import wire  # torch: only for a request that asked for the embedding

            data["clip_embedding"] = wire.from_proto(h.clip_embedding).tolist()
        for key, value in extra.items():
            data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and isinstance(value, dict) else value
        return data


# --- part files ------------------------------------------------------------------------------


def part_prefix(out: Path) -> str:
    """Temp files of `out` are '.NAME.PID.RANDOM.part' beside it: a later run knows whose they are."""
    return f".{out.name}.{os.getpid()}."


def remove_stale_parts(out: Path) -> list[Path]:
    """Removes temp files of `out` whose process no longer runs (killed by SIGKILL, power loss)."""
    removed = []
    pattern = "." + re.sub(r"([*?[])", r"[\1]", out.name) + ".*.part"  # the name taken literally
    for part in out.parent.glob(pattern):
        pid, _, _ = part.name[len(out.name) + 2 : -len(".part")].rpartition(".")
        if pid and not re.fullmatch(r"[0-9]+", pid):
            continue  # a temp file of another output whose name starts like this one
        if pid and _alive(int(pid)):
            continue
        unlink_quietly(part)
        removed.append(part)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# --- the client ------------------------------------------------------------------------------


class AvatarClient:
    """A channel to one gateway with its credentials and retry policy; use as `async with`.

    tls_ca verifies the server (TLS); tls_cert + tls_key present a client certificate (mTLS);
    token is sent as ``authorization: Bearer``. max_audio_s: longest audio sent (the gateway's
    default limit; None leaves it to the gateway)."""

    def __init__(
        self,
        address: str,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_audio_s: float | None = media.MAX_AUDIO_S,
        max_request_bytes: int = PUBLIC_MAX_REQUEST_BYTES,
    ):
        self.address, self.retry = address, retry
        self.max_audio_s, self.max_request_bytes = max_audio_s, max_request_bytes
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)  # ValueError names a bad PEM file
        self.warning = plaintext_token_warning(address, credentials, token)
        self._channel = create_channel(address, credentials, token)
        self.stub = avatar_pb2_grpc.AvatarServiceStub(self._channel)

    async def __aenter__(self) -> AvatarClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(
        self,
        request: avatar_pb2.GenerateRequest,
        *,
        timeout_s: float | None = None,
        span_name: str = "avatar.client generate",
        on_retry: Callable[[GenerateError, float], None] | None = None,
    ) -> GenerateCall:
        """The call's messages, as `async for event in client.generate(...)`. timeout_s is the
        deadline of the whole call, retries and waits included; on_retry(error, wait_s) hears
        of each retry."""
        return GenerateCall(self, request, timeout_s, span_name, on_retry)

    async def generate_to_file(
        self,
        request: avatar_pb2.GenerateRequest,
        out: str | os.PathLike,
        *,
        timeout_s: float | None = None,
        sidecar: dict | None = None,
        on_event: Callable[[avatar_pb2.GenerateResponse], None] | None = None,
        on_retry: Callable[[GenerateError, float], None] | None = None,
        span_name: str = "avatar.client generate",
        server: str | None = None,
    ) -> SavedVideo:
        """Streams the video into a temp file beside `out` (it plays while it grows), renames it
        to `out` when complete and writes OUT.json (SavedVideo.sidecar() merged with `sidecar`).
        On any failure or cancellation the temp file is removed and `out` is untouched; temp
        files of `out` left by killed processes are removed first. `server` names the gateway
        in the sidecar (default: its address)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(out)
        started, t0 = _now(), time.perf_counter()
        call = self.generate(request, timeout_s=timeout_s, span_name=span_name, on_retry=on_retry)
        header = status = None
        fragments, first_fragment_s = 0, None
        fd, part = tempfile.mkstemp(prefix=part_prefix(out), suffix=".part", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                async for msg in call:
                    kind = msg.WhichOneof("event")
                    if kind == "header":
                        header = msg.header
                    elif kind == "init_segment":
                        f.write(msg.init_segment.data)
                    elif kind == "fragment":
                        f.write(msg.fragment.data)
                        f.flush()  # appended as it arrives: the temp file plays while it grows
                        fragments += 1
                        if first_fragment_s is None:
                            first_fragment_s = time.perf_counter() - t0
                    elif kind == "status":
                        status = msg.status
                    if on_event is not None:
                        on_event(msg)
                if header is None or fragments != header.expected_fragments:
                    raise GenerateError(
                        grpc.StatusCode.DATA_LOSS,
                        f"got {fragments} of {header.expected_fragments if header else '?'} fragments",
                        call.attempts,
                    )
                os.fsync(f.fileno())
            os.chmod(part, 0o644)  # mkstemp makes it private; the video is an ordinary output file
            os.replace(part, out)
        except BaseException:
            unlink_quietly(part)
            raise
        size, digest = out.stat().st_size, sha256_file(out)
        saved = SavedVideo(
            path=out,
            header=header,
            status=status,
            bytes=size,
            sha256=digest,
            attempts=call.attempts,
            audio_note=call.audio_note,
            server=server or self.address,
            client_time_to_first_fragment_s=first_fragment_s,
            total_s=time.perf_counter() - t0,
            started=started,
            finished=_now(),
        )
        write_json_atomic(out.with_suffix(".json"), saved.sidecar(**(sidecar or {})))
        return saved


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate_to_file(
    address: str,
    request: avatar_pb2.GenerateRequest,
    out: str | os.PathLike,
    *,
    timeout_s: float | None = None,
    sidecar: dict | None = None,
    **client_options,
) -> SavedVideo:
    """Synchronous AvatarClient(address, **client_options).generate_to_file(...), for scripts
    (not from inside a running event loop)."""

    async def run() -> SavedVideo:
        async with AvatarClient(address, **client_options) as client:
            return await client.generate_to_file(request, out, timeout_s=timeout_s, sidecar=sidecar)

    return asyncio.run(run())
