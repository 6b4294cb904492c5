import asyncio

import pytest

from avatar.gateway.web.hub import SessionHub


def test_subscribers_get_fragments_from_when_they_joined_and_none_at_the_end():
    async def main():
        hub = SessionHub()
        session = hub.open()
        assert hub.get(session.id) is session
        session.publish_header(b"init", "video/mp4")
        assert await session.wait_ready(1)
        session.publish_fragment(b"before")
        got = []

        async def watch():
            async for data in session.fragments():
                got.append(data)

        task = asyncio.create_task(watch())
        await asyncio.sleep(0)
        session.publish_fragment(b"a")
        session.publish_fragment(b"b")
        hub.close(session)
        await asyncio.wait_for(task, 1)
        assert got == [b"a", b"b"]
        assert hub.get(session.id) is None and session.viewers == 0

    asyncio.run(main())


def test_a_slow_viewer_loses_its_oldest_fragments_not_the_producer_its_pace():
    async def main():
        hub = SessionHub()
        session = hub.open()
        session.max_backlog = 3
        frags = session.fragments()
        first = asyncio.create_task(anext(frags))
        await asyncio.sleep(0)
        session.publish_fragment(bytes([0]))
        assert await first == bytes([0])
        for i in range(1, 10):
            session.publish_fragment(bytes([i]))
        rest = [await anext(frags) for _ in range(3)]
        assert rest == [bytes([7]), bytes([8]), bytes([9])]
        await frags.aclose()

    asyncio.run(main())


def test_the_hub_is_bounded_and_ids_are_unguessable():
    hub = SessionHub(max_sessions=2)
    a, b = hub.open(), hub.open()
    assert a.id != b.id and len(a.id) >= 16
    with pytest.raises(RuntimeError, match="2 live sessions"):
        hub.open()
