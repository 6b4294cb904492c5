"""Shared fixtures: free loopback ports, `avatar serve` subprocesses that are up (health SERVING) and always killed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
START_TIMEOUT_S = 120
_VENV_AVATAR = Path(sys.executable).parent / "avatar"
# The installed console script when present (what users run), else the module.
AVATAR = [str(_VENV_AVATAR)] if _VENV_AVATAR.exists() else [sys.executable, "-m", "avatar.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Polls grpc.health.v1 until the server says SERVING; fails early if the process died."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server at {address} exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} not SERVING after {timeout_s} s:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.exists() else ""


@dataclass
class Service:
    role: str
    address: str
    proc: subprocess.Popen
    log: Path
    trace_file: Path | None = None

    def spans(self) -> list[dict]:
        if not self.trace_file or not self.trace_file.exists():
            return []
        return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def env() -> dict:
    """Subprocess environment: 1 torch thread each (4 servers share 2 cores), no OTLP export."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return e


@pytest.fixture
def start_service(tmp_path, env):
    """start_service(role, *args, trace=False) -> Service, up and SERVING; killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(role: str, *args: str, trace: bool = False, wait: bool = True) -> Service:
        address = f"127.0.0.1:{free_port()}"
        log = tmp_path / f"{role}-{len(started)}.log"
        trace_file = tmp_path / f"{role}-{len(started)}.trace.jsonl" if trace else None
        cmd = [*AVATAR, "serve", "--role", role, "--listen", address, *args]
        if trace_file:
            cmd += ["--trace-file", str(trace_file)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        svc = Service(role, address, proc, log, trace_file)
        if wait:
            wait_serving(address, START_TIMEOUT_S, proc, log)
        return svc

    yield start
    for proc in started:
        _stop(proc)


@pytest.fixture
def mesh(start_service):
    """The four services as separate OS processes on loopback ports, each writing a trace file."""
    parts = {role: start_service(role, trace=True, wait=False) for role in ("encoder", "generator", "decoder")}
    for svc in parts.values():
        wait_serving(svc.address, START_TIMEOUT_S, svc.proc, svc.log)
    parts["gateway"] = start_service("gateway", "--encoder", parts["encoder"].address,
                                     "--generator", parts["generator"].address,
                                     "--decoder", parts["decoder"].address, trace=True)
    return parts


def ffprobe(path: Path) -> dict:
    """Streams and format of a media file, with the video frames counted by decoding."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"ffprobe failed on {path}: {out.stderr}")
    return json.loads(out.stdout)


def audio_duration(path: Path) -> float:
    info = ffprobe(path)
    return float(info["format"]["duration"])
