"""Live sessions the web front is serving, by id, so that other viewers (WHEP) can watch them.

A session's producer (the WebSocket Converse bridge) publishes the stream header once, then each
fragment; every subscriber gets the fragments from the moment it subscribed, in order, and None
when the session ends. A slow subscriber loses its oldest fragments instead of holding the
producer back (a live viewer wants the present, not a backlog).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class LiveSession:
    id: str
    # Set by publish_header: the fMP4 init segment and its MSE MIME type, e.g.
    # 'video/mp4; codecs="avc1.64000a,mp4a.40.2"'.
    init_segment: bytes = b""
    mime_type: str = ""
    ended: bool = False
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _queues: list[asyncio.Queue] = field(default_factory=list)
    max_backlog: int = 8

    def publish_header(self, init_segment: bytes, mime_type: str) -> None:
        self.init_segment, self.mime_type = init_segment, mime_type
        self._ready.set()

    def publish_fragment(self, data: bytes) -> None:
        for queue in self._queues:
            if queue.qsize() >= self.max_backlog:
                queue.get_nowait()
            queue.put_nowait(data)

    def end(self) -> None:
        self.ended = True
        self._ready.set()
        for queue in self._queues:
            queue.put_nowait(None)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the header is known; False if the session ended first."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        return not self.ended or bool(self.init_segment)

    async def fragments(self) -> AsyncIterator[bytes]:
        """moof+mdat bytes of every block published from now on; ends with the session."""
        if self.ended:
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.append(queue)
        try:
            while (data := await queue.get()) is not None:
                yield data
        finally:
            self._queues.remove(queue)

    @property
    def viewers(self) -> int:
        return len(self._queues)


class SessionHub:
    """Sessions by id; ids are unguessable because knowing one is enough to watch."""

    def __init__(self, max_sessions: int = 64):
        self.max_sessions = max_sessions
        self._sessions: dict[str, LiveSession] = {}

    def open(self) -> LiveSession:
        if len(self._sessions) >= self.max_sessions:
            raise RuntimeError(f"{self.max_sessions} live sessions are open already")
        session = LiveSession(id=secrets.token_urlsafe(12))
        self._sessions[session.id] = session
        return session

    def close(self, session: LiveSession) -> None:
        session.end()
        self._sessions.pop(session.id, None)

    def get(self, session_id: str) -> LiveSession | None:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)
