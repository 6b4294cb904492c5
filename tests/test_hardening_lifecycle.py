"""Lifecycle under trouble: client cancel and deadlines free every session within one block; a
decoder killed mid-stream becomes UNAVAILABLE in seconds and the mesh recovers when it is back;
SIGTERM drains (health NOT_SERVING, in-flight streams finish or are cancelled within the grace)."""

import io
import json
import signal
import threading
import time
import wave

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatar.grpc_util import MESSAGE_OPTIONS
from avatar.v1 import avatar_pb2, avatar_pb2_grpc
from tests.conftest import ASSETS, Services, ffprobe, metrics_of, wait_serving

pytestmark = pytest.mark.timeout(300)
IMAGE = (ASSETS / "astronaut.png").read_bytes()


def _speech(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 180 * t)[:, None] * np.linspace(0.5, 1, channels)[None, :]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _request(seconds: float, **kw) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(image=IMAGE, audio=kw.pop("audio", None) or _speech(seconds), size="64*64", **kw)


def wait_sessions_freed(svc, services=("gateway", "generator"), timeout_s=10.0) -> float:
    """Seconds until every admission gauge of svc reads 0 (active and queued)."""
    t0 = time.monotonic()
    while True:
        m = metrics_of(svc)
        busy = {k: v for k, v in m.items() if k.startswith(("avatar_active_sessions", "avatar_queue_depth")) and v != 0}
        busy.update(
            {
                k: v
                for k, v in m.items()
                if k.startswith("avatar_inflight_rpcs")
                and v != 0
                and any(s in k for s in ("GeneratorService", "DecoderService", "EncoderService"))
            }
        )
        if not busy:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"sessions still held after {timeout_s} s: {busy}")
        time.sleep(0.1)


def _complete(address, request, timeout=120):
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        msgs = list(avatar_pb2_grpc.AvatarServiceStub(ch).Generate(request, timeout=timeout))
    assert msgs[-1].WhichOneof("event") == "status"
    return msgs


def _valid_mp4(msgs, path):
    data = b"".join(m.init_segment.data for m in msgs if m.WhichOneof("event") == "init_segment")
    data += b"".join(m.fragment.data for m in msgs if m.WhichOneof("event") == "fragment")
    path.write_bytes(data)
    kinds = sorted(s["codec_name"] for s in ffprobe(path)["streams"])
    assert kinds == ["aac", "h264"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, env):
    services = Services(tmp_path_factory.mktemp("lifecycle"), env)
    try:
        yield services.start("all", "--metrics-port", "0", "--max-sessions", "2", trace=True)
    finally:
        services.stop_all()


def test_cancel_mid_stream_frees_sessions_within_one_block(embedded, tmp_path):
    with grpc.insecure_channel(embedded.address, options=MESSAGE_OPTIONS) as ch:
        call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(6.0), timeout=120)
        for msg in call:
            if msg.WhichOneof("event") == "fragment":
                break
        header_blocks = 13  # 6 s at 25 fps = 150 frames = 13 blocks
        cancelled_ns = time.time_ns()
        call.cancel()
    freed_s = wait_sessions_freed(embedded)
    time.sleep(0.5)  # let a block that was running finish and be written
    spans = [s for s in embedded.spans() if s["name"] == "dit_block"]
    trace_id = max(
        (s for s in spans if s["start_unix_nano"] < cancelled_ns and s["attributes"]["block"] == 0),
        key=lambda s: s["start_unix_nano"],
    )["trace_id"]
    mine = [s for s in spans if s["trace_id"] == trace_id]
    after = [s for s in mine if s["start_unix_nano"] > cancelled_ns]
    assert len(mine) < header_blocks, "the job ran to the end despite the cancel"
    assert len(after) <= 1, f"{len(after)} blocks started after the cancel (at most the running one may finish)"
    assert freed_s < 10
    m = metrics_of(embedded)
    assert m.get('avatar_requests_total{code="CANCELLED",method="Generate",service="AvatarService"}', 0) >= 1
    # the next request succeeds; odd input on purpose: 3 channels at 22.05 kHz are mixed to mono
    msgs = _complete(embedded.address, _request(1.0, audio=_speech(1.0, rate=22050, channels=3)))
    _valid_mp4(msgs, tmp_path / "next.mp4")
    # a cancel is routine: it leaves no error noise (tracing contexts, abandoned request streams)
    log = embedded.log.read_text(errors="replace")
    for noise in (
        "Failed to detach context",
        "asynchronous generator is already running",
        "Task exception was never retrieved",
    ):
        assert noise not in log, f"{noise!r} in the server log after a cancel"


