"""`avatar serve --processes per-service`: the embedded mesh as a gateway over three child processes."""

import errno
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from avatar.v1 import avatar_pb2
from tests.conftest import AVATAR, ROOT, check_video, free_port, generate

ASSETS = ROOT / "assets"


def children(svc) -> list[psutil.Process]:
    """The encoder, generator and decoder processes (multiprocessing's resource tracker aside)."""
    procs = psutil.Process(svc.proc.pid).children()
    return [p for p in procs if "resource_tracker" not in " ".join(p.cmdline())]


def gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
            return True
        time.sleep(0.2)
    return False


def split(start_service):
    svc = start_service("all", "--processes", "per-service")
    kids = children(svc)
    assert len(kids) == 3, [p.cmdline() for p in kids]
    return svc, kids


def test_a_video_through_three_child_processes_then_sigterm_stops_them_all(start_service, clip_5s, tmp_path):
    svc, kids = split(start_service)
    request = avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(), audio=clip_5s.read_bytes(), size="64*64", preset="preview"
    )
    stream = generate(svc.address, request)
    check_video(stream.write_mp4(tmp_path / "out.mp4"), 5.0)
    log = svc.log.read_text()
    listening = {c.laddr.port for k in kids for c in k.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    for role in ("encoder", "generator", "decoder"):
        assert f"started the {role}" in log
        # the port the child bound and reported is the one the gateway was given
        port = int(re.search(rf"the {role} serves on 127\.0\.0\.1:(\d+)", log).group(1))
        assert port in listening, (role, port, listening)
    # The generator, whose kept caches adapt to what is free, starts once the others hold theirs.
    started = log.index("started the generator")
    assert log.index("the encoder serves on") < started and log.index("the decoder serves on") < started
    # Each service ran in its own process: the internal listeners belong to the children.
    assert {k.pid for k in kids}.isdisjoint({svc.proc.pid})
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=60) == 0
    assert gone([k.pid for k in kids], 5)


def test_a_child_that_dies_takes_the_server_down_with_a_reason(start_service):
    svc, kids = split(start_service)
    decoder = next(
        k for k in kids if "decoder" in svc.log.read_text().split(f"pid {k.pid}")[0].rsplit("started", 1)[-1]
    )
    os.kill(decoder.pid, signal.SIGKILL)
    assert svc.proc.wait(timeout=60) == 1
    last = svc.log.read_text().strip().splitlines()[-1]
    assert last.startswith("avatar serve: the decoder process") and "exited" in last, last
    assert gone([k.pid for k in kids], 5)


def test_a_child_that_fails_before_serving_stops_the_server_with_a_reason(env, tmp_path):
    """The encoder child cannot open its metrics port (the parent's + 2, taken here): the server
    exits 1 naming it, and the generator (started once the encoder and decoder serve) never was."""
    metrics = free_port()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", metrics + 2))
        taken.listen()
        out = subprocess.run(
            [*AVATAR, "serve", "--listen", f"127.0.0.1:{free_port()}", "--processes", "per-service"]
            + ["--metrics-port", str(metrics)],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("avatar serve: the encoder process exited with code 1 before serving"), last
    assert f"avatar serve (encoder): cannot serve metrics on 127.0.0.1:{metrics + 2}: Address already in use" in (
        out.stderr
    )
    assert "started the generator" not in out.stderr


def test_the_http_port_is_held_while_the_children_load_then_serves(start_service, env):
    """--http is bound before the children load (nothing can take it meanwhile; a busy one is
    refused at once, exit 2), and the page is served on it once they are up."""
    port = free_port()
    svc = start_service("all", "--processes", "per-service", "--http", str(port), wait=False)
    deadline = time.monotonic() + 60
    while "started the encoder" not in svc.log.read_text():
        assert svc.proc.poll() is None and time.monotonic() < deadline, svc.log.read_text()[-2000:]
        time.sleep(0.05)
    with socket.socket() as other, pytest.raises(OSError) as taken:
        other.bind(("127.0.0.1", port))
    assert taken.value.errno == errno.EADDRINUSE
    busy = subprocess.run(
        [*AVATAR, "serve", "--listen", "127.0.0.1:0", "--processes", "per-service", "--http", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    errors = [line for line in busy.stderr.splitlines() if not line.startswith("{")]
    assert busy.returncode == 2 and len(errors) == 1 and f"port {port} is already in use" in errors[0], busy.stderr
    assert "started the" not in busy.stderr  # refused before any child
    deadline = time.monotonic() + 180
    while True:
        assert svc.proc.poll() is None, svc.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                assert page.status == 200 and b"<html" in page.read().lower()
                break
        except OSError:
            assert time.monotonic() < deadline, svc.log.read_text()[-2000:]
            time.sleep(0.5)


def test_children_do_not_outlive_a_killed_parent(start_service):
    svc, kids = split(start_service)
    svc.proc.kill()
    svc.proc.wait(timeout=10)
    assert gone([k.pid for k in kids], 10), [k.pid for k in kids if k.is_running()]


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--role", "gateway", "--processes", "per-service"], "--processes per-service splits --role all"),
        (["--processes", "threads"], "invalid choice: 'threads'"),
    ],
)
def test_bad_processes_flags_exit_2_with_one_line(args, reason, env):
    out = subprocess.run([*AVATAR, "serve", *args], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert reason in out.stderr and "Traceback" not in out.stderr


def test_each_child_gets_the_warm_up_it_was_asked_for():
    """--warmup and --warmup-shape reach the encoder, generator and decoder processes."""
    from avatar.app.processes import Children
    from avatar.app.serve import ServeConfig

    shapes = ((64, 64, 12, 2),)
    kids = Children(ServeConfig(warmup=True, warmup_shapes=shapes))
    for role in ("encoder", "generator", "decoder"):
        cfg = kids.child_config(role, None)
        assert (cfg.role, cfg.warmup, cfg.warmup_shapes) == (role, True, shapes)
        assert cfg.listen == "127.0.0.1:0"  # the child binds a port of its choosing and reports it
