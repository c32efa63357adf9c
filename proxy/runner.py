"""A bounded-frequency runner for syncs (kube-proxy's BoundedFrequencyRunner, in asyncio).

Guarantees:
1. a requested run starts no sooner than ``min_interval`` after the previous one began;
2. runs happen at least every ``max_interval`` even when nobody asks (periodic resync);
3. a run that raises is retried after ``retry_interval`` (or sooner if asked again);
4. requests made while a run is in progress coalesce into one follow-up run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class Runner:
    def __init__(
        self,
        fn: Callable[[], Awaitable[None]],
        *,
        min_interval: float,
        max_interval: float,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or max_interval <= 0 or max_interval < min_interval:
            raise ValueError(f"invalid intervals: min {min_interval}, max {max_interval}")
        self._fn = fn
        self._min = min_interval
        self._max = max_interval
        self._retry = retry_interval
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_start: float | None = None

    def request(self) -> None:
        """Ask for a run; cheap and safe to call from any callback on the loop."""
        self._wake.set()

    async def loop(self) -> None:
        """Run until cancelled."""
        delay = 0.0
        while True:
            # A timeout means the periodic run (or a retry) is due.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay or self._max)
            if self._last_start is not None:
                wait = self._last_start + self._min - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._wake.clear()
            self._last_start = self._clock()
            try:
                await self._fn()
                delay = 0.0
            except Exception:
                logger.exception("sync failed; retrying in %.1fs", self._retry)
                delay = self._retry
