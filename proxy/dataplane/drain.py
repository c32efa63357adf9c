"""Endpoint drain: connections to an endpoint that left its pool are closed after a deadline.

kube-proxy leaves established connections alone when an endpoint goes away or starts
terminating (conntrack keeps them until they end or the pod is gone). svcproxy does the same by
default: new connections stop going to the endpoint at once, open ones run on. With
``--endpoint-drain-timeout`` they may run for that long, then both legs are reset and counted
(``svcproxy_endpoint_drained_connections_total``): a terminating pod's long-lived connections
(a database session, a websocket) move to a live endpoint within a known time instead of
whenever the pod dies.

An endpoint counts as gone when its address and port are no longer a non-terminating member of
the connection's pool: deleted, not ready any more, or terminating (a pool that falls back to
terminating endpoints still drains them; they are on their way out). A Service removed outright
empties its pools (``retire``), so its connections drain too. An endpoint that comes back
before the deadline keeps its connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.balancer import Pool
from proxy.dataplane.connections import Connection, Connections

Address = tuple[str, int]


def serving(pool: Pool) -> frozenset[Address]:
    return frozenset((ep.ip, ep.port) for ep in pool.endpoints if not ep.terminating)


class EndpointDrain:
    def __init__(self, connections: Connections, timeout: float, *, loop: asyncio.AbstractEventLoop,
                 on_drained: Callable[[int], None]) -> None:
        self._connections = connections
        self.timeout = timeout
        self._loop = loop
        self._on_drained = on_drained
        self._deadlines: dict[Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def check(self) -> None:
        """After a sync: give each connection whose endpoint left a deadline, and take it back from
        those whose endpoint returned. O(live connections); nothing when the timeout is off."""
        if self.timeout <= 0:
            return
        now = self._loop.time()
        members: dict[int, frozenset[Address]] = {}
        for conn in self._connections.live:
            ep = conn.endpoint
            if ep is None:
                continue  # still dialling: its pick already skipped the endpoint
            alive = False
            for pool in conn.pools():
                known = members.get(id(pool))
                if known is None:
                    known = members[id(pool)] = serving(pool)
                if (ep.ip, ep.port) in known:
                    alive = True
                    break
            if not alive:
                self._deadlines.setdefault(conn, now + self.timeout)
            else:
                self._deadlines.pop(conn, None)
        self._forget_closed()
        self._schedule()

    def _forget_closed(self) -> None:
        live = self._connections.live
        for conn in [c for c in self._deadlines if c not in live]:
            del self._deadlines[conn]

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._deadlines:
            self._timer = self._loop.call_at(min(self._deadlines.values()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._forget_closed()
        now = self._loop.time()
        due = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
        for conn in due:
            del self._deadlines[conn]
            conn.reset()
        if due:
            self._on_drained(len(due))
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()


def retire(pool: Pool) -> None:
    """A pool no listener uses any more (its Service went away): empty, so its connections drain."""
    pool.update((), pool.affinity_timeout)
