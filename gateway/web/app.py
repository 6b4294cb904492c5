"""The web front (`avatar serve --http`): an aiohttp app translating HTTP and WebSocket to the public API.

It holds no pipeline of its own: every job and live session is a call to the gateway's own
AvatarService over a loopback gRPC channel (avatar.client, avatar.live_client), so admission,
limits and input checks stay in one place and their gRPC status becomes the HTTP status here.

Routes: `/` (the page), `/static/*`, `GET /v1/converse` (WebSocket: ws_converse),
`POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/video.mp4` (http_jobs). The WHEP egress
adds its routes with `add_whep_routes(app, app["hub"])`.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from avatar import grpc_util, telemetry
from avatar.gateway.web.hub import SessionHub
from avatar.gateway.web.metrics import HTTP_REQUESTS
from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES
from avatar.security import TLSConfig

log = logging.getLogger("avatar.gateway.web")

STATIC = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
# Browsers cannot set headers on a WebSocket or a <video src>: the token may come as a query
# parameter or as a WebSocket subprotocol "bearer.<token>" beside "avatar.v1".
TOKEN_QUERY = "token"
SUBPROTOCOL = "avatar.v1"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."

# gRPC status of the public API -> HTTP status of the web front.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def parse_listen(value: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); the host defaults to loopback. ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {value!r}: expected [HOST:]PORT with PORT in 0..65535, e.g. 8080 or 0.0.0.0:8080")
    return host or DEFAULT_HOST, int(port)


@dataclass(frozen=True)
class WebConfig:
    """What the web front needs; `grpc_address` is the gateway's loopback listener for it."""

    listen: str = f"{DEFAULT_HOST}:8080"
    grpc_address: str = ""
    auth_token: str | None = None  # the public API's token; None: no auth
    allowed_origins: tuple[str, ...] = ()  # WebSocket origins beside the page's own host
    tls: TLSConfig = field(default_factory=TLSConfig)
    max_jobs: int = 32  # jobs kept (running or finished); more: 429
    max_job_bytes: int = 512 << 20  # fMP4 bytes kept over all jobs; the oldest finished go first
    job_ttl_s: float = 600.0  # a finished job is forgotten this long after it ended

    def __repr__(self) -> str:  # never print the token
        return f"WebConfig(listen={self.listen!r}, auth_token={'set' if self.auth_token else None})"


# --- errors ----------------------------------------------------------------------------------


def json_error(status: int, reason: str, code: str | None = None, headers: dict | None = None) -> web.Response:
    """Every refusal of the web front: a JSON body {"error": reason, "code": ...} with the status."""
    body = {"error": reason, **({"code": code} if code else {})}
    return web.json_response(body, status=status, headers=headers)


