"""TLS / mTLS round trips with a test CA made here, and bearer-token auth on real gRPC calls."""

import asyncio
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from avatar import security
from avatar.security import BearerAuthInterceptor, SecurityConfig, TLSConfig
from avatar.v1 import avatar_pb2, avatar_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, all signed by the CA;
    plus a second, unrelated CA and a client cert it signed (must be refused)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "evil-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=avatar test {ca}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            cwd=d,
        )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ca, ext in (
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("evil-client", "evil-ca", "client.ext"),
    ):
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            ext,
            cwd=d,
        )
    return d


class _Avatar(avatar_pb2_grpc.AvatarServiceServicer):
    """Answers Generate with one header naming the request's prompt."""

    async def Generate(self, request, context):
        yield avatar_pb2.GenerateResponse(header=avatar_pb2.StreamHeader(request_id=request.prompt, fps=25))


async def _serve(creds=None, interceptors=()):
    server = grpc.aio.server(interceptors=list(interceptors))
    avatar_pb2_grpc.add_AvatarServiceServicer_to_server(_Avatar(), server)
    h = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = security.add_port(server, "127.0.0.1:0", creds)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _generate(address, creds=None, token=None, metadata=None, timeout=10):
    async with security.aio_channel(address, creds, token) as ch:
        stub = avatar_pb2_grpc.AvatarServiceStub(ch)
        call = stub.Generate(avatar_pb2.GenerateRequest(prompt="hello"), timeout=timeout, metadata=metadata)
        return [m async for m in call]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_tls_round_trip_with_test_ca(pki):
    async def go():
        server, addr = await _serve(security.server_credentials(pki / "server.pem", pki / "server.key"))
        try:
            got = await _generate(addr, security.channel_credentials(pki / "ca.pem"))
            assert got[0].header.request_id == "hello"
            # a client that trusts another CA must not get through
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(addr, security.channel_credentials(pki / "evil-ca.pem"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # nor a plaintext client
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(addr, None, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    run(go())


def test_mtls_requires_a_client_certificate_from_the_ca(pki):
    async def go():
        tls = TLSConfig(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
        server, addr = await _serve(tls.server_credentials())
        try:
            ok = TLSConfig(str(pki / "client.pem"), str(pki / "client.key"), str(pki / "ca.pem"))
            got = await _generate(addr, ok.channel_credentials())
            assert got[0].header.fps == 25
            for creds in (
                security.channel_credentials(pki / "ca.pem"),  # no client cert
                security.channel_credentials(pki / "ca.pem", pki / "evil-client.pem", pki / "evil-client.key"),
            ):  # cert from another CA
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _generate(addr, creds, timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    run(go())


def test_bearer_auth_no_token_wrong_token_right_token():
    async def go():
        server, addr = await _serve(interceptors=[BearerAuthInterceptor(["s3cret-token"])])
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(addr)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(addr, token="wrong-token")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "invalid API token" in e.value.details() and "wrong-token" not in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:  # not the Bearer scheme
                await _generate(addr, metadata=[("authorization", "Basic s3cret-token")])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            got = await _generate(addr, token="s3cret-token")
            assert got[0].header.request_id == "hello"
            got = await _generate(addr, metadata=security.auth_metadata("s3cret-token"))
            assert got[0].header.request_id == "hello"
            # health stays open for probes
            async with grpc.aio.insecure_channel(addr) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)

    run(go())


def test_refused_bodies_are_never_read():
    """An unauthenticated call and one refused for want of a slot end without their request
    being read: grpc never hands the body to the deserializer (a unary handler that refused
    after the fact would have had grpc read and parse all 31 MiB first). The deserializer's
    count is what tells; tests/test_hardening_internal.py measures the memory under load."""
    from avatar.admission import Admission, AdmissionConfig, AdmitBeforeReading
    from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES

    method = "/avatar.v1.AvatarService/Generate"
    read, holding, release = [], asyncio.Event(), asyncio.Event()

    def deserialize(data: bytes):
        read.append(len(data))
        return avatar_pb2.GenerateRequest.FromString(data)

    async def generate(request, context):
        holding.set()
        await release.wait()
        yield avatar_pb2.GenerateResponse(header=avatar_pb2.StreamHeader(request_id="done"))

    async def go():
        admission = Admission(AdmissionConfig(max_sessions=1, max_queue=0), name="t-unread")
        server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(["tok"]), AdmitBeforeReading(admission, [method])],
            options=[("grpc.max_receive_message_length", PUBLIC_MAX_REQUEST_BYTES)],
        )
        handler = grpc.unary_stream_rpc_method_handler(
            generate,
            request_deserializer=deserialize,
            response_serializer=avatar_pb2.GenerateResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("avatar.v1.AvatarService", {"Generate": handler})]
        )
        addr = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        body = avatar_pb2.GenerateRequest(image=b"\0" * (31 << 20))
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = avatar_pb2_grpc.AvatarServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [m async for m in stub.Generate(body, timeout=30)]
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and read == []
                first = stub.Generate(
                    avatar_pb2.GenerateRequest(prompt="first"), timeout=30, metadata=security.auth_metadata("tok")
                )
                reading = asyncio.ensure_future(first.read())
                await asyncio.wait_for(holding.wait(), 10)  # the only slot is taken
                assert len(read) == 1
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [m async for m in stub.Generate(body, timeout=30, metadata=security.auth_metadata("tok"))]
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(read) == 1
                release.set()
                assert (await reading).header.request_id == "done"
                assert (await first.code()) == grpc.StatusCode.OK
                # once a slot is free the same body is read, whole
                holding.clear()
                got = [m async for m in stub.Generate(body, timeout=30, metadata=security.auth_metadata("tok"))]
                assert got[0].header.request_id == "done" and read[1] == body.ByteSize()
        finally:
            await server.stop(None)

    run(go())


def test_roles_pick_the_right_token():
    cfg = SecurityConfig(auth_token="public-tok", internal_token="internal-tok")
    assert "public-tok" not in repr(cfg) and "internal-tok" not in str(cfg)
    assert SecurityConfig().server_interceptors("gateway") == []

    async def go():
        for role, accepted, refused in (
            ("gateway", ["public-tok"], ["internal-tok"]),
            ("generator", ["internal-tok"], ["public-tok"]),
            # the embedded server's public port: the internal token opens nothing
            ("all", ["public-tok"], ["internal-tok", "nope"]),
        ):
            server, addr = await _serve(interceptors=cfg.server_interceptors(role))
            try:
                for tok in accepted:
                    assert (await _generate(addr, token=tok))[0].header.request_id == "hello"
                for tok in refused:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await _generate(addr, token=tok)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    if role == "generator":
                        assert "internal token" in e.value.details()
            finally:
                await server.stop(None)

    run(go())


def test_config_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="both a certificate and its key"):
        TLSConfig(cert="a.pem")
    with pytest.raises(ValueError, match="cannot read TLS (key|certificate)"):
        security.server_credentials(tmp_path / "nope.pem", tmp_path / "nope.key")
    (tmp_path / "junk.pem").write_text("not a pem")
    (tmp_path / "junk.key").write_text("not a pem")
    with pytest.raises(ValueError, match="not a PEM file"):
        security.server_credentials(tmp_path / "junk.pem", tmp_path / "junk.key")
    monkeypatch.setenv("AVATAR_AUTH_TOKEN", " from-env ")
    assert security.token_from(None, "AVATAR_AUTH_TOKEN") == "from-env"
    assert security.token_from("flag", "AVATAR_AUTH_TOKEN") == "flag"
    monkeypatch.setenv("AVATAR_AUTH_TOKEN", "  ")
    assert security.token_from(None, "AVATAR_AUTH_TOKEN") is None
    assert security.token_fingerprint("abc") == security.token_fingerprint("abc") != security.token_fingerprint("abd")


