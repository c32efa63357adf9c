"""Tiny HTTP/1.1 backends for the demo: each answers with its own name and address.

Keep-alive aware and fast enough for wrk, so the demo can be load-tested as it is.
Usage: ``python -m proxy.demo_backend NAME=HOST:PORT ...``
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from typing import cast

import uvloop


class Responder(asyncio.Protocol):
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
            close = b"connection: close" in head
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(self.body), b"Connection: close\r\n" if close else b"", self.body)
            )
            if close:
                self.transport.close()
                return


async def serve(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        name, _, addr = spec.partition("=")
        host, _, port = addr.rpartition(":")
        body = f"hello from {name} ({host}:{port})\n".encode()
        factory = functools.partial(Responder, body)
        servers.append(await loop.create_server(factory, host, int(port), reuse_address=True))
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1:]))
