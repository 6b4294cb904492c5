"""gRPC plumbing shared by every service: servers, channels, error mapping, health, reflection."""

import asyncio
import contextlib
import contextvars
import errno
import functools
import inspect
import logging
import random
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from avatar import cancellation, errors, telemetry

log = logging.getLogger(__name__)

# Latents, text embeddings and motion latents travel whole; 64 MiB covers 704*384 with room to
# spare. Set on both ends because gRPC's default receive limit is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# The public API (AvatarService) receives a portrait and a speech file, not tensors: its own,
# smaller limit (docs/operations.md, "Input limits"). Clients transcode audio that would not fit.
PUBLIC_MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Servers never share a port: with grpc's default SO_REUSEPORT a second `avatar serve` on a busy
# port starts without error and takes most of the first one's connections.
NO_REUSEPORT_OPTIONS = [("grpc.so_reuseport", 0)]
# A peer that vanishes without closing its socket (host down, process frozen, network cut)
# is noticed by keepalive pings within ~10 s instead of hanging the stream (ping_timeout_ms:
# grpc's own default is 60 s); a peer that comes back is reconnected to within 2 s. Servers
# accept the pings (else: GOAWAY too_many_pings).
CHANNEL_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.max_ping_strikes", 0),
]
_STATUS = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.WeightsError: grpc.StatusCode.FAILED_PRECONDITION,
}


class DeadlineExceeded(errors.AvatarError):
    """The request's deadline passed before its work could start (e.g. while queued)."""


class PeerError(errors.AvatarError):
    """A call to a mesh peer failed. Carries the peer's status code, but the client learns which
    service failed ("encoder unavailable"), not internal addresses or grpc's connection details."""

    def __init__(self, service: str, error: grpc.aio.AioRpcError):
        self.service, self.error = service, error
        super().__init__(f"{service}: {error.code().name}")

    def trailing_metadata(self):  # a busy peer's retry-after-ms reaches the client
        return self.error.trailing_metadata()

    def status(self) -> tuple[grpc.StatusCode, str]:
        code, details = self.error.code(), self.error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE or _connection_lost(code, details):
            return grpc.StatusCode.UNAVAILABLE, f"{self.service} unavailable; retry later"
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return code, f"{self.service}: {code.name.lower().replace('_', ' ')}"
        if code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION,
        ):
            return code, _without_addresses(details)  # our own services' reasons: keep them
        return code, f"{self.service} failed ({code.name})"


def _connection_lost(code: grpc.StatusCode, details: str) -> bool:
    """A peer killed mid-stream mostly surfaces as UNAVAILABLE, but grpc can also end the call
    INTERNAL or UNKNOWN with a transport reason ("Received RST_STREAM ...", "Stream removed"; seen
    in CI as "decoder failed (INTERNAL)" after SIGKILL). Our own services' INTERNAL statuses always
    read "internal error: ..." or "<service> failed (...)" (status_of), so any other is the transport."""
    if code == grpc.StatusCode.UNKNOWN:
        return details == "Stream removed"
    return code == grpc.StatusCode.INTERNAL and not (details.startswith("internal error") or _OUR_FAILED.match(details))


_OUR_FAILED = re.compile(r"\w+ failed \([A-Z_]+\)$")


def _without_addresses(text: str) -> str:
    return _ADDRESS.sub("<peer>", text)


