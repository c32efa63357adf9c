"""Shutdown: stop accepting at once, let live connections finish, cut them at the drain deadline."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from proxy.app import App
from proxy.settings import Settings
from tests.integration.harness import endpoint_slice, refused, servers, service, write_manifests
from tests.integration.test_forwarding import ReplyAfterEof

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.170"
BACKEND = "127.0.0.171"
PORT = 18085


async def started(tmp_path: Path, drain: float) -> App:
    write_manifests(tmp_path / "svc.yaml", [service("web", VIP, 8120), endpoint_slice("web", PORT, [BACKEND])])
    app = App(Settings(manifests=tmp_path, hostname_override="node-a", healthz_bind_address="127.0.0.1:0",
                       metrics_bind_address="", vip_interface="lo", drain_timeout=drain).validate())
    await app.start()
    await asyncio.wait_for(app.synced.wait(), 5)
    return app


async def test_live_connection_finishes_during_drain(tmp_path: Path) -> None:
    async with servers([(BACKEND, PORT)], lambda ip: ReplyAfterEof()):
        app = await started(tmp_path, drain=10)
        reader, writer = await asyncio.open_connection(VIP, 8120)
        writer.write(b"in flight")
        await writer.drain()
        stopping = asyncio.create_task(app.stop())
        await asyncio.sleep(0.2)
        assert await refused(VIP, 8120)  # no new connections
        assert not stopping.done()       # but the live one is waited for
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"thgilf ni"
        writer.close()
        await asyncio.wait_for(stopping, 5)  # and shutdown ends as soon as it is done


async def test_connection_past_the_drain_deadline_is_cut(tmp_path: Path) -> None:
    async with servers([(BACKEND, PORT)], lambda ip: ReplyAfterEof()):
        app = await started(tmp_path, drain=0.5)
        reader, writer = await asyncio.open_connection(VIP, 8120)
        writer.write(b"idle")
        await writer.drain()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(app.stop(), 5)
        assert 0.4 < loop.time() - start < 2
        with contextlib.suppress(ConnectionResetError):  # reset or closed: the client sees the end
            assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
