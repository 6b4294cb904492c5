"""gateway/replicas.py without Ray: which replica a session gets, slots, LoRA preference, a replica
that leaves, and the gateway admission's capacity following the replicas. Also the --ray-config
parser and the controller's scaling decisions (app/ray_mesh.py, no cluster)."""

import asyncio
from dataclasses import replace

import grpc
import pytest

from avatar.admission import Admission, AdmissionConfig, Overloaded
from avatar.app import serve as serve_mod
from avatar.app.ray_mesh import MeshController, RayMeshConfig
from avatar.gateway.replicas import NoFreeSlot, NoReplica, ReplicaLoad, ReplicaRouter
from avatar.grpc_util import status_of


def table(*generators, encoders=1, decoders=1):
    """ReplicaLoads: generators as (id, capacity, loras), plus encoders and decoders."""
    out = [ReplicaLoad(f"encoder-{i}", "encoder", f"127.0.0.1:{100 + i}", "n1") for i in range(encoders)]
    out += [ReplicaLoad(f"decoder-{i}", "decoder", f"127.0.0.1:{200 + i}", "n1") for i in range(decoders)]
    for i, (rid, capacity, loras) in enumerate(generators):
        out.append(ReplicaLoad(rid, "generator", f"127.0.0.1:{300 + i}", f"n{i % 2}", 0, capacity, tuple(loras)))
    return out


def run(coro):
    return asyncio.run(coro)


def test_sessions_go_to_the_least_loaded_replica_with_a_free_slot_and_stay_counted():
    async def body():
        router = ReplicaRouter()
        router.update(table(("g1", 2, ()), ("g2", 2, ()), ("g3", 1, ())))
        routes = [await router.route() for _ in range(5)]
        picked = [r.replicas["generator"].replica_id for r in routes]
        # fraction in use first: g1, g2, g3 each get one, then g1 and g2 their second
        assert sorted(picked) == ["g1", "g1", "g2", "g2", "g3"]
        assert dict(router.sessions) == {"g1": 2, "g2": 2, "g3": 1, "encoder-0": 5, "decoder-0": 5}
        with pytest.raises(NoFreeSlot) as exc:  # none free, and no time to wait for one
            await router.route(wait_s=0)
        assert status_of(exc.value) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "generator busy: no replica's slot freed within 0.0 s (5 sessions on 5 slots)",
        )
        routes[0].release()
        routes[0].release()  # twice is harmless
        freed = routes[0].replicas["generator"].replica_id
        assert router.sessions[freed] == 1
        assert (await router.route()).replicas["generator"].replica_id == freed
        await router.close()

    run(body())


def test_a_session_prefers_a_free_replica_holding_its_lora():
    async def body():
        router = ReplicaRouter()
        router.update(table(("g1", 2, ()), ("g2", 2, ("brand-a",)), ("g3", 2, ("brand-b",))))
        assert (await router.route("brand-b")).replicas["generator"].replica_id == "g3"
        assert (await router.route("brand-b")).replicas["generator"].replica_id == "g3"
        # g3 is full now: the least loaded of the others, not a queue behind g3
        assert (await router.route("brand-b")).replicas["generator"].replica_id == "g1"
        assert (await router.route("")).replicas["generator"].replica_id in ("g1", "g2")
        await router.close()

    run(body())


def test_no_replica_of_a_role_is_unavailable_and_a_gone_replica_gets_no_sessions():
    async def body():
        router = ReplicaRouter()
        router.update(table(("g1", 2, ()), decoders=0))
        with pytest.raises(NoReplica) as exc:
            await router.route()
        code, details = status_of(exc.value)
        assert code == grpc.StatusCode.UNAVAILABLE and "decoder unavailable" in details
        assert router.missing_roles() == ["decoder"]
        router.update(table(("g1", 2, ()), ("g2", 2, ())))
        running = await router.route()
        assert running.replicas["generator"].replica_id == "g1"
        router.update(table(("g2", 2, ())))  # g1's node died
        assert {(await router.route()).replicas["generator"].replica_id for _ in range(2)} == {"g2"}
        running.release()  # its session ended: the retired channel closes
        assert "g1" not in router.sessions and not router._retired
        await router.close()

    run(body())


def test_the_gateway_admission_capacity_is_the_replicas_slots():
    async def body():
        admission = Admission(AdmissionConfig(max_sessions=1, max_queue=1), "gateway")
        router = ReplicaRouter()
        router.admission = admission
        router.update(table(("g1", 2, ())))
        assert admission.capacity == 2
        async with admission.slot(client="a"), admission.slot(client="b"):
            waiter = asyncio.create_task(admission._acquire("c", 5))
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded, match=r"gateway busy: 2 of 2 sessions running and 1 of 1 queued"):
                await admission._acquire("d", 5)
            router.update(table(("g1", 2, ()), ("g2", 2, ())))  # a replica joined: the waiter gets a slot
            await asyncio.wait_for(waiter, 1)
            assert admission.active == 3 and admission.capacity == 4
            router.update(table())  # every generator gone: nothing new is admitted
            assert admission.capacity == 0
        await router.close()

    run(body())


