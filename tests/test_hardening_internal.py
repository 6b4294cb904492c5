"""Hardening round 2, found by attacking `avatar serve` (tiny model, CPU, loopback): internal
services behind their own token and listener, input limits in every internal RPC, cancellation
that reaches the encoder's work, per-client fairness on the public API only, small unread
bodies on the public port, malformed messages, a busy port, deadline and frame metrics.
Real server processes on 127.0.0.1; every wait is bounded."""

import concurrent.futures
import re
import subprocess
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from avatar import wire
from avatar.grpc_util import MESSAGE_OPTIONS, PUBLIC_MAX_REQUEST_BYTES
from avatar.v1 import (
    avatar_pb2,
    avatar_pb2_grpc,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    tensor_pb2,
)
from tests.conftest import ASSETS, AVATAR, ROOT, Services, free_port, metrics_of, tone_wav

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(600)]
IMAGE = (ASSETS / "astronaut.png").read_bytes()
PUBLIC, INTERNAL = "public-tok-r2", "internal-tok-r2"


def _request(seconds: float = 1.0) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(image=IMAGE, audio=tone_wav(seconds, hz=180), size="64*64")


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _job(blocks: int, **kw) -> tensor_pb2.JobSpec:
    fields = dict(
        width=64,
        height=64,
        fps=25,
        infer_frames=36,
        latent_frames_per_block=3,
        num_blocks=blocks,
        total_frames=min(blocks * 12, 2**31 - 1),
        sample_steps=1,
        audio_sample_rate=48000,
        model="tiny",
    )
    return tensor_pb2.JobSpec(**(fields | kw))


def _count(m: dict, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def _internal_address(svc) -> str:
    return "127.0.0.1:" + re.search(r"internal services on 127\.0\.0\.1:(\d+)", svc.log.read_text()).group(1)


def _generate(address: str, request, token: str = PUBLIC, timeout: float = 120):
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        return list(avatar_pb2_grpc.AvatarServiceStub(ch).Generate(request, timeout=timeout, metadata=_bearer(token)))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, env):
    """`avatar serve` all-in-one with a public and an internal token and metrics."""
    services = Services(
        tmp_path_factory.mktemp("round2"), dict(env, AVATAR_AUTH_TOKEN=PUBLIC, AVATAR_INTERNAL_TOKEN=INTERNAL)
    )
    try:
        yield services.start("all", "--metrics-port", "0", "--max-sessions", "2", "--max-queue", "2")
    finally:
        services.stop_all()


# -- 1. internal services: own listener, own token, own input limits ---------------------------


def test_public_token_does_not_open_internal_services(embedded):
    text = encoder_pb2.EncodeTextRequest(prompt="x")
    with grpc.insecure_channel(embedded.address) as ch:  # the public port hosts only the gateway
        with pytest.raises(grpc.RpcError) as e:
            encoder_pb2_grpc.EncoderServiceStub(ch).EncodeText(text, timeout=10, metadata=_bearer(PUBLIC))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    internal = _internal_address(embedded)
    with grpc.insecure_channel(internal) as ch:  # the internal one wants the internal token
        stub = encoder_pb2_grpc.EncoderServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.EncodeText(text, timeout=10, metadata=_bearer(PUBLIC))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "internal token" in e.value.details()
        assert stub.EncodeText(text, timeout=60, metadata=_bearer(INTERNAL)).embeddings.shape
    msgs = _generate(embedded.address, _request(0.5))
    assert msgs[-1].WhichOneof("event") == "status"


