"""Per-avatar LoRAs on `avatar serve --ray`: two avatars' sessions on a two-node Ray cluster on
loopback (ray.cluster_utils, as tests/test_ray_mesh.py starts it, always shut down), one generator
replica per node, each holding one LoRA at most (--max-loras 1) and two sessions (--max-sessions 2).

Each session's video is compared byte for byte with the one a single generator loaded with that
LoRA renders (`avatar serve` without Ray, registering that LoRA alone). Where a session lands is
read from the gateway: its `route` spans (--trace-file: replica and decision per session) and its
`avatar_replica_loras` gauge (the LoRAs each replica holds, as the router sees them); the switches
from each replica's GeneratorService/Loras counters (the internal token is set for the test).
"""

import concurrent.futures
import json
import os
import re
import subprocess

import grpc
import pytest
import torch
from ckpt_fixtures.dit import write_lora
from conftest import ASSETS, AVATAR, ROOT, check_video, generate, tone_wav
from safetensors.torch import save_file

from avatar.services.generator.weights import random_dit
from avatar.v1 import avatar_pb2, generator_pb2, generator_pb2_grpc

ray = pytest.importorskip("ray")
from test_ray_mesh import RAY_ENV, metrics, ray_cluster, serving, wait_for  # noqa: E402

pytestmark = pytest.mark.mesh

CAP = 2  # --max-sessions: slots per generator replica
TOKEN = "ray-loras-internal-token"  # $AVATAR_INTERNAL_TOKEN: the test reads the replicas' Loras with it
ENV = {**RAY_ENV, "OMP_NUM_THREADS": "1"}  # one torch thread in every replica and reference: the same sums
CONFIG = """
encoder: {replicas: 1, num_cpus: 0, resources: {head: 1}}
decoder: {replicas: 1, num_cpus: 0, resources: {head: 1}}
generator: {min_replicas: 2, max_replicas: 2, num_cpus: 0, resources: {gen: 1}}
autoscaling: {poll_s: 0.25}
"""


@pytest.fixture(scope="module")
def cluster():
    """A head (encoder, decoder, one generator) and a second node (one generator): `gen: 1` each."""
    with ray_cluster(ENV, "rl", {"head": 6, "gen": 1}, {"gen": 1}) as (c, _):
        yield c


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for i, name in enumerate(("acme", "globex")):
        paths[name] = folder / f"{name}.safetensors"
        write_lora(paths[name], random_dit("tiny", "cpu", torch.float32, seed=0), rank=4, seed=40 + i, scale=0.2)
    return paths


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", AVATAR_INTERNAL_TOKEN=TOKEN, **ENV)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return env


@pytest.fixture(scope="module")
def gateway(cluster, loras, tmp_path_factory):
    """`avatar serve --ray` with both LoRAs registered; (address, metrics port, log, trace file)."""
    work = tmp_path_factory.mktemp("ray-loras")
    config = work / "ray-mesh.yaml"
    config.write_text(CONFIG)
    log, trace = work / "gateway.log", work / "gateway.trace.jsonl"
    cmd = [*AVATAR, "serve", "--ray", cluster.address, "--ray-config", str(config), "--listen", "127.0.0.1:0"]
    cmd += ["--max-sessions", str(CAP), "--metrics-port", "0", "--trace-file", str(trace), "--max-loras", "1"]
    for name, path in loras.items():
        cmd += ["--avatar-lora", f"{name}={path}"]
    with serving(cmd, _env(), log) as (_, address, port):
        yield address, port, log, trace


def _request(lora_id: str, seconds: float) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(), audio=tone_wav(seconds), size="64*64", seed=7, lora_id=lora_id
    )


def _video(address: str, lora_id: str, seconds: float, path) -> bytes:
    s = generate(address, _request(lora_id, seconds), timeout_s=240)
    check_video(s.write_mp4(path), seconds)
    return b"".join(f.data for _, f in s.fragments)


def _references(loras: dict, work) -> dict[tuple[str, float], bytes]:
    """(lora_id, seconds) -> the video of `avatar serve` (one process, no Ray) registering only that LoRA."""
    out = {}
    for name, path in loras.items():
        log = work / f"reference-{name}.log"
        cmd = [*AVATAR, "serve", "--listen", "127.0.0.1:0", "--avatar-lora", f"{name}={path}", "--max-loras", "1"]
        with serving(cmd + ["--metrics-port", "0"], _env(), log) as (_, address, _):
            for seconds in (1.0, 3.0) if name == "acme" else (1.0,):
                out[name, seconds] = _video(address, name, seconds, work / f"reference-{name}-{seconds:g}.mp4")
    return out


def _routes(trace) -> list[tuple[str, str, str]]:
    """(lora_id, generator replica, decision) of each session the gateway routed, in order."""
    spans = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    spans = sorted((s for s in spans if s["name"] == "route"), key=lambda s: s["start_unix_nano"])
    return [
        (s["attributes"]["lora_id"], s["attributes"]["generator.replica"], s["attributes"]["generator.decision"])
        for s in spans
    ]


