"""WebSocket `GET /v1/converse`: one Converse session per connection, for browsers and agent pipelines.

Client -> server: first a text message with the ConverseHeader as JSON (protobuf JSON mapping:
the portrait as base64 in "image", e.g. {"image": "iVBOR...", "size": "64*64", "sample_rate":
16000}), then binary messages of PCM s16le mono at the header's sample rate, and text messages
{"type": "end_of_utterance" | "interrupt" | "end"}.

Server -> client: text messages are JSON with a "type"; a binary message always follows the
text message that announces it, with its length in "bytes": "header" (then the fMP4 init
segment), "fragment" (then that fragment's moof+mdat), "utterance_started",
"utterance_finished", "idle", "degraded", "status" (last; the socket then closes with 1000) and
"error" (then the socket closes: 1008 for a missing/wrong token, 4000 + the HTTP status
otherwise, e.g. 4400 for bad input, 4429 when the gateway is busy). The header's "session_id"
names the session in the SessionHub, where WHEP viewers can watch it.

The gRPC call is cancelled as soon as the socket closes, so a client that disappears frees its
session within one block; audio is read only as fast as the session takes it (bounded queue).
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from aiohttp import WSMsgType, web
from google.protobuf import json_format

from avatar import telemetry
from avatar.admission import retry_after_ms
from avatar.gateway.web.app import HTTP_STATUS, SUBPROTOCOL, auth_refusal, dumps, json_error, origin_refusal
from avatar.gateway.web.metrics import BYTES_STREAMED, WEBSOCKET_SESSIONS
from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES
from avatar.live_client import END_OF_UTTERANCE, INTERRUPT, converse
from avatar.v1 import avatar_pb2

log = logging.getLogger("avatar.gateway.web")

ROUTE = "/v1/converse"
HEADER_TIMEOUT_S = 30.0  # a connection that sends no header within this is closed
QUEUED_MESSAGES = 16  # client messages read ahead of the session; more: the socket is not read
# The header carries the portrait as base64 (4/3 of its bytes) inside JSON.
MAX_MESSAGE_BYTES = PUBLIC_MAX_REQUEST_BYTES * 4 // 3 + (64 << 10)
CONTROLS = {"end_of_utterance": END_OF_UTTERANCE, "interrupt": INTERRUPT, "end": None}
POLICY_VIOLATION = 1008


class Refused(Exception):
    """Bad input from the WebSocket client: an "error" message, then the socket closes."""

    def __init__(self, reason: str, status: int = 400, code: str = "INVALID_ARGUMENT"):
        super().__init__(reason)
        self.reason, self.status, self.code = reason, status, code


def parse_header(text: str) -> avatar_pb2.ConverseHeader:
    """The first message: a ConverseHeader in protobuf's JSON mapping ("type": "header" allowed)."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise Refused(f"the header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Refused("the header must be a JSON object with the ConverseHeader fields")
    if obj.pop("type", "header") != "header":
        raise Refused("the first message must be the header (a JSON ConverseHeader)")
    header = avatar_pb2.ConverseHeader()
    try:
        json_format.ParseDict(obj, header)
    except json_format.ParseError as exc:
        raise Refused(f"bad header: {exc}") from None
    return header


def parse_control(text: str):
    """A control text message -> END_OF_UTTERANCE, INTERRUPT, or None for "end"."""
    try:
        obj = json.loads(text)
        kind = obj.get("type") if isinstance(obj, dict) else None
    except ValueError:
        kind = None
    if kind not in CONTROLS:
        raise Refused(
            f'after the header, text messages are {{"type": {" | ".join(map(repr, CONTROLS))}}}: got {text[:80]!r}'
        )
    return CONTROLS[kind]


def _fields(message) -> dict:
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


