"""UDP forwarding: a flow per client address, each with a connected socket to its endpoint.

The frontend socket is bound to the service address, so replies leave from it (what a DNS
client checks). A flow's socket is a plain non-blocking socket watched with ``add_reader``:
connecting a UDP socket is instant, so no coroutine or task is needed per flow. Datagrams are
read whole (up to 64 KiB, never truncated). A flow ends when idle for ``idle_timeout`` or when
its endpoint leaves the pool: the client's next datagram then goes to a current endpoint
(kube-proxy's stale-conntrack problem does not arise).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from proxy.balancer import Pool
from proxy.dataplane import reuseport, tproxy
from proxy.dataplane.target import Target
from proxy.dataplane.traffic import EndpointTraffic, ServiceTraffic
from proxy.model import Endpoint

logger = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
DEFAULT_IDLE_TIMEOUT = 30.0
Address = tuple[str, int] | tuple[str, int, int, int]
_PORTS_KEPT: set[tuple[str, int, str, int]] = set()
"""(client IP, client port, endpoint IP, endpoint port) of the transparent flows that kept their
client's port, across every frontend of this process."""


class Flow:
    __slots__ = ("bytes_in", "bytes_out", "client", "datagrams_in", "datagrams_out", "endpoint", "endpoint_traffic",
                 "frontend", "last_seen", "pool", "port_kept", "sock", "traffic")

    def __init__(self, frontend: Frontend, client: Address, pool: Pool, endpoint: Endpoint, now: float) -> None:
        self.frontend = frontend
        self.pool = pool
        self.client = client
        self.endpoint = endpoint
        self.last_seen = now
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.port_kept: tuple[str, int, str, int] | None = None
        try:
            self.sock.setblocking(False)
            kept = frontend.transparent and frontend.target.keeps_client_address(client[0], endpoint.ip)
            if kept:
                # The client's port too, unless a flow of it (through another Service) already
                # leaves from that port to this endpoint: the kernel does not keep UDP 4-tuples
                # apart, and the replies of one would reach the other.
                pair = (client[0], client[1], endpoint.ip, endpoint.port)
                if tproxy.bind_transparent(self.sock, client[0], 0 if pair in _PORTS_KEPT else client[1]):
                    _PORTS_KEPT.add(pair)
                    self.port_kept = pair
            self.sock.connect((endpoint.ip, endpoint.port))
        except BaseException:
            self._release()
            self.sock.close()
            raise
        frontend.loop.add_reader(self.sock.fileno(), self._readable)
        # Counted here, added to the service port's and endpoint's counts when the flow ends.
        self.bytes_in = self.bytes_out = self.datagrams_in = self.datagrams_out = 0
        self.traffic: ServiceTraffic = frontend.target.traffic
        self.endpoint_traffic: EndpointTraffic = self.traffic.flow_opened(endpoint)
        if kept:
            self.traffic.transparent += 1

    def _release(self) -> None:
        if self.port_kept is not None:
            _PORTS_KEPT.discard(self.port_kept)
            self.port_kept = None

    def send(self, data: bytes, now: float) -> None:
        self.last_seen = now
        self.datagrams_in += 1
        self.bytes_in += len(data)
        try:
            self.sock.send(data)
        except (BlockingIOError, ConnectionRefusedError):
            pass  # UDP: a full buffer or an ICMP error from an earlier datagram just loses this one
        except OSError as e:
            logger.debug("%s: send to %s:%d failed: %s", self.frontend.target.name, self.endpoint.ip,
                         self.endpoint.port, e)

    def _readable(self) -> None:
        transport = self.frontend.transport
        for _ in range(64):  # bounded, so one busy flow cannot starve the loop
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ECONNREFUSED surfaced from an ICMP error: nothing to relay
            if transport is None:
                return
            self.last_seen = self.frontend.loop.time()
            self.datagrams_out += 1
            self.bytes_out += len(data)
            transport.sendto(data, self.client)

    def close(self) -> None:
        self.frontend.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._release()
        counts = (self.bytes_in, self.bytes_out, self.datagrams_in, self.datagrams_out)
        self.traffic.ended(*counts)
        self.endpoint_traffic.ended(*counts)


class Frontend(asyncio.DatagramProtocol):
    """One UDP service address: receives client datagrams and relays them through flows."""

    def __init__(self, target: Target, loop: asyncio.AbstractEventLoop, idle_timeout: float,
                 transparent: bool = False) -> None:
        self.target = target
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.transparent = transparent
        """Flows leave from their client's address where kube-proxy keeps it (tproxy.py)."""
        self.flows: dict[Address, Flow] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._schedule_sweep()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        now = self.loop.time()
        flow = self.flows.get(addr)
        if flow is not None and flow.endpoint not in flow.pool.members:
            flow.close()  # its endpoint is gone: start over on a current one
            del self.flows[addr]
            flow = None
        if flow is None:
            target = self.target
            if not target.admits(addr[0]):
                target.traffic.refuse("source_ranges")
                return
            pool = target.pool_for(addr[0])
            endpoint = pool.pick(addr[0])
            if endpoint is None:
                target.traffic.refuse("no_endpoints")
                return
            try:
                flow = Flow(self, addr, pool, endpoint, now)
            except OSError as e:
                logger.warning("%s: cannot open a flow to %s:%d: %s", target.name, endpoint.ip, endpoint.port, e)
                target.traffic.refuse("local_resource")
                return
            self.flows[addr] = flow
        flow.send(data, now)

    def error_received(self, exc: Exception) -> None:
        logger.debug("%s: %s", self.target.name, exc)

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(max(self.idle_timeout / 2, 0.05), self.sweep)

    def sweep(self) -> None:
        """Close flows idle too long or whose endpoint left the pool."""
        cutoff = self.loop.time() - self.idle_timeout
        for addr, flow in list(self.flows.items()):
            if flow.last_seen < cutoff or flow.endpoint not in flow.pool.members:
                flow.close()
                del self.flows[addr]
        if self.transport is not None:
            self._schedule_sweep()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def bound_socket(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # restarts overlap, as for TCP
        if ":" in ip:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        reuseport.steer_to_newest(sock)  # a restart's new instance takes every new datagram
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
