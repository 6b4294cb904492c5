"""`avatar serve --ray ADDRESS`: encoder, generator and decoder replicas as Ray actors; the gateway
routes each session to replicas it finds through Ray.

Three pieces, on Ray Core:
- ReplicaActor: one replica; runs the existing gRPC service (app/serve.py, one role) on its node
  and reports its load (gateway.replicas.ReplicaLoad). Ray places it by its resource needs (a GPU;
  custom resources or CPUs on CPU clusters) and restarts it when its process or node dies.
- MeshController: a named actor beside the gateway that owns the replicas: keeps each role at its
  replica count, polls their load, leaves out of the table any replica that does not answer
  (dead, restarting, on a lost node) and scales the generators between min and max replicas on
  sessions in use. On Kubernetes, replicas Ray cannot place make KubeRay's autoscaler add nodes.
- serve(): the gateway process (the Ray driver): connects to Ray, starts the controller, refreshes
  the gateway's ReplicaRouter from it every POLL_S and serves AvatarService on --listen.

The gRPC contracts do not change: replicas are the same services, behind the internal token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from avatar import telemetry
from avatar.app import serve as serve_mod
from avatar.gateway.replicas import ROLES, ReplicaLoad, ReplicaRouter
from avatar.grpc_util import free_port
from avatar.services.generator.distributed import torchrun_env

log = logging.getLogger("avatar.app.ray_mesh")

NAMESPACE = "avatar"  # Ray namespace of the controller
CONTROLLER_NAME = "avatar-mesh-controller"
LOAD_TIMEOUT_S = 2.0  # a replica that does not report within this is left out of the table


@dataclass(frozen=True)
class RoleReplicas:
    """Replicas of one role and what each needs from Ray."""

    min_replicas: int = 1
    max_replicas: int = 1  # generator: autoscaling between min and max; encoder/decoder: == min
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 1: one GPU per replica
    resources: dict = field(default_factory=dict)  # custom Ray resources per replica, e.g. {"generator_slot": 1}
    tpp: int = 1  # generator: ranks of a TPP group per replica (services/generator/distributed); 1: one process

    def __post_init__(self):
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"replicas: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got {self.min_replicas}..{self.max_replicas}"
            )
        if self.num_cpus < 0 or self.num_gpus < 0 or any(v <= 0 for v in self.resources.values()):
            raise ValueError("num_cpus, num_gpus and resources must not be negative")
        if self.tpp < 1 or (self.tpp > 1 and self.num_gpus and self.num_gpus != self.tpp):
            raise ValueError(f"tpp: a group of tpp ranks needs num_gpus == tpp (one GPU per rank), got {self.tpp}")

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


@dataclass(frozen=True)
class RayMeshConfig:
    """`--ray-config FILE` (YAML; deploy/ray-mesh.yaml is an example). Sessions per generator
    replica are its --max-sessions."""

    encoder: RoleReplicas = RoleReplicas()
    generator: RoleReplicas = RoleReplicas()
    decoder: RoleReplicas = RoleReplicas()
    target_sessions: int = 0  # autoscaling: sessions per generator replica to aim at; 0: --max-sessions
    upscale_delay_s: float = 0.0  # load above the replicas' target this long adds replicas
    downscale_delay_s: float = 60.0  # load below it this long removes one idle replica
    poll_s: float = 0.5  # how often the controller polls replicas and the gateway the controller
    start_timeout_s: float = 1800.0  # every first replica SERVING within this, or serve exits

    def __post_init__(self):
        if self.target_sessions < 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("target_sessions, upscale_delay_s and downscale_delay_s must not be negative")
        if self.poll_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError("poll_s and start_timeout_s must be positive")
        for role in ("encoder", "decoder"):
            spec = getattr(self, role)
            if spec.min_replicas < 1 or spec.max_replicas != spec.min_replicas:
                raise ValueError(
                    f"{role}: a fixed number of replicas ('replicas: N', N >= 1); only generators autoscale"
                )

    def role(self, name: str) -> RoleReplicas:
        return getattr(self, name)

    @classmethod
    def default(cls, gpu: bool) -> RayMeshConfig:
        """One replica per role; one GPU each on a CUDA model, one CPU each otherwise."""
        spec = RoleReplicas(num_cpus=0.0 if gpu else 1.0, num_gpus=1.0 if gpu else 0.0)
        return cls(spec, spec, spec)

    @classmethod
    def load(cls, path: str | None, gpu: bool) -> RayMeshConfig:
        """The file's settings over default(gpu). ValueError names the file and the bad key."""
        if path is None:
            return cls.default(gpu)
        import yaml

        try:
            raw = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except OSError as exc:
            raise ValueError(f"--ray-config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"--ray-config {path}: not YAML ({str(exc).splitlines()[0]})") from None
        try:
            return cls.from_dict(raw, gpu)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--ray-config {path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict, gpu: bool) -> RayMeshConfig:
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping of roles and autoscaling settings")
        base = cls.default(gpu)
        known = {f.name for f in fields(cls)} - set(ROLES)
        roles, top = {}, {}
        for key, value in raw.items():
            if key in ROLES:
                roles[key] = _role_from_dict(key, value or {}, base.role(key))
            elif key == "autoscaling":
                if not isinstance(value, dict) or set(value) - known:
                    raise ValueError(
                        f"autoscaling: unknown key(s) {sorted(set(value or {}) - known)}; known: {sorted(known)}"
                    )
                top.update(value)
            else:
                raise ValueError(f"unknown key {key!r}; expected {', '.join(ROLES)} or autoscaling")
        return replace(base, **roles, **top)


def _role_from_dict(role: str, raw: dict, base: RoleReplicas) -> RoleReplicas:
    if not isinstance(raw, dict):
        raise ValueError(f"{role}: expected a mapping")
    allowed = {"num_cpus", "num_gpus", "resources"} | (
        {"min_replicas", "max_replicas", "tpp"} if role == "generator" else {"replicas"}
    )
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{role}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")
    values = dict(raw)
    if "replicas" in values:
        values["min_replicas"] = values["max_replicas"] = values.pop("replicas")
    if role == "generator" and "min_replicas" in values and "max_replicas" not in values:
        values["max_replicas"] = max(values["min_replicas"], base.max_replicas)
    if not isinstance(values.get("resources", {}), dict):
        raise ValueError(f"{role}: resources must be a mapping of resource name to amount")
    try:
        return replace(base, **values)
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from None


# ---- the replica ------------------------------------------------------------------------------


class ReplicaActor:
    """One replica: the existing gRPC service of `role`, started on the actor's node at its first
    load() call (so a restart by Ray serves again at the controller's next poll)."""

    def __init__(self, role: str, replica_id: str, cfg: serve_mod.ServeConfig, tpp: int = 1):
        self.role, self.replica_id, self.cfg, self.tpp = role, replica_id, cfg, tpp
        self.running = None
        self.group: _TppGroup | None = None  # tpp > 1: the ranks, child processes of this actor
        self.address = ""
        self._starting: asyncio.Task | None = None

    async def load(self) -> ReplicaLoad | None:
        """This replica's report; None while it starts; raises what made its start fail."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        if not self._starting.done():
            return None
        self._starting.result()
        if self.group is not None:
            sessions = await self.group.sessions()
            import ray

            return ReplicaLoad(
                self.replica_id,
                self.role,
                self.address,
                ray.get_runtime_context().get_node_id(),
                sessions,
                self.cfg.admission.max_sessions if self.cfg.admission else 0,
            )
        sessions = capacity = 0
        loras: tuple[str, ...] = ()
        generator = self.running.servicers.get("generator")
        if generator is not None:
            if generator.admission is not None:
                sessions = generator.admission.active + generator.admission.queued
                capacity = generator.admission.capacity
            # The per-avatar LoRA work fills this: the ids the engine holds loaded.
            held = getattr(generator.engine, "loaded_loras", None)
            loras = tuple(held()) if callable(held) else ()
        import ray

        return ReplicaLoad(
            self.replica_id,
            self.role,
            self.address,
            ray.get_runtime_context().get_node_id(),
            sessions,
            capacity,
            loras,
        )

    async def _start(self) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        cfg = replace(self.cfg, role=self.role, listen=f"{host}:0")
        if self.tpp > 1:
            self.group = _TppGroup(replace(cfg, listen=f"{host}:{free_port(host)}"), self.tpp)
            await self.group.start()
            self.address = self.group.cfg.listen
        else:
            self.running = await serve_mod.start(cfg)
            self.address = f"{host}:{self.running.port}"
        log.info("%s serving on %s", self.replica_id, self.address)

    async def stop(self, grace_s: float) -> None:
        if self.running is not None:
            await self.running.stop(grace_s)
        if self.group is not None:
            await self.group.stop(grace_s)


class _TppGroup:
    """A TPP group (services/generator/distributed) as one replica: `tpp` rank processes started
    the way torchrun would (env rendezvous on loopback), on the GPUs Ray gave this actor; rank 0
    serves GeneratorService. They die with the actor (PR_SET_PDEATHSIG); a rank that exits makes
    the actor exit, and Ray restarts the replica."""

    def __init__(self, cfg: serve_mod.ServeConfig, tpp: int):
        self.cfg = replace(cfg, role="generator", metrics_port=free_port("127.0.0.1"))
        self.tpp = tpp
        self.procs: list = []
        self.last = 0  # sessions at the last scrape

    async def start(self) -> None:
        import pickle
        import subprocess
        import tempfile

        fd, path = tempfile.mkstemp(prefix="avatar-tpp-", suffix=".pickle")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(self.cfg, f)
        port = free_port("127.0.0.1")
        for r in range(self.tpp):
            env = dict(os.environ, **torchrun_env(r, self.tpp, port))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "avatar.app.ray_mesh", path], env=env, preexec_fn=_die_with_parent
                )
            )
        try:
            while not await self._serving():
                self._check()
                await asyncio.sleep(0.5)
        finally:
            os.unlink(path)

    def _check(self) -> None:
        for r, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(f"TPP rank {r} exited with {p.returncode}")

    async def _serving(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from avatar.grpc_util import create_channel

        async with create_channel(self.cfg.listen) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except Exception:  # noqa: BLE001 - not listening yet
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def sessions(self) -> int:
        """Sessions in use on rank 0, from its Prometheus metrics (slots held + waiting)."""
        try:
            self._check()
        except RuntimeError:
            log.error("a rank of the TPP group died: restarting the replica")
            os._exit(1)  # Ray restarts the actor, which starts a new group
        import urllib.request

        url = f"http://127.0.0.1:{self.cfg.metrics_port}/metrics"
        try:
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read().decode())
        except OSError:  # rank 0 busy or restarting its listener: the last count stands
            return self.last
        total = 0.0
        for line in text.splitlines():
            if line.startswith(
                ('avatar_active_sessions{service="generator"}', 'avatar_queue_depth{service="generator"}')
            ):
                total += float(line.rpartition(" ")[2])
        self.last = int(total)
        return self.last

    async def stop(self, grace_s: float) -> None:
        import signal as sig

        if self.procs and self.procs[0].poll() is None:
            self.procs[0].send_signal(sig.SIGTERM)  # rank 0 drains, then stops the others
        deadline = time.monotonic() + grace_s + 10
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


# ---- the controller ---------------------------------------------------------------------------


@dataclass
class _Replica:
    replica_id: str
    role: str
    handle: object
    report: ReplicaLoad | None = None  # last answer; None: starting or not answering
    draining: bool = False  # scaled down: no new sessions; killed when idle
    served: bool = False  # reported once: a later error is a failure, not a start-up error
    misses: int = 0  # load() calls in a row that timed out


class MeshController:
    """Owns the replicas of one mesh; the gateway polls it for the routing table."""

    def __init__(self, mesh: RayMeshConfig, cfg: serve_mod.ServeConfig):
        self.mesh, self.cfg = mesh, cfg
        self.replicas: dict[str, _Replica] = {}
        self.numbers = dict.fromkeys(ROLES, 0)
        self.targets = {role: mesh.role(role).min_replicas for role in ROLES}
        self.queued = 0  # sessions waiting at the gateway: load beyond the replicas' slots
        # From the gateway's last poll: replica_id -> sessions it runs there (exact and current,
        # where a replica's own report lags by the session's encodes and a poll), and the
        # replicas it routes new sessions to (None: not told yet)
        self.routed: dict[str, int] = {}
        self.routing: set[str] | None = None
        self.errors: list[str] = []
        self.scale_since: tuple[int, float] | None = None  # (desired count, since) while it differs
        self.events: list[str] = []
        self._loop: asyncio.Task | None = None
        for role in ROLES:
            for _ in range(self.targets[role]):
                self._add(role)

    async def poll(
        self, queued: int = 0, routed: dict[str, int] | None = None, routing: list[str] | None = None
    ) -> dict:
        """The routing table (replicas serving and not draining), start-up errors and the scaling
        state. From the gateway: `queued`, sessions waiting for a slot; `routed`, the sessions it
        runs on each replica; `routing`, the replicas in its table now."""
        if self._loop is None:
            self._loop = asyncio.ensure_future(self._run())
        self.queued = queued
        self.routed = dict(routed or {})
        self.routing = None if routing is None else set(routing)
        return {
            "table": [r.report for r in self.replicas.values() if r.report is not None and not r.draining],
            "errors": list(self.errors),
            "targets": dict(self.targets),
            "replicas": {role: sum(r.role == role for r in self.replicas.values()) for role in ROLES},
            "events": self.events[-20:],
        }

    async def stop(self, grace_s: float) -> None:
        if self._loop is not None:
            self._loop.cancel()
        import ray

        refs = [r.handle.stop.remote(grace_s) for r in self.replicas.values()]
        await asyncio.gather(*(asyncio.wait_for(_aw(ref), grace_s + 5) for ref in refs), return_exceptions=True)
        for r in self.replicas.values():
            ray.kill(r.handle, no_restart=True)
        self.replicas.clear()

    def _add(self, role: str) -> None:
        self.numbers[role] += 1
        rid = f"{role}-{self.numbers[role]}"
        self.replicas[rid] = _Replica(rid, role, self._start_actor(role, rid))
        self._event(f"added {rid}")

    def _start_actor(self, role: str, rid: str):
        """The Ray actor of a new replica (its handle); Ray places and starts it."""
        import ray

        spec = self.mesh.role(role)
        return (
            ray.remote(ReplicaActor)
            .options(
                name=f"avatar-{rid}",
                namespace=NAMESPACE,
                max_restarts=-1,  # Ray restarts it (on another node when its node is gone)
                max_task_retries=0,
                max_concurrency=64,
                scheduling_strategy="SPREAD",  # replicas on different nodes: a lost node costs fewer
                **spec.actor_options(),
            )
            .remote(role, rid, self.cfg, spec.tpp if role == "generator" else 1)
        )

    def _event(self, text: str) -> None:
        log.info("%s", text)
        self.events.append(f"{time.time():.3f} {text}")

    async def _run(self) -> None:
        while True:
            try:
                await self._poll_replicas()
                self._scale()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round
                log.exception("mesh controller round failed")
            await asyncio.sleep(self.mesh.poll_s)

    async def _poll_replicas(self) -> None:
        import ray

        reps = list(self.replicas.values())
        answers = await asyncio.gather(
            *(asyncio.wait_for(_aw(r.handle.load.remote()), LOAD_TIMEOUT_S) for r in reps), return_exceptions=True
        )
        for rep, answer in zip(reps, answers):
            if isinstance(answer, ray.exceptions.ActorDiedError):  # gone for good: replace it
                self.replicas.pop(rep.replica_id, None)
                self._event(f"{rep.replica_id} died: {str(answer).splitlines()[0][:200]}")
            elif isinstance(answer, ray.exceptions.RayTaskError) and not rep.served:  # failed to start
                self.errors.append(f"{rep.replica_id} failed to start: {_first_line(answer)}")
                self.replicas.pop(rep.replica_id, None)
                ray.kill(rep.handle, no_restart=True)
                self._event(self.errors[-1])
            elif isinstance(answer, BaseException):  # restarting, node lost, or slow: not routable now
                rep.misses += 1
                # one slow answer (a replica busy on CPU) keeps its place; Ray saying it restarts does not
                if isinstance(answer, TimeoutError) and rep.misses < 2:
                    continue
                if rep.report is not None:
                    self._event(f"{rep.replica_id} stopped answering ({type(answer).__name__})")
                rep.report = None
            else:
                rep.misses = 0
                if answer is not None and rep.report is None:
                    self._event(f"{rep.replica_id} serving at {answer.address}")
                rep.report = answer
                rep.served = rep.served or answer is not None
                if self._drained(rep):
                    self.replicas.pop(rep.replica_id, None)
                    ray.kill(rep.handle, no_restart=True)
                    self._event(f"removed {rep.replica_id} (idle)")
        for role in ROLES:  # keep each role at its target (replaces replicas Ray gave up on)
            if role != "generator" or not self.errors:
                while sum(r.role == role and not r.draining for r in self.replicas.values()) < self.targets[role]:
                    self._add(role)

    def _sessions(self, rep: _Replica) -> int:
        """Sessions on a replica: the larger of its report and the gateway's count. The report
        alone lags: a session the gateway routed there seconds ago (still at the encoder) is not
        in it yet, and a replica drained or removed on it would lose that session."""
        reported = rep.report.sessions if rep.report is not None else 0
        return max(reported, self.routed.get(rep.replica_id, 0))

    def _drained(self, rep: _Replica) -> bool:
        """A draining replica may go when it runs no session by its report and by the gateway's
        count, taken when the gateway's table no longer had it (until then it may route there)."""
        return (
            rep.draining
            and rep.report is not None
            and self._sessions(rep) == 0
            and self.routing is not None
            and rep.replica_id not in self.routing
        )

    def _scale(self) -> None:
        """Generators: desired = ceil((sessions in use + waiting) / target per replica), within
        min..max; up after upscale_delay_s, down by one idle replica after downscale_delay_s."""
        spec = self.mesh.generator
        per = self.mesh.target_sessions or (self.cfg.admission.max_sessions if self.cfg.admission else 1)
        gens = [r for r in self.replicas.values() if r.role == "generator" and not r.draining]
        in_use = sum(self._sessions(r) for r in gens) + self.queued
        desired = min(spec.max_replicas, max(spec.min_replicas, math.ceil(in_use / per)))
        current = len(gens)
        now = time.monotonic()
        if desired == current:
            self.scale_since = None
            return
        if self.scale_since is None or self.scale_since[0] != desired:
            self.scale_since = (desired, now)
        waited = now - self.scale_since[1]
        if desired > current and waited >= self.mesh.upscale_delay_s:
            self._event(f"scale up: {in_use} sessions in use or waiting, {current} -> {desired} generators")
            self.targets["generator"] = desired
            for _ in range(desired - current):
                self._add("generator")
            self.scale_since = None
        elif desired < current and waited >= self.mesh.downscale_delay_s:
            idle = [r for r in gens if r.report is not None and self._sessions(r) == 0]
            if idle:
                victim = max(idle, key=lambda r: int(r.replica_id.rsplit("-", 1)[1]))  # the newest
                victim.draining = True
                self.targets["generator"] = current - 1
                self._event(f"scale down: {in_use} sessions in use, draining {victim.replica_id}")
                self.scale_since = None


async def _aw(ref):
    return await ref


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return (text[-1] if text else type(cause).__name__)[:300]


# ---- the gateway process -------------------------------------------------------------------------


def connect(address: str) -> None:
    """ray.init for `--ray ADDRESS`: HOST:PORT of a head node's GCS, "auto" (RAY_ADDRESS or the
    cluster `ray start` made on this machine) or "local" (start a Ray instance here, for one
    machine). ValueError with one line when there is no cluster there."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'avatar-mesh[ray]'") from None
    kwargs = {"namespace": NAMESPACE, "log_to_driver": False, "configure_logging": False}
    # ray.init runs off the main thread (it blocks) and warns it set no SIGTERM handler: the
    # gateway handles SIGTERM itself (a drain), and the stray line broke one-line start-up errors
    logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler is not set" not in r.getMessage())
    if address == "local":  # a new instance even when `ray start` made one on this machine
        ray.init(address="local", include_dashboard=False, **kwargs)
        return
    if address != "auto":
        host, sep, port = address.rpartition(":")
        if address.startswith("ray://"):
            raise ValueError(f"--ray {address}: Ray Client addresses are not supported; give the head's HOST:PORT")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--ray {address}: expected HOST:PORT of a Ray head node (GCS port), 'auto' or 'local'")
        try:  # ray.init retries an unreachable address for minutes: check it first
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        except OSError as exc:
            raise ValueError(f"--ray {address}: no Ray head there ({exc.strerror or exc})") from None
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"--ray {address}: {str(exc).strip().splitlines()[0]}") from None


def replica_config(cfg: serve_mod.ServeConfig, mesh: RayMeshConfig) -> serve_mod.ServeConfig:
    """What every replica serves with: the gateway's model and limits, the internal token (a
    random one per mesh unless $AVATAR_INTERNAL_TOKEN is set), no public listener settings. The
    replicas speak plaintext inside the cluster network, behind that token.

    Each session starts with two encodes (portrait, prompt) and up to every generator slot of
    the mesh may start at once: the encoders' queue holds that many (more than --encoder-queue
    when the mesh is larger), so a burst of new sessions waits rather than being refused."""
    from avatar.security import SecurityConfig

    enc = cfg.encoder_admission
    if enc is not None and cfg.admission is not None:
        burst = 2 * mesh.generator.max_replicas * cfg.admission.max_sessions
        enc = replace(enc, max_queue=max(enc.max_queue, math.ceil(burst / mesh.encoder.min_replicas)))
    return replace(
        cfg,
        encoder_admission=enc,
        security=SecurityConfig(internal_token=cfg.security.internal_token),
        metrics_port=None,
        trace_file=None,
        router=None,
    )


async def serve(cfg: serve_mod.ServeConfig, address: str, mesh: RayMeshConfig) -> None:
    """`avatar serve --ray`: connects, starts the replicas, serves the gateway until SIGTERM."""
    import ray

    cfg = replace(cfg, role="gateway", security=cfg.security.with_internal_token())
    telemetry.setup("avatar-gateway", cfg.trace_file)
    await asyncio.to_thread(connect, address)
    controller = None
    try:
        controller = (
            ray.remote(MeshController)
            .options(
                name=CONTROLLER_NAME,
                namespace=NAMESPACE,
                num_cpus=0,
                max_concurrency=64,
                # on this (the gateway's) node: it survives the loss of any replica's node
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            )
            .remote(mesh, replica_config(cfg, mesh))
        )
        router = ReplicaRouter(cfg.security.peer_credentials("gateway"), cfg.security.peer_token("gateway"))
        await _wait_for_replicas(controller, router, mesh)
        running = await serve_mod.start(replace(cfg, router=router, compile_cache=None))  # replicas compile
        directory = asyncio.create_task(_follow(controller, router, mesh))
        ray_address = ray.get_runtime_context().gcs_address
        print(
            f"avatar serve: gateway listening on {serve_mod._host(cfg.listen)}:{running.port}, "
            f"replicas on Ray at {ray_address}: "
            + ", ".join(f"{n} {r}" for r, n in _counts(router).items())
            + f" (generators {mesh.generator.min_replicas}..{mesh.generator.max_replicas})"
            + f", model {cfg.model.describe()}"
            + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""),
            file=sys.stderr,
            flush=True,
        )
        await serve_mod.until_stopped()
        await running.stop(cfg.grace_s)
        directory.cancel()
    finally:
        if controller is not None:
            try:
                await asyncio.wait_for(_aw(controller.stop.remote(1.0)), 15)
            except Exception:  # noqa: BLE001 - best effort: ray.shutdown ends what this driver owns
                pass
        ray.shutdown()
        telemetry.shutdown()


def _counts(router: ReplicaRouter) -> dict[str, int]:
    return {role: sum(r.role == role for r in router.table.values()) for role in ROLES}


async def _wait_for_replicas(controller, router: ReplicaRouter, mesh: RayMeshConfig) -> None:
    """Until the first replicas of every role serve (model loads take minutes on a GPU); a replica
    that failed to start ends the wait with its reason."""
    deadline = time.monotonic() + mesh.start_timeout_s
    want = {role: max(1, mesh.role(role).min_replicas) for role in ROLES}
    while True:
        state = await _aw(controller.poll.remote(0))
        if state["errors"]:
            raise ValueError(state["errors"][0])
        router.update(state["table"])
        have = _counts(router)
        if all(have[role] >= n for role, n in want.items()):
            return
        if time.monotonic() > deadline:
            raise ValueError(
                f"replicas not serving after {mesh.start_timeout_s:g} s: "
                + ", ".join(f"{have[r]} of {n} {r}" for r, n in want.items())
                + " (does the cluster have the resources they ask for? `ray status` shows pending demands)"
            )
        await asyncio.sleep(mesh.poll_s)


async def _follow(controller, router: ReplicaRouter, mesh: RayMeshConfig) -> None:
    """The gateway's directory: the controller's table into the router every poll_s. Without an
    answer for LOAD_TIMEOUT_S the gateway keeps its last table (the replicas may be fine)."""
    logged = 0.0  # the controller's events (added, serving, died, scale up/down) go to this log too
    while True:
        try:
            # waiting for a slot: in the gateway's queue, or admitted and waiting for a replica's slot
            queued = (router.admission.queued if router.admission is not None else 0) + router.waiting
            # one snapshot: sessions routed during the call below are in the next poll
            routed, routing = dict(router.sessions), list(router.table)
            state = await asyncio.wait_for(_aw(controller.poll.remote(queued, routed, routing)), LOAD_TIMEOUT_S)
            router.update(state["table"])
            for event in state["events"]:
                at, _, text = event.partition(" ")
                if float(at) > logged:
                    logged = float(at)
                    log.info("ray mesh: %s", text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep following; the log says why a round failed
            log.warning("mesh controller did not answer: %s", _first_line(exc))
        await asyncio.sleep(mesh.poll_s)


def add_serve_flags(p) -> None:
    g = p.add_argument_group("Ray (multi-node; pip install 'avatar-mesh[ray]')")
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run encoder, generator and decoder replicas on a Ray cluster and serve the gateway here: "
        "HOST:PORT of the head (GCS), 'auto' (RAY_ADDRESS or the local `ray start`) or 'local' "
        "(start Ray in this process); see docs/operations.md",
    )
    g.add_argument(
        "--ray-config",
        metavar="FILE",
        help="replicas per role, their resources and generator autoscaling (YAML, e.g. deploy/ray-mesh.yaml)",
    )


def check_flags(args) -> None:
    """ValueError for flag combinations --ray does not take."""
    if args.ray_config and not args.ray:
        raise ValueError("--ray-config needs --ray ADDRESS")
    if not args.ray:
        return
    if args.role not in ("all", "gateway"):
        raise ValueError(f"--ray runs the gateway here and the other roles as Ray replicas: not --role {args.role}")
    given = [f"--{n}" for n in ("encoder", "generator", "decoder") if getattr(args, n)]
    if given:
        raise ValueError(f"--ray finds replicas through Ray: drop {', '.join(given)}")


if __name__ == "__main__":  # one rank of a TPP group replica (_TppGroup): its ServeConfig, pickled
    import pickle

    with open(sys.argv[1], "rb") as f:
        _cfg = pickle.load(f)
    from avatar.logging_setup import setup_logging

    setup_logging("avatar-generator")
    asyncio.run(serve_mod.serve_forever(_cfg))
