"""Prometheus metrics of the web front (`avatar serve --http`), in the process's one registry."""

from prometheus_client import Counter, Gauge

from avatar.metrics import REGISTRY

HTTP_REQUESTS = Counter(
    "avatar_http_requests",
    "HTTP requests and WebSocket sessions of the web front, by route template and final status code",
    ["route", "code"],
    registry=REGISTRY,
)
WEBSOCKET_SESSIONS = Gauge(
    "avatar_http_websocket_sessions", "Live sessions open on the WebSocket /v1/converse now", registry=REGISTRY
)
BYTES_STREAMED = Counter(
    "avatar_http_bytes_streamed",
    "fMP4 bytes (init segments and fragments) sent to web clients, by route template",
    ["route"],
    registry=REGISTRY,
)
