"""Keep Python's full garbage collections short, so that they never stop forwarding for long.

A full collection walks every object the collector tracks, holding the GIL: at 10,000 Services
with 100,000 endpoints that is about 400,000 objects and 250 ms on these machines, and a relist
that replaces them triggered it again and again (benchmarks/stall.py: 18 stalls over 50 ms in
three relists, every one a full collection that found almost nothing to free).

So a full collection that took longer than ``SLOW`` freezes what it walked (``gc.freeze()``,
which costs nothing): the next one walks only what was allocated since. Frozen objects are still
freed by reference counting the moment they are dropped; what freezing costs is that a reference
cycle alive at the freeze and dead later is never collected. Hence only after slow collections,
which happen in bursts of control-plane work (start-up, a relist, a large manifest), and never
on a timer: freezing every 200 ms kept every stall under 50 ms too, but leaked 0.33 MiB a
minute in the soak (watch connections and netlink replies alive at a freeze, dropped later).
Connections are untied when they close (``tcp.Client._release``), so none is ever left in a
frozen cycle.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

SLOW = 0.01
"""A full collection longer than this freezes the heap (about 20,000 objects on these machines)."""


class FreezeSlowCollections:
    """A ``gc.callbacks`` entry; :meth:`install` adds it, :meth:`remove` takes it out again."""

    def __init__(self, slow: float = SLOW) -> None:
        self.slow = slow
        self.freezes = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif time.perf_counter() - self._started > self.slow:
            # Called after the collection has finished its lists: freezing here is as after it.
            gc.freeze()
            self.freezes += 1

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
