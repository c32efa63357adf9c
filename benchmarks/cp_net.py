"""Loopback pieces of the control-plane benchmark: backends, probes and /proc readings.

* :class:`IdentServer` listens on ``0.0.0.0:8080`` of the benchmark's own namespace, so it answers
  on every endpoint address in 127.0.0.0/8 at once; to each connection it writes the address the
  connection was made *to* (``getsockname``), and closes when the client has sent a byte. A probe
  through a service therefore learns which endpoint svcproxy picked, without 100,000 listening
  sockets.
* :class:`HoldServer` accepts connections and keeps them open, silent, counting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

REFUSED = "refused"
"""Probe result: nothing listens on the service address (svcproxy's 'no endpoints')."""
CUT = "cut"
"""Probe result: accepted, then closed or reset without an answer."""
STALLED = "stalled"
"""Probe result: the connect got no answer at all in time (a dropped SYN)."""


class _Ident(asyncio.Protocol):
    """Writes the address it was reached at; closes once the client has sent something (or EOF)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(f"{self.transport.get_extra_info('sockname')[0]}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def eof_received(self) -> bool:
        self.transport.close()
        return False


class _Hold(asyncio.Protocol):
    def __init__(self, server: HoldServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.live += 1
        self.server.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.live -= 1


class IdentServer:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(_Ident, "0.0.0.0", port, backlog=4096, reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class HoldServer:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.live = 0
        self.accepted = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Hold(self), host, port, backlog=4096, reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def probe(ip: str, port: int, timeout: float = 1.0, connect_timeout: float = 0.1) -> str:
    """Connect to ip:port and read one line: the endpoint address, REFUSED, CUT or STALLED.

    On loopback a connect is answered at once unless the SYN was dropped (the client would resend
    it after a second): after ``connect_timeout`` the probe gives up, so the caller probes again.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), connect_timeout)
        except ConnectionRefusedError:
            return REFUSED
        except TimeoutError:
            return STALLED
        except OSError:
            return CUT  # e.g. reset: the listener closed with this connection in its queue
        try:
            # Send first: a connection whose handshake the kernel completed just as the listener
            # closed is dead on the proxy's side, and only data makes it answer with a reset.
            await loop.sock_sendall(sock, b"\n")
            data = await asyncio.wait_for(loop.sock_recv(sock, 64), timeout)
        except (OSError, TimeoutError):
            return CUT
        return data.decode(errors="replace").strip() or CUT
    finally:
        sock.close()


async def connect(ip: str, port: int, timeout: float = 5.0) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it returns true or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


# -- /proc -------------------------------------------------------------------------------------


def listening(port: int) -> int:
    """IPv4 TCP sockets listening on ``port`` in this network namespace (from /proc/self/net/tcp)."""
    needle = f":{port:04X} 00000000:0000 0A ".encode()
    return Path("/proc/self/net/tcp").read_bytes().count(needle)


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, RssAnon...), None if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sockstat_tcp() -> dict[str, int]:
    """The TCP line of this namespace's /proc/net/sockstat (``mem`` is in pages, host-wide)."""
    for line in Path("/proc/self/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            return {k: int(v) for k, v in zip(parts[::2], parts[1::2], strict=False)}
    return {}