def test_the_first_block_runs_alone_then_the_generator_runs_ahead(embedded):
    msgs = _complete(embedded.address, _request(3.0))
    trace_id = msgs[-1].status.trace_id
    spans = [s for s in embedded.spans() if s["trace_id"] == trace_id]
    dit = {s["attributes"]["block"]: s for s in spans if s["name"] == "dit_block"}
    decoded = {s["attributes"]["block"]: s for s in spans if s["name"] == "vae_decode"}
    sent = {s["attributes"]["block"]: s for s in spans if s["name"] == "send"}
    assert len(dit) == len(decoded) == len(sent) == 7
    # block 1's DiT waits until block 0 is decoded (its decode had the GPU alone; its H.264
    # encode and send may overlap block 1: tests/test_gateway_window.py pins that down) ...
    assert dit[1]["start_unix_nano"] >= decoded[0]["end_unix_nano"]
    # ... then the window opens: some later block starts before the fragment two before it is sent
    assert any(dit[k]["start_unix_nano"] < sent[k - 1]["end_unix_nano"] for k in range(2, 7))


def test_deadline_reaches_every_stage(embedded):
    t0 = time.monotonic()
    with grpc.insecure_channel(embedded.address, options=MESSAGE_OPTIONS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            for _ in avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0), timeout=2.0):
                pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 4
    wait_sessions_freed(embedded)
    # downstream calls carried the deadline: they ended with it, not by running to completion
    m = metrics_of(embedded)
    ends = {k for k, v in m.items() if k.startswith("avatar_requests_total") and "GeneratorService" in k and v}
    assert any('code="OK"' not in k for k in ends), ends


def test_decoder_killed_mid_stream_then_back(tmp_path, env):
    # internal services require the internal token; the gateway sends it
    services = Services(tmp_path, dict(env, AVATAR_INTERNAL_TOKEN="internal-tok-789"))
    try:
        parts = {r: services.start(r, "--metrics-port", "0", wait=False) for r in ("encoder", "generator", "decoder")}
        for svc in parts.values():
            wait_serving(svc.address, 120, svc.proc, svc.log)
        gw = services.start(
            "gateway",
            "--encoder",
            parts["encoder"].address,
            "--generator",
            parts["generator"].address,
            "--decoder",
            parts["decoder"].address,
            "--metrics-port",
            "0",
        )
        from avatar.v1 import encoder_pb2, encoder_pb2_grpc

        with grpc.insecure_channel(parts["encoder"].address) as ch:  # no token: refused
            with pytest.raises(grpc.RpcError) as e:
                encoder_pb2_grpc.EncoderServiceStub(ch).EncodeText(
                    encoder_pb2.EncodeTextRequest(prompt="x"), timeout=10
                )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "internal token" in e.value.details()
        with grpc.insecure_channel(gw.address, options=MESSAGE_OPTIONS) as ch:
            call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0), timeout=120)
            fragments = 0
            with pytest.raises(grpc.RpcError) as e:
                for msg in call:
                    if msg.WhichOneof("event") == "fragment":
                        fragments += 1
                        if fragments == 1:
                            parts["decoder"].proc.send_signal(signal.SIGKILL)
                            killed = time.monotonic()
            waited = time.monotonic() - killed
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert waited < 10, f"the client waited {waited:.1f} s for UNAVAILABLE"
        wait_sessions_freed(gw, ("gateway",))
        wait_sessions_freed(parts["generator"], ("generator",))
        # while the decoder is down, new requests fail fast and cleanly
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            _complete(gw.address, _request(1.0), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 10
        # restart it on the same address; the gateway reconnects by itself
        parts["decoder"].proc.wait(timeout=10)
        back = services.start("decoder", "--listen", parts["decoder"].address, wait=False)
        wait_serving(parts["decoder"].address, 120, back.proc, back.log)
        _valid_mp4(_complete(gw.address, _request(1.0)), tmp_path / "after.mp4")
        # a frozen decoder (host gone, no socket closed) is found out by keepalive pings
        with grpc.insecure_channel(gw.address, options=MESSAGE_OPTIONS) as ch:
            call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0), timeout=120)
            with pytest.raises(grpc.RpcError) as e:
                for msg in call:
                    if msg.WhichOneof("event") == "fragment" and back.proc.poll() is None:
                        back.proc.send_signal(signal.SIGSTOP)
                        frozen = time.monotonic()
                        break
                for _msg in call:
                    pass
            waited = time.monotonic() - frozen
        back.proc.send_signal(signal.SIGCONT)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert waited < 15, f"the client waited {waited:.1f} s for UNAVAILABLE from a frozen decoder"
        # operators see each failure as a JSON log line that names its trace
        records = [json.loads(line) for line in gw.log.read_text().splitlines() if line.startswith("{")]
        failures = [r for r in records if "UNAVAILABLE" in r["message"]]
        assert len(failures) >= 3 and all(
            len(r["trace_id"]) == 32 and r["service"] == "avatar-gateway" for r in failures
        ), failures
        # ... and nothing else: failed requests leave no error noise behind (tracing contexts
        # detached in the wrong task, abandoned request streams closed by the loop)
        for svc in (gw, parts["encoder"], parts["generator"]):
            log = svc.log.read_text(errors="replace")
            for noise in (
                "Failed to detach context",
                "asynchronous generator is already running",
                "Task exception was never retrieved",
            ):
                assert noise not in log, f"{noise!r} in the {svc.role} log"
    finally:
        for p in services.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        services.stop_all()