def test_internal_rpcs_validate_their_own_inputs(embedded):
    md = _bearer(INTERNAL)
    with grpc.insecure_channel(_internal_address(embedded), options=MESSAGE_OPTIONS) as ch:
        enc = encoder_pb2_grpc.EncoderServiceStub(ch)
        checks = {
            "4 MiB prompt": lambda: enc.EncodeText(
                encoder_pb2.EncodeTextRequest(prompt="a" * (4 << 20)), timeout=30, metadata=md
            ),
            "2^31-1 audio blocks": lambda: list(
                enc.EncodeAudio(
                    encoder_pb2.EncodeAudioRequest(
                        job=_job(2**31 - 1), pcm_16k=wire.to_proto(np.zeros(16000, np.float32))
                    ),
                    timeout=30,
                    metadata=md,
                )
            ),
            "more blocks than audio": lambda: list(
                enc.EncodeAudio(
                    encoder_pb2.EncodeAudioRequest(job=_job(100), pcm_16k=wire.to_proto(np.zeros(16000, np.float32))),
                    timeout=30,
                    metadata=md,
                )
            ),
            "4000x4000 pixels": lambda: enc.EncodeImage(
                encoder_pb2.EncodeImageRequest(pixels=wire.to_proto(np.zeros((4000, 4000, 3), np.uint8))),
                timeout=30,
                metadata=md,
            ),
            "2^31-1 generator blocks": lambda: list(
                generator_pb2_grpc.GeneratorServiceStub(ch).Generate(
                    iter([generator_pb2.GeneratorInput(start=generator_pb2.SessionStart(job=_job(2**31 - 1)))]),
                    timeout=30,
                    metadata=md,
                )
            ),
            "decoder job 100 px wide": lambda: list(
                decoder_pb2_grpc.DecoderServiceStub(ch).Decode(
                    iter([decoder_pb2.DecoderInput(start=decoder_pb2.DecodeStart(job=_job(1, width=100)))]),
                    timeout=30,
                    metadata=md,
                )
            ),
        }
        for what, call in checks.items():
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value)
            assert time.monotonic() - t0 < 10, what  # refused, not worked on
    for reason in (
        "prompt is too long",
        "num_blocks must be between 1 and",
        "samples of 16 kHz audio fill",
        "over the largest area",
        "job size must be positive multiples of 16",
    ):
        assert reason in embedded.log.read_text(), reason


# -- 2. cancellation reaches the encoder's work; the encoder has its own cap --------------------


def test_deadline_stops_the_encode_and_the_encoder_caps_its_work(tmp_path, env):
    services = Services(tmp_path, env)
    try:
        enc = services.start("encoder", "--metrics-port", "0", "--encoder-concurrency", "1", "--encoder-queue", "0")
        # an encode far longer than the first call's 3 s deadline (~14 s at 1280 x 1280 on an idle
        # 2-core machine; 384 x 384 took 2 s since the portrait's one-pass motion context)
        big = encoder_pb2.EncodeImageRequest(pixels=wire.to_proto(np.full((1280, 1280, 3), 128, np.uint8)))
        with grpc.insecure_channel(enc.address, options=MESSAGE_OPTIONS) as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            first = stub.EncodeImage.future(big, timeout=3)
            time.sleep(1.0)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:  # the one slot is busy and nothing may wait
                stub.EncodeImage(big, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 2
            assert dict(e.value.trailing_metadata()).get("retry-after-ms")
            with pytest.raises(grpc.RpcError) as e:
                first.result()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            expired = time.monotonic()
            # the encode stops at its next layer, not when it is done
            while _count(metrics_of(enc), "avatar_inflight_rpcs", method="EncodeImage") > 0:
                assert time.monotonic() - expired < 10, "the encode still runs after its deadline"
                time.sleep(0.2)
            stopped_s = time.monotonic() - expired
            m = metrics_of(enc)
            assert _count(m, "avatar_requests_total", method="EncodeImage", code="DEADLINE_EXCEEDED") == 1
            assert _count(m, "avatar_rejected_total", service="encoder") == 1
            small = encoder_pb2.EncodeImageRequest(pixels=wire.to_proto(np.full((64, 64, 3), 128, np.uint8)))
            assert stub.EncodeImage(small, timeout=120).ref_latent.shape
        print(f"encode stopped {stopped_s:.2f} s after its deadline")
    finally:
        services.stop_all()


# -- 3. per-client limits on the public API only -----------------------------------------------


def test_max_per_client_does_not_cap_the_generator(tmp_path, env):
    """The gateway is the generator's only client: a per-client cap there caps the server."""
    services = Services(tmp_path, env)
    try:
        gen = services.start("generator", "--max-per-client", "1", "--max-sessions", "4")
        c = 16  # tiny model channels
        start = generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=_job(1),
                text=wire.to_proto(np.zeros((1, 32), np.float32)),
                ref_latent=wire.to_proto(np.zeros((c, 1, 8, 8), np.float32)),
                motion_latents=wire.to_proto(np.zeros((c, 19, 8, 8), np.float32)),
            )
        )
        release = threading.Event()

        def requests():
            yield start
            release.wait(60)

        with grpc.insecure_channel(gen.address, options=MESSAGE_OPTIONS) as ch:
            stub = generator_pb2_grpc.GeneratorServiceStub(ch)
            calls = [stub.Generate(requests(), timeout=60) for _ in range(2)]
            try:
                firsts = [next(call) for call in calls]  # both sessions open at once
                assert all(f.WhichOneof("event") == "ready" for f in firsts)
            finally:
                release.set()
                for call in calls:
                    call.cancel()
    finally:
        services.stop_all()


