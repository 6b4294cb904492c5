"""Admission control: session cap, bounded queue, RESOURCE_EXHAUSTED with a retry hint,
fair order between clients, deadlines while queued; unit level and over real gRPC."""

import asyncio

import grpc
import pytest

from avatar.admission import Admission, AdmissionConfig, Overloaded, QueueDeadline, retry_after_ms
from avatar.v1 import avatar_pb2, avatar_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_cap_queue_and_refusal():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=2, max_queue=1), name="t-cap")
        release = asyncio.Event()
        running = []

        async def job(i):
            async with adm.slot(client=f"c{i}"):
                running.append(i)
                await release.wait()

        tasks = [asyncio.create_task(job(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert (adm.active, adm.queued) == (2, 1) and running == [0, 1]
        with pytest.raises(Overloaded) as e:  # 2 running + 1 queued: the 4th is refused
            async with adm.slot(client="c9"):
                pass
        assert "2 of 2 sessions running and 1 of 1 queued" in str(e.value)
        assert e.value.retry_after_ms >= 100
        release.set()
        await asyncio.gather(*tasks)
        assert (adm.active, adm.queued) == (0, 0) and sorted(running) == [0, 1, 2]

    run(go())


def test_fair_order_and_per_client_cap():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=1, max_queue=10, max_per_client=3), name="t-fair")
        order, gates = [], {}

        async def job(client, tag):
            async with adm.slot(client=client):
                order.append(tag)
                gates[tag] = asyncio.Event()
                await gates[tag].wait()

        first = asyncio.create_task(job("greedy", "g0"))
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(job("greedy", "g1")), asyncio.create_task(job("greedy", "g2"))]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="limit 3 per client"):
            async with adm.slot(client="greedy"):
                pass
        queued.append(asyncio.create_task(job("polite", "p0")))  # arrives last ...
        await asyncio.sleep(0.01)
        for _ in range(4):
            tag = order[-1]
            gates[tag].set()
            await asyncio.sleep(0.02)
        await asyncio.gather(first, *queued)
        # ... but goes before greedy's second and third: fewest running first
        assert order == ["g0", "p0", "g1", "g2"]

    run(go())


def test_deadline_while_queued_and_cancel_frees_the_place():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=1, max_queue=2), name="t-deadline")
        hold = asyncio.Event()

        async def holder():
            async with adm.slot(client="a"):
                await hold.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        # past its deadline in the queue: DEADLINE_EXCEEDED (what the client's library reports anyway)
        with pytest.raises(QueueDeadline, match="before the deadline"):
            async with adm.slot(client="b", timeout=0.05):
                pass
        waiter = asyncio.create_task(adm.slot(client="c").__aenter__())
        await asyncio.sleep(0.01)
        assert adm.queued == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.queued == 0 and adm.active == 1
        hold.set()
        await h
        assert adm.active == 0
        async with adm.slot(client="d"):  # the freed slot is usable
            assert adm.active == 1

    run(go())


def test_retry_hint_follows_session_length():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=1, max_queue=0), name="t-hint")
        async with adm.slot(client="a"):
            await asyncio.sleep(0.3)
        hold = asyncio.Event()

        async def holder():
            async with adm.slot(client="a"):
                await hold.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as e:
            async with adm.slot(client="b"):
                pass
        assert 250 <= e.value.retry_after_ms <= 1000
        hold.set()
        await h

    run(go())


def test_config_is_checked():
    with pytest.raises(ValueError, match="at least 1"):
        AdmissionConfig(max_sessions=0)
    with pytest.raises(ValueError):
        AdmissionConfig(max_queue=-1)


class _Slow(avatar_pb2_grpc.AvatarServiceServicer):
    def __init__(self, adm):
        self.adm = adm

    async def Generate(self, request, context):
        async with self.adm.slot(context):
            for i in range(3):
                await asyncio.sleep(0.05)
                yield avatar_pb2.GenerateResponse(progress=avatar_pb2.Progress(blocks_done=i + 1, blocks_total=3))


