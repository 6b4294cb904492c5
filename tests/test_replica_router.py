"""gateway/replicas.py without Ray: which replica a session gets, slots, LoRA preference, a replica
that leaves, and the gateway admission's capacity following the replicas. Also the --ray-config
parser and the controller's scaling decisions (app/ray_mesh.py, no cluster)."""

import asyncio
import concurrent.futures
from dataclasses import replace

import grpc
import pytest

from avatar.admission import Admission, AdmissionConfig, Overloaded
from avatar.app import serve as serve_mod
from avatar.app.ray_mesh import MeshController, RayMeshConfig
from avatar.gateway.replicas import NoFreeSlot, NoReplica, ReplicaLoad, ReplicaRouter
from avatar.gateway.server import GatewayServicer
from avatar.grpc_util import status_of
from avatar.presets import ModelSpec


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


def test_converse_takes_the_gateway_admission_slot_with_a_router_too():
    """`serve --ray`: Converse's live sessions wait and are refused by the same admission as
    Generate (it raised AttributeError: the servicer kept no admission when given a router)."""

    async def body():
        admission = Admission(AdmissionConfig(max_sessions=1, max_queue=0), "gateway")
        router = ReplicaRouter()
        gateway = GatewayServicer(ModelSpec(), None, None, None, admission=admission, router=router)
        router.update(table(("g1", 1, ())))
        async with admission.slot(client="a"):  # the only slot is in use
            with pytest.raises(Overloaded, match=r"gateway busy: 1 of 1 sessions running and 0 of 0 queued"):
                await anext(gateway.Converse(iter(()), None))
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


# --- LoRA affinity end to end: two generator processes on loopback ------------------------------


class RecordingRouter(ReplicaRouter):
    """The router the gateway uses, noting which generator each session got."""

    def __init__(self):
        super().__init__()
        self.picked: list[tuple[str, str]] = []  # (lora_id, generator replica), in routing order

    async def route(self, lora_id: str = "", wait_s: float | None = None):
        chosen = await super().route(lora_id, wait_s)
        self.picked.append((lora_id, chosen.replicas["generator"].replica_id))
        return chosen


def test_lora_sessions_land_on_the_generator_process_holding_their_lora(start_service, tmp_path):
    """Two generator processes holding one LoRA each at most (--max-loras 1, --max-sessions 2), an
    encoder and a decoder, a gateway in this process routing through ReplicaRouter. The directory
    is what a Ray replica reports: each generator's loaded LoRAs, here read with its Loras RPC.
    Sessions go to the generator holding their LoRA while it has a free slot, a LoRA nobody holds
    goes to the generator holding none (not evicting one), and a video is the same byte for byte
    whichever generator process rendered it."""
    import torch
    from ckpt_fixtures.dit import write_lora
    from conftest import ASSETS, START_TIMEOUT_S, check_video, generate, tone_wav, wait_serving

    from avatar.grpc_util import create_server
    from avatar.services.generator.weights import random_dit
    from avatar.v1 import avatar_pb2, avatar_pb2_grpc, generator_pb2, generator_pb2_grpc

    loras = []
    for i, name in enumerate(("acme", "globex")):
        path = tmp_path / f"{name}.safetensors"
        write_lora(path, random_dit("tiny", "cpu", torch.float32, seed=0), rank=4, seed=30 + i, scale=0.2)
        loras += ["--avatar-lora", f"{name}={path}"]
    gen_args = (*loras, "--max-loras", "1", "--max-sessions", "2")
    services = {
        "encoder-1": start_service("encoder", wait=False),
        "decoder-1": start_service("decoder", wait=False),
        "g1": start_service("generator", *gen_args, wait=False),
        "g2": start_service("generator", *gen_args, wait=False),
    }
    for svc in services.values():
        wait_serving(svc.address, START_TIMEOUT_S, svc.proc, svc.log)
    generators = {rid: services[rid].address for rid in ("g1", "g2")}

    def request(lora_id: str, seconds: float) -> avatar_pb2.GenerateRequest:
        return avatar_pb2.GenerateRequest(
            image=(ASSETS / "astronaut.png").read_bytes(),
            audio=tone_wav(seconds),
            size="64*64",
            seed=7,
            lora_id=lora_id,
        )

    async def body():
        router = RecordingRouter()
        channels = {rid: grpc.aio.insecure_channel(address) for rid, address in generators.items()}
        stubs = {rid: generator_pb2_grpc.GeneratorServiceStub(ch) for rid, ch in channels.items()}

        async def loras_of(rid: str):
            return await stubs[rid].Loras(generator_pb2.LorasRequest(), timeout=10)

        async def refresh():
            table = [ReplicaLoad(rid, rid.split("-")[0], services[rid].address, "n1") for rid in services if "-" in rid]
            for rid, address in generators.items():
                held = tuple((await loras_of(rid)).loaded)
                table.append(ReplicaLoad(rid, "generator", address, "n1", 0, 2, held))
            router.update(table)

        async def directory():
            while True:
                await refresh()
                await asyncio.sleep(0.1)

        async def holding(rid: str, lora_id: str):
            async with asyncio.timeout(10):
                while router.table[rid].loras != (lora_id,):
                    await asyncio.sleep(0.05)

        # clients in threads beside the gateway's own blocking work (prepare): room for both
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(16))
        await refresh()
        server, port = create_server("127.0.0.1:0")
        avatar_pb2_grpc.add_AvatarServiceServicer_to_server(
            GatewayServicer(ModelSpec(), None, None, None, router=router), server
        )
        await server.start()
        following = asyncio.create_task(directory())
        gateway = f"127.0.0.1:{port}"

        def render(lora_id: str, seconds: float, name: str) -> bytes:  # a client, in a thread
            s = generate(gateway, request(lora_id, seconds), 240)
            check_video(s.write_mp4(tmp_path / f"{name}.mp4"), seconds)
            return b"".join(f.data for _, f in s.fragments)

        async def video(lora_id: str, seconds: float, name: str) -> bytes:
            return await asyncio.to_thread(render, lora_id, seconds, name)

        try:
            acme = await video("acme", 1.0, "acme")  # nobody holds a LoRA: the first by name
            assert router.picked == [("acme", "g1")]
            await holding("g1", "acme")
            globex = await video("globex", 1.0, "globex")  # to g2, which holds none: acme stays loaded
            assert router.picked[-1] == ("globex", "g2")
            await holding("g2", "globex")
            assert await video("acme", 1.0, "acme-again") == acme  # each to the generator holding it
            assert await video("globex", 1.0, "globex-again") == globex
            assert acme != globex
            assert router.picked == [("acme", "g1"), ("globex", "g2"), ("acme", "g1"), ("globex", "g2")]
            # three acme sessions at once: g1's two slots, then g2 (free), which loads acme in globex's place
            router.picked.clear()
            three = await asyncio.gather(*(video("acme", 3.0, f"acme-{n}") for n in range(3)))
            assert sorted(rid for _, rid in router.picked) == ["g1", "g1", "g2"]
            assert three[0] == three[1] == three[2]  # the same video from either generator process
            g1, g2 = await loras_of("g1"), await loras_of("g2")
            assert (g1.loads, g1.evictions, list(g1.loaded)) == (1, 0, ["acme"])  # acme loaded once, kept
            assert (g2.loads, g2.evictions, list(g2.loaded)) == (2, 1, ["acme"])
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await server.stop(0)
            await router.close()
            for ch in channels.values():
                await ch.close()

    run(body())
