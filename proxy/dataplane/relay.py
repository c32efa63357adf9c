"""TCP forwarding on bare non-blocking sockets and one edge-triggered epoll (``--forwarding sockets``).

uvloop's transports make every connection pay for what a proxy does not use: a transport per socket
(its names looked up, a read buffer allocated per chunk), a Future and a Task per dial, and epoll
changes whenever reading pauses. Here each socket is registered once, for input and output and
edge-triggered, in an epoll of the forwarder's own that the loop watches as one reader; closing the
socket takes it out again. The byte path is ``recv_into`` one shared buffer and ``send``: nothing is
allocated unless a send falls short. The dial is callbacks, not a Task.

Edge-triggered means an event says "something changed", once. A read that fills the buffer may have
left more behind, so the pump reads again; a short read emptied the socket of bytes, and new bytes
bring a new event. A FIN that came with the last bytes brings none of its own: the event said so
(EPOLLRDHUP), and then the pump reads on to the end. Input that arrives while a direction is paused
is read when it resumes.

The guarantees are ``tcp.py``'s: connect retries on the dial-timeout ladder, half-close (EOF one way
becomes a shutdown of the other socket's write side), bounded buffering (at most one chunk per
direction besides the kernel's buffers: a short send pauses reading the other side until the rest is
out), a reset on one side passed on as a reset, the limits and drain through ``Connections``.

With ``splice=True`` (``--forwarding splice``) a direction that fills a whole chunk (a bulk
transfer) moves on to splice(2) through a pipe of its own, so its bytes no longer cross into
userspace; request/response traffic never fills a chunk and never pays for the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections.abc import Callable

from proxy.balancer import Pool
from proxy.dataplane import proxyproto, tproxy
from proxy.dataplane.connections import (
    ERROR_REASONS,
    LINGER_RESET,
    LOCAL_ERRNOS,
    Connections,
    set_keepalive,
)
from proxy.dataplane.target import Target
from proxy.dataplane.traffic import EndpointTraffic, ServiceTraffic
from proxy.model import Endpoint

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024
"""Bytes moved per read (uvloop's transports read as much); also the size of a splice pipe."""
_BUF = bytearray(CHUNK)
_VIEW = memoryview(_BUF)
"""One buffer for every read: a chunk is sent on at once, and only a short send's rest is copied."""
_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
_ENDING = _TROUBLE | select.EPOLLRDHUP
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_AGAIN = (BlockingIOError, InterruptedError)
_ACCEPT_PAUSE = 0.1
"""Seconds a listener stops accepting after running out of descriptors (the error would repeat)."""


class _Leg:
    """One socket of a relayed connection. ``peer`` is where its bytes go."""

    __slots__ = ("ending", "eof", "fd", "nbytes", "out", "peer", "pipe", "piped", "relay", "sock", "tick")

    def __init__(self, relay: Relay, sock: socket.socket, tick: int) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.tick = tick
        """The dispatch round it was registered in: events of that round predate it."""
        self.peer: _Leg | None = None
        self.eof = False
        """Its input has ended (read a FIN)."""
        self.ending = False
        """An event said its input ends (or failed): a short read is not the last read then."""
        self.out: bytes | memoryview = b""
        """Bytes on their way to this socket that it did not take yet."""
        self.pipe: tuple[int, int] | None = None
        """Splice mode: the pipe carrying bytes from this socket to its peer."""
        self.piped = 0
        """Bytes in that pipe not yet written to the peer."""
        self.nbytes = 0
        """Bytes received from this socket."""

    def handle(self, events: int) -> None:
        if events & _ENDING:
            self.ending = True
        relay = self.relay
        if relay.dialing is self:
            relay.dial_event(self, events)
        elif self.peer is None:  # the client while its backend is dialled: only a loss matters now
            if events & _TROUBLE:
                relay.lost(self, _error(self.sock))
        else:
            if events & _OUT and (self.out or self.peer.piped):
                self.flush()
            if events & (_IN | _TROUBLE) and self.relay is not None:
                self.pump()

    def pump(self) -> None:
        """Move what this socket has to its peer until one of them would block."""
        dst = self.peer
        relay = self.relay
        while dst is not None and not self.eof and not dst.out and not self.piped:
            if self.pipe is not None:
                if not self._splice(dst):
                    return
                continue
            try:
                n = self.sock.recv_into(_BUF)
            except _AGAIN:
                return
            except OSError as e:
                relay.lost(self, e)
                return
            if not n:
                relay.ended(self)
                return
            self.nbytes += n
            relay.active = True
            try:
                sent = dst.sock.send(_VIEW[:n])
            except _AGAIN:
                sent = 0
            except OSError as e:
                relay.lost(dst, e)
                return
            if sent < n:
                dst.out = bytes(_VIEW[sent:n])  # the peer's output edge will flush it and resume us
                return
            if n < CHUNK and not self.ending:
                return  # a short read emptied the socket
            if relay.splice:
                with contextlib.suppress(OSError):  # out of descriptors: go on copying
                    self.pipe = _pipe()

    def _splice(self, dst: _Leg) -> bool:
        """One chunk from this socket through its pipe to ``dst``; False once either would block."""
        assert self.pipe is not None
        relay = self.relay
        try:
            n = os.splice(self.fd, self.pipe[1], CHUNK, flags=_SPLICE)
        except _AGAIN:
            return False
        except OSError as e:
            relay.lost(self, e)
            return False
        if not n:
            relay.ended(self)
            return False
        self.nbytes += n
        self.piped = n
        relay.active = True
        # On until the socket says EAGAIN: a short splice proves nothing, as the pipe also fills
        # up by its count of buffers (one per fragment), with bytes still queued behind.
        return self._drain_pipe(dst)

    def _drain_pipe(self, dst: _Leg) -> bool:
        """Write this socket's piped bytes to ``dst``; False if some are left (``dst`` is full)."""
        assert self.pipe is not None
        while self.piped:
            try:
                self.piped -= os.splice(self.pipe[0], dst.fd, self.piped, flags=_SPLICE)
            except _AGAIN:
                return False
            except OSError as e:
                self.relay.lost(dst, e)
                return False
        return True

    def flush(self) -> None:
        """This socket can take more: write what waits for it, then let its peer go on."""
        src = self.peer
        assert src is not None
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except _AGAIN:
                return
            except OSError as e:
                self.relay.lost(self, e)
                return
            if sent < len(self.out):
                self.out = memoryview(self.out)[sent:]
                return
            self.out = b""
        elif not src._drain_pipe(self):
            return
        relay = self.relay
        if relay is None:  # lost while writing the pipe
            return
        if relay.closing:
            relay.finish()
        elif src.eof:
            relay.ended(src)
        else:
            src.pump()

    def close(self, reset: bool = False) -> None:
        sock = self.sock
        if sock.fileno() < 0:
            return  # closed already: its descriptor may be another socket's by now
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.relay.forwarder.legs.pop(self.fd, None)
        sock.close()  # which also takes it out of the epoll
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)  # 64 KiB by default; at most 1 MiB (pipe-max-size)
    except OSError:
        os.close(r)
        os.close(w)
        raise
    return r, w


