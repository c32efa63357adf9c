"""A watchdog on the data loop: how late its timers run, which is how long forwarding stood still.

Every ``interval`` a timer is due; the delay between when it was due and when it ran is the time
the loop (or the GIL it needs) was held by something else. Each delay is observed into a histogram
(``svcproxy_loop_lag_seconds``); a delay over ``warn_after`` is logged, at most once a minute.
Envoy's watchdog ("miss", "mega miss") is the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class LoopWatchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, observe: Callable[[float], None], *,
                 interval: float = 0.05, warn_after: float = 0.25, warn_every: float = 60.0) -> None:
        self._loop = loop
        self._observe = observe
        self._interval = interval
        self._warn_after = warn_after
        self._warn_every = warn_every
        self._warned_at = -warn_every
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.worst = 0.0
        """The longest delay seen, in seconds."""

    def start(self) -> None:
        self._due = self._loop.time() + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self._observe(lag)
        self.worst = max(self.worst, lag)
        if lag >= self._warn_after and now - self._warned_at >= self._warn_every:
            self._warned_at = now
            logger.warning("the data plane stood still for %.0f ms (new connections and data waited)", lag * 1000)
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
