"""Session routing over replicas that come and go: the gateway's side of `avatar serve --ray`.

A directory (app/ray_mesh.py) refreshes the table of replicas and their load reports a few
times a second; the gateway asks `route()` for the encoder, generator and decoder of each new
session and keeps them for the whole stream. The generator is the scarce one: a session takes
one of its slots (`capacity`, its --max-sessions), so the router picks the least loaded replica
with a free slot, preferring one that already holds the session's LoRA. The gateway's Admission
(queue, RESOURCE_EXHAUSTED, retry hint) sees the sum of the live replicas' slots as its
capacity, so waiting and refusing keep today's single-host semantics and messages.

No Ray here: the router only knows ReplicaLoad reports, so it is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from avatar import errors, metrics, telemetry
from avatar.grpc_util import create_channel
from avatar.v1 import decoder_pb2_grpc, encoder_pb2_grpc, generator_pb2_grpc

log = logging.getLogger(__name__)
ROLES = ("encoder", "generator", "decoder")
_STUBS = {
    "encoder": encoder_pb2_grpc.EncoderServiceStub,
    "generator": generator_pb2_grpc.GeneratorServiceStub,
    "decoder": decoder_pb2_grpc.DecoderServiceStub,
}


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's report (app/ray_mesh.py ReplicaActor.load), e.g.
    ReplicaLoad("generator-2", "generator", "10.0.3.7:41234", "9f3c...", 1, 4, ("brand-a",))."""

    replica_id: str  # stable while the replica lives, e.g. "generator-2"
    role: str  # "encoder", "generator" or "decoder"
    address: str  # host:port of its gRPC server (the existing service, internal token)
    node_id: str  # the Ray node it runs on (hex)
    sessions: int = 0  # sessions in use now (generator: admission slots held)
    capacity: int = 0  # session slots (generator: its --max-sessions); 0: no cap (encoder, decoder)
    loras: tuple[str, ...] = ()  # LoRA ids loaded on the replica (generator; empty without LoRAs)


class NoReplica(errors.Unavailable):
    """No live replica of a role: the session fails with UNAVAILABLE."""


@dataclass
class Route:
    """The replicas of one session and stubs for them; release() when the session ends."""

    encoder: object
    generator: object
    decoder: object
    replicas: dict[str, ReplicaLoad]  # role -> the replica chosen
    _router: ReplicaRouter | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._router is not None:
            self._router._release(self)
            self._router = None