def test_sigterm_drains_then_exits(tmp_path, env):
    """Long grace: the in-flight stream finishes; health turns NOT_SERVING at once; the
    process exits 0. Short grace: a long stream is cut at the grace, not left hanging."""
    for grace, seconds, expect_ok in ((30, 1.5, True), (1, 8.0, False)):
        services = Services(tmp_path / f"g{grace}", env)
        (tmp_path / f"g{grace}").mkdir()
        try:
            svc = services.start("all", "--grace", str(grace))
            statuses, result = [], {}
            ch = grpc.insecure_channel(svc.address, options=MESSAGE_OPTIONS)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)

            def watcher():
                try:
                    for r in watch:
                        statuses.append(r.status)
                        if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                            watch.cancel()  # an open Watch would hold the drain for the whole grace
                except grpc.RpcError:
                    pass

            threading.Thread(target=watcher, daemon=True).start()
            call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(seconds), timeout=120)
            t0 = None
            try:
                for msg in call:
                    if msg.WhichOneof("event") == "fragment" and t0 is None:
                        svc.proc.send_signal(signal.SIGTERM)
                        t0 = time.monotonic()
                    if msg.WhichOneof("event") == "status":
                        result["ok"] = True
            except grpc.RpcError as e:
                result["code"] = e.code()
            ended = time.monotonic() - t0
            rc = svc.proc.wait(timeout=grace + 20)
            ch.close()
            assert rc == 0, svc.log.read_text()[-2000:]
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
            if expect_ok:
                assert result == {"ok": True}, result
            else:
                assert "ok" not in result and result["code"] in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.ABORTED,
                ), result
                assert ended < grace + 5, f"the stream lasted {ended:.1f} s past SIGTERM with a {grace} s grace"
        finally:
            services.stop_all()


def test_slow_reader_stalls_the_generator(embedded, tmp_path):
    """A client that stops reading stops the generator a few blocks later (the gateway's block
    credits + HTTP/2 flow control), instead of the mesh buffering the whole video."""
    window_64k = MESSAGE_OPTIONS + [("grpc.http2.bdp_probe", 0)]  # the client's window stays small
    msgs = []
    with grpc.insecure_channel(embedded.address, options=window_64k) as ch:
        call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0, sample_steps=1), timeout=180)
        for msg in call:
            msgs.append(msg)
            if msg.WhichOneof("event") == "fragment":
                break
        total = msgs[0].header.expected_fragments
        paused = time.time_ns()
        time.sleep(8)  # unthrottled, the tiny generator finishes all 17 blocks in this time
        resumed = time.time_ns()
        msgs.extend(call)
    spans = [s for s in embedded.spans() if s["name"] == "dit_block"]
    # this request's trace: the last block 0 started before the pause (the server is shared)
    trace_id = max(
        (s for s in spans if s["start_unix_nano"] < paused and s["attributes"]["block"] == 0),
        key=lambda s: s["start_unix_nano"],
    )["trace_id"]
    mine = [s for s in spans if s["trace_id"] == trace_id]
    during = [s for s in mine if paused < s["start_unix_nano"] < resumed]
    assert total == 18 and len(mine) == 17  # 17 blocks, block 0 in two fragments
    assert len(during) <= 9, f"{len(during)} blocks generated while the client read nothing"
    assert sum(m.WhichOneof("event") == "fragment" for m in msgs) == total  # and nothing was lost
    _valid_mp4(msgs, tmp_path / "slow.mp4")