_ADDRESS = re.compile(r"\b(?:ipv4|ipv6|unix|dns):[^\s,;)]+")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details an exception becomes on the wire."""
    if isinstance(exc, PeerError):
        return exc.status()
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream service already chose the code; pass it on unchanged.
        return exc.code(), exc.details() or ""
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return code, str(exc)
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {text}".rstrip(": ")


class _Malformed:
    """Stands in for a request that did not parse, so the handler (inside the metrics and error
    wrappers) reports it: grpc itself would answer UNKNOWN with a class name and log a traceback."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, some builds others
            return _Malformed(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    return parse


def _checked(request):
    if isinstance(request, _Malformed):
        raise errors.InvalidInput(f"malformed request message: {request.reason}")
    return request


class _CheckedStream:
    """A request stream whose malformed messages raise InvalidInput where the servicer reads them."""

    def __init__(self, requests):
        self._requests = requests.__aiter__()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return _checked(await self._requests.__anext__())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps avatar.errors to status codes once, for every method of every servicer.

    It also opens the server span of each RPC, continuing the caller's trace from the
    request metadata (W3C traceparent), so servicers only add their stage spans.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        name = handler_call_details.method.rsplit("/", 2)[-2:]
        span_name = "/".join(name)
        parse = _safe_deserializer(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, span_name), parse, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, span_name), parse, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, span_name, streaming=True), parse, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, span_name, streaming=True), parse, handler.response_serializer
        )


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str):
    code, details = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    else:
        log.info("%s: %s: %s", method, code.name, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        from avatar.admission import retry_hint_metadata

        hint = retry_hint_metadata(exc)  # a busy peer's retry-after-ms reaches the client
        if hint:
            context.set_trailing_metadata(hint)
    # The traceback holds the failed call's frames and through them its request (up to 32 MiB)
    # in a reference cycle that only a full GC pass frees: drop it now that it is logged.
    _drop_tracebacks(exc)
    await context.abort(code, details)


def _drop_tracebacks(exc: BaseException | None) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _wrap_unary(behavior, method: str, streaming: bool = False):
    @functools.wraps(behavior)
    async def wrapper(request, context):
        with telemetry.server_span(method, context.invocation_metadata()):
            try:
                return await behavior(_CheckedStream(request) if streaming else _checked(request), context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
                request = None  # grpc keeps its AbortError in a cycle with this frame: not the request
                await _abort(context, exc, method)

    return wrapper


def _wrap_stream(behavior, method: str, streaming: bool = False):
    @functools.wraps(behavior)
    async def wrapper(request, context):
        with telemetry.server_span(method, context.invocation_metadata()):
            try:
                request = _CheckedStream(request) if streaming else _checked(request)
                # aclosing: the servicer's cleanup (closing sessions, cancelling downstream calls)
                # runs as soon as this stream ends, not when the generator is garbage-collected.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001
                request = None  # as in _wrap_unary
                await _abort(context, exc, method)

    return wrapper


class CloseAbandonedStreams(grpc.aio.ServerInterceptor):
    """Closes a streaming handler that grpc left open when its RPC ended.

    grpc.aio reads a handler's response stream with `async for` and writes each response outside
    it. When the client goes away during a write (the write fails, or the cancel lands there),
    grpc leaves the loop with the handler suspended at its `yield`, unclosed. Its `finally` blocks
    (a session's replicas and admission slot, the calls downstream) then wait for the garbage
    collector, which with a large heap can be minutes: under `serve --ray` a generator slot stayed
    counted as in use 80 s after its client left. Outermost of all interceptors, so it closes the
    whole chain: at the end of the RPC it closes the stream beneath it if that is still open.
    """

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        # only response streams that are async generators: not a reader/writer coroutine (health's Watch)
        if handler is None or not inspect.isasyncgenfunction(handler.unary_stream or handler.stream_stream):
            return handler
        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_closed_at_the_end(handler.unary_stream), **kw)
        return grpc.stream_stream_rpc_method_handler(_closed_at_the_end(handler.stream_stream), **kw)


_closing: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones to tasks


def _closed_at_the_end(behavior):
    @functools.wraps(behavior)
    async def wrapper(request, context):
        stream = _ClosedOnce(behavior(request, context))
        context.add_done_callback(lambda _: stream.close())
        try:
            async for response in stream.responses:
                yield response
        finally:
            closing = stream.close()
            if closing is not None:
                await asyncio.shield(closing)

    return wrapper


class _ClosedOnce:
    """A response stream closed by whichever comes first, the end of its RPC (grpc runs done
    callbacks once the RPC's task has finished) or the exit of the wrapper around it (asyncio
    closes an abandoned wrapper when it is freed): two closes at once would collide ("aclose():
    asynchronous generator is already running")."""

    def __init__(self, responses):
        self.responses = responses
        self._closing: asyncio.Task | None = None

    def close(self) -> asyncio.Task | None:
        """The task closing the stream; None when there is nothing to close (it finished, or its
        consumer is inside it and ends it)."""
        if self._closing is None and self.responses.ag_frame is not None and not self.responses.ag_running:
            self._closing = asyncio.get_running_loop().create_task(self.responses.aclose())
            _closing.add(self._closing)
            self._closing.add_done_callback(_closing.discard)
        return self._closing


def create_server(
    listen: str,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_request_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """An aio server bound to `listen` (HOST:PORT; port 0 picks one) with the given interceptors
    (metrics, auth: avatar.security) before the error interceptor, TLS when `credentials` is
    given, requests up to `max_request_bytes` (PUBLIC_MAX_REQUEST_BYTES on the public port), and
    the port it got. A port another process listens on is an OSError naming it."""
    _check_port_free(listen)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_request_bytes),
    ]
    server = grpc.aio.server(
        interceptors=[CloseAbandonedStreams(), *interceptors, ErrorInterceptor()],
        options=options + SERVER_KEEPALIVE_OPTIONS + NO_REUSEPORT_OPTIONS,
    )
    try:
        port = (
            server.add_secure_port(listen, credentials) if credentials is not None else server.add_insecure_port(listen)
        )
    except RuntimeError:  # grpc >= 1.5x raises instead of returning 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or not local?)")
    return server, port


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port nothing listens on at `host` (the first of `count` consecutive ones), for a process
    about to bind it (a rendezvous, a child's metrics). Outside the kernel's ephemeral range on
    purpose: a port from that range (what binding port 0 gives) can be taken by any outgoing
    connection between this check and the later bind, which then fails "address already in use".
    Below 20000 are Ray's worker ports."""
    low, high = _ephemeral_ports()
    first, last = (20000, low - count) if low > 21000 else (high + 1, 65536 - count)
    pick = random.Random()  # not the global generator: a caller that seeds it must not pin ports
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = pick.randint(first, last)
        with contextlib.ExitStack() as probes:
            try:
                for p in range(port, port + count):
                    probes.enter_context(socket.socket(family, socket.SOCK_STREAM)).bind((host, p))
            except OSError:
                continue
            return port
    raise OSError(f"no {count} free port(s) on {host} in {first}-{last + count - 1}")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_HOST_PORT = re.compile(r"(?:\[[^\]]*\]|[^:/\[\]]*):(\d+)")  # host:port or [v6]:port, no scheme


def check_port_range(address: str, lowest: int = 1) -> None:
    """ValueError for a HOST:PORT whose port is out of range: grpc takes it modulo 65536 (99999
    would quietly be 34463). Other target forms (dns:///..., unix:...) pass through."""
    match = _HOST_PORT.fullmatch(address)
    if match and not lowest <= int(match.group(1)) <= 65535:
        raise ValueError(f"{address}: port {match.group(1)} is out of range ({lowest}..65535)")


def _check_port_free(listen: str) -> None:
    """OSError 'port N is already in use' before grpc tries (its own failure is a core log line
    and a RuntimeError without the reason); ValueError for a port out of range. Port 0 and names
    that do not resolve pass through."""
    check_port_range(listen, lowest=0)
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    held = reserve_port(host.strip("[]") or "0.0.0.0", int(port), listen)
    if held is not None:
        held.close()


def reserve_port(host: str, port: int, listen: str) -> socket.socket | None:
    """A socket bound to host:port (not listening yet), for a listener that starts minutes later,
    after the model loads: held, the port cannot be taken meanwhile. OSError 'port N is already in
    use (listen)'; None where the host does not resolve or the bind fails otherwise (the server's
    own bind then says why)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None
    family, kind, proto, _, addr = infos[0]
    # Without SO_REUSEADDR first: two sockets that both set it may share a port none listens on
    # yet, so only this one holds it against a second server. With it where that fails: a
    # connection of the last run in TIME_WAIT is no conflict (grpc and aiohttp set it too).
    for reuse in (0, 1):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
        try:
            sock.bind(addr)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                return None
    raise OSError(f"port {port} is already in use ({listen}): is another avatar serve running there?")


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 and server reflection; returns the health servicer (NOT_SERVING)."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def set_serving(
    health_servicer, service_names: Iterable[str], serving: bool = True, whole_server: bool = True
) -> None:
    """Sets the named services (and "" = the whole server, what grpcurl/k8s probe by default,
    unless whole_server is False) to SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [""] * whole_server + list(service_names):
        await health_servicer.set(name, status)


def create_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, token: str | None = None
) -> grpc.aio.Channel:
    """An aio channel to a mesh peer with the same raised message limits; TLS when `credentials`
    is given, and `token` sent as ``authorization: Bearer`` on every call when given."""
    from avatar.security import aio_channel

    check_port_range(address)
    return aio_channel(address, credentials, token, MESSAGE_OPTIONS + CHANNEL_KEEPALIVE_OPTIONS)


