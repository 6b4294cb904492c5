"""Shared fixtures: free loopback ports, `avatar serve` subprocesses that are up (health SERVING) and always killed."""
# ruff: noqa: E402 (the environment is set before the imports)

import os

# The GPU's Triton kernels run in Triton's interpreter on the CPU (tests/test_fused_norms.py). Set
# before anything imports triton: its jit decorator reads it then.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import signal
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
AVATAR = [str(_VENV_AVATAR)] if _VENV_AVATAR.exists() else [sys.executable, "-m", "avatar.app.cli"]

sys.path.insert(0, str(ROOT / "bench"))
import local_ranks  # noqa: E402  (the rank launcher bench/bench_tpp.py uses too)
from local_ranks import free_port  # noqa: E402


def run_ranks(n: int, argv: list[str], timeout: float, what: str) -> list[tuple[int, str]]:
    """Runs `argv` as n ranks the way torchrun starts them (env rendezvous on 127.0.0.1, gloo on
    the CPU); returns each rank's (exit code, output). Always reaps them; fails the test on timeout."""
    try:
        return local_ranks.run_ranks(n, argv, timeout, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, what=what)
    except local_ranks.RanksTimedOut as e:
        pytest.fail(str(e))


def wait_serving(address: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Polls grpc.health.v1 until the server says SERVING; fails early if the process died."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server at {address} exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
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


# Fixtures that start `avatar` processes: a test using one is marked `mesh` (pyproject.toml), so
# `pytest -m "not mesh"` is the fast inner loop. Tests that start processes otherwise carry the mark.
PROCESS_FIXTURES = {"env", "mesh", "start_service"}


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mesh)


@pytest.fixture(scope="session")
def env() -> dict:
    """Subprocess environment: 1 torch thread each (4 servers share 2 cores), no OTLP export."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return e


class Services:
    """Starts `avatar serve` subprocesses; stop_all() ends exactly the processes it started."""

    def __init__(self, workdir: Path, env: dict):
        self.workdir, self.env = workdir, env
        self.procs: list[subprocess.Popen] = []

    def start(self, role: str, *args: str, trace: bool = False, wait: bool = True) -> Service:
        n = len(self.procs)
        address = f"127.0.0.1:{free_port()}"
        log = self.workdir / f"{role}-{n}.log"
        trace_file = self.workdir / f"{role}-{n}.trace.jsonl" if trace else None
        cmd = [*AVATAR, "serve", "--role", role, "--listen", address, *args]
        if trace_file:
            cmd += ["--trace-file", str(trace_file)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        svc = Service(role, address, proc, log, trace_file)
        if wait:
            wait_serving(address, START_TIMEOUT_S, proc, log)
        return svc

    def stop_all(self) -> None:
        for proc in self.procs:  # SIGTERM to all first: they drain in parallel
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            _stop(proc)


@pytest.fixture
def start_service(tmp_path, env):
    """start_service(role, *args, trace=False) -> Service, up and SERVING; killed at teardown."""
    services = Services(tmp_path, env)
    try:
        yield services.start
    finally:
        services.stop_all()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory, env):
    """The four services as separate OS processes on loopback ports, each writing a trace file.

    Shared by the e2e and tracing tests (starting four torch processes costs seconds); tests tell
    their requests apart by trace id.
    """
    services = Services(tmp_path_factory.mktemp("mesh"), env)
    try:
        parts = {role: services.start(role, trace=True, wait=False) for role in ("encoder", "generator", "decoder")}
        # The gateway starts alongside: its channels connect on first use.
        parts["gateway"] = services.start(
            "gateway",
            "--encoder",
            parts["encoder"].address,
            "--generator",
            parts["generator"].address,
            "--decoder",
            parts["decoder"].address,
            trace=True,
            wait=False,
        )
        for svc in parts.values():
            wait_serving(svc.address, START_TIMEOUT_S, svc.proc, svc.log)
        yield parts
    finally:
        services.stop_all()


@pytest.fixture(scope="session")
def clip_5s(tmp_path_factory) -> Path:
    """Exactly 5.0 s of the sample speech as 44.1 kHz stereo (exercises mono-mix and resampling)."""
    path = tmp_path_factory.mktemp("audio") / "speech-5s.wav"
    # ffmpeg comes with ffprobe (.ci/run installs it); 5.0 s = 220500 samples exactly.
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(ASSETS / "speech.wav"), "-t", "5", "-ar", "44100", "-ac", "2", str(path)],
        check=True,
        timeout=30,
    )
    return path


def trim_speech(out: Path, start_s: float, length_s: float) -> Path:
    """A piece of the sample speech as its own WAV (soundfile: no sox needed)."""
    import soundfile

    pcm, rate = soundfile.read(str(ASSETS / "speech.wav"))
    soundfile.write(str(out), pcm[round(start_s * rate) : round((start_s + length_s) * rate)], rate)
    return out


def tone_wav(seconds: float, rate: int = 16000, hz: float = 200.0) -> bytes:
    """A mono 16-bit WAV of a sine tone at 0.3 of full scale: audio the mesh accepts, made in memory."""
    import io
    import wave

    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def metrics_of(svc: Service) -> dict:
    """The Prometheus samples of a service started with a metrics port (its log names the port)."""
    import re
    import urllib.request

    port = int(re.search(r"metrics on :(\d+)", svc.log.read_text()).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def ffprobe(path: Path) -> dict:
    """Streams and format of a media file, with the video frames counted by decoding."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"ffprobe failed on {path}: {out.stderr}")
    return json.loads(out.stdout)


