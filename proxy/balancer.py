"""Endpoint choice for one pool: round robin, or least connections, with optional ClientIP affinity.

Used on the hot path, so picking is a few attribute reads and an index bump. The order is
shuffled and the cursor reset only when the endpoint *set* changes (as the userspace proxier
did): a sync that changes nothing leaves every pool's position alone, and the shuffle keeps all
nodes from starting on the same endpoint.

Least connections (``Pool.load`` set) sends a connection to the endpoint with the fewest open
ones, as IPVS's ``lc`` scheduler, counting this process's connections: among up to LEAST_SCAN
endpoints it compares all of them, starting at the cursor so ties go round robin; in larger
pools it compares two, the next in the rotation and one at random (the power of two choices),
which stays O(1) per connection and avoids sending every new connection to one idle endpoint.
Dials in progress count as open (``EndpointTraffic.dialing``), so a burst of accepts does not all
go to the endpoint that was least loaded before it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

from proxy.model import Endpoint
from proxy.outliers import Outliers

_SHARED_RNG = random.Random()
LEAST_SCAN = 8
"""Pools up to this size compare every endpoint's load; larger ones compare two."""


@dataclass(frozen=True, slots=True)
class Rotation:
    """A pool's next endpoints, prepared where the work does not hold up forwarding: hashing and
    shuffling 50,000 endpoints takes ~30 ms, swapping in the result takes none."""

    members: frozenset[Endpoint]
    order: tuple[Endpoint, ...]


def rotation(endpoints: tuple[Endpoint, ...], rng: random.Random | None = None) -> Rotation:
    shuffled = list(endpoints)
    (rng or _SHARED_RNG).shuffle(shuffled)
    return Rotation(frozenset(endpoints), tuple(shuffled))


class Pool:
    """Round robin over a set of endpoints; ``pick`` returns None when there are none."""

    __slots__ = ("_affinity", "_clock", "_cursor", "_rng", "affinity_timeout", "endpoints", "load", "members",
                 "outliers")

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...] = (),
        *,
        affinity_timeout: int = 0,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        outliers: Outliers | None = None,
        prepared: Rotation | None = None,
    ) -> None:
        self._clock = clock
        self.outliers = outliers
        """Shared record of endpoints whose connects failed: skipped while others remain."""
        self._rng = rng or _SHARED_RNG  # one generator is 2.5 KiB: not one per pool
        self._cursor = 0
        self._affinity: dict[str, tuple[Endpoint, float]] = {}
        self.affinity_timeout = affinity_timeout
        self.endpoints: tuple[Endpoint, ...] = ()
        self.members: frozenset[Endpoint] = frozenset()
        """The endpoints as a set: UDP flows check their endpoint is still in the pool."""
        self.load: Callable[[Endpoint], int] | None = None
        """Least connections: an endpoint's open connections (and UDP flows); None: round robin."""
        if prepared is not None:
            self.install(prepared, affinity_timeout)
        else:
            self.update(endpoints, affinity_timeout)

    def update(self, endpoints: tuple[Endpoint, ...], affinity_timeout: int) -> None:
        """Take a new endpoint list; a list with the same members keeps order and cursor."""
        changed = frozenset(endpoints) != self.members
        self.install(rotation(endpoints, self._rng) if changed else None, affinity_timeout)

    def install(self, prepared: Rotation | None, affinity_timeout: int) -> None:
        """Take endpoints prepared by :func:`rotation`; None keeps the members, order and cursor."""
        if affinity_timeout != self.affinity_timeout:
            self.affinity_timeout = affinity_timeout
            self._affinity.clear()
        if prepared is None:
            return
        members = prepared.members
        self.endpoints = prepared.order
        self.members = members
        self._cursor = 0
        self._affinity = {ip: v for ip, v in self._affinity.items() if v[0] in members}

    def pick(self, client_ip: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """The next endpoint for a connection from ``client_ip``.

        ``exclude`` holds endpoints that already failed for this connection; they are skipped
        while others remain. Affinity is bypassed once anything failed (``exclude`` non-empty),
        like the userspace proxier's sessionAffinityReset.
        """
        eps = self.endpoints
        if not eps:
            return None
        if self.affinity_timeout and client_ip is not None:
            now = self._clock()
            entry = self._affinity.get(client_ip)
            if not exclude and entry is not None and now - entry[1] < self.affinity_timeout and not (
                    self.outliers is not None and self.outliers.ejections and self.outliers.ejected(entry[0])):
                self._affinity[client_ip] = (entry[0], now)  # sliding window
                return entry[0]
            # A failover re-pins the client to the endpoint it is now sent to.
            ep = self._next(exclude)
            self._affinity[client_ip] = (ep, now)
            return ep
        return self._next(exclude)

    def _next(self, exclude: Collection[Endpoint]) -> Endpoint:
        if self.load is not None:
            least = self._least(exclude)
            if least is not None:
                return least
        eps = self.endpoints
        n = len(eps)
        outliers = self.outliers
        if outliers is not None and outliers.ejections:  # else the plain loop below, as cheap as ever
            for _ in range(n):
                ep = eps[self._cursor % n]
                self._cursor = (self._cursor + 1) % n
                if ep not in exclude and not outliers.ejected(ep):
                    return ep
            # Everything left is ejected: never eject the last endpoint, use them anyway.
        for _ in range(n):
            ep = eps[self._cursor % n]
            self._cursor = (self._cursor + 1) % n
            if ep not in exclude:
                return ep
        # Every endpoint failed already: start over rather than give up early.
        ep = eps[self._cursor % n]
        self._cursor = (self._cursor + 1) % n
        return ep

    def _least(self, exclude: Collection[Endpoint]) -> Endpoint | None:
        """The least loaded of the candidates (see the module's docstring) that did not fail for
        this connection and are not ejected; None if there is none (round robin decides then)."""
        assert self.load is not None
        eps = self.endpoints
        n = len(eps)
        cursor = self._cursor % n
        candidates = range(cursor, cursor + n) if n <= LEAST_SCAN else (cursor, self._rng.randrange(n))
        outliers = self.outliers if self.outliers is not None and self.outliers.ejections else None
        best, best_at, best_load = None, cursor, 0
        for i in candidates:
            ep = eps[i % n]
            if ep in exclude or (outliers is not None and outliers.ejected(ep)):
                continue
            load = self.load(ep)
            if best is None or load < best_load:
                best, best_at, best_load = ep, i, load
        if best is not None:
            self._cursor = (best_at + 1) % n if n <= LEAST_SCAN else (cursor + 1) % n
        return best

    def expire_affinity(self) -> None:
        """Forget client affinities older than the timeout (called at each sync)."""
        if not self._affinity:
            return
        cutoff = self._clock() - self.affinity_timeout
        self._affinity = {ip: v for ip, v in self._affinity.items() if v[1] > cutoff}

    def __repr__(self) -> str:
        return f"<Pool endpoints={len(self.endpoints)} cursor={self._cursor} affinity={len(self._affinity)}>"