# -- 4 + load: bodies of unauthenticated clients are not buffered ------------------------------


def test_load_unauthenticated_bodies_and_internal_attacks_stay_bounded(embedded):
    """Bounded load against the public and internal ports (items 1-4): 16 concurrent 31 MiB
    unauthenticated requests, 4 authenticated ones over the public limit, 8 internal calls with
    the public token, 6 random bearers, then 8 concurrent authenticated 31 MiB requests while 2
    slots + 2 queue places are taken (refused unread): peak RSS grows by less than the bodies held
    at once would take in each phase (160 of 496 MiB, 248 MiB; under 700 MiB in all, with the 4
    long requests) and the next good request completes within 60 s. That the refused bodies are
    never read at all is test_security.py's test_refused_bodies_are_never_read."""
    proc = psutil.Process(embedded.proc.pid)
    _generate(embedded.address, _request(0.5))  # warm: baseline after one request
    sampler = _RssPeak(proc).__enter__()
    peak_before = sampler.reset()
    body = b"\0" * (PUBLIC_MAX_REQUEST_BYTES + (1 << 20))
    internal = _internal_address(embedded)

    def public(size: int, token: str | None):
        req = avatar_pb2.GenerateRequest(image=body[:size], audio=b"x")
        with grpc.insecure_channel(embedded.address, options=MESSAGE_OPTIONS) as ch:
            try:
                list(
                    avatar_pb2_grpc.AvatarServiceStub(ch).Generate(
                        req, timeout=60, metadata=_bearer(token) if token else None
                    )
                )
            except grpc.RpcError as e:
                return e.code()

    def public_token_on_internal(_):
        with grpc.insecure_channel(internal) as ch:
            try:
                encoder_pb2_grpc.EncoderServiceStub(ch).EncodeText(
                    encoder_pb2.EncodeTextRequest(prompt="a" * (4 << 20)), timeout=60, metadata=_bearer(PUBLIC)
                )
            except grpc.RpcError as e:
                return e.code()

    def random_bearer(i: int):
        try:
            _generate(embedded.address, _request(0.5), token=f"random-{i}", timeout=60)
        except grpc.RpcError as e:
            return e.code()

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(public, [31 << 20] * 16, [None] * 16))
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 16, codes
    unauthenticated_mib = (sampler.peak - peak_before) / 2**20
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        codes = list(pool.map(public, [len(body)] * 4, [PUBLIC] * 4))
        codes += list(pool.map(public_token_on_internal, range(8)))
        codes += list(pool.map(random_bearer, range(6)))
    assert codes[:4] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4, codes  # over 32 MiB: refused by size
    assert set(codes[4:]) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    # authenticated bodies are read only once admitted: with the 2 slots and the 2 queue places
    # taken by long requests, 8 concurrent 31 MiB requests are refused without being read
    with grpc.insecure_channel(embedded.address, options=MESSAGE_OPTIONS) as ch:
        stub = avatar_pb2_grpc.AvatarServiceStub(ch)
        # long enough (60 s of video) that no slot frees while the 8 are refused
        long_calls = [stub.Generate(_request(60.0), timeout=120, metadata=_bearer(PUBLIC)) for _ in range(4)]
        try:
            next(long_calls[0]), next(long_calls[1])  # both slots run
            # the other two wait in the queue (once in CI two of the 8 bodies took queue places
            # instead, were admitted later and read: after a fixed second, with 8 s long requests)
            deadline = time.monotonic() + 30
            while _count(metrics_of(embedded), "avatar_queue_depth", service="gateway") < 2:
                assert time.monotonic() < deadline, "the two long requests never queued"
                time.sleep(0.05)
            peak_so_far = sampler.peak
            rss_busy = sampler.reset()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(public, [31 << 20] * 8, [PUBLIC] * 8))
            refused_mib = (sampler.peak - rss_busy) / 2**20  # 8 bodies read would be >= 248 MiB
            sampler.peak = max(sampler.peak, peak_so_far)
        finally:
            for call in long_calls:
                call.cancel()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8, codes
    attack_s = time.monotonic() - t0
    sampler.__exit__()
    grown = (sampler.peak - peak_before) / 2**20
    t1 = time.monotonic()
    msgs = _generate(embedded.address, _request(0.5), timeout=60)
    next_ok_s = time.monotonic() - t1
    assert msgs[-1].WhichOneof("event") == "status"
    print(
        f"attack {attack_s:.1f} s; peak RSS grew {unauthenticated_mib:.0f} MiB in the unauthenticated phase, "
        f"{refused_mib:.0f} MiB for the 8 refused authenticated bodies, {grown:.0f} MiB in all (4 long requests "
        f"included); next request {next_ok_s:.1f} s"
    )
    # Ceilings, not measurements: what lands before a refusal is the HTTP/2 window of each
    # connection, which grpc's BDP probing grows while the refusal is on its way, so the phases
    # vary run to run (10 runs here and in CI: 34-92, 32-169 and 197-458 MiB; the refused phase
    # shares its window with the 4 running requests, which grow RSS by themselves). Each ceiling
    # is what holding the phase's bodies at once would exceed (16 x 31 MiB / 3, 8 x 31 MiB).
    assert unauthenticated_mib < 160 and refused_mib < 248, (unauthenticated_mib, refused_mib)
    assert grown < 700, f"peak RSS grew {grown:.0f} MiB"
    assert next_ok_s < 60