def _held(port: int) -> dict[str, set[str]]:
    """Replica -> the LoRAs the gateway's router sees it holding (avatar_replica_loras)."""
    out: dict[str, set[str]] = {}
    for key, value in metrics(port).items():
        m = re.match(r'avatar_replica_loras\{lora_id="([\w.-]+)",replica="([\w-]+)"\}', key)
        if m and value == 1:
            out.setdefault(m.group(2), set()).add(m.group(1))
    return out


def _generator_addresses(log) -> dict[str, str]:
    return dict(re.findall(r"replica (generator-\d+) \(generator\) at ([\d.]+:\d+)", log.read_text()))


def _loras_of(address: str):
    with grpc.insecure_channel(address) as ch:
        return generator_pb2_grpc.GeneratorServiceStub(ch).Loras(
            generator_pb2.LorasRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10
        )


def test_two_avatars_render_like_a_generator_with_their_lora_and_land_where_it_is_held(gateway, loras, tmp_path):
    address, port, log, trace = gateway
    reference = _references(loras, tmp_path)
    assert reference["acme", 1.0] != reference["globex", 1.0]  # the LoRAs change the picture
    gens = _generator_addresses(log)
    assert sorted(gens) == ["generator-1", "generator-2"], log.read_text()[-3000:]
    assert all(
        _loras_of(a).max_loras == 1 and list(_loras_of(a).registered) == ["acme", "globex"] for a in gens.values()
    )

    # one at a time: nobody holds a LoRA, acme goes to the first by name; globex to the other (holding
    # none), not in acme's place; from then on each to the replica holding it
    order = ["acme", "globex", "acme", "globex", "globex", "acme"]
    for n, lora_id in enumerate(order):
        video = _video(address, lora_id, 1.0, tmp_path / f"{n}-{lora_id}.mp4")
        assert video == reference[lora_id, 1.0], f"session {n} ({lora_id}) differs from its reference"
        if n < 2:  # the next session routes on the gateway's view: wait until it shows this LoRA held
            wait_for(lambda lora_id=lora_id: lora_id in set().union(*_held(port).values()), 30, f"{lora_id} held")
    routes = _routes(trace)
    assert [r[0] for r in routes] == order, routes
    holder = {"acme": routes[0][1], "globex": routes[1][1]}
    assert holder["acme"] != holder["globex"], routes
    assert [r[2] for r in routes[:2]] == ["least_loaded"] * 2, routes
    assert routes[2:] == [(lora_id, holder[lora_id], "lora_loaded") for lora_id in order[2:]], routes
    assert _held(port) == {holder["acme"]: {"acme"}, holder["globex"]: {"globex"}}
    for lora_id, rid in holder.items():  # warm: each loaded its LoRA once and never switched
        state = _loras_of(gens[rid])
        assert (list(state.loaded), state.loads, state.evictions) == ([lora_id], 1, 0), (rid, state)

    # three acme sessions at once: the holder's two slots, then the other replica, which loads acme
    # in globex's place rather than the session waiting for the holder
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        three = list(pool.map(lambda n: _video(address, "acme", 3.0, tmp_path / f"three-{n}.mp4"), range(3)))
    assert all(video == reference["acme", 3.0] for video in three)
    burst = _routes(trace)[len(order) :]
    assert sorted(burst) == sorted(
        [("acme", holder["acme"], "lora_loaded")] * 2 + [("acme", holder["globex"], "least_loaded")]
    ), burst
    other = _loras_of(gens[holder["globex"]])
    assert (list(other.loaded), other.loads, other.evictions) == (["acme"], 2, 1), other
    held = _loras_of(gens[holder["acme"]])
    assert (held.loads, held.evictions) == (1, 0), held
    wait_for(lambda: _held(port) == {holder["acme"]: {"acme"}, holder["globex"]: {"acme"}}, 30, "acme on both")


def test_a_bad_lora_fails_the_ray_generators_start_with_one_line(tmp_path):
    """With --ray the gateway does not read the LoRA files (they are on the generators' nodes):
    the replicas register them, and a bad one ends `avatar serve` with exit 2 and its reason.
    `--ray local`: a Ray of its own (one gateway per cluster, and the module's has one)."""
    bad = tmp_path / "bad.safetensors"
    tensors = write_lora(bad, random_dit("tiny", "cpu", torch.float32, seed=0), rank=4)
    save_file({k: v for k, v in tensors.items() if ".blocks.1.ffn.0." not in k}, str(bad))
    config = tmp_path / "one.yaml"
    config.write_text(
        "encoder: {replicas: 1, num_cpus: 0}\ndecoder: {replicas: 1, num_cpus: 0}\n"
        "generator: {min_replicas: 1, max_replicas: 1, num_cpus: 0}\nautoscaling: {poll_s: 0.25}\n"
    )
    cmd = [*AVATAR, "serve", "--ray", "local", "--ray-config", str(config), "--listen", "127.0.0.1:0"]
    cmd += ["--avatar-lora", f"acme={bad}"]
    env = _env()
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # told, a new local Ray does not log whether it uses token auth
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "generator-1 failed to start" in lines[0] and f"avatar LoRA acme ({bad})" in lines[0], lines[0]
    assert "cover 51 of the 52" in lines[0], lines[0]
