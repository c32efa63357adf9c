"""TCP forwarding: one accepted client, one backend connection, bytes pumped both ways.

Built on ``asyncio.Protocol`` callbacks (no streams, no per-chunk coroutines):

* Backpressure: when one side's write buffer passes its high-water mark, reading from the other
  side pauses until it drains, so the proxy holds at most about two buffers per direction.
* Half-close: EOF from one side becomes ``write_eof`` on the other; the connection ends only
  when both directions have ended (or a side resets).
* Connect failure: the next distinct endpoint is tried, with dial timeouts growing after each
  timeout (the userspace proxier's 250 ms, 500 ms, 1 s, 2 s); a refused connect tries the next
  endpoint at once, so several dead endpoints cannot use up the ladder. Then the client is closed.
* Limits (`connections.Limits`): connections in total and per service port beyond the maximum are
  reset at once and counted; an idle timeout (off by default, as kube-proxy) and a bound on
  half-closed connections that went quiet (kube-proxy's conntrack CLOSE_WAIT timeout, 1 h) are
  enforced by one sweep over the live connections, so the byte path only sets a flag.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

from proxy.balancer import Pool
from proxy.dataplane import proxyproto
from proxy.dataplane.connections import ERROR_REASONS, LINGER_RESET, LOCAL_ERRNOS, Connections, set_keepalive
from proxy.dataplane.target import Target
from proxy.dataplane.traffic import EndpointTraffic, ServiceTraffic
from proxy.model import Endpoint

logger = logging.getLogger(__name__)

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


def _reset(t: asyncio.Transport) -> None:
    """Refuse an accepted client with a reset. Linger 0 makes the close a RST even when the client
    has sent nothing yet (an abort alone would send a FIN then)."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    t.abort()


def _keepalive(t: asyncio.Transport, idle: float) -> None:
    sock = t.get_extra_info("socket")
    if sock is not None:
        set_keepalive(sock, idle)


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; ``peer`` is the side its bytes go to."""

    __slots__ = ("conn", "eof", "nbytes", "peer", "spoke", "transport")

    def __init__(self, conn: Client) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.spoke = False
        """Sent anything (a byte or an EOF): a backend that did cannot be swapped for another."""
        self.nbytes = 0
        """Bytes received from this side (the traffic metrics add them up when the connection ends)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.active = self.spoke = True
        self.nbytes += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = self.spoke = True
        peer = self.peer
        if peer is not None and peer.eof:
            self.conn.finish()  # both directions have ended: close, no separate shutdown needed
        elif peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write_eof()
        return True  # keep our write half open until the other direction ends too

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn.side_lost(self, exc)


