"""`avatar serve --ray`: replicas on a two-node Ray cluster on loopback, sessions routed to free
slots, a lost node, autoscaling. The cluster (ray.cluster_utils: a head and a second node, each its
own raylet and processes) is started here and always shut down, even when a test fails.

Sized for a 2-core machine: tiny model, no dashboard, 80 MB object stores, one torch thread each.
"""

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request

import grpc
import psutil
import pytest
from conftest import ASSETS, AVATAR, ROOT, tone_wav, wait_serving

from avatar.grpc_util import MESSAGE_OPTIONS
from avatar.v1 import avatar_pb2, avatar_pb2_grpc

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.mesh

CAP = 2  # --max-sessions: slots per generator replica
MIN_GENERATORS, MAX_GENERATORS = 3, 4
DOWNSCALE_S = 4.0  # downscale_delay_s in the test's config
# Stated times on this 2-core machine: the controller decides within a poll (0.25 s here); the rest
# is the new replica's start (a Ray worker process importing torch and loading the tiny model:
# 30-90 s while other tests share the cores)
UPSCALE_WITHIN_S = 240  # a replica added under load serves within this
RECOVER_WITHIN_S = 120  # replicas of a lost node serve again on the survivors within this
UNAVAILABLE_WITHIN_S = 10  # sessions on a lost node end with UNAVAILABLE within this
# Node death detected in ~1.5 s (defaults: tens of seconds); loopback only.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 (Ray would swap in the host's address)
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_USAGE_STATS_ENABLED": "0",
}
NODE = {"object_store_memory": 80 * 1024 * 1024, "node_ip_address": "127.0.0.1"}
CONFIG = f"""
encoder: {{replicas: 1, num_cpus: 0, resources: {{head: 1}}}}
decoder: {{replicas: 1, num_cpus: 0, resources: {{head: 1}}}}
generator: {{min_replicas: {MIN_GENERATORS}, max_replicas: {MAX_GENERATORS}, num_cpus: 0, resources: {{gen: 1}}}}
autoscaling: {{upscale_delay_s: 0, downscale_delay_s: {DOWNSCALE_S}, poll_s: 0.25}}
"""


@contextlib.contextmanager
def ray_cluster(env: dict, prefix: str, head_resources: dict, node_resources: dict):
    """A head and a second node on loopback (ray.cluster_utils), with `env` in os.environ while
    they run (their raylets and workers read it); shut down, their files removed and the
    environment restored, also when a test fails. Yields (cluster, second node)."""
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray writes the cluster's address to $RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray),
    # whatever temp_dir says, and fails if that folder does not exist (a fresh machine): keep it here.
    os.makedirs(os.path.join(temp, "ray"))
    env = {**env, "RAY_TMPDIR": temp}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = None
    try:
        c = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 2,
                "resources": head_resources,
                "include_dashboard": False,
                "temp_dir": temp,
                **NODE,
            },
        )
        second = c.add_node(num_cpus=2, resources=node_resources, **NODE)
        yield c, second
    finally:
        if c is not None:
            c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["rm", "-rf", temp], check=False)


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM (a clean shutdown of the mesh), SIGKILL after grace_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


LISTENING = re.compile(r"avatar serve: .*listening on (\S+?:\d+)")


