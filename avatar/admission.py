"""Admission control: a cap on concurrent sessions, a bounded wait queue and per-client fairness.

A servicer wraps each session in ``async with admission.slot(context): ...``. Up to
`max_sessions` run at once; up to `max_queue` more wait (in fair order: the next free slot goes
to the waiting client with the fewest sessions running, ties by arrival); beyond that the call
fails with RESOURCE_EXHAUSTED, a message saying what is full, and trailing metadata
``retry-after-ms`` estimated from recent session lengths; past the caller's deadline while
waiting, with DEADLINE_EXCEEDED.
Nothing ever waits unbounded: the queue is bounded and every wait has the RPC's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import grpc

from avatar import errors
from avatar.grpc_util import DeadlineExceeded, status_of
from avatar.security import bearer_token, token_fingerprint

log = logging.getLogger(__name__)
RETRY_AFTER_KEY = "retry-after-ms"
_MIN_RETRY_MS, _MAX_RETRY_MS, _DEFAULT_RETRY_MS = 100, 60_000, 1_000


class Overloaded(errors.ResourceExhausted):
    """No session slot now: RESOURCE_EXHAUSTED. retry_after_ms says when trying again makes sense."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class QueueDeadline(DeadlineExceeded):
    """The request's deadline passed while it waited for a slot: DEADLINE_EXCEEDED."""


@dataclass(frozen=True)
class AdmissionConfig:
    max_sessions: int = 4  # sessions running at once (a generator's GPU budget)
    max_queue: int = 8  # sessions waiting for a slot; 0: refuse at once when full
    max_per_client: int = 0  # running + waiting per client (token or peer); 0: no cap

    def __post_init__(self):
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.max_queue < 0 or self.max_per_client < 0:
            raise ValueError("max_queue and max_per_client must not be negative")

    def internal(self) -> AdmissionConfig:
        """The same caps for an internal service: no per-client limit (its one client is the gateway)."""
        return replace(self, max_per_client=0)


def client_key(context, token_checked: bool = False) -> str:
    """Who is calling, for fairness: the authenticated identity, else the peer's host.

    Authenticated means a client certificate (mTLS: its subject) or, when `token_checked` (the
    listener verifies bearer tokens), the fingerprint of the token: every client sharing one
    API token is one client. An unchecked bearer string says nothing about who sends it (a
    client could send a new one per call), so without auth the key is the peer's address
    without the port (a client's connections share it). Never the token itself.
    """
    cert = _certificate_identity(context)
    if cert:
        return "cert:" + cert
    if token_checked:
        token = bearer_token(context.invocation_metadata())
        if token:
            return token_fingerprint(token)
    return peer_host(context.peer() or "unknown")


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5123' -> 'ipv6:[::1]'; others unchanged."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _certificate_identity(context) -> str | None:
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - contexts without TLS (tests, plaintext) may not offer it
        return None
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            v = values[0]
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return None


class _Waiter:
    __slots__ = ("client", "seq", "future")

    def __init__(self, client: str, seq: int, future: asyncio.Future):
        self.client, self.seq, self.future = client, seq, future