class Client(_Side):
    """The accepted client socket; owns the connection's lifecycle."""

    __slots__ = ("_dial", "_early", "_loop", "_registry", "_timed_out", "accepted", "active", "backend", "endpoint",
                 "endpoint_traffic", "quiet", "target", "traffic")

    def __init__(self, target: Target, registry: Connections, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(self)
        self.target = target
        self._registry = registry
        self._loop = loop
        self._dial: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._timed_out = False
        self.backend: _Side | None = None
        self.endpoint: Endpoint | None = None
        """The endpoint the connection went to, once dialled (the routing table counts them)."""
        self.active = True
        """Set by every chunk either way; cleared by the registry's sweep."""
        self.quiet = 0.0
        """Seconds the sweeps have seen no byte move."""
        self.accepted = 0.0
        self.traffic: ServiceTraffic | None = None
        """Its service port's counts, once admitted (not for a connection turned away)."""
        self.endpoint_traffic: EndpointTraffic | None = None

    @property
    def service(self) -> str:
        return self.target.name

    @property
    def half_closed(self) -> bool:
        return self.eof or (self.backend is not None and self.backend.eof)

    @property
    def moved(self) -> tuple[int, int]:
        return self.nbytes, self.backend.nbytes if self.backend is not None else 0

    @property
    def buffered(self) -> int:
        return sum(side.transport.get_write_buffer_size() for side in (self, self.backend)
                   if side is not None and side.transport is not None) + sum(map(len, self._early))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = t = cast(asyncio.Transport, transport)
        target = self.target
        pool = target.pool
        client_ip: str | None = None
        if target.needs_client_ip:  # else spare the getpeername call
            peer = t.get_extra_info("peername")
            client_ip = peer[0] if peer else ""
            pool = target.pool_for(client_ip)
            if not target.admits(client_ip):  # outside loadBalancerSourceRanges
                target.traffic.refuse("source_ranges")
                _reset(t)
                return
        if not pool.endpoints:  # e.g. eTP Local with no local endpoint (an empty Service binds nothing)
            target.traffic.refuse("no_endpoints")
            _reset(t)
            return
        if not self._registry.admit(self):
            _reset(t)
            return
        self.traffic = traffic = target.traffic
        traffic.opened += 1
        traffic.active += 1
        self.accepted = time.perf_counter()  # uvloop's loop.time() moves in whole milliseconds
        if self._registry.limits.keepalive:
            _keepalive(t, self._registry.limits.keepalive)
        t.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._dial = self._loop.create_task(self._connect(client_ip, pool, traffic))

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.nbytes += len(data)
        peer = self.peer
        if peer is not None:
            if peer.transport is not None:
                peer.transport.write(data)
            return
        # Still dialling. uvloop starts reading right after connection_made (a pause_reading
        # there does not stick), so keep what came early and stop reading until attached.
        self._early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    async def _connect(self, client_ip: str | None, pool: Pool, traffic: ServiceTraffic) -> None:
        loop = self._loop
        failed: list[Endpoint] = []
        step = 0
        timed_out = False
        ladder = self._registry.limits.dial_timeouts
        while step < len(ladder):
            timeout = ladder[step]
            ep = pool.pick(client_ip, failed)
            if ep is None:
                break
            if failed:
                traffic.retries += 1
            # A refused connect is cheap and says nothing about the others: try each distinct
            # endpoint once at this step of the ladder. Only a timeout, or a second round over
            # endpoints that all failed, moves up the ladder (at most distinct + 4 dials).
            if ep in failed:
                if not timed_out:
                    break  # every endpoint refused: none is listening, asking again will not help
                step += 1
            backend = _Side(self)
            # Wired to the client before the dial: the backend may send (even close) before this
            # coroutine resumes, and those bytes must reach the client.
            backend.peer = self
            # A plain timer rather than asyncio.timeout(): this runs once per connection.
            timer = loop.call_later(timeout, self._dial_timeout, backend)
            # A least-connections pool counts the dial as a connection from now on (balancer.py).
            dialing = traffic.endpoint(ep) if pool.load is not None else None
            if dialing is not None:
                dialing.dialing += 1
            try:
                await loop.create_connection(lambda b=backend: b, ep.ip, ep.port)  # type: ignore[misc]
            except OSError as e:
                if e.errno in LOCAL_ERRNOS:
                    # Our own shortage, not the endpoint's fault: trying others would fail the same.
                    logger.warning("%s: cannot dial %s:%d: %s (this process or node is out of a resource)",
                                   self.target.name, ep.ip, ep.port, e.strerror)
                    traffic.refuse("local_resource")
                    if self.transport is not None:
                        _reset(self.transport)
                    return
                logger.debug("%s: dial %s:%d failed: %r", self.target.name, ep.ip, ep.port, e)
                traffic.connect_failed(ep, ERROR_REASONS.get(e.errno or 0, "other"))
                failed.append(ep)
                if pool.outliers is not None:
                    pool.outliers.failed(ep)
                continue
            except asyncio.CancelledError:
                if not self._timed_out:
                    raise
                self._timed_out = False
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                logger.debug("%s: dial %s:%d timed out after %.2fs", self.target.name, ep.ip, ep.port, timeout)
                traffic.connect_failed(ep, "timeout")
                failed.append(ep)
                if pool.outliers is not None:
                    pool.outliers.failed(ep)
                step += 1
                timed_out = True
                continue
            finally:
                timer.cancel()
                if dialing is not None:
                    dialing.dialing -= 1
            if backend.transport is None and not backend.spoke:
                # Reset before we could use it (a listener closing with us in its accept queue):
                # nothing was sent either way, so another endpoint is as good and safe to try.
                logger.debug("%s: %s:%d reset the connection before it was used", self.target.name, ep.ip,
                             ep.port)
                traffic.connect_failed(ep, "reset")
                failed.append(ep)
                if pool.outliers is not None:
                    pool.outliers.failed(ep)
                continue
            if pool.outliers is not None and pool.outliers.ejections:
                pool.outliers.succeeded(ep)
            self.endpoint = ep
            self.endpoint_traffic = traffic.connected(ep, time.perf_counter() - self.accepted)
            self._attach(backend)
            return
        peer = client_ip
        if peer is None and self.transport is not None:  # not looked up on the fast path
            peer = (self.transport.get_extra_info("peername") or ("?",))[0]
        logger.info("%s: no endpoint accepted the connection from %s (%d dials to %d endpoints)",
                    self.target.name, peer, len(failed), len(set(failed)))
        traffic.refuse("endpoints_failed")
        if self.transport is not None:
            self.transport.close()

    def _dial_timeout(self, backend: _Side) -> None:
        # The connection may be made already, its coroutine not yet resumed (a busy loop): keep it.
        if backend.transport is None and self._dial is not None:
            self._timed_out = True
            self._dial.cancel()

    def _attach(self, backend: _Side) -> None:
        self._dial = None
        client = self.transport
        if client is None:  # client went away while we dialled
            if backend.transport is not None:
                backend.transport.close()
            return
        self.backend = backend
        self.peer = backend
        if backend.transport is None:  # the backend already came and went
            logger.debug("%s: the backend closed before the connection was attached", self.target.name)
            client.close()
            return
        backend.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self._registry.limits.keepalive:
            _keepalive(backend.transport, self._registry.limits.keepalive)
        if self.target.proxy_protocol:
            peer, own = client.get_extra_info("peername"), client.get_extra_info("sockname")
            backend.transport.write(proxyproto.header(self.target.proxy_protocol, peer[:2], own[:2]))
        if self._early:
            backend.transport.writelines(self._early)
            self._early.clear()
        if self.eof and backend.eof:
            self.finish()
        elif self.eof:
            backend.transport.write_eof()
        else:
            client.resume_reading()

    def finish(self) -> None:
        """Both directions ended: close both sockets (buffered bytes are still flushed)."""
        for side in (self, self.backend):
            if side is not None and side.transport is not None:
                side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is not self and side is not self.backend and not side.spoke:
            return  # a dial's connection lost before it was used: _connect tries another endpoint
        other = self.backend if side is self else self
        if other is not None and other.transport is not None:
            # A reset (or any error) on one side is a reset on the other: a plain abort would
            # send a FIN when nothing is unread, and the peer would take cut data for a clean end.
            # A clean close lets the peer flush.
            if exc is None:
                other.transport.close()
            else:
                logger.debug("%s: %s side lost (%r): resetting the %s side", self.target.name,
                             "client" if side is self else "backend", exc, "backend" if side is self else "client")
                _reset(other.transport)
        if side is self and self._dial is not None:
            self._dial.cancel()
        if self.transport is None and (self.backend is None or self.backend.transport is None):
            self._registry.discard(self)
            self._release()

    def _release(self) -> None:
        """Untie a finished connection: the two sides point at each other (and the client at
        itself), and left so every closed connection would wait for the cyclic collector, which
        at scale walks the whole heap. Untied, reference counting frees it at once."""
        backend = self.backend
        traffic = self.traffic
        if traffic is not None:  # counted once, though a late callback may bring us here again
            self.traffic = None
            out = backend.nbytes if backend is not None else 0
            traffic.ended(self.nbytes, out)
            if self.endpoint_traffic is not None:
                self.endpoint_traffic.ended(self.nbytes, out)
        if backend is not None:
            backend.peer = None
            backend.conn = None  # type: ignore[assignment]  # finished: no callback reads it again
        self.peer = self.backend = self._dial = None
        self.conn = None  # type: ignore[assignment]

    def abort(self) -> None:
        for side in (self, self.backend):
            if side is not None and side.transport is not None:
                side.transport.abort()
        if self._dial is not None:
            self._dial.cancel()

    def reset(self) -> None:
        """Cut both legs with a reset: a connection closed for the proxy's reasons must not look
        like one that ended cleanly."""
        for side in (self, self.backend):
            if side is not None and side.transport is not None:
                _reset(side.transport)
        if self._dial is not None:
            self._dial.cancel()

    def sockets(self) -> list[socket.socket]:
        return [side.transport.get_extra_info("socket") for side in (self, self.backend)
                if side is not None and side.transport is not None]

    def pools(self) -> tuple[Pool, ...]:
        """The pools this connection's endpoint may belong to (eTP Local frontends have two)."""
        target = self.target
        return (target.pool,) if target.local_traffic_pool is None else (target.pool, target.local_traffic_pool)


def client_factory(
    target: Target, registry: Connections, loop: asyncio.AbstractEventLoop
) -> Callable[[], Client]:
    return lambda: Client(target, registry, loop)


class TransportForwarder:
    """The forwarding mode of this module: uvloop transports on both legs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: Connections, backlog: int) -> None:
        self._loop = loop
        self.connections = connections
        self._backlog = backlog

    async def serve(self, sock: socket.socket, target: Target) -> Callable[[], None]:
        server = await self._loop.create_server(client_factory(target, self.connections, self._loop), sock=sock,
                                                backlog=self._backlog)
        return server.close

    def close(self) -> None:
        pass  # nothing of its own beyond its servers