class _RssPeak:
    """Samples a process's RSS every 20 ms in a thread: the highest value since start() or
    reset() (VmHWM would keep a peak from before the phase being measured)."""

    def __init__(self, proc: psutil.Process):
        self.proc, self.peak, self._stop = proc, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def reset(self) -> int:
        """The RSS now, which becomes the peak to beat."""
        self.peak = self.proc.memory_info().rss
        return self.peak

    def __enter__(self):
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


# -- 5. a malformed message is the client's error ------------------------------------------------


def test_malformed_protobuf_is_invalid_argument_one_line_counted(embedded):
    labels = dict(service="AvatarService", method="Generate", code="INVALID_ARGUMENT")
    before = _count(metrics_of(embedded), "avatar_requests_total", **labels)
    bad = b"\x1a\x02\xff\xfe"  # field 3 (prompt, a string) holding invalid UTF-8
    with grpc.insecure_channel(embedded.address) as ch:
        call = ch.unary_stream("/avatar.v1.AvatarService/Generate", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(call(bad, timeout=30, metadata=_bearer(PUBLIC)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "malformed request message" in e.value.details() and "<class" not in e.value.details()
    assert _count(metrics_of(embedded), "avatar_requests_total", **labels) == before + 1
    log = embedded.log.read_text()
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if "malformed request message" in line]) == 1


# -- 6. a busy port ------------------------------------------------------------------------------


def test_second_serve_on_a_busy_port_refuses_to_start(embedded, env):
    t0 = time.monotonic()
    out = subprocess.run(
        [*AVATAR, "serve", "--listen", embedded.address], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    port = embedded.address.rsplit(":", 1)[1]
    assert len(lines) == 1 and f"port {port} is already in use" in lines[0], lines
    assert time.monotonic() - t0 < 60


# -- 7. metrics: deadlines and frames of cancelled streams ---------------------------------------


def test_deadline_and_cancelled_frames_are_counted(embedded):
    m0 = metrics_of(embedded)
    with grpc.insecure_channel(embedded.address, options=MESSAGE_OPTIONS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0), timeout=1.5, metadata=_bearer(PUBLIC)))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(8.0), timeout=120, metadata=_bearer(PUBLIC))
        frames = 0
        for msg in call:
            if msg.WhichOneof("event") == "fragment":
                frames += msg.fragment.num_frames
                if frames >= 24:
                    call.cancel()
                    break
    deadline = time.monotonic() + 10
    while True:
        m = metrics_of(embedded)
        deadline_labels = dict(service="AvatarService", method="Generate", code="DEADLINE_EXCEEDED")
        dl = _count(m, "avatar_requests_total", **deadline_labels) - _count(
            m0, "avatar_requests_total", **deadline_labels
        )
        sent = _count(m, "avatar_frames_total") - _count(m0, "avatar_frames_total")
        if (dl == 1 and sent >= frames) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dl == 1, "the deadline was not counted as DEADLINE_EXCEEDED"
    assert sent >= frames, f"{sent} frames counted, {frames} received on the cancelled stream"


