"""Keep Python's full garbage collections short, so that they never stop forwarding for long.

A full collection walks every object the collector tracks, holding the GIL: at 10,000 Services
with 100,000 endpoints that is about 400,000 objects and 250 ms on these machines, and a relist
that replaces them triggered it again and again (measured with benchmarks/stall.py: 18 stalls
over 50 ms in three relists, every one a full collection that found almost nothing to free).

svcproxy's long-lived state needs no cyclic collection: models and decoded JSON are acyclic, and
a connection is untied when it closes (``tcp.Client._release``). So the heap is frozen
(``gc.freeze()``, which costs nothing) after the initial sync and then every ``interval``: a full
collection walks only what was allocated since the last freeze, and frozen objects are still
freed by reference counting the moment they are dropped. The price: a reference cycle that is
alive at a freeze and dies later is never collected. The soak (benchmarks/soak.py) watches for
exactly that: RSS must stay flat.
"""

from __future__ import annotations

import asyncio
import gc

INTERVAL = 0.2
"""Seconds between freezes: a full collection walks at most this long's allocations (a relist of 10,000
changed slices allocates ~100,000 objects a second; at 1 s, 8 stalls of 60-120 ms remained)."""


class HeapFreezer:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = INTERVAL) -> None:
        self._loop = loop
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        gc.collect()  # walks only what is not frozen yet: what was allocated since the last tick
        gc.freeze()
        self._handle = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