def call_options(context: grpc.aio.ServicerContext | None = None) -> dict[str, Any]:
    """Keyword arguments for a downstream call: the caller's remaining deadline and trace context."""
    timeout = context.time_remaining() if context is not None else None
    return {"timeout": timeout, "metadata": telemetry.outgoing_metadata()}


async def run_blocking(fn: Callable, *args, **kwargs):
    """Runs blocking (torch) work in a thread so the event loop keeps serving.

    If the RPC is cancelled meanwhile (client gone, deadline passed), sets the work's CancelFlag,
    so it stops at its next check (avatar.cancellation: between layers, chunks or blocks), and
    waits for the thread before re-raising: a session is never closed while its engine is still
    inside a call.
    """
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()  # keeps the current span for anything the thread logs
    flag = cancellation.CancelFlag()
    ctx.run(cancellation.CURRENT.set, flag)
    future = loop.run_in_executor(None, functools.partial(ctx.run, fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        flag.set()
        try:
            await future
        except Exception:  # noqa: BLE001 - the cancellation is what the caller must see
            pass
        raise
    finally:
        # asyncio keeps a failed future's traceback, which holds this frame, which holds the
        # future and the call's arguments (a request of up to 32 MiB): a cycle only a full GC
        # pass frees. Cut it here.
        future = args = kwargs = None
