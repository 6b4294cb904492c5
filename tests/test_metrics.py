"""Metrics over HTTP (request counts by status, stage histograms, GPU state without a GPU),
`avatar gpu-monitor` without NVML, and JSON logs with trace ids and no secrets."""

import asyncio
import io
import json
import logging
import subprocess
import sys
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from avatar import metrics
from avatar.logging_setup import redact, setup_logging
from avatar.v1 import avatar_pb2, avatar_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.timeout(60)


def _scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name + repr(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }, text


def _value(samples, name, **labels):
    return samples.get(name + repr(sorted(labels.items())), 0.0)


class _Svc(avatar_pb2_grpc.AvatarServiceServicer):
    async def Generate(self, request, context):
        if request.prompt == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        yield avatar_pb2.GenerateResponse(status=avatar_pb2.FinalStatus(frames=50, total_s=2.0))


def test_metrics_endpoint_counts_rpcs_and_reports_gpu_state():
    http, port = metrics.start_metrics_server(0, "127.0.0.1")
    try:
        before, _ = _scrape(port)

        async def go():
            server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor()])
            avatar_pb2_grpc.add_AvatarServiceServicer_to_server(_Svc(), server)
            p = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{p}") as ch:
                stub = avatar_pb2_grpc.AvatarServiceStub(ch)
                for prompt in ("ok", "ok", "bad"):
                    try:
                        [m async for m in stub.Generate(avatar_pb2.GenerateRequest(prompt=prompt), timeout=5)]
                    except grpc.aio.AioRpcError:
                        pass
            await server.stop(None)

        asyncio.run(go())
        metrics.observe_final(
            avatar_pb2.FinalStatus(
                frames=100,
                total_s=4.0,
                time_to_first_fragment_s=0.5,
                timings=[tensor_pb2.StageTiming(stage="dit_block", ms=1500, count=9)],
            )
        )
        after, text = _scrape(port)
        key = dict(service="AvatarService", method="Generate")
        assert (
            _value(after, "avatar_requests_total", code="OK", **key)
            - _value(before, "avatar_requests_total", code="OK", **key)
            == 2
        )
        assert (
            _value(after, "avatar_requests_total", code="INVALID_ARGUMENT", **key)
            - _value(before, "avatar_requests_total", code="INVALID_ARGUMENT", **key)
            == 1
        )
        assert _value(after, "avatar_stage_seconds_count", stage="dit_block") >= 1
        assert _value(after, "avatar_generation_fps_last") == 25.0
        assert _value(after, "avatar_time_to_first_fragment_seconds_count") >= 1
        for name in ("avatar_active_sessions", "avatar_queue_depth", "avatar_request_seconds"):
            assert f"# TYPE {name}" in text
        gpu = metrics.register_gpu_collector()
        if gpu._nvml is None:  # this machine has no NVML: the metrics say so, and why
            assert _value(after, "avatar_gpu_available") == 0.0
            assert "avatar_gpu_nvml_error{reason=" in text
        else:
            assert _value(after, "avatar_gpu_available") == 1.0
            assert "avatar_gpu_memory_used_bytes" in text
    finally:
        http.shutdown()
        http.server_close()