@contextlib.contextmanager
def serving(cmd: list, env: dict, log, grace_s: float = 30):
    """Runs `cmd` (an `avatar serve` with --listen 127.0.0.1:0 and --metrics-port 0) until SERVING;
    yields (process, its address, metrics port); stopped at the end, also when a test fails.
    Port 0, read back from the log: a free port picked before the start can be taken in between
    by one of Ray's processes, whose gRPC health service answers SERVING for the gateway."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (listening := LISTENING.search(log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:3]} not listening (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        address = listening.group(1)
        wait_serving(address, 60, proc, log)
        yield proc, address, int(re.search(r"metrics on :(\d+)", log.read_text()).group(1))
    finally:
        stop(proc, grace_s)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(RAY_ENV, "rt", {"head": 4, "gen": 3}, {"gen": 3}) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    c, _ = cluster
    work = tmp_path_factory.mktemp("ray")
    config = work / "ray-mesh.yaml"
    config.write_text(CONFIG)
    log = work / "gateway.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **RAY_ENV)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    cmd = [*AVATAR, "serve", "--ray", c.address, "--ray-config", str(config), "--listen", "127.0.0.1:0"]
    cmd += ["--max-sessions", str(CAP), "--max-queue", "16", "--metrics-port", "0"]
    with serving(cmd, env, log) as (_, address, port):
        yield address, port, log


def metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def replica_sessions(port: int) -> dict[tuple[str, str], float]:
    """(replica, node) -> sessions the gateway runs there now, generators only."""
    out = {}
    for key, value in metrics(port).items():
        m = re.match(r'avatar_replica_sessions\{node="(\w+)",replica="([\w-]+)",role="generator"\}', key)
        if m:
            out[(m.group(2), m.group(1))] = value
    return out


def generators(port: int) -> int:
    return int(metrics(port).get('avatar_ray_replicas{role="generator"}', 0))


def wait_for(check, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def request(seconds: float, steps: int = 1) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(), audio=tone_wav(seconds), size="64*64", sample_steps=steps
    )


def run_session(address: str, seconds: float, timeout_s: float = 240, steps: int = 1):
    """(status code, details, fragments, time the call ended)."""
    frags = 0
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        try:
            for msg in avatar_pb2_grpc.AvatarServiceStub(ch).Generate(request(seconds, steps), timeout=timeout_s):
                frags += msg.WhichOneof("event") == "fragment"
                if msg.WhichOneof("event") == "status":
                    return grpc.StatusCode.OK, "", frags, time.monotonic()
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), frags, time.monotonic()
    return None, "stream ended without a status", frags, time.monotonic()


def sample_while(futures, port: int) -> list[dict]:
    """The gateway's sessions per generator replica, sampled until the sessions are done."""
    samples = []
    while not all(f.done() for f in futures):
        samples.append(replica_sessions(port))
        time.sleep(0.2)
    return samples


def test_eight_sessions_spread_over_replicas_and_both_nodes(gateway, cluster):
    address, port, _ = gateway
    _, second = cluster
    assert generators(port) == MIN_GENERATORS
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run_session, address, 1.0) for _ in range(8)]
        samples = sample_while(futures, port)
        results = [f.result() for f in futures]
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 8, results
    assert all(r[2] == 4 for r in results), results  # 1 s = 25 frames = 3 blocks, block 0 in two fragments
    assert max(max(s.values(), default=0) for s in samples) <= CAP  # never more than a replica's slots
    busy_nodes = {node for s in samples for (_, node), n in s.items() if n > 0}
    assert second.node_id in busy_nodes and len(busy_nodes) == 2, busy_nodes
    decisions = {k: v for k, v in metrics(port).items() if k.startswith("avatar_routing_decisions_total")}
    assert sum(v for k, v in decisions.items() if 'role="generator"' in k) >= 8, decisions


def test_load_beyond_the_minimum_adds_a_replica_and_idle_removes_it(gateway):
    address, port, log = gateway
    wait_for(lambda: generators(port) == MIN_GENERATORS, 60, "back at the minimum before the test")
    # 8 long sessions on 3 * 2 slots: 2 wait at the gateway, so the controller wants 4 replicas
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        stub = avatar_pb2_grpc.AvatarServiceStub(ch)
        calls = [stub.Generate(request(30.0), timeout=600) for _ in range(8)]
        readers = concurrent.futures.ThreadPoolExecutor(8)
        for call in calls:
            readers.submit(lambda c: [None for _ in c], call)  # consume; ends when cancelled
        try:
            started = time.monotonic()
            try:
                added = wait_for(lambda: generators(port) == MAX_GENERATORS, UPSCALE_WITHIN_S, "a 4th generator")
            except AssertionError as exc:
                events = [line for line in log.read_text().splitlines() if "ray mesh" in line or "replica" in line]
                raise AssertionError(f"{exc}; gateway log:\n" + "\n".join(events[-30:])) from None
            sessions = replica_sessions(port)
            wait_for(lambda: len([n for n in replica_sessions(port).values() if n > 0]) == 4, 30, "a session on it")
        finally:
            for call in calls:
                call.cancel()
            readers.shutdown(wait=True)
        idle_since = time.monotonic()
    assert max(sessions.values()) <= CAP
    removed = wait_for(lambda: generators(port) == MIN_GENERATORS, DOWNSCALE_S + 30, "back to 3 when idle")
    assert removed - idle_since >= DOWNSCALE_S - 1  # not before the downscale delay
    text = log.read_text()
    assert re.search(r"scale up: \d+ sessions in use or waiting, 3 -> 4 generators", text), text[-3000:]
    assert re.search(r"scale down: \d+ sessions in use, draining generator-\d+", text), text[-3000:]
    print(f"upscaled in {added - started:.1f} s, downscaled {removed - idle_since:.1f} s after the last session")


