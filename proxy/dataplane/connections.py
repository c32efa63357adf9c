"""The seam between listeners and the ways of forwarding a TCP connection.

A forwarding mode (uvloop transports on both legs, ``tcp.py``; bare sockets on an epoll of its own,
optionally splicing, ``relay.py``) provides a
:class:`Forwarder`, which serves a bound listening socket, and registers each connection it
forwards in :class:`Connections`: the limits, the idle and half-closed sweeps, endpoint drain,
the traffic metrics, the routing table and the shutdown drain all work on what a
:class:`Connection` exposes, whatever moves its bytes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Protocol

from proxy.balancer import Pool
from proxy.dataplane.target import Target
from proxy.dataplane.traffic import EndpointTraffic, ServiceTraffic
from proxy.model import Endpoint

logger = logging.getLogger(__name__)

DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
"""Dial errors that are this node's shortage (descriptors, memory, ephemeral ports), not the endpoint's."""
ERROR_REASONS = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout", errno.ECONNRESET: "reset",
                 errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable"}
"""How a failed dial is counted (``svcproxy_endpoint_connect_errors_total``); anything else is "other"."""
LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends a RST, even when nothing is unread (a plain close sends a FIN)."""
MODES = ("sockets", "splice", "transports")
"""The forwarding modes (``--forwarding``): relay.py's sockets (the default), relay.py with
splice(2) for bulk transfers, and tcp.py's uvloop transports."""


def set_keepalive(sock: socket.socket, idle: float) -> None:
    """Probe after ``idle`` quiet seconds, then every idle/3, and give up after 3 misses (so a
    dead peer is noticed within about twice ``idle``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(idle / 3)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class Connection(Protocol):
    """A proxied TCP connection, as the registry and everything around forwarding see it."""

    target: Target
    endpoint: Endpoint | None
    """Where it went, once dialled."""
    traffic: ServiceTraffic | None
    """Its service port's counts, once admitted."""
    endpoint_traffic: EndpointTraffic | None
    active: bool
    """Set by every chunk either way; cleared by the registry's sweep."""
    quiet: float
    """Seconds the sweeps have seen no byte move."""

    @property
    def service(self) -> str: ...

    @property
    def half_closed(self) -> bool:
        """One direction has ended."""

    @property
    def moved(self) -> tuple[int, int]:
        """Bytes received so far from the client and from the endpoint."""

    @property
    def buffered(self) -> int:
        """Bytes the proxy holds for either socket that it has not taken yet."""

    def finish(self) -> None:
        """Close both legs cleanly (buffered bytes still go out)."""

    def abort(self) -> None: ...

    def reset(self) -> None:
        """Cut both legs with a reset."""

    def pools(self) -> tuple[Pool, ...]:
        """The pools its endpoint may belong to."""

    def sockets(self) -> list[socket.socket]:
        """Its open sockets, the client's first (to inspect their options)."""


class Forwarder(Protocol):
    """A forwarding mode: serves listening sockets, registering its connections in ``connections``."""

    connections: Connections

    async def serve(self, sock: socket.socket, target: Target) -> Callable[[], None]:
        """Start accepting on ``sock`` (bound and listening); returns what stops it."""

    def close(self) -> None:
        """Release what the mode holds of its own (its listeners are stopped one by one)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_connections: int = 0
    """Proxied TCP connections in total; 0 = no limit."""
    max_connections_per_service: int = 0
    """Per service port; 0 = no limit."""
    idle_timeout: float = 0.0
    """Close a connection with no byte either way for this long; 0 = never (kube-proxy has none)."""
    half_closed_timeout: float = 3600.0
    """Close a connection one side has ended when no byte has moved for this long; 0 = never."""
    dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS  # the same ladder as Settings.dial_timeouts
    """The connect-timeout ladder: each timed-out dial moves to the next, longer one."""
    keepalive: float = 0.0
    """TCP keepalive on both legs: first probe after this many idle seconds; 0 = off."""
    transparent: bool = False
    """Dial from the client's own address where kube-proxy would keep it (tproxy.py)."""

    @property
    def sweep_interval(self) -> float:
        """How often live connections are checked: a tenth of the shortest timeout, 0.1-10 s."""
        timeouts = [t for t in (self.idle_timeout, self.half_closed_timeout) if t > 0]
        return min(10.0, max(0.1, min(timeouts) / 10)) if timeouts else 0.0


class Connections:
    """Live connections: counted against the limits, swept for timeouts, drained at shutdown."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.live: set[Connection] = set()
        self.limits = limits or Limits()
        self.per_service: collections.Counter[str] = collections.Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.TimerHandle | None = None

    def admit(self, conn: Connection) -> bool:
        """Register a new connection, or say no (the caller resets it) when over a limit."""
        lim, name = self.limits, conn.service
        reason = ""
        if lim.max_connections and len(self.live) >= lim.max_connections:
            reason = "max_connections"
        elif lim.max_connections_per_service and self.per_service[name] >= lim.max_connections_per_service:
            reason = "max_connections_per_service"
        if reason:
            conn.target.traffic.refuse(reason)
            return False
        self.live.add(conn)
        if lim.max_connections_per_service:  # counted only when limited: no work per connection otherwise
            self.per_service[name] += 1
        self._idle.clear()
        if self._sweeper is None and lim.sweep_interval:
            self._schedule()
        return True

    def discard(self, conn: Connection) -> None:
        if conn in self.live:
            self.live.discard(conn)
            if self.limits.max_connections_per_service:
                self.per_service[conn.service] -= 1
                if not self.per_service[conn.service]:
                    del self.per_service[conn.service]
        if not self.live:
            self._idle.set()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past a timeout. Each has an ``active`` flag set by every chunk;
        a connection seen inactive on consecutive sweeps has been idle that many intervals."""
        self._sweeper = None
        lim, step = self.limits, self.limits.sweep_interval
        for conn in list(self.live):
            if conn.active:
                conn.active = False
                conn.quiet = 0.0
                continue
            conn.quiet += step
            half_closed = conn.half_closed
            if (lim.idle_timeout and conn.quiet >= lim.idle_timeout) or \
                    (half_closed and lim.half_closed_timeout and conn.quiet >= lim.half_closed_timeout):
                logger.debug("%s: closing a connection quiet for %.0fs%s", conn.service, conn.quiet,
                             " (half-closed)" if half_closed else "")
                conn.finish()  # nothing is in flight: a plain close on both legs
        if self.live:
            self._schedule()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_all(self) -> None:
        for conn in list(self.live):
            conn.abort()