# -- 7. the gateway's health follows its peers; errors name the service, not its address ---------


def _health(address: str, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _wait_health(address: str, service: str, want: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while (got := _health(address, service)) != want:
        assert time.monotonic() - t0 < timeout_s, f"{service} is {got}, not {want}, after {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_gateway_not_serving_while_a_peer_is_down(tmp_path, env):
    services = Services(tmp_path, dict(env, AVATAR_INTERNAL_TOKEN=INTERNAL))
    try:
        peers = {role: f"127.0.0.1:{free_port()}" for role in ("encoder", "generator", "decoder")}
        gw = services.start("gateway", *[a for role, addr in peers.items() for a in (f"--{role}", addr)])
        _wait_health(gw.address, "avatar.v1.AvatarService", "NOT_SERVING", 15)
        assert _health(gw.address, "") == "SERVING"  # liveness: the gateway itself is fine
        with pytest.raises(grpc.RpcError) as e:
            _generate(gw.address, _request(0.5), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "encoder unavailable" in e.value.details() and "127.0.0.1" not in e.value.details(), e.value
        parts = [services.start(role, "--listen", addr, wait=False) for role, addr in peers.items()]
        for svc, addr in zip(parts, peers.values()):
            from tests.conftest import wait_serving

            wait_serving(addr, 120, svc.proc, svc.log)
        back_s = _wait_health(gw.address, "avatar.v1.AvatarService", "SERVING", 15)
        assert _generate(gw.address, _request(0.5))[-1].WhichOneof("event") == "status"
        log = gw.log.read_text()
        assert "gateway NOT_SERVING: cannot connect to encoder at" in log and "gateway SERVING again" in log
        print(f"SERVING again {back_s:.1f} s after the peers were up")
    finally:
        services.stop_all()


# -- 8. warm-up: listening and NOT_SERVING while it runs, saying what it compiles ----------------


def test_warm_up_reports_not_serving_and_progress(tmp_path, env):
    services = Services(tmp_path, env)
    try:
        gen = services.start("generator", "--warmup", wait=False)
        seen = []
        deadline = time.monotonic() + 180
        while not seen or seen[-1] != "SERVING":
            assert gen.proc.poll() is None and time.monotonic() < deadline, gen.log.read_text()[-2000:]
            try:
                status = _health(gen.address, "")
            except grpc.RpcError:  # not listening yet (engine still building)
                status = "UNREACHABLE"
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.05)
        assert "NOT_SERVING" in seen, seen
        log = gen.log.read_text()
        assert "generator warm-up: compiling/running 176*96" in log and "generator warm-up: 176*96:" in log
    finally:
        services.stop_all()