def test_ray_config_parses_and_refuses_bad_keys(tmp_path):
    mesh = RayMeshConfig.from_dict(
        {
            "generator": {"min_replicas": 2, "max_replicas": 5, "num_gpus": 1},
            "encoder": {"replicas": 2, "num_gpus": 0.5},
            "autoscaling": {"downscale_delay_s": 10},
        },
        gpu=True,
    )
    assert (mesh.generator.min_replicas, mesh.generator.max_replicas, mesh.generator.num_gpus) == (2, 5, 1)
    assert (mesh.encoder.min_replicas, mesh.encoder.max_replicas, mesh.encoder.num_gpus) == (2, 2, 0.5)
    assert mesh.decoder.num_gpus == 1 and mesh.downscale_delay_s == 10
    assert RayMeshConfig.default(gpu=False).generator.actor_options() == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "resources": {},
    }
    for raw, message in [
        ({"generators": {}}, "unknown key 'generators'"),
        ({"encoder": {"min_replicas": 2}}, "encoder: unknown key(s) ['min_replicas']"),
        ({"generator": {"min_replicas": 3, "max_replicas": 2}}, "generator: replicas: need 0 <= min_replicas"),
        ({"autoscaling": {"poll_s": 0}}, "must be positive"),
        ({"autoscaling": {"upscale": 1}}, "autoscaling: unknown key(s) ['upscale']"),
        ({"decoder": {"replicas": 0}}, "decoder: replicas: need"),
    ]:
        with pytest.raises(ValueError) as exc:
            RayMeshConfig.from_dict(raw, gpu=True)
        assert message in str(exc.value), (raw, str(exc.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: [1, 2\n")
    with pytest.raises(ValueError, match=r"--ray-config .*bad.yaml: not YAML"):
        RayMeshConfig.load(str(bad), gpu=False)


def test_a_replica_whose_call_failed_unavailable_gets_no_new_session_until_it_restarts():
    async def body():
        router = ReplicaRouter()
        router.admission = Admission(AdmissionConfig(max_sessions=1, max_queue=0), "gateway")
        router.update(table(("g1", 2, ()), ("g2", 2, ())))
        route = await router.route()
        assert route.replicas["generator"].replica_id == "g1"
        route.unavailable("generator")  # its process died: the directory has not noticed yet
        assert router.admission.capacity == 2
        router.update(table(("g1", 2, ()), ("g2", 2, ())))  # the stale report changes nothing
        router.update(table(("g2", 2, ())))  # nor does leaving the table and coming back
        router.update(table(("g1", 2, ()), ("g2", 2, ())))
        assert {(await router.route()).replicas["generator"].replica_id for _ in range(2)} == {"g2"}
        restarted = table(("g2", 2, ())) + [ReplicaLoad("g1", "generator", "127.0.0.1:999", "n2", 0, 2)]
        router.update(restarted)  # Ray restarted it elsewhere: a new address, routable again
        assert (await router.route()).replicas["generator"].replica_id == "g1"
        await router.close()

    run(body())


def test_a_session_granted_while_slots_vanished_waits_for_a_free_one():
    async def body():
        router = ReplicaRouter()
        router.update(table(("g1", 1, ()), ("g2", 1, ())))
        first = await router.route()
        router.update(table(("g1" if first.replicas["generator"].replica_id == "g1" else "g2", 1, ())))
        waiting = asyncio.create_task(router.route(wait_s=5))  # the only replica is full
        await asyncio.sleep(0.1)
        assert not waiting.done()
        first.release()  # a slot frees: the waiting session takes it, within the cap
        second = await asyncio.wait_for(waiting, 1)
        assert second.replicas["generator"].replica_id == first.replicas["generator"].replica_id
        assert max(n for rid, n in router.sessions.items() if rid.startswith("g")) == 1
        await router.close()

    run(body())


def over_their_slots(router: ReplicaRouter) -> dict[str, int]:
    """Generators the router gave more sessions than their slots (known to it, in the table or not)."""
    caps = {rid: r.capacity for rid, r in router.table.items() if r.role == "generator"}
    return {rid: n for rid, n in router.sessions.items() if rid in caps and n > caps[rid]}


def test_an_admitted_session_waits_for_a_free_slot_and_never_exceeds_a_replica_cap():
    """Issue 16 (seen in the Ray autoscaling test): the controller drained a replica the gateway had
    just routed sessions to, so the admitted sessions not yet routed found every remaining slot in
    use; after 5 s one went to a full replica anyway (3 sessions on a cap of 2). Such a session now
    waits for the next free slot on any replica, counted as waiting for the autoscaler."""

    async def body():
        router = ReplicaRouter()
        router.admission = Admission(AdmissionConfig(max_sessions=1, max_queue=8), "gateway")
        router.update(table(("g1", 2, ()), ("g2", 2, ()), ("g3", 2, ())))
        routes = [await router.route() for _ in range(5)]  # six admitted (the gateway's 6 slots), five routed
        assert dict(router.sessions) == {"g1": 2, "g2": 2, "g3": 1, "encoder-0": 5, "decoder-0": 5}
        router.update(table(("g1", 2, ()), ("g2", 2, ())))  # g3 drained, its session still on it
        # a deadline that passes first: refused with the reason, no replica over its slots
        refused = (await asyncio.gather(router.route(wait_s=0.3), return_exceptions=True))[0]
        assert over_their_slots(router) == {}  # before the fix: {"g1": 3}
        assert isinstance(refused, NoFreeSlot), refused
        assert "no replica's slot freed within 0.3 s (4 sessions on 4 slots)" in str(refused)
        sixth = asyncio.create_task(router.route())  # no deadline: waits for a slot
        await asyncio.sleep(0.3)
        assert not sixth.done() and router.waiting == 1 and over_their_slots(router) == {}
        router.update(table(("g1", 2, ()), ("g2", 2, ()), ("g4", 2, ())))  # scaled up: g4 serves
        assert (await asyncio.wait_for(sixth, 1)).replicas["generator"].replica_id == "g4"
        assert router.waiting == 0
        seventh = asyncio.create_task(router.route())  # g4's second slot
        assert (await asyncio.wait_for(seventh, 1)).replicas["generator"].replica_id == "g4"
        eighth = asyncio.create_task(router.route())  # all full again: waits for a session to end
        await asyncio.sleep(0.1)
        assert not eighth.done()
        routes[0].release()
        assert (await asyncio.wait_for(eighth, 1)).replicas["generator"].replica_id == "g1"
        assert over_their_slots(router) == {}
        await router.close()

    run(body())


class Controller(MeshController):
    """The controller's decisions without Ray: replicas are records, reports are set by the test."""

    def _start_actor(self, role, rid):
        return None

    async def _run(self):  # no polling of replicas
        pass


def test_the_controller_drains_no_replica_the_gateway_runs_sessions_on():
    """Issue 16: replicas report a session only once its generator call arrives (after the
    encoders, seconds under load) and a poll later. The controller took a replica the gateway had
    just routed two sessions to for idle, drained it and killed it. It now counts the larger of
    the report and the gateway's count, and kills a drained replica only once the gateway's table
    no longer has it and the gateway runs nothing there."""

    async def body():
        mesh = RayMeshConfig.from_dict(
            {
                "generator": {"min_replicas": 3, "max_replicas": 4},
                "autoscaling": {"downscale_delay_s": 0, "upscale_delay_s": 0},
            },
            gpu=False,
        )
        controller = Controller(mesh, serve_mod.ServeConfig(admission=AdmissionConfig(max_sessions=2)))
        gens = [controller.replicas[f"generator-{i}"] for i in (1, 2, 3)]
        for rep in gens:
            rep.report = ReplicaLoad(rep.replica_id, "generator", "127.0.0.1:1", "n1", 0, 2)
        controller.targets["generator"] = 4
        controller._add("generator")  # a 4th starting (the last scale-up), no report yet
        table_ids = [rep.replica_id for rep in gens]
        # the gateway runs 6 sessions (2 waiting); every replica still reports none
        await controller.poll(2, {"generator-1": 2, "generator-2": 2, "generator-3": 2}, table_ids)
        controller._scale()
        assert not any(r.draining for r in controller.replicas.values())
        assert controller.targets["generator"] == 4
        # two sessions left, on generator-1 and generator-3: generator-2 is the idle one, not the newest
        await controller.poll(0, {"generator-1": 1, "generator-3": 1}, table_ids)
        controller._scale()
        assert [r.replica_id for r in controller.replicas.values() if r.draining] == ["generator-2"]
        victim = controller.replicas["generator-2"]
        assert not controller._drained(victim)  # the gateway may still route there
        answer = await controller.poll(0, {"generator-1": 1, "generator-3": 1}, table_ids)
        assert "generator-2" not in [r.replica_id for r in answer["table"]]
        routing = [i for i in table_ids if i != "generator-2"]
        # a session routed to it before the gateway applied that table
        await controller.poll(0, {"generator-1": 1, "generator-2": 1, "generator-3": 1}, routing)
        assert not controller._drained(victim)
        await controller.poll(0, {"generator-1": 1, "generator-3": 1}, routing)
        victim.report = replace(victim.report, sessions=1)  # ... which the replica reports a poll later
        assert not controller._drained(victim)
        victim.report = replace(victim.report, sessions=0)
        assert controller._drained(victim)

    run(body())