async def _serve(servicer) -> tuple[grpc.aio.Server, int]:
    """`servicer` as an AvatarService on a free loopback port, errors mapped as the services map them."""
    from avatar.grpc_util import ErrorInterceptor

    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    avatar_pb2_grpc.add_AvatarServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_grpc_clients_get_resource_exhausted_with_retry_metadata():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=2, max_queue=2), name="t-grpc")
        server, port = await _serve(_Slow(adm))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = avatar_pb2_grpc.AvatarServiceStub(ch)

                async def one():
                    try:
                        msgs = [m async for m in stub.Generate(avatar_pb2.GenerateRequest(), timeout=10)]
                        return "ok", len(msgs)
                    except grpc.aio.AioRpcError as e:
                        return e.code(), (e.details(), retry_after_ms(e))

                results = await asyncio.gather(*(one() for _ in range(12)))
            ok = [r for r in results if r[0] == "ok"]
            refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(ok) + len(refused) == 12
            assert len(ok) >= 4 and all(n == 3 for _, n in ok)  # 2 running + 2 queued at least
            assert refused, "beyond cap + queue someone must be refused"
            for _, (details, hint) in refused:
                assert "busy" in details and hint is not None and hint > 0
            assert adm.active == 0 and adm.queued == 0
        finally:
            await server.stop(None)

    run(go())


class _Front(avatar_pb2_grpc.AvatarServiceServicer):
    """A gateway-like servicer whose work is a call to a busy back end."""

    def __init__(self, back_address):
        self.back = back_address

    async def Generate(self, request, context):
        async with grpc.aio.insecure_channel(self.back) as ch:
            async for m in avatar_pb2_grpc.AvatarServiceStub(ch).Generate(request, timeout=10):
                yield m


def test_retry_hint_crosses_a_hop():
    async def go():
        adm = Admission(AdmissionConfig(max_sessions=1, max_queue=0), name="t-hop")
        back, back_port = await _serve(_Slow(adm))
        front, front_port = await _serve(_Front(f"127.0.0.1:{back_port}"))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{front_port}") as ch:
                stub = avatar_pb2_grpc.AvatarServiceStub(ch)

                async def one():
                    try:
                        return [m async for m in stub.Generate(avatar_pb2.GenerateRequest(), timeout=10)]
                    except grpc.aio.AioRpcError as e:
                        return e

                results = await asyncio.gather(one(), one(), one())
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
            assert all(retry_after_ms(e) for e in errors), "the back end's hint reaches the client"
        finally:
            await front.stop(None)
            await back.stop(None)

    run(go())


class _Context:
    """The parts of a grpc.aio context that client_key reads."""

    def __init__(self, peer: str, token: str | None = None, cert: bytes | None = None):
        self._peer, self._token, self._cert = peer, token, cert

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    def auth_context(self):
        return {"x509_common_name": [self._cert]} if self._cert else {}

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata


def test_client_key_is_the_authenticated_identity_else_the_peer_host():
    from avatar.admission import client_key

    # auth off: a bearer string proves nothing; random ones from one host are one client
    keys = {client_key(_Context(f"ipv4:10.0.0.7:{5000 + i}", token=f"random-{i}")) for i in range(5)}
    assert keys == {"ipv4:10.0.0.7"}
    assert client_key(_Context("ipv6:[::1]:5123")) == "ipv6:[::1]"
    # auth on: the (checked) token is the identity, wherever it connects from
    a = client_key(_Context("ipv4:10.0.0.7:1", token="tok-a"), token_checked=True)
    assert (
        a
        == client_key(_Context("ipv4:10.0.0.8:2", token="tok-a"), token_checked=True)
        != client_key(_Context("ipv4:10.0.0.7:1", token="tok-b"), token_checked=True)
    )
    assert "tok-a" not in a
    # mTLS: the certificate names the client
    assert client_key(_Context("ipv4:10.0.0.7:1", token="x", cert=b"alice"), token_checked=True) == "cert:alice"


def test_per_client_cap_with_random_bearers_and_auth_off():
    """One host sending a new bearer string per call is still one client for --max-per-client."""

    async def go():
        adm = Admission(AdmissionConfig(max_sessions=4, max_queue=4, max_per_client=1), name="t-bearers")
        async with adm.slot(_Context("ipv4:10.0.0.7:1000", token="random-1")):
            with pytest.raises(Overloaded, match="limit 1 per client"):
                async with adm.slot(_Context("ipv4:10.0.0.7:1001", token="random-2")):
                    pass
            async with adm.slot(_Context("ipv4:10.0.0.9:1000", token="random-3")):  # another host
                assert adm.active == 2

    asyncio.run(go())