def grpc_error_response(code: grpc.StatusCode, details: str, retry_after_ms: int | None = None) -> web.Response:
    """The HTTP form of a gRPC status: its mapped code, the reason, and Retry-After (whole
    seconds, from the gateway's hint) when the gateway is busy."""
    headers = None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        headers = {"Retry-After": str(max(1, -(-(retry_after_ms or 1000) // 1000)))}
    return json_error(HTTP_STATUS.get(code, 502), details or code.name, code.name, headers)


# --- auth ------------------------------------------------------------------------------------


def request_token(request: web.Request) -> str | None:
    """The token a request carries: `Authorization: Bearer`, else `?token=`, else a WebSocket
    subprotocol `bearer.<token>`; None when it carries none."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    if TOKEN_QUERY in request.query:
        return request.query[TOKEN_QUERY]
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return proto[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    return None


def auth_refusal(request: web.Request) -> str | None:
    """Why the request may not use the API (tokens on, none or a wrong one), or None."""
    expected = request.app["config"].auth_token
    if not expected:
        return None
    token = request_token(request)
    if token is None:
        return (
            "missing API token: send 'Authorization: Bearer <token>', the query parameter "
            f"'{TOKEN_QUERY}', or (WebSocket) the subprotocol '{TOKEN_SUBPROTOCOL_PREFIX}<token>'"
        )
    if not hmac.compare_digest(token.encode(), expected.encode()):
        return "invalid API token"
    return None


def origin_refusal(request: web.Request) -> str | None:
    """Why a WebSocket's Origin is refused, or None: same host as the page, or an allowed origin.
    Clients that are not browsers send no Origin and pass (the token is their check)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    allowed = request.app["config"].allowed_origins
    if "*" in allowed or origin.rstrip("/") in allowed:
        return None
    host = origin.split("://", 1)[-1].rstrip("/")
    if host.lower() == request.host.lower():
        return None
    return f"origin {origin} may not open sessions here (same host only; see --http-allowed-origins)"


# --- the app ---------------------------------------------------------------------------------


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler):
    """A span per request (a WebSocket's covers the session), request counts by route and code,
    the token check of /v1/ (the WebSocket checks it after the upgrade to close with a reason),
    and JSON for errors nobody else answered."""
    route = _route_of(request)
    started = time.monotonic()
    code = 500
    with telemetry.server_span(f"HTTP {request.method} {route}", list(request.headers.items())) as span:
        span.set_attribute("http.method", request.method)
        span.set_attribute("http.route", route)
        try:
            if route.startswith("/v1/") and route != "/v1/converse" and (reason := auth_refusal(request)):
                response = json_error(401, reason, "UNAUTHENTICATED", {"WWW-Authenticate": "Bearer"})
            else:
                response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            if exc.status >= 400 and exc.content_type != "application/json":
                return json_error(exc.status, exc.reason)
            raise
        except Exception:
            log.exception("web front: %s %s failed", request.method, route)
            return json_error(500, "internal error (see the server log)", "INTERNAL")
        finally:
            span.set_attribute("http.status_code", code)
            span.set_attribute("duration_s", time.monotonic() - started)
            HTTP_REQUESTS.labels(route, str(code)).inc()


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _open_channels(app: web.Application) -> None:
    from avatar.client import AvatarClient, RetryPolicy
    from avatar.grpc_util import create_channel

    cfg: WebConfig = app["config"]
    # The web front has checked the caller's token; its calls carry the same token to the API.
    app["channel"] = create_channel(cfg.grpc_address, None, cfg.auth_token)
    # No retries inside: a busy gateway is the web client's 429 with Retry-After.
    app["client"] = AvatarClient(cfg.grpc_address, token=cfg.auth_token, retry=RetryPolicy(retries=0))


async def _close(app: web.Application) -> None:
    for ws in list(app["websockets"]):
        await ws.close(code=1001, message=b"server shutting down")
    await app["jobs"].close()
    await app["client"].close()
    await app["channel"].close()


def make_web_app(config: WebConfig, hub: SessionHub | None = None) -> web.Application:
    """The aiohttp application; `app["hub"]` holds the live sessions by id (for WHEP)."""
    from avatar.gateway.web import http_jobs, ws_converse
    from avatar.gateway.web.whep import add_whep_routes

    app = web.Application(middlewares=[observe], client_max_size=PUBLIC_MAX_REQUEST_BYTES)
    app["config"] = config
    app["hub"] = hub or SessionHub()
    app["websockets"] = weakref.WeakSet()
    app["jobs"] = http_jobs.JobStore(config.max_jobs, config.max_job_bytes, config.job_ttl_s)
    app.on_startup.append(_open_channels)
    app.on_shutdown.append(_close)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/v1/converse", ws_converse.handle)
    http_jobs.add_routes(app)
    # WebRTC viewers of the WebSocket sessions; the middleware has already checked the token.
    add_whep_routes(app, app["hub"], auth=None)
    return app


def ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """HTTPS with the gRPC listener's certificate; with a CA, client certificates are required (mTLS)."""
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            ctx.load_verify_locations(tls.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--http with TLS: cannot load {tls.cert} / {tls.key}: {exc}") from None
    return ctx


@dataclass
class RunningWeb:
    runner: web.AppRunner
    app: web.Application
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    async def stop(self) -> None:
        await self.runner.cleanup()


def reserve_web_port(config: WebConfig) -> socket.socket | None:
    """The --http port bound now, before minutes of model loading: 'port N is already in use'
    at once, and nothing can take it until start_web listens on it."""
    host, port = parse_listen(config.listen)
    return grpc_util.reserve_port(host, port, config.listen)


async def start_web(config: WebConfig, hub: SessionHub | None = None, sock: socket.socket | None = None) -> RunningWeb:
    """Binds (or takes `sock`, from reserve_web_port) and serves the web front on the running
    loop; port 0 picks a free one."""
    host, port = parse_listen(config.listen)
    app = make_web_app(config, hub)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    context = ssl_context(config.tls)
    if sock is not None:
        site = web.SockSite(runner, sock, ssl_context=context, shutdown_timeout=1.0)
    else:
        site = web.TCPSite(runner, host, port, ssl_context=context, shutdown_timeout=1.0)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"--http {config.listen}: cannot listen ({exc.strerror or exc})") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningWeb(runner, app, host, bound, "https" if context else "http")


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))
