"""Listening sockets: one per (address, port, protocol), each forwarding to a Target.

Sockets use SO_REUSEPORT so a new svcproxy can bind next to an old one during a restart and no
connection is refused. Closing a TCP listener never touches the connections it accepted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from proxy.dataplane import reuseport, udp
from proxy.dataplane.connections import Forwarder
from proxy.dataplane.target import Target
from proxy.plan import ListenerKey

logger = logging.getLogger(__name__)

BACKLOG = 4096


def listening_socket(key: ListenerKey) -> socket.socket:
    family = socket.AF_INET6 if ":" in key.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((key.ip, key.port))
        sock.listen(BACKLOG)
        reuseport.steer_to_newest(sock)  # a restart's new instance takes every new connection
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    __slots__ = ("close", "fileno", "key", "target", "udp")

    def __init__(self, key: ListenerKey, target: Target, close: Callable[[], None],
                 udp_frontend: udp.Frontend | None = None, fileno: int = -1) -> None:
        self.key = key
        self.target = target
        self.close = close
        self.udp = udp_frontend
        self.fileno = fileno
        """The listening socket's descriptor (TCP), handed to worker processes."""


class Listeners:
    """The open listeners, keyed by address, port and protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, forwarder: Forwarder, *,
                 udp_idle_timeout: float = udp.DEFAULT_IDLE_TIMEOUT, transparent: bool = False) -> None:
        self._loop = loop
        self._forwarder = forwarder
        self._udp_idle_timeout = udp_idle_timeout
        self._transparent = transparent
        self.open: dict[ListenerKey, Listener] = {}

    async def open_listener(self, key: ListenerKey, target: Target) -> None:
        """Bind and start serving; raises OSError when the address cannot be bound."""
        if key.protocol == "TCP":
            await self._open_tcp(key, target)
        elif key.protocol == "UDP":
            await self._open_udp(key, target)
        else:
            raise ValueError(f"unsupported protocol {key.protocol}")

    async def _open_tcp(self, key: ListenerKey, target: Target) -> None:
        sock = listening_socket(key)
        fileno = sock.fileno()
        try:
            close = await self._forwarder.serve(sock, target)
        except BaseException:
            sock.close()
            raise
        self.open[key] = Listener(key, target, close, fileno=fileno)

    async def _open_udp(self, key: ListenerKey, target: Target) -> None:
        sock = udp.bound_socket(key.ip, key.port)
        frontend = udp.Frontend(target, self._loop, self._udp_idle_timeout, self._transparent)
        try:
            await self._loop.create_datagram_endpoint(lambda: frontend, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.open[key] = Listener(key, target, frontend.close, frontend)

    def close(self, key: ListenerKey) -> None:
        listener = self.open.pop(key, None)
        if listener is not None:
            listener.close()

    def close_all(self) -> None:
        for key in list(self.open):
            self.close(key)