def test_real_mesh_with_tls_and_auth(pki, tmp_path, env):
    """`avatar serve` with TLS + tokens, and `avatar generate` over it: right token works, the
    embedded gateway reaches its siblings on its internal loopback listener with the internal
    token, a missing token is refused."""
    import subprocess
    import time

    from avatar.app.healthcheck import check
    from tests.conftest import ASSETS, AVATAR, ROOT, Services, free_port, trim_speech

    chain = tmp_path / "fullchain.pem"  # leaf + CA: the embedded mesh verifies itself with it
    chain.write_bytes((pki / "server.pem").read_bytes() + (pki / "ca.pem").read_bytes())
    services = Services(tmp_path, dict(env, AVATAR_AUTH_TOKEN="pub-token-123", AVATAR_INTERNAL_TOKEN="int-token-456"))
    try:
        svc = services.start(
            "all", "--tls-cert", str(chain), "--tls-key", str(pki / "server.key"), wait=False, trace=True
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if check(svc.address, tls_ca=str(pki / "ca.pem")) == "SERVING":
                    break
            except grpc.RpcError:
                pass
            assert svc.proc.poll() is None and time.monotonic() < deadline, svc.log.read_text()[-2000:]
            time.sleep(0.3)
        audio = tmp_path / "a.wav"
        trim_speech(audio, 0, 0.6)
        base = [
            *AVATAR,
            "generate",
            "--image",
            str(ASSETS / "astronaut.png"),
            "--audio",
            str(audio),
            "--size",
            "64*64",
            "--server",
            svc.address,
            "--tls-ca",
            str(pki / "ca.pem"),
        ]
        clean_env = {k: v for k, v in env.items() if k not in ("AVATAR_AUTH_TOKEN", "AVATAR_INTERNAL_TOKEN")}
        r = subprocess.run(
            [*base, "--out", str(tmp_path / "no.mp4")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=clean_env,
        )
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and not (tmp_path / "no.mp4").exists()
        r = subprocess.run(
            [*base, "--out", str(tmp_path / "yes.mp4")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=dict(clean_env, AVATAR_AUTH_TOKEN="pub-token-123"),
        )
        assert r.returncode == 0, r.stderr[-2000:]
        r = subprocess.run(
            [*base, "--auth-token", "pub-token-123", "--out", str(tmp_path / "flag.mp4")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=clean_env,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "pub-token-123" not in (tmp_path / "flag.json").read_text(), "the token leaked into OUT.json"
        assert (tmp_path / "yes.mp4").stat().st_size > 1000
        probe = [sys.executable, "-m", "avatar.app.healthcheck", "--tls-ca", str(pki / "ca.pem")]
        r = subprocess.run([*probe, svc.address], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "SERVING" in r.stdout
        r = subprocess.run(
            [*probe, "--timeout", "1", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
        log = svc.log.read_text()
        assert "pub-token-123" not in log and "int-token-456" not in log
        spans = svc.trace_file.read_text()
        assert "encode_image" in spans, "the trace was written"
        assert "pub-token-123" not in spans and "int-token-456" not in spans and "Bearer" not in spans
    finally:
        services.stop_all()


def test_exposure_warnings():
    open_cfg = SecurityConfig()
    assert open_cfg.exposure_warnings("all", "127.0.0.1:50051") == []
    # "all" exposes only the gateway: its internal services listen on loopback behind a token
    assert len(open_cfg.exposure_warnings("all", "0.0.0.0:50051")) == 1
    assert "AVATAR_INTERNAL_TOKEN" in open_cfg.exposure_warnings("generator", "0.0.0.0:50053")[0]
    assert SecurityConfig(internal_token="x").exposure_warnings("decoder", "[::]:50054") == []
    assert SecurityConfig(auth_token="x").exposure_warnings("all", "0.0.0.0:50051") == []
    assert "AVATAR_AUTH_TOKEN" in SecurityConfig(internal_token="x").exposure_warnings("gateway", "0.0.0.0:1")[0]


def test_plaintext_token_warning():
    creds = object()
    assert security.plaintext_token_warning("10.0.0.5:50051", None, "t") is not None
    assert security.plaintext_token_warning("10.0.0.5:50051", creds, "t") is None
    assert security.plaintext_token_warning("127.0.0.1:50051", None, "t") is None
    assert security.plaintext_token_warning("[::1]:50051", None, "t") is None
    assert security.plaintext_token_warning("10.0.0.5:50051", None, None) is None
