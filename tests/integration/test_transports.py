"""The transports mode's own failure paths, injected through a stand-in for the loop's dialer."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import pytest

from proxy.balancer import Pool
from proxy.dataplane.connections import Connections
from proxy.dataplane.tcp import client_factory
from proxy.model import Endpoint, Family
from tests.integration.harness import servers
from tests.integration.test_forwarding import BACKENDS, PORT, ReplyAfterEof, web_target


class _NoDescriptors:
    """The running loop, except that every dial fails with EMFILE (this process is out of fds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.dials = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._loop, name)

    async def create_connection(self, *args: object, **kwargs: object) -> object:
        self.dials += 1
        raise OSError(errno.EMFILE, "Too many open files")


async def test_our_own_fd_shortage_is_not_blamed_on_endpoints(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    eps = tuple(Endpoint(ip, PORT, Family.V4) for ip in BACKENDS)
    pool = Pool(eps, clock=loop.time)
    dialer = _NoDescriptors(loop)
    server = await loop.create_server(client_factory(web_target(pool), Connections(), dialer),  # type: ignore[arg-type]
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.INFO, logger="proxy.dataplane"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
        assert dialer.dials == 1  # no other endpoint was tried: they would fail the same way
        assert "Too many open files (this process or node is out of a resource)" in caplog.text
        assert "no endpoint accepted" not in caplog.text
    finally:
        server.close()


class _LostOnArrival:
    """The running loop, except that connections to ``doomed`` are lost as soon as they are made,
    before the dialer resumes (as when a listener closes with them in its accept queue)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, doomed: str) -> None:
        self._loop = loop
        self.doomed = doomed

    def __getattr__(self, name: str) -> object:
        return getattr(self._loop, name)

    async def create_connection(self, factory: Any, host: str, port: int) -> object:
        transport, protocol = await self._loop.create_connection(factory, host, port)
        if host == self.doomed:
            transport.abort()
            for _ in range(3):  # let its connection_lost run, as when the loss arrives first
                await asyncio.sleep(0)
        return transport, protocol


async def test_a_backend_lost_before_use_is_replaced_by_another() -> None:
    loop = asyncio.get_running_loop()
    doomed, live = BACKENDS[0], BACKENDS[1]
    pool = Pool((Endpoint(doomed, PORT, Family.V4), Endpoint(live, PORT, Family.V4)), clock=loop.time)
    async with servers([(doomed, PORT), (live, PORT)], lambda ip: ReplyAfterEof()):
        server = await loop.create_server(client_factory(web_target(pool), Connections(),
                                                         _LostOnArrival(loop, doomed)),  # type: ignore[arg-type]
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(4):  # both orders of the round robin
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"ping")  # early bytes: kept until a backend is attached
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b"gnip"
                writer.close()
        finally:
            server.close()
