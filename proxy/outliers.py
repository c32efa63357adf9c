"""Outlier ejection: endpoints whose connects fail are skipped for new connections for a while.

kube-proxy's kernel modes keep sending a share of new connections to a dead pod until its
EndpointSlice changes; svcproxy sees every connect, so it can do better. An endpoint whose dial
fails (refused, timed out, unreachable) is ejected for ``base`` seconds, doubled at each further
failure up to ``cap``; a successful connect forgets it. Pools never eject their last usable
endpoint (see ``Pool.pick``). Pure: the clock is injected; one instance is shared by all pools,
because one endpoint address may serve several pools (policies, families).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.model import Endpoint

logger = logging.getLogger(__name__)


@dataclass
class Ejection:
    failures: int
    until: float


class Outliers:
    def __init__(self, *, clock: Callable[[], float], base: float = 1.0, cap: float = 30.0) -> None:
        self._clock = clock
        self.base = base
        self.cap = cap
        self.ejections: dict[tuple[str, int], Ejection] = {}
        """Endpoints that failed since their last success, by (ip, port)."""
        self.ejections_total = 0

    def ejected(self, ep: Endpoint) -> bool:
        e = self.ejections.get((ep.ip, ep.port))
        return e is not None and e.until > self._clock()

    def failed(self, ep: Endpoint) -> None:
        key = (ep.ip, ep.port)
        e = self.ejections.get(key)
        now = self._clock()
        if e is not None and e.until > now:
            return  # already ejected (dials started before the ejection): no longer a sentence
        failures = 1 if e is None else e.failures + 1
        seconds = min(self.cap, self.base * 2 ** (failures - 1))
        self.ejections[key] = Ejection(failures, now + seconds)
        self.ejections_total += 1
        logger.debug("endpoint %s:%d ejected for %gs after a failed connect (failure %d in a row)",
                    ep.ip, ep.port, seconds, failures)

    def succeeded(self, ep: Endpoint) -> None:
        if self.ejections.pop((ep.ip, ep.port), None) is not None:
            logger.debug("endpoint %s:%d is back: a connect succeeded", ep.ip, ep.port)

    def ejected_now(self) -> list[tuple[str, int, float]]:
        """(ip, port, seconds left) of each endpoint ejected at this moment."""
        now = self._clock()
        return [(ip, port, e.until - now) for (ip, port), e in self.ejections.items() if e.until > now]

    def forget(self, keep: Callable[[tuple[str, int]], bool]) -> None:
        """Drop the state of endpoints no pool has any more (called at sync)."""
        self.ejections = {k: v for k, v in self.ejections.items() if keep(k)}
