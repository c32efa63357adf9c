"""A pod's servers for the e2e cluster: each answer names the pod and the address it came in on.

Usage: ``python podserver.py NAME --addr IP [--addr IP ...] [--tcp PORT ...] [--udp PORT ...]
[--linger SECONDS]``

* TCP ports speak just enough HTTP/1.1 for a probe: every request gets
  ``hello from NAME (IP:PORT)`` (IPv6 addresses unbracketed), then the connection closes;
  ``GET /peer`` gets ``NAME peer PEER-IP`` instead: the client address this pod sees, and
  ``GET /peerport`` ``NAME peer PEER-IP PEER-PORT``.
* UDP ports echo each datagram back as ``NAME (IP:PORT): <datagram>``; the datagram ``peer?`` gets
  ``NAME peer PEER-IP``, and ``peerport?`` ``NAME peer PEER-IP PEER-PORT``.

It runs inside a pod's network namespace and binds only the pod's own addresses. On SIGTERM it
keeps serving for ``--linger`` seconds before it closes its sockets, as a pod with a preStop sleep
does while the endpoint change reaches every proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
from typing import cast


class Http(asyncio.Protocol):
    def __init__(self, name: str, body: bytes) -> None:
        self.name = name
        self.body = body
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf and self.transport is not None:
            body = self.body
            peer = self.transport.get_extra_info("peername")
            if self.buf.startswith(b"GET /peer "):
                body = f"{self.name} peer {peer[0]}\n".encode()
            elif self.buf.startswith(b"GET /peerport "):
                body = f"{self.name} peer {peer[0]} {peer[1]}\n".encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()


class Echo(asyncio.DatagramProtocol):
    def __init__(self, name: str, prefix: bytes) -> None:
        self.name = name
        self.prefix = prefix
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            if data == b"peer?":
                answer = f"{self.name} peer {addr[0]}".encode()
            elif data == b"peerport?":
                answer = f"{self.name} peer {addr[0]} {addr[1]}".encode()
            else:
                answer = self.prefix + data
            self.transport.sendto(answer, addr)


async def serve(name: str, addrs: list[str], tcp: list[int], udp: list[int], linger: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    closers = []
    for ip in addrs:
        for port in tcp:
            body = f"hello from {name} ({ip}:{port})\n".encode()
            server = await loop.create_server(functools.partial(Http, name, body), ip, port, reuse_address=True)
            closers.append(server.close)
        for port in udp:
            prefix = f"{name} ({ip}:{port}): ".encode()
            transport, _ = await loop.create_datagram_endpoint(functools.partial(Echo, name, prefix),
                                                               local_addr=(ip, port))
            closers.append(transport.close)
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if linger > 0:
        print(f"terminating: serving {linger:g}s more", flush=True)
        await asyncio.sleep(linger)
    for close in closers:
        close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--addr", action="append", default=[])
    parser.add_argument("--tcp", action="append", type=int, default=[])
    parser.add_argument("--udp", action="append", type=int, default=[])
    parser.add_argument("--linger", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.name, args.addr, args.tcp, args.udp, args.linger))


if __name__ == "__main__":
    main()
