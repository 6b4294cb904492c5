"""Session routing over replicas that come and go: the gateway's side of `avatar serve --ray`.

A directory (app/ray_mesh.py) refreshes the table of replicas and their load reports a few
times a second; the gateway asks `route()` for the encoder, generator and decoder of each new
session and keeps them for the whole stream. The generator is the scarce one: a session takes
one of its slots (`capacity`, its --max-sessions), so the router picks the least loaded replica
with a free slot, preferring one that already holds the session's LoRA, and never gives a
replica more sessions than its slots. The gateway's Admission (queue, RESOURCE_EXHAUSTED, retry
hint) sees the sum of the live replicas' slots as its capacity, so waiting and refusing keep
today's single-host semantics and messages.

No Ray here: the router only knows ReplicaLoad reports, so it is tested without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from avatar import errors, metrics, telemetry
from avatar.grpc_util import DeadlineExceeded, create_channel
from avatar.v1 import decoder_pb2_grpc, encoder_pb2_grpc, generator_pb2_grpc

log = logging.getLogger(__name__)
ROLES = ("encoder", "generator", "decoder")
NO_GENERATOR_WAIT_S = 5.0  # with no generator serving, a new session waits this long for one (a restart)
PROBE_S = 2.0  # a replica whose call failed UNAVAILABLE is probed this often until it answers again
SUSPECT_MAX_S = 300.0  # ... for at most this long: by then Ray has noticed a dead node
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


class NoFreeSlot(DeadlineExceeded):
    """The session's wait for a free generator slot outlasted its deadline: DEADLINE_EXCEEDED."""


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

    def unavailable(self, role: str) -> None:
        """A call to this session's `role` replica failed UNAVAILABLE (its process or node died):
        the router sends no new session there before the directory's next report can say so."""
        if self._router is not None and role in self.replicas:
            self._router.suspect(self.replicas[role])


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
        self.waiting = 0  # admitted sessions waiting here for a free generator slot (autoscaling counts them)
        self._stubs: dict[str, object] = {}  # replica_id -> stub on its channel
        self._channels: dict[str, object] = {}
        self._retired: dict[str, list] = defaultdict(list)  # replica_id -> channels of gone servers still in use
        self._suspects: dict[tuple[str, str], asyncio.Task] = {}  # (replica_id, address) -> its probe
        self._changes = asyncio.Event()  # set when a slot frees or the table changes

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
        # restarted at a new address: routable again (a replica that merely leaves the table stays
        # suspect: Ray may report a lost node's replica again for a while)
        for key in [k for k in self._suspects if k[0] in new and new[k[0]].address != k[1]]:
            self._suspects.pop(key).cancel()
        self._changed()

    def capacity(self) -> int:
        """Generator session slots of the live replicas: what the gateway's admission may hand out."""
        return sum(r.capacity for r in self.routable() if r.role == "generator")

    def missing_roles(self) -> list[str]:
        have = {r.role for r in self.routable()}
        return [role for role in ROLES if role not in have]

    def suspect(self, rep: ReplicaLoad) -> None:
        """No new session to `rep` until its server accepts a connection again, or it reports from
        another address (restarted), or it leaves the table: Ray's view of a lost node lags."""
        key = (rep.replica_id, rep.address)
        if key in self._suspects:
            return
        log.warning("replica %s at %s unavailable: no new sessions until it answers", *key)
        self._suspects[key] = asyncio.get_running_loop().create_task(self._probe(key))
        self._changed()

    async def _probe(self, key: tuple[str, str]) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + SUSPECT_MAX_S
        while loop.time() < give_up:
            await asyncio.sleep(PROBE_S)
            channel = create_channel(key[1], self.credentials)
            try:
                async with asyncio.timeout(PROBE_S):
                    await channel.channel_ready()
                log.info("replica %s at %s answers again", *key)
                break
            except TimeoutError:
                continue
            finally:
                await channel.close()
        self._suspects.pop(key, None)
        self._changed()

    def _changed(self) -> None:
        self._changes.set()
        if self.admission is not None:
            self.admission.set_capacity(self.capacity())
        self._publish()

    def routable(self) -> list[ReplicaLoad]:
        """The table without replicas whose calls failed UNAVAILABLE and that do not answer yet."""
        return [r for r in self.table.values() if (r.replica_id, r.address) not in self._suspects]

    # ---- the gateway's side ------------------------------------------------------------------

    async def route(self, lora_id: str = "", wait_s: float | None = None) -> Route:
        """The encoder, generator and decoder of a new session. The generator: among replicas
        with a free slot, one holding `lora_id` first, then the least loaded (fraction of slots
        in use, then sessions, then for a LoRA the fewest LoRAs held, then name). A replica
        never gets more sessions than its slots. The gateway's admission hands out no more
        sessions than the replicas have slots, but slots can vanish between its grant and this
        call (a replica drained, late with its reports, or failed a call): the session then
        waits here for the next free slot on any replica, up to `wait_s` (the call's remaining
        deadline; None: until one frees or the call ends). Raises NoReplica when a role has
        no replica serving, NoFreeSlot when `wait_s` passed first."""
        with telemetry.span("route", lora_id=lora_id or "") as span:
            waited_s = await self._wait_for_free_slot(wait_s)
            if waited_s:
                span.set_attribute("slot_wait_s", round(waited_s, 3))
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

    async def _wait_for_free_slot(self, wait_s: float | None) -> float:
        """Until a generator has a free slot; the seconds waited. With no generator serving at
        all, returns after NO_GENERATOR_WAIT_S (Ray may have restarted one by then; if not,
        _choose raises NoReplica); past `wait_s`, raises NoFreeSlot."""
        if self._free_generator():
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.waiting += 1
        try:
            while not self._free_generator():
                waited = loop.time() - started
                serving = any(r.role == "generator" for r in self.routable())
                if not serving and waited >= NO_GENERATOR_WAIT_S:
                    break
                if wait_s is not None and waited >= wait_s:
                    metrics.ROUTING.labels(role="generator", decision="no_free_slot").inc()
                    raise NoFreeSlot(
                        f"generator busy: no replica's slot freed within {wait_s:.1f} s "
                        f"({self._generator_sessions()} sessions on {self.capacity()} slots)"
                    )
                limits = [NO_GENERATOR_WAIT_S - waited] if not serving else []
                if wait_s is not None:
                    limits.append(wait_s - waited)
                self._changes.clear()
                try:
                    # not wait_for: Python 3.11's drops a cancel that comes as the wait ends
                    # (CPython gh-86296): a client gone while waiting would still get a session
                    async with asyncio.timeout(min(limits) if limits else None):
                        await self._changes.wait()
                except TimeoutError:
                    pass
            return loop.time() - started
        finally:
            self.waiting -= 1

    def _choose(self, role: str, lora_id: str) -> tuple[ReplicaLoad, str]:
        replicas = [r for r in self.routable() if r.role == role]
        if not replicas:
            metrics.ROUTING.labels(role=role, decision="no_replica").inc()
            raise NoReplica(f"{role} unavailable: no replica is serving; retry later")

        def load(r: ReplicaLoad) -> tuple:
            used = self.sessions.get(r.replica_id, 0)
            return (used / r.capacity if r.capacity else used, used, r.replica_id)

        if role != "generator":
            return min(replicas, key=load), "least_loaded"
        free = [r for r in replicas if self._has_slot(r)]
        if not free:  # route() waits for a free slot first: never more sessions than a replica's slots
            raise NoReplica("generator unavailable: every replica's slots are in use; retry later")
        holding = [r for r in free if lora_id and lora_id in r.loras]
        if holding:
            return min(holding, key=load), "lora_loaded"
        if lora_id:  # it loads the LoRA: among the least loaded, one holding fewest evicts none in use
            return min(free, key=lambda r: (*load(r)[:2], len(r.loras), r.replica_id)), "least_loaded"
        return min(free, key=load), "least_loaded"

    def _has_slot(self, rep: ReplicaLoad) -> bool:
        return not rep.capacity or self.sessions.get(rep.replica_id, 0) < rep.capacity  # 0: no cap

    def _free_generator(self) -> bool:
        return any(self._has_slot(r) for r in self.routable() if r.role == "generator")

    def _generator_sessions(self) -> int:
        return sum(self.sessions.get(r.replica_id, 0) for r in self.routable() if r.role == "generator")

    def _release(self, route: Route) -> None:
        for rep in route.replicas.values():
            n = self.sessions.get(rep.replica_id, 0) - 1
            if n > 0:
                self.sessions[rep.replica_id] = n
            else:
                self.sessions.pop(rep.replica_id, None)
                for channel in self._retired.pop(rep.replica_id, ()):  # its last session ended
                    asyncio.get_running_loop().create_task(channel.close())
        self._changes.set()
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
        routable = self.routable()
        for role in ROLES:
            metrics.RAY_REPLICAS.labels(role=role).set(sum(r.role == role for r in routable))
        metrics.REPLICA_SESSIONS.clear()
        metrics.REPLICA_LORAS.clear()
        for rep in routable:
            rid = rep.replica_id
            metrics.REPLICA_SESSIONS.labels(role=rep.role, replica=rid, node=rep.node_id).set(self.sessions.get(rid, 0))
            for lora_id in rep.loras:
                metrics.REPLICA_LORAS.labels(replica=rid, lora_id=lora_id).set(1)

    async def close(self) -> None:
        for probe in self._suspects.values():
            probe.cancel()
        self._suspects.clear()
        for channel in [*self._channels.values(), *(c for cs in self._retired.values() for c in cs)]:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
        self._retired.clear()