class Session:
    """One WebSocket bridged to one Converse call."""

    def __init__(self, ws: web.WebSocketResponse, app: web.Application):
        self.ws, self.app = ws, app
        self.queue: asyncio.Queue = asyncio.Queue(QUEUED_MESSAGES)
        self.live = None  # the hub's LiveSession
        self.call = None
        self.client_gone = False

    async def send_json(self, obj: dict) -> None:
        await self.ws.send_str(dumps(obj))

    async def send_media(self, obj: dict, data: bytes) -> None:
        await self.send_json({**obj, "bytes": len(data)})
        await self.ws.send_bytes(data)
        BYTES_STREAMED.labels(ROUTE).inc(len(data))

    async def fail(self, status: int, code: str, reason: str, retry_after_s: int | None = None) -> None:
        if self.ws.closed:
            return
        error = {"type": "error", "status": status, "code": code, "error": reason}
        if retry_after_s:
            error["retry_after_s"] = retry_after_s
        try:
            await self.send_json(error)
        except ConnectionError:
            return
        await self.ws.close(code=4000 + status, message=reason.encode()[:120])

    async def _requests(self):
        while (item := await self.queue.get()) is not None:
            yield item

    async def read_header(self) -> avatar_pb2.ConverseHeader:
        try:
            msg = await self.ws.receive(timeout=HEADER_TIMEOUT_S)
        except TimeoutError:
            raise Refused(f"no header within {HEADER_TIMEOUT_S:g} s", 408, "DEADLINE_EXCEEDED") from None
        if msg.type == WSMsgType.BINARY:
            raise Refused("audio came before the header: send the ConverseHeader as a JSON text message first")
        if msg.type != WSMsgType.TEXT:
            raise ConnectionResetError("the client left before its header")
        return parse_header(msg.data)

    async def read_client(self) -> None:
        """Client messages into the queue until the socket closes; a close cancels the call."""
        ended = False
        try:
            async for msg in self.ws:
                if ended:
                    raise Refused('a message came after {"type": "end"}')
                if msg.type == WSMsgType.BINARY:
                    await self.queue.put(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    item = parse_control(msg.data)
                    await self.queue.put(item)
                    ended = item is None
        except Refused as exc:
            self.call.cancel()
            await self.fail(exc.status, exc.code, exc.reason)
            return
        # The socket closed (by the client, a failed heartbeat, or us after the status).
        self.client_gone = True
        self.call.cancel()

    async def forward(self, header: avatar_pb2.ConverseHeader) -> None:
        self.call = converse(self.app["channel"], header, self._requests(), metadata=telemetry.outgoing_metadata())
        reader = asyncio.create_task(self.read_client())
        try:
            async for msg in self.call:
                await self.send_response(msg)
        except grpc.aio.AioRpcError as exc:
            status = HTTP_STATUS.get(exc.code(), 502)
            hint = retry_after_ms(exc) if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
            retry_s = max(1, -(-(hint or 1000) // 1000)) if status == 429 else None
            await self.fail(status, exc.code().name, exc.details() or exc.code().name, retry_s)
        except (asyncio.CancelledError, ConnectionError):
            if not self.client_gone and not self.ws.closed:
                raise
        finally:
            self.call.cancel()
            reader.cancel()
        if not self.ws.closed:
            await self.ws.close(code=1000, message=b"session ended")

    async def send_response(self, msg: avatar_pb2.ConverseResponse) -> None:
        kind = msg.WhichOneof("event")
        if kind == "header":
            h = msg.header
            self.live.publish_header(h.init_segment, h.mime_type)
            fields = _fields(h)
            fields.pop("init_segment")
            block_s = h.frames_per_block / h.fps if h.fps else 0.0
            await self.send_media(
                {"type": "header", "session_id": self.live.id, **fields, "block_s": block_s}, h.init_segment
            )
        elif kind == "fragment":
            f = msg.fragment
            self.live.publish_fragment(f.data)
            fields = _fields(f)
            fields.pop("data")
            await self.send_media({"type": "fragment", **fields}, f.data)
        else:
            await self.send_json({"type": kind, **_fields(getattr(msg, kind))})

    async def run(self) -> None:
        hub = self.app["hub"]
        try:
            header = await self.read_header()
            try:
                self.live = hub.open()
            except RuntimeError as exc:
                raise Refused(str(exc), 503, "UNAVAILABLE") from None
            try:
                await self.forward(header)
            finally:
                hub.close(self.live)
        except Refused as exc:
            await self.fail(exc.status, exc.code, exc.reason)
        except ConnectionError:
            pass


async def handle(request: web.Request) -> web.StreamResponse:
    if reason := origin_refusal(request):
        return json_error(403, reason, "PERMISSION_DENIED")
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=20.0, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    # After the upgrade, so that a browser can read why (it sees nothing of a refused handshake).
    if reason := auth_refusal(request):
        await ws.send_str(dumps({"type": "error", "status": 401, "code": "UNAUTHENTICATED", "error": reason}))
        await ws.close(code=POLICY_VIOLATION, message=reason.encode()[:120])
        return ws
    request.app["websockets"].add(ws)
    WEBSOCKET_SESSIONS.inc()
    try:
        await Session(ws, request.app).run()
    finally:
        WEBSOCKET_SESSIONS.dec()
    return ws