def audio_duration(path: Path) -> float:
    info = ffprobe(path)
    return float(info["format"]["duration"])


@dataclass
class Stream:
    """What one AvatarService.Generate call returned, with the arrival time of every message."""

    header: object = None
    init_segment: bytes = b""
    fragments: list = None  # [(arrival unix ns, MediaFragment)]
    progress: list = None
    status: object = None

    def write_mp4(self, path: Path) -> Path:
        path.write_bytes(self.init_segment + b"".join(f.data for _, f in self.fragments))
        return path


def generate(address: str, request, timeout_s: float = 300) -> Stream:
    from avatar.grpc_util import MESSAGE_OPTIONS
    from avatar.v1 import avatar_pb2_grpc

    s = Stream(fragments=[], progress=[])
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        for msg in avatar_pb2_grpc.AvatarServiceStub(ch).Generate(request, timeout=timeout_s):
            now, kind = time.time_ns(), msg.WhichOneof("event")
            if kind == "header":
                s.header = msg.header
            elif kind == "init_segment":
                s.init_segment = msg.init_segment.data
            elif kind == "fragment":
                s.fragments.append((now, msg.fragment))
            elif kind == "progress":
                s.progress.append(msg.progress)
            else:
                s.status = msg.status
    return s


def video_frames(path: Path) -> list[dict]:
    """Per video frame: key_frame (0/1) and pts_time, in order."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame=key_frame,pts_time",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)["frames"]


def check_video(path: Path, duration_s: float) -> dict:
    """The issue's checks: h264 + aac, 25 x duration frames (within one), duration within 0.1 s,
    first frame at 0, a keyframe at the start of every 12-frame fragment."""
    info = ffprobe(path)
    codecs = {s["codec_type"]: s for s in info["streams"]}
    assert codecs["video"]["codec_name"] == "h264", info
    assert codecs["audio"]["codec_name"] == "aac", info
    frames = int(codecs["video"]["nb_read_frames"])
    assert abs(frames - 25 * duration_s) <= 1, (frames, duration_s)
    assert abs(float(info["format"]["duration"]) - duration_s) <= 0.1, info["format"]
    assert float(codecs["video"].get("start_time", 0)) == 0.0 and float(info["format"].get("start_time", 0)) >= 0
    per_frame = video_frames(path)
    assert [i for i, f in enumerate(per_frame) if f["key_frame"] == 1][:1] == [0]
    assert all(per_frame[i]["key_frame"] == 1 for i in range(0, len(per_frame), 12))
    return info