def test_gpu_monitor_without_nvml_exits_2_with_one_line(tmp_path):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has NVML; see test_gpu_monitor_writes_csv")
    except pynvml.NVMLError:
        pass
    out = tmp_path / "gpu.csv"
    r = subprocess.run(
        [sys.executable, "-m", "avatar.app.cli", "gpu-monitor", "--count", "1", "--csv", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "NVML" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_gpu_monitor_writes_csv(tmp_path):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pytest.skip("no NVML here (covered by the exit-2 test)")
    out = tmp_path / "gpu.csv"
    r = subprocess.run(
        [sys.executable, "-m", "avatar.app.cli", "gpu-monitor", "--count", "2", "--interval", "0.1", "--csv", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = out.read_text().splitlines()
    assert rows[0].startswith("timestamp,gpu,name") and len(rows) == 1 + 2 * pynvml.nvmlDeviceGetCount()


def test_json_logs_carry_trace_ids_and_no_secrets(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setenv("AVATAR_INTERNAL_TOKEN", "internal-secret-value")
    stream = io.StringIO()
    handler = setup_logging("avatar-test", fmt="json", stream=stream)
    try:
        tracer = TracerProvider().get_tracer("t")
        log = logging.getLogger("avatar.test")
        with tracer.start_as_current_span("req") as span:
            log.info("call with authorization: Bearer abc.def-123 from %s", "peer", extra={"request_id": "r1"})
            log.warning("peer sent internal-secret-value")
        log.error("--auth-token sekrit99 given")
        trace_id = f"{span.get_span_context().trace_id:032x}"
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(records) == 3
        assert records[0]["trace_id"] == trace_id and records[0]["request_id"] == "r1"
        assert records[0]["service"] == "avatar-test" and records[0]["level"] == "info"
        assert "abc.def-123" not in stream.getvalue() and "[REDACTED]" in records[0]["message"]
        assert "internal-secret-value" not in stream.getvalue()
        assert "sekrit99" not in stream.getvalue() and "trace_id" not in records[2]
    finally:
        logging.getLogger().removeHandler(handler)


def test_redact():
    assert redact("Authorization: Bearer xyz") == "Authorization: Bearer [REDACTED]"
    assert redact("internal_token=abc def") == "internal_token=[REDACTED] def"
    assert redact("nothing here") == "nothing here"


class _FakeNVML:
    """Stands in for pynvml on machines without a GPU: two boards, the second without power
    readings (as on MIG slices), so the GPU code paths run here too."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H100 MIG 1g.10gb"

    def nvmlDeviceGetMemoryInfo(self, h):
        from types import SimpleNamespace

        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        from types import SimpleNamespace

        return SimpleNamespace(gpu=37 + h, memory=12)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 51

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("not supported")
        return 312_500


def test_gpu_collector_and_monitor_with_nvml(monkeypatch, tmp_path, capsys):
    import argparse
    import csv

    from avatar.app import gpu_monitor

    fake = _FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in metrics.GPUCollector().collect()
        for s in fam.samples
    }
    g0 = (("gpu", "0"), ("name", "NVIDIA H100 80GB HBM3"))
    g1 = (("gpu", "1"), ("name", "NVIDIA H100 MIG 1g.10gb"))
    assert samples[("avatar_gpu_available", ())] == 1
    assert samples[("avatar_gpu_memory_used_bytes", g0)] == 2**30
    assert samples[("avatar_gpu_memory_total_bytes", g1)] == 80 * 2**30
    assert samples[("avatar_gpu_utilization_percent", g1)] == 38
    assert samples[("avatar_gpu_temperature_celsius", g0)] == 51
    assert samples[("avatar_gpu_power_watts", g0)] == 312.5
    assert ("avatar_gpu_power_watts", g1) not in samples  # unsupported: left out, not an error

    out = tmp_path / "gpu.csv"
    args = argparse.Namespace(interval=0.01, csv=str(out), count=3)
    assert gpu_monitor.run(args) == 0 and fake.shutdown
    assert gpu_monitor.run(args) == 0  # appends, one header
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 3 * 2 and out.read_text().count("timestamp") == 1
    assert rows[0]["memory_used_mib"] == "1024" and rows[1]["power_w"] == "" and rows[0]["power_w"] == "312.5"
    assert gpu_monitor.run(argparse.Namespace(interval=0.01, csv=None, count=1)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["time", "gpu", "name"] and len(table) == 3


def test_a_cancellation_at_the_deadline_counts_as_deadline_exceeded():
    """The client's deadline passes before the server's (which counts from the request's arrival):
    its cancellation can arrive with time still left here, and is the deadline all the same."""

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    cancelled = asyncio.CancelledError()
    assert metrics._code_of(Context(-0.01), cancelled) == "DEADLINE_EXCEEDED"
    assert metrics._code_of(Context(0.3), cancelled) == "DEADLINE_EXCEEDED"  # the client's clock ran first
    assert metrics._code_of(Context(5.0), cancelled) == "CANCELLED"  # the client went away
    assert metrics._code_of(Context(None), cancelled) == "CANCELLED"  # no deadline at all
