"""Connection limits and timeouts (issue: limits as settings): excess connections are reset at once
and counted; idle and half-closed connections that went quiet are closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import metrics
from tests.integration.harness import endpoint_slice, hung_listener, running_proxy, servers, service

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.120"
BACKEND = "127.0.0.121"
PORT = 18090


class Silent(asyncio.Protocol):
    """Accepts and never answers, never closes (a hung backend)."""

    accepted = 0
    eofs = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Silent.accepted += 1

    def eof_received(self) -> bool:
        Silent.eofs += 1
        return True  # keep our side open: the client's FIN is not an answer


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def outcome(reader: asyncio.StreamReader, timeout: float) -> str:
    """How the proxy ends a connection we hold open: "reset", "closed" (EOF), or "open"."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "closed" if not data else f"data {data!r}"


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(VIP, port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def turned_away(port: int) -> str:
    """The outcome of a connection the proxy should refuse; the reset may even come before the
    client's loop saw its connect complete."""
    try:
        async with connection(port) as (reader, _):
            return await outcome(reader, 5)
    except ConnectionResetError:
        return "reset"


def refused_count(service: str, reason: str) -> float:
    labels = {"namespace": "default", "service": service, "port_name": "p", "protocol": "TCP", "reason": reason}
    return metrics.REGISTRY.get_sample_value("svcproxy_connections_refused_total", labels) or 0.0


async def test_connections_over_the_per_service_limit_are_reset_and_counted(tmp_path: Path) -> None:
    objs = [service("lim", VIP, 8100), endpoint_slice("lim", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Echo()), \
            running_proxy(tmp_path, objs, max_connections_per_service=2):
        before = refused_count("lim", "max_connections_per_service")
        async with connection(8100) as (r1, w1), connection(8100) as (r2, w2):
            for r, w in ((r1, w1), (r2, w2)):
                w.write(b"hi")
                assert await asyncio.wait_for(r.readexactly(2), 5) == b"hi"
            assert await turned_away(8100) == "reset"
            assert refused_count("lim", "max_connections_per_service") == before + 1
        # Both closed: there is room again.
        await asyncio.sleep(0.2)
        async with connection(8100) as (r4, w4):
            w4.write(b"ok")
            assert await asyncio.wait_for(r4.readexactly(2), 5) == b"ok"


async def test_connections_over_the_total_limit_are_reset(tmp_path: Path) -> None:
    objs = [service("lim2", VIP, 8101), endpoint_slice("lim2", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Echo()), running_proxy(tmp_path, objs, max_connections=1), \
            connection(8101) as (r1, w1):
        w1.write(b"a")
        assert await asyncio.wait_for(r1.readexactly(1), 5) == b"a"
        assert await turned_away(8101) == "reset"
        assert refused_count("lim2", "max_connections") >= 1


async def test_idle_timeout_closes_quiet_connections_only(tmp_path: Path) -> None:
    objs = [service("idle", VIP, 8102), endpoint_slice("idle", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Echo()), \
            running_proxy(tmp_path, objs, tcp_idle_timeout=0.5), \
            connection(8102) as (quiet, _), connection(8102) as (busy_r, busy_w):
        async def keep_busy() -> None:
            for _ in range(20):  # 2 s of a byte every 0.1 s
                busy_w.write(b".")
                await busy_r.readexactly(1)
                await asyncio.sleep(0.1)

        busy = asyncio.create_task(keep_busy())
        assert await outcome(quiet, 3) == "closed"  # after ~0.5-0.6 s of silence
        await busy  # the busy one was never cut


async def test_a_hung_backend_after_the_client_gave_up_is_released(tmp_path: Path) -> None:
    """The client sends, half-closes and waits; the backend never answers nor closes. kube-proxy's
    conntrack forgets such a flow after its CLOSE_WAIT timeout; svcproxy closes it the same way."""
    Silent.accepted = Silent.eofs = 0
    objs = [service("hung", VIP, 8103), endpoint_slice("hung", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Silent()), \
            running_proxy(tmp_path, objs, tcp_half_closed_timeout=0.5) as app:
        async with connection(8103) as (reader, writer):
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            writer.write_eof()
            assert await outcome(reader, 3) == "closed"
        assert app.proxier is not None
        for _ in range(50):
            if not app.proxier.connections.live:
                break
            await asyncio.sleep(0.05)
        assert not app.proxier.connections.live  # both legs closed: no descriptor held
        assert Silent.accepted == 1 and Silent.eofs == 1


async def test_half_closed_but_streaming_is_not_cut(tmp_path: Path) -> None:
    class Streamer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def eof_received(self) -> bool:
            async def stream() -> None:
                for _ in range(15):  # 1.5 s, three half-closed timeouts
                    self.transport.write(b"x")  # type: ignore[attr-defined]
                    await asyncio.sleep(0.1)
                self.transport.close()
            asyncio.get_running_loop().create_task(stream())
            return True

    objs = [service("stream", VIP, 8104), endpoint_slice("stream", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Streamer()), \
            running_proxy(tmp_path, objs, tcp_half_closed_timeout=0.5), connection(8104) as (reader, writer):
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"x" * 15


async def test_a_taken_address_is_reported_counted_and_retried_until_free(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vip, port = "127.0.0.122", 8105
    blocker = socket.socket()
    blocker.bind((vip, port))  # no SO_REUSEPORT: svcproxy cannot bind beside it
    blocker.listen()
    objs = [service("taken", vip, port), endpoint_slice("taken", PORT, [BACKEND])]
    try:
        with caplog.at_level(logging.ERROR, logger="proxy.proxier"):
            async with servers([(BACKEND, PORT)], lambda ip: Echo()), running_proxy(tmp_path, objs):
                assert f"default/taken:p/TCP: cannot listen on {vip}:{port}/TCP: Address already in use " \
                       "(will retry)" in caplog.text
                assert metrics.REGISTRY.get_sample_value("svcproxy_listeners_failed") == 1
                blocker.close()  # the other process lets go
                for _ in range(40):  # retried every second, not only at the 30 s resync
                    await asyncio.sleep(0.1)
                    if metrics.REGISTRY.get_sample_value("svcproxy_listeners_failed") == 0:
                        break
                assert metrics.REGISTRY.get_sample_value("svcproxy_listeners_failed") == 0
                reader, writer = await asyncio.open_connection(vip, port)
                writer.write(b"up")
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"up"
                writer.close()
    finally:
        blocker.close()


async def test_tcp_keepalive_on_both_legs(tmp_path: Path) -> None:
    objs = [service("ka", VIP, 8106), endpoint_slice("ka", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Echo()), \
            running_proxy(tmp_path, objs, tcp_keepalive=30.0) as app, connection(8106) as (reader, writer):
        writer.write(b"k")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"k"
        assert app.proxier is not None
        [conn] = app.proxier.connections.live
        socks = conn.sockets()
        assert len(socks) == 2
        for sock in socks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10


async def test_keepalive_is_off_by_default(tmp_path: Path) -> None:
    objs = [service("ka2", VIP, 8107), endpoint_slice("ka2", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)], lambda ip: Echo()), running_proxy(tmp_path, objs) as app, \
            connection(8107) as (reader, writer):
        writer.write(b"k")
        await asyncio.wait_for(reader.readexactly(1), 5)
        assert app.proxier is not None
        [conn] = app.proxier.connections.live
        socks = conn.sockets()
        assert len(socks) == 2
        for sock in socks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


async def test_the_dial_timeout_ladder_is_a_setting(tmp_path: Path) -> None:
    hung_ip = "127.0.0.123"
    objs = [service("ladder", VIP, 8108), endpoint_slice("ladder", PORT, [hung_ip])]
    with hung_listener(hung_ip, PORT):
        async with running_proxy(tmp_path, objs, dial_timeouts=(0.1, 0.2)), connection(8108) as (reader, _):
            started = asyncio.get_running_loop().time()
            assert await outcome(reader, 5) == "closed"  # every dial timed out: the client is closed
            took = asyncio.get_running_loop().time() - started
            assert 0.25 < took < 1.0, took  # 0.1 s + 0.2 s, not the default 3.75 s
