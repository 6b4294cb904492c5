"""The web front's pure parts: listen addresses, WebSocket message parsing, packaged static files."""

import base64
import json
from pathlib import Path

import pytest

from avatar.gateway.web.app import parse_listen
from avatar.gateway.web.ws_converse import Refused, parse_control, parse_header
from tests.conftest import ASSETS

IMAGE = (ASSETS / "astronaut.png").read_bytes()


def test_listen_addresses():
    assert parse_listen("8080") == ("127.0.0.1", 8080)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("", "http", "1.2.3.4:99999", "host:"):
        with pytest.raises(ValueError, match=r"\[HOST:\]PORT"):
            parse_listen(bad)


def test_header_and_control_parsing():
    fields = {"image": base64.b64encode(IMAGE).decode(), "sample_steps": 3, "seed": 7, "sample_rate": 16000}
    h = parse_header(json.dumps({"type": "header", **fields}))
    assert h.image == IMAGE and h.sample_steps == 3 and h.seed == 7 and h.sample_rate == 16000
    assert parse_header('{"sampleRate": 24000}').sample_rate == 24000  # protobuf JSON names work too
    with pytest.raises(Refused, match="first message must be the header"):
        parse_header('{"type": "interrupt"}')
    assert parse_control('{"type": "end"}') is None
    assert parse_control('{"type": "interrupt"}').WhichOneof("event") == "interrupt"


def test_static_files_are_packaged():
    static = Path(__import__("avatar.gateway.web", fromlist=["x"]).__file__).parent / "static"
    assert {"index.html", "app.js", "pcm-worklet.js", "portrait.jpg"} <= {p.name for p in static.iterdir()}