def test_a_lost_node_ends_its_sessions_unavailable_and_the_replicas_come_back(gateway, cluster):
    address, port, _ = gateway
    c, second = cluster
    wait_for(lambda: generators(port) == MIN_GENERATORS, 60, "at the minimum before the test")
    # a session of the test before, still ending in the gateway, would count as one on the lost node
    wait_for(lambda: sum(replica_sessions(port).values()) == 0, 60, "no session left from the test before")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(run_session, address, 12.0) for _ in range(6)]
        wait_for(lambda: sum(replica_sessions(port).values()) == 6, 60, "6 sessions running")
        time.sleep(1.0)
        on_second = sum(n for (_, node), n in replica_sessions(port).items() if node == second.node_id)
        assert on_second > 0
        killed_at = time.monotonic()
        kill_node(second)
        results = [f.result() for f in futures]
    lost = [r for r in results if r[0] != grpc.StatusCode.OK]
    assert len(lost) == on_second, results
    for code, details, _, ended in lost:
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert details == "generator unavailable; retry later", details
        assert ended - killed_at < UNAVAILABLE_WITHIN_S, ended - killed_at
    print(f"{len(lost)} sessions on the lost node ended UNAVAILABLE after {max(r[3] for r in lost) - killed_at:.2f} s")
    # the lost node's replicas leave the table, new sessions run on the survivors
    left = wait_for(lambda: all(node != second.node_id for _, node in replica_sessions(port)), 15, "node left")
    assert run_session(address, 1.0)[0] == grpc.StatusCode.OK
    # Ray restarts the lost replicas on the head (it has room for 3 generators)
    back = wait_for(lambda: generators(port) == MIN_GENERATORS, RECOVER_WITHIN_S, "3 generators again", interval_s=1)
    print(
        f"node left the routing table {left - killed_at:.1f} s after the kill, "
        f"3 generators again after {back - killed_at:.1f} s"
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert [r[0] for r in pool.map(lambda _: run_session(address, 1.0), range(4))] == [grpc.StatusCode.OK] * 4


def kill_node(node) -> None:
    """SIGKILL the node's raylet and every process under it (its workers: the replicas)."""
    raylet = node.all_processes["raylet"][0].process
    procs = psutil.Process(raylet.pid).children(recursive=True) + [psutil.Process(raylet.pid)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    node.kill_all_processes(check_alive=False, allow_graceful=False)


def test_bad_ray_flags_exit_2_with_one_line(tmp_path):
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("generator: {min_replicas: 2, maxreplicas: 3}\n")
    cases = [
        (["--ray", "127.0.0.1:1"], "no Ray head there"),
        (["--ray", "not-an-address"], "expected HOST:PORT"),
        (["--ray", "local", "--ray-config", str(bad_config)], "unknown key(s) ['maxreplicas']"),
        (["--ray-config", str(bad_config)], "--ray-config needs --ray"),
        (["--ray", "auto", "--generator", "127.0.0.1:5"], "drop --generator"),
        (["--ray", "auto", "--role", "generator"], "not --role generator"),
    ]
    for args, expected in cases:
        r = subprocess.run([*AVATAR, "serve", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, r.stderr)


def test_ray_local_with_a_tpp_group_as_one_generator_replica(tmp_path):
    """`--ray local` (Ray started inside `avatar serve`) and a generator replica that is a TPP
    group of 2 ranks (gloo on CPU): a session completes through rank 0; the ranks end with it."""
    config = tmp_path / "tpp.yaml"
    config.write_text(
        "encoder: {replicas: 1, num_cpus: 0}\ndecoder: {replicas: 1, num_cpus: 0}\n"
        "generator: {min_replicas: 1, max_replicas: 1, num_cpus: 0, tpp: 2}\n"
    )
    log = tmp_path / "gateway.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **RAY_ENV)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [*AVATAR, "serve", "--ray", "local", "--ray-config", str(config), "--listen", "127.0.0.1:0"]
    cmd += ["--max-sessions", "2", "--metrics-port", "0"]
    ranks = []
    with serving(cmd, env, log, grace_s=60) as (proc, address, port):
        ranks = [p for p in psutil.process_iter(["cmdline"]) if "avatar.app.ray_mesh" in (p.info["cmdline"] or [])]
        assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]
        code, details, frags, _ = run_session(address, 1.0, steps=2)  # a group of 2 runs one step per rank
        assert (code, frags) == (grpc.StatusCode.OK, 4), details  # 3 blocks, block 0 in two fragments
        assert generators(port) == 1
    alive = psutil.wait_procs(ranks, timeout=30)[1]
    assert not alive, "TPP ranks outlived the mesh"
    assert proc.returncode == 0, log.read_text()[-3000:]