class ReplicaRouter:
    """The gateway's view of the replicas: `update()` from the directory, `route()` per session.

    Sessions are counted here, per replica, when they are routed and when they end: one gateway
    routes all sessions of its mesh, so its count is exact and current, where a replica's report
    lags by a poll. Not thread-safe: use from the gateway's event loop.
    """

    def __init__(self, credentials=None, token: str | None = None):
        self.credentials, self.token = credentials, token
        self.admission = None  # the gateway's avatar.admission.Admission: capacity follows the replicas
        self.table: dict[str, ReplicaLoad] = {}
        self.sessions: dict[str, int] = defaultdict(int)  # replica_id -> sessions routed there, running
        self._stubs: dict[str, object] = {}  # replica_id -> stub on its channel
        self._channels: dict[str, object] = {}
        self._retired: dict[str, list] = defaultdict(list)  # replica_id -> channels of gone servers still in use

    # ---- the directory's side ----------------------------------------------------------------

    def update(self, table: Iterable[ReplicaLoad]) -> None:
        """Replaces the view. A replica missing from `table` (dead, draining or not yet serving)
        gets no new session; sessions already on it end with it (their calls fail UNAVAILABLE)."""
        new = {r.replica_id: r for r in table}
        for gone in self.table.keys() - new.keys():
            log.info("replica %s left the routing table (%d sessions on it)", gone, self.sessions.get(gone, 0))
            self._forget(gone)
        for rid, rep in new.items():
            old = self.table.get(rid)
            if old is None:
                log.info("replica %s (%s) at %s on node %s joined", rid, rep.role, rep.address, rep.node_id[:8])
            elif old.address != rep.address:  # restarted by Ray elsewhere: a new server
                self._forget(rid)
        self.table = new
        if self.admission is not None:
            self.admission.set_capacity(self.capacity())
        self._publish()

    def capacity(self) -> int:
        """Generator session slots of the live replicas: what the gateway's admission may hand out."""
        return sum(r.capacity for r in self.table.values() if r.role == "generator")

    def missing_roles(self) -> list[str]:
        have = {r.role for r in self.table.values()}
        return [role for role in ROLES if role not in have]

    # ---- the gateway's side ------------------------------------------------------------------

    def route(self, lora_id: str = "") -> Route:
        """The encoder, generator and decoder of a new session. The generator: among replicas
        with a free slot, one holding `lora_id` first, then the least loaded (fraction of slots
        in use, then sessions, then name); when none is free (a report lagging a death) the least
        loaded anyway, whose own admission queues the session. Raises NoReplica."""
        with telemetry.span("route", lora_id=lora_id or "") as span:
            chosen, decisions = {}, {}
            for role in ROLES:
                chosen[role], decisions[role] = self._choose(role, lora_id)
                span.set_attribute(f"{role}.replica", chosen[role].replica_id)
            span.set_attribute("generator.decision", decisions["generator"])
            for role, rep in chosen.items():
                self.sessions[rep.replica_id] += 1
                metrics.ROUTING.labels(role=role, decision=decisions[role]).inc()
            self._publish()
            return Route(*(self._stub(chosen[role]) for role in ROLES), chosen, self)

    def _choose(self, role: str, lora_id: str) -> tuple[ReplicaLoad, str]:
        replicas = [r for r in self.table.values() if r.role == role]
        if not replicas:
            metrics.ROUTING.labels(role=role, decision="no_replica").inc()
            raise NoReplica(f"{role} unavailable: no replica is serving; retry later")

        def load(r: ReplicaLoad) -> tuple:
            used = self.sessions.get(r.replica_id, 0)
            return (used / r.capacity if r.capacity else used, used, r.replica_id)

        if role != "generator":
            return min(replicas, key=load), "least_loaded"
        free = [r for r in replicas if self.sessions.get(r.replica_id, 0) < r.capacity]
        if not free:
            return min(replicas, key=load), "over_capacity"
        holding = [r for r in free if lora_id and lora_id in r.loras]
        if holding:
            return min(holding, key=load), "lora_loaded"
        return min(free, key=load), "least_loaded"

    def _release(self, route: Route) -> None:
        for rep in route.replicas.values():
            n = self.sessions.get(rep.replica_id, 0) - 1
            if n > 0:
                self.sessions[rep.replica_id] = n
            else:
                self.sessions.pop(rep.replica_id, None)
                for channel in self._retired.pop(rep.replica_id, ()):  # its last session ended
                    asyncio.get_running_loop().create_task(channel.close())
        self._publish()

    def _stub(self, rep: ReplicaLoad):
        stub = self._stubs.get(rep.replica_id)
        if stub is None:
            channel = create_channel(rep.address, self.credentials, self.token)
            self._channels[rep.replica_id] = channel
            stub = self._stubs[rep.replica_id] = _STUBS[rep.role](channel)
        return stub

    def _forget(self, replica_id: str) -> None:
        self._stubs.pop(replica_id, None)
        channel = self._channels.pop(replica_id, None)
        if channel is None:
            return
        if self.sessions.get(replica_id):  # sessions still on it: closing would cancel their calls
            self._retired[replica_id].append(channel)
        else:
            asyncio.get_running_loop().create_task(channel.close())

    def _publish(self) -> None:
        for role in ROLES:
            metrics.RAY_REPLICAS.labels(role=role).set(sum(r.role == role for r in self.table.values()))
        metrics.REPLICA_SESSIONS.clear()
        for rid, rep in self.table.items():
            metrics.REPLICA_SESSIONS.labels(role=rep.role, replica=rid, node=rep.node_id).set(self.sessions.get(rid, 0))

    async def close(self) -> None:
        for channel in [*self._channels.values(), *(c for cs in self._retired.values() for c in cs)]:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
        self._retired.clear()