def _error(sock: socket.socket) -> OSError:
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return OSError(code, os.strerror(code)) if code else ConnectionResetError(errno.ECONNRESET, "connection lost")


class Relay:
    """A proxied connection: the accepted client, the dial, then bytes pumped both ways."""

    __slots__ = ("accepted", "active", "backend", "client", "client_ip", "closing", "dialing",
                 "endpoint", "endpoint_traffic", "failed", "forwarder", "kept", "peer", "pool", "quiet", "splice",
                 "step", "target", "timed_out", "timer", "traffic", "trying", "trying_counts")

    def __init__(self, forwarder: SocketForwarder, target: Target, sock: socket.socket) -> None:
        self.forwarder = forwarder
        self.target = target
        self.client = _Leg(self, sock, forwarder.tick)
        self.backend: _Leg | None = None
        self.dialing: _Leg | None = None
        """The backend socket being connected."""
        self.timer: asyncio.TimerHandle | None = None
        self.endpoint: Endpoint | None = None
        """Where it went, once connected."""
        self.trying: Endpoint | None = None
        self.trying_counts: EndpointTraffic | None = None
        """For a least-connections pool: the endpoint's counts, whose ``dialing`` includes this dial."""
        """The endpoint being dialled."""
        self.traffic: ServiceTraffic | None = None
        self.endpoint_traffic: EndpointTraffic | None = None
        self.active = True
        self.quiet = 0.0
        self.accepted = 0.0
        self.closing = False
        """finish() was asked while bytes were still on their way: close once they are out."""
        self.splice = forwarder.splice
        self.client_ip: str | None = None
        """The client's address where a policy needs it to pick the endpoint (affinity, eTP Local)."""
        self.peer: tuple[str, int] = ("", 0)
        """The client's address and port, from accept (for --transparent and PROXY protocol headers)."""
        self.kept = False
        """The dial left from the client's address."""
        self.pool: Pool = target.pool
        self.failed: list[Endpoint] = []
        self.step = 0
        self.timed_out = False

    # -- what Connections and the views read --------------------------------------------------

    @property
    def service(self) -> str:
        return self.target.name

    @property
    def half_closed(self) -> bool:
        return self.client.eof or (self.backend is not None and self.backend.eof)

    @property
    def moved(self) -> tuple[int, int]:
        return self.client.nbytes, self.backend.nbytes if self.backend is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes the proxy holds that neither socket has taken yet (in userspace or its pipes)."""
        return sum(len(leg.out) + leg.piped for leg in (self.client, self.backend) if leg is not None)

    def sockets(self) -> list[socket.socket]:
        return [leg.sock for leg in (self.client, self.backend) if leg is not None and leg.sock.fileno() >= 0]

    def pools(self) -> tuple[Pool, ...]:
        target = self.target
        return (target.pool,) if target.local_traffic_pool is None else (target.pool, target.local_traffic_pool)

    # -- accept and dial -----------------------------------------------------------------------

    def start(self, addr: tuple[str, int]) -> None:
        target, client = self.target, self.client
        client_ip = addr[0]
        self.peer = addr
        if target.needs_client_ip:
            self.client_ip = client_ip
            self.pool = target.pool_for(client_ip)
            if not target.admits(client_ip):  # outside loadBalancerSourceRanges
                self._turn_away("source_ranges")
                return
        if not self.pool.endpoints:  # e.g. eTP Local with no local endpoint
            self._turn_away("no_endpoints")
            return
        registry = self.forwarder.connections
        if not registry.admit(self):  # over a limit: counted there
            self._turn_away("")
            return
        self.traffic = traffic = target.traffic
        traffic.opened += 1
        traffic.active += 1
        self.accepted = time.perf_counter()
        fw = self.forwarder
        fw.legs[client.fd] = client
        fw.epoll.register(client.fd, _WATCH)
        self.dial()

    def _turn_away(self, reason: str) -> None:
        if reason:
            self.target.traffic.refuse(reason)
        client = self.client
        client.close(reset=True)
        client.relay = None  # type: ignore[assignment]  # untied: freed at once

    def dial(self) -> None:
        """Connect to the next endpoint (see tcp.Client._connect for the ladder's rules)."""
        fw, pool, traffic = self.forwarder, self.pool, self.traffic
        assert traffic is not None
        ladder = fw.connections.limits.dial_timeouts
        failed = self.failed
        while self.step < len(ladder):
            timeout = ladder[self.step]
            ep = pool.pick(self.client_ip, failed)
            if ep is None:
                break
            if failed:
                traffic.retries += 1
            if ep in failed:
                if not self.timed_out:
                    break  # every endpoint refused: none is listening
                self.step += 1
            self.kept = fw.transparent and self.target.keeps_client_address(self.peer[0], ep.ip)
            try:
                # The client's port on the first dial only: a retry from it would reuse the four-tuple
                # the endpoint may still hold half-open from the dial that timed out.
                keep_port = self.kept and not failed
                sock, code = self._connect(ep, self.peer[1] if keep_port else 0)
                if code == errno.EADDRNOTAVAIL and keep_port:
                    # The client's port is taken toward this endpoint (another of its connections
                    # through another Service, or a TIME_WAIT): let the kernel pick one.
                    sock.close()
                    sock, code = self._connect(ep, 0)
            except OSError as e:
                self._short_of(ep, e)
                return
            if code in (0, errno.EINPROGRESS):
                leg = _Leg(self, sock, fw.tick)
                fw.legs[leg.fd] = leg
                fw.epoll.register(leg.fd, _WATCH)
                self.trying = ep
                if pool.load is not None:
                    self.trying_counts = counts = traffic.endpoint(ep)
                    counts.dialing += 1
                if code == 0:  # loopback may connect at once
                    self._attach(leg, 0)
                else:
                    self.dialing = leg
                    self.timer = fw.loop.call_later(timeout, self._dial_timeout, leg)
                return
            sock.close()
            if code in LOCAL_ERRNOS:
                self._short_of(ep, OSError(code, os.strerror(code)))
                return
            self._failed(ep, ERROR_REASONS.get(code, "other"), os.strerror(code))
        client = self.client
        logger.info("%s: no endpoint accepted the connection from %s (%d dials to %d endpoints)",
                    self.target.name, self.client_ip or _peer(client.sock), len(failed), len(set(failed)))
        traffic.refuse("endpoints_failed")
        client.close()
        self._done()

    def _connect(self, ep: Endpoint, port: int) -> tuple[socket.socket, int]:
        """A new socket, connecting to ``ep``; with --transparent (``self.kept``) from the client's
        address and, if ``port``, that port. The connect's error code, 0 or EINPROGRESS; an OSError
        is raised only if the socket cannot be made (descriptors)."""
        fw = self.forwarder
        family = socket.AF_INET6 if ":" in ep.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if fw.keepalive:
                set_keepalive(sock, fw.keepalive)
            if self.kept:
                tproxy.bind_transparent(sock, self.peer[0], port)
            return sock, sock.connect_ex((ep.ip, ep.port))
        except OSError as e:
            return sock, e.errno or errno.EIO

    def _short_of(self, ep: Endpoint, e: OSError) -> None:
        """Our own shortage (descriptors, memory, ports), not the endpoint's: others would fail the same."""
        logger.warning("%s: cannot dial %s:%d: %s (this process or node is out of a resource)",
                       self.target.name, ep.ip, ep.port, e.strerror)
        assert self.traffic is not None
        self.traffic.refuse("local_resource")
        self.client.close(reset=True)
        self._done()

    def _failed(self, ep: Endpoint, reason: str, detail: str) -> None:
        logger.debug("%s: dial %s:%d failed: %s", self.target.name, ep.ip, ep.port, detail)
        assert self.traffic is not None
        self.traffic.connect_failed(ep, reason)
        self.failed.append(ep)
        if self.pool.outliers is not None:
            self.pool.outliers.failed(ep)
        self.trying = None

    def dial_event(self, leg: _Leg, events: int) -> None:
        ep = self.trying
        assert ep is not None
        if events & _TROUBLE:
            error = _error(leg.sock)
            self._stop_dial(leg)
            self._failed(ep, ERROR_REASONS.get(error.errno or 0, "other"), str(error))
            self.dial()
        elif events & _OUT:
            self._attach(leg, events)

    def _dial_timeout(self, leg: _Leg) -> None:
        self.timer = None
        if self.dialing is leg and self.trying is not None:
            ep = self.trying
            logger.debug("%s: dial %s:%d timed out", self.target.name, ep.ip, ep.port)
            self._stop_dial(leg)
            self._failed(ep, "timeout", "timed out")
            self.step += 1
            self.timed_out = True
            self.dial()

    def _dial_over(self) -> None:
        if self.trying_counts is not None:
            self.trying_counts.dialing -= 1
            self.trying_counts = None

    def _stop_dial(self, leg: _Leg) -> None:
        self._dial_over()
        self.dialing = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        leg.close()

    def _attach(self, backend: _Leg, events: int) -> None:
        if self.trying_counts is not None:
            self._dial_over()
        self.dialing = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ep = self.endpoint = self.trying
        assert ep is not None and self.traffic is not None
        pool = self.pool
        if pool.outliers is not None and pool.outliers.ejections:
            pool.outliers.succeeded(ep)
        self.endpoint_traffic = self.traffic.connected(ep, time.perf_counter() - self.accepted)
        if self.kept:
            self.traffic.transparent += 1
        client = self.client
        self.backend = backend
        client.peer, backend.peer = backend, client
        if self.target.proxy_protocol and not self._introduce(backend):
            return
        client.pump()  # what the client sent while we dialled (its events were not acted on)
        if events & _IN and self.backend is not None:  # a server that speaks first
            backend.pump()

    def _introduce(self, backend: _Leg) -> bool:
        """Send the PROXY protocol header, the endpoint's first bytes; False if that failed."""
        try:
            data = proxyproto.header(self.target.proxy_protocol, self.peer[:2],
                                     self.client.sock.getsockname()[:2])
            sent = backend.sock.send(data)
        except _AGAIN:
            sent = 0
        except OSError as e:
            self.lost(backend, e)
            return False
        if sent < len(data):
            backend.out = data[sent:]  # the client's bytes wait until it is out
        return True

    # -- ending -------------------------------------------------------------------------------

    def ended(self, src: _Leg) -> None:
        """``src`` has sent its FIN (and everything before it is out): pass the end on."""
        src.eof = True
        dst = src.peer
        assert dst is not None
        if dst.out or src.piped:
            return  # flush() comes back here when the rest is out
        if dst.eof and not src.out and not dst.piped:
            self._close(False)  # both directions are over
            return
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.lost(dst, e)

    def lost(self, leg: _Leg, exc: OSError) -> None:
        """A socket failed (reset, or a send to a closed peer): reset the other side too, so its end
        does not take cut data for a clean end."""
        if self.dialing is not None:
            self._stop_dial(self.dialing)
        logger.debug("%s: %s side lost (%r): resetting the other side", self.target.name,
                     "client" if leg is self.client else "backend", exc)
        other = leg.peer
        leg.close()
        if other is not None:
            other.close(reset=True)
        elif leg is not self.client:
            self.client.close(reset=True)
        self._done()

    def finish(self) -> None:
        """Close both legs cleanly; bytes still on their way go out first."""
        if self.dialing is not None:
            self._stop_dial(self.dialing)
        if self.buffered:
            self.closing = True
            return
        self._close(False)

    def abort(self) -> None:
        self._close(False)

    def reset(self) -> None:
        self._close(True)

    def _close(self, reset: bool) -> None:
        if self.dialing is not None:
            self._stop_dial(self.dialing)
        for leg in (self.client, self.backend):
            if leg is not None and leg.relay is not None:
                leg.close(reset)
        self._done()

    def _done(self) -> None:
        """Unregister and untie (so reference counting frees it, with no wait for the collector)."""
        traffic = self.traffic
        if traffic is None and self.client.relay is None:
            return
        self.forwarder.connections.discard(self)
        if self.trying_counts is not None:  # a dial still counted (a leak would skew the balance)
            self._dial_over()
        client, backend = self.client, self.backend
        if traffic is not None:
            self.traffic = None
            out = backend.nbytes if backend is not None else 0
            traffic.ended(client.nbytes, out)
            if self.endpoint_traffic is not None:
                self.endpoint_traffic.ended(client.nbytes, out)
        for leg in (client, backend):
            if leg is not None:
                leg.peer = None
                leg.relay = None  # type: ignore[assignment]  # closed: no event reaches it again


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


class SocketForwarder:
    """The forwarding mode of this module (``--forwarding sockets``, or ``splice``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: Connections, *, splice: bool = False,
                 accept_batch: int = 32) -> None:
        self.loop = loop
        self.connections = connections
        self.splice = splice
        self.keepalive = connections.limits.keepalive
        self.transparent = connections.limits.transparent
        self._accept_batch = accept_batch
        """Connections taken per wake-up; 1 when worker processes share the listeners, so each takes
        its share."""
        self.epoll = select.epoll()
        self.legs: dict[int, _Leg] = {}
        self.tick = 0
        self._watching = False

    async def serve(self, sock: socket.socket, target: Target) -> Callable[[], None]:
        fd = sock.fileno()
        sock.setblocking(False)
        # Accepted sockets inherit these: set once here rather than on every connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.keepalive:
            set_keepalive(sock, self.keepalive)
        if not self._watching:
            self.loop.add_reader(self.epoll.fileno(), self._dispatch)
            self._watching = True
        self.loop.add_reader(fd, self._accept, sock, target)

        def stop() -> None:
            self.loop.remove_reader(fd)
            sock.close()
        return stop

    def _accept(self, lsock: socket.socket, target: Target) -> None:
        for _ in range(self._accept_batch):
            try:
                sock, addr = lsock.accept()
            except _AGAIN:
                return
            except OSError as e:
                if e.errno in LOCAL_ERRNOS:
                    logger.warning("%s: cannot accept: %s (this process or node is out of a resource)",
                                   target.name, e.strerror)
                    self._pause(lsock, target)
                return  # e.g. ECONNABORTED: the client left before it was accepted
            try:
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            Relay(self, target, sock).start(addr)

    def _pause(self, lsock: socket.socket, target: Target) -> None:
        fd = lsock.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if lsock.fileno() == fd:  # not closed meanwhile
                self.loop.add_reader(fd, self._accept, lsock, target)
        self.loop.call_later(_ACCEPT_PAUSE, resume)

    def _dispatch(self) -> None:
        self.tick = tick = self.tick + 1
        legs = self.legs
        for fd, events in self.epoll.poll(0):
            leg = legs.get(fd)
            if leg is not None and leg.tick != tick:
                try:
                    leg.handle(events)
                except Exception:  # a bug must cost one connection, not the rest of this round's events
                    relay = leg.relay
                    logger.exception("forwarding failed; resetting the connection")
                    if relay is not None:
                        relay.reset()

    def close(self) -> None:
        if self._watching:
            self.loop.remove_reader(self.epoll.fileno())
            self._watching = False
        self.epoll.close()