class Admission:
    """Session slots of one service (e.g. "generator"). Not thread-safe: use from one event loop."""

    def __init__(
        self, config: AdmissionConfig = AdmissionConfig(), name: str = "generator", token_checked: bool = False
    ):
        self.config = config
        self.name = name
        self.token_checked = token_checked  # the listener verifies bearer tokens: they identify clients
        self._running: dict[str, int] = defaultdict(int)
        self._last_grant: dict[str, int] = {}  # per client with work here: when it last got a slot
        self._grants = itertools.count()
        self._waiting: list[_Waiter] = []
        self._active = 0
        self._capacity = config.max_sessions  # set_capacity: the slots of the replicas behind (--ray)
        self._seq = itertools.count()
        self._mean_s: float | None = None  # moving average of session length
        self._metrics = _metrics()
        self._publish()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, max_sessions: int) -> None:
        """Changes the number of slots (a gateway on Ray: the generator replicas' slots, which come
        and go; 0 while none serves, so sessions wait or are refused). More slots go to the waiting
        at once; fewer take effect as sessions end."""
        self._capacity = max(0, max_sessions)
        while self._waiting and self._active < self._capacity:
            self._grant_next()
        self._publish()

    def retry_after_ms(self) -> int:
        """When a slot is likely free: one mean session length per full round of the queue."""
        if self._mean_s is None:
            return _DEFAULT_RETRY_MS
        rounds = 1 + len(self._waiting) / max(1, self._capacity)
        return int(min(_MAX_RETRY_MS, max(_MIN_RETRY_MS, 1000 * self._mean_s * rounds)))

    @contextlib.asynccontextmanager
    async def slot(self, context=None, *, client: str | None = None, timeout: float | None = None):
        """Holds one session slot for the body. With a grpc.aio context: the client key and the
        deadline come from it, and a refusal sets ``retry-after-ms`` trailing metadata."""
        if context is not None:
            client = client or client_key(context, self.token_checked)
            if timeout is None:
                timeout = context.time_remaining()
        try:
            await self._acquire(client or "", timeout)
        except Overloaded as e:
            if context is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(e.retry_after_ms)),))
            raise
        started = time.monotonic()
        try:
            yield
        finally:
            self._release(client or "", time.monotonic() - started)

    def _refuse(self, why: str) -> Overloaded:
        ms = self.retry_after_ms()
        if self._metrics:
            self._metrics.rejected.labels(service=self.name).inc()
        return Overloaded(f"{self.name} busy: {why}; retry in {ms / 1000:.1f} s", ms)

    async def _acquire(self, client: str, timeout: float | None) -> None:
        cfg = self.config
        mine = self._running[client] + sum(w.client == client for w in self._waiting)
        if cfg.max_per_client and mine >= cfg.max_per_client:
            raise self._refuse(
                f"this client already has {mine} requests running or queued (limit {cfg.max_per_client} per client)"
            )
        if self._active < self._capacity and not self._waiting:
            self._take(client)
            return
        if len(self._waiting) >= cfg.max_queue:
            raise self._refuse(
                f"{self._active} of {self._capacity} sessions running and "
                f"{len(self._waiting)} of {cfg.max_queue} queued"
            )
        waiter = _Waiter(client, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._publish()
        try:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            # not wait_for: Python 3.11's drops a cancel that comes as the wait ends (CPython
            # gh-86296), and a departed client's request then went on to run its whole session
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter.future)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.future.done() and not waiter.future.cancelled():
                # the slot was handed over just as we gave up: pass it on
                self._release(client, None)
            else:
                waiter.future.cancel()
                self._waiting.remove(waiter)
                if client not in self._running and not any(w.client == client for w in self._waiting):
                    self._last_grant.pop(client, None)
                self._publish()
            if isinstance(e, asyncio.CancelledError):
                raise
            if self._metrics:
                self._metrics.rejected.labels(service=self.name).inc()
            # DEADLINE_EXCEEDED, not RESOURCE_EXHAUSTED: the client's own deadline fires at the
            # same moment, and its library reports DEADLINE_EXCEEDED whichever status wins.
            raise QueueDeadline(
                f"{self.name} busy: no session slot freed before the deadline "
                f"({self._capacity} running, {len(self._waiting)} queued)"
            ) from None

    def _take(self, client: str) -> None:
        self._active += 1
        self._running[client] += 1
        self._last_grant[client] = next(self._grants)
        self._publish()

    def _release(self, client: str, duration_s: float | None) -> None:
        self._active -= 1
        self._running[client] -= 1
        if self._running[client] <= 0:
            del self._running[client]
            if not any(w.client == client for w in self._waiting):
                self._last_grant.pop(client, None)
        if duration_s is not None:
            self._mean_s = duration_s if self._mean_s is None else 0.8 * self._mean_s + 0.2 * duration_s
        if self._waiting and self._active < self._capacity:
            self._grant_next()
        self._publish()

    def _grant_next(self) -> None:
        # fairness: fewest sessions running first, then the client served longest ago
        # (round robin between clients), then arrival order
        nxt = min(
            self._waiting, key=lambda w: (self._running.get(w.client, 0), self._last_grant.get(w.client, -1), w.seq)
        )
        self._waiting.remove(nxt)
        self._take(nxt.client)
        nxt.future.set_result(None)

    def _publish(self) -> None:
        if self._metrics:
            self._metrics.active.labels(service=self.name).set(self._active)
            self._metrics.queued.labels(service=self.name).set(len(self._waiting))


class AdmitBeforeReading(grpc.aio.ServerInterceptor):
    """Takes the session slot of a single-request method before its request is read.

    grpc reads a unary request whole (the public Generate: up to 32 MiB of image and audio)
    before the handler runs, so a slot taken inside the handler lets every waiting or refused
    request sit in memory first. Served as a request stream instead, the body stays in the
    client's HTTP/2 window until a slot is granted: at most `max_sessions` bodies are in memory,
    waiting and refused requests cost none. The servicer itself takes no slot.
    """

    def __init__(self, admission: Admission, methods: Iterable[str]):
        self.admission = admission
        self.methods = frozenset(methods)  # full names, e.g. "/avatar.v1.AvatarService/Generate"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method not in self.methods or not handler.unary_stream:
            return handler
        respond, admission, details_method = handler.unary_stream, self.admission, details.method.lstrip("/")

        async def admitted(requests, context):
            try:
                async with admission.slot(context):
                    messages = aiter(requests)
                    request = await anext(messages, None)  # the body is read only now
                    # ... and the end of the client's stream: grpc completes a call whose
                    # receive side is still open only when the client goes away (the handler
                    # task, holding the request, would outlive the call)
                    if request is None or await anext(messages, None) is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call must carry one request")
                    responses, request = respond(request, context), None  # no frame but its own holds it
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            yield response
            except (errors.ResourceExhausted, DeadlineExceeded) as exc:  # outside the error interceptor
                code, details = status_of(exc)
                log.info("%s: %s: %s", details_method, code.name, details)
                await context.abort(code, details)

        return grpc.stream_stream_rpc_method_handler(
            admitted, handler.request_deserializer, handler.response_serializer
        )


def _metrics():
    try:
        from avatar import metrics
    except ImportError:  # metrics are optional: admission works without prometheus_client
        return None
    return metrics.ADMISSION


def retry_hint_metadata(exc) -> tuple:
    """Trailing metadata carrying the retry hint of an Overloaded error or of a downstream
    RESOURCE_EXHAUSTED grpc error; empty when there is none."""
    ms = exc.retry_after_ms if isinstance(exc, Overloaded) else retry_after_ms(exc)
    return ((RETRY_AFTER_KEY, str(ms)),) if ms else ()


def retry_after_ms(error) -> int | None:
    """The retry hint of a RESOURCE_EXHAUSTED grpc.aio error (or grpc.RpcError), if it has one."""
    try:
        trailing = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        return None
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None
