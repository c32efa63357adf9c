"""--forwarding splice: a bulk transfer moves through a pipe with splice(2), request/response
traffic never does, and the bytes arrive whole either way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from proxy.balancer import Pool
from proxy.dataplane.connections import Connections
from proxy.dataplane.relay import Relay
from proxy.model import Endpoint, Family
from tests.integration.harness import eventually, forwarding_to, servers
from tests.integration.test_forwarding import PORT, ReplyAfterEof, web_target

BACKEND = "127.0.0.110"
PAYLOAD = bytes(range(256)) * 4096 * 8  # 8 MiB


def piped_legs(connections: Connections) -> int:
    return sum(leg.pipe is not None for conn in connections.live if isinstance(conn, Relay)
               for leg in (conn.client, conn.backend) if leg is not None)


async def test_bulk_goes_through_a_pipe_and_arrives_whole() -> None:
    loop = asyncio.get_running_loop()
    pool = Pool((Endpoint(BACKEND, PORT, Family.V4),), clock=loop.time)
    connections = Connections()
    async with forwarding_to(web_target(pool), connections, "splice") as port, \
            servers([(BACKEND, PORT)], lambda ip: ReplyAfterEof()):
        # Request/response sized: no pipe.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        await asyncio.sleep(0.1)
        assert piped_legs(connections) == 0
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"gnip"
        writer.close()
        # 8 MiB up, then 8 MiB back reversed: both directions fill whole chunks and splice.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PAYLOAD)
        await writer.drain()
        piped_up = piped_legs(connections)
        writer.write_eof()
        got = bytearray()
        piped_most = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            got += chunk
            piped_most = max(piped_most, piped_legs(connections))
        writer.close()
        assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(reversed(PAYLOAD))).digest()
        assert piped_up >= 1 and piped_most == 2, (piped_up, piped_most)


@contextlib.contextmanager
def downloads(ip: str, port: int, path: Path) -> Iterator[None]:
    """A backend that answers every byte it is sent with the file at ``path``, by sendfile(2) as
    nginx does: page-cache pages, one pipe buffer each, so a full pipe holds less than a splice
    asked for while bytes still wait in the socket."""
    listener = socket.create_server((ip, port), reuse_port=True)
    listener.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn, path.open("rb") as f:
            conn.settimeout(10)
            while conn.recv(1):
                conn.sendfile(f)
                f.seek(0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(10)


async def test_one_connection_downloads_again_and_again(tmp_path: Path) -> None:
    """After a direction has moved on to splicing, small requests still go up and every answer
    comes down whole: a short splice does not stop the pump while bytes wait behind it."""
    loop = asyncio.get_running_loop()
    pool = Pool((Endpoint(BACKEND, PORT, Family.V4),), clock=loop.time)
    connections = Connections()
    (tmp_path / "mib").write_bytes(PAYLOAD[:1 << 20])
    async with forwarding_to(web_target(pool), connections, "splice") as port:
        with downloads(BACKEND, PORT, tmp_path / "mib"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(20):
                writer.write(b"x")
                assert await asyncio.wait_for(reader.readexactly(1 << 20), 5) == PAYLOAD[:1 << 20]
            assert piped_legs(connections) == 1  # the download direction only
            writer.close()
            await eventually(lambda: not connections.live, timeout=5)  # the backend has its EOF
