"""What a block costs on this generator, by size, once a session is past its one-time costs.

A live session must be refused or admitted before its blocks say how fast they are: its first
blocks pay for what later ones do not (the ring cache filling, CUDA graph captures, a shape the
compiler has not seen), so they can over-state the steady block time (H200, 4 steps: 473 and 615
ms for the first two blocks at 256*256, a size the warm-up had not run, where the warmed 384*256
ran at 220-285 ms per block; docs/performance.md, runs P and R). The generator's
warm-up and every session record here the time of their blocks with full caches, per DiT forward
(a block is one forward per sampling step, one more with a single cache set), so a figure
measured at one step count answers for any other.
"""

from __future__ import annotations

import collections
import statistics
import threading


class BlockTimes:
    """Milliseconds per DiT forward by (width, height): the median of the last `keep` steady blocks."""

    def __init__(self, keep: int = 16):
        self._keep = keep
        self._ms: dict[tuple[int, int], collections.deque[float]] = {}
        self._lock = threading.Lock()  # sessions record from their worker threads

    def record(self, width: int, height: int, block_ms: float, forwards: int) -> None:
        with self._lock:
            self._ms.setdefault((width, height), collections.deque(maxlen=self._keep)).append(block_ms / forwards)

    def block_ms(self, width: int, height: int, forwards: int) -> float | None:
        """A steady block of `forwards` DiT forwards at this size, or None: not measured here."""
        with self._lock:
            ms = self._ms.get((width, height))
            return statistics.median(ms) * forwards if ms else None

    def by_size(self, forwards: int) -> dict[str, float]:
        """{"W*H": ms per block of `forwards` forwards} for every size measured here."""
        with self._lock:
            return {f"{w}*{h}": statistics.median(ms) * forwards for (w, h), ms in self._ms.items() if ms}
