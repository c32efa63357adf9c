"""TCP forwarding through svcproxy on real loopback sockets, with uvloop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import cast

import pytest
import uvloop

from proxy.balancer import Pool
from proxy.dataplane.connections import Connections
from proxy.dataplane.target import Target
from proxy.dataplane.traffic import ServiceTraffic
from proxy.model import Endpoint, Family, ServicePortName
from tests.integration.harness import (
    ask,
    endpoint_slice,
    eventually,
    forwarding_to,
    hung_listener,
    refused,
    running_proxy,
    servers,
    service,
)

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.100"
BACKENDS = ["127.0.0.101", "127.0.0.102", "127.0.0.103"]
PORT = 18080


def web_target(pool: Pool) -> Target:
    return Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), pool)


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_round_robin_across_three_backends(tmp_path: Path) -> None:
    objs = [service("web", VIP, 80 + 8000, node_port=30100), endpoint_slice("web", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS]), running_proxy(tmp_path, objs):
        answers = [await ask(VIP, 8080) for _ in range(30)]
        # Round robin: every window of three consecutive connections hits each backend once.
        for i in range(0, 30, 3):
            assert sorted(answers[i:i + 3]) == BACKENDS
        node_answers = collections.Counter([await ask("127.0.0.1", 30100) for _ in range(30)])
        assert node_answers == {ip: 10 for ip in BACKENDS}


async def test_no_endpoints_is_refused(tmp_path: Path) -> None:
    objs = [service("empty", VIP, 8081, node_port=30101), endpoint_slice("empty", PORT, [])]
    async with running_proxy(tmp_path, objs):
        assert await refused(VIP, 8081)
        assert await refused("127.0.0.1", 30101)


async def test_cluster_ip_node_port_is_refused(tmp_path: Path) -> None:
    objs = [service("web", VIP, 8082, node_port=30102), endpoint_slice("web", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
        assert await ask("127.0.0.1", 30102) == BACKENDS[0]
        assert await ask(VIP, 8082) == BACKENDS[0]
        assert await refused(VIP, 30102)


async def test_dead_endpoint_costs_no_failed_requests(tmp_path: Path) -> None:
    # The third endpoint has nothing listening: every dial to it is refused and retried elsewhere.
    objs = [service("web", VIP, 8083), endpoint_slice("web", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS[:2]]), running_proxy(tmp_path, objs):
        results = await asyncio.gather(*(ask(VIP, 8083) for _ in range(300)), return_exceptions=True)
        failures = [r for r in results if not isinstance(r, str) or r not in BACKENDS[:2]]
        assert failures == []
        assert set(results) == set(BACKENDS[:2])


async def test_hung_endpoint_times_out_and_next_one_answers(tmp_path: Path) -> None:
    objs = [service("web", VIP, 8084), endpoint_slice("web", PORT, [BACKENDS[0], BACKENDS[2]])]
    with hung_listener(BACKENDS[2], PORT):
        async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
            loop = asyncio.get_running_loop()
            slowest = 0.0
            for _ in range(4):
                start = loop.time()
                assert await ask(VIP, 8084) == BACKENDS[0]
                slowest = max(slowest, loop.time() - start)
            # Half the picks hit the hung endpoint first: one 250 ms dial timeout, not more.
            assert 0.2 < slowest < 0.6


async def test_all_endpoints_dead_closes_client(tmp_path: Path) -> None:
    objs = [service("web", VIP, 8085), endpoint_slice("web", PORT, BACKENDS)]
    async with running_proxy(tmp_path, objs):
        assert await ask(VIP, 8085) == ""  # accepted, every dial refused, then closed


class ReplyAfterEof(asyncio.Protocol):
    """Reads until the client half-closes, then answers with what it got, reversed."""

    def __init__(self) -> None:
        self.got = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += data

    def eof_received(self) -> bool:
        self.transport.write(bytes(reversed(self.got)))  # type: ignore[attr-defined]
        self.transport.close()
        return True


async def test_half_close_both_ways(tmp_path: Path) -> None:
    objs = [service("rev", VIP, 8086), endpoint_slice("rev", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: ReplyAfterEof()), running_proxy(tmp_path, objs):
        reader, writer = await asyncio.open_connection(VIP, 8086)
        payload = b"hello, half-closed world" * 1000
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # shut down writing; keep reading
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply == bytes(reversed(payload))


class Source(asyncio.Protocol):
    """Streams ``total`` bytes as fast as the peer takes them, then closes."""

    CHUNK = bytes(range(256)) * 4096  # 1 MiB

    def __init__(self, total: int) -> None:
        self.left = total
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._pump()

    def _pump(self) -> None:
        while self.left and not self.paused:
            n = min(self.left, len(self.CHUNK))
            self.transport.write(self.CHUNK[:n])  # type: ignore[attr-defined]
            self.left -= n
        if not self.left:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


async def test_bulk_to_slow_reader_holds_bounded_bytes(tmp_path: Path) -> None:
    total = 256 * 1024 * 1024
    objs = [service("bulk", VIP, 8087), endpoint_slice("bulk", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: Source(total)), running_proxy(tmp_path, objs) as app:
        assert app.proxier is not None
        live = app.proxier.connections.live
        held_max = 0

        def held() -> int:
            return sum(conn.buffered for conn in live)

        reader, writer = await asyncio.open_connection(VIP, 8087, limit=64 * 1024)
        received = 0
        digest = 0
        while True:
            chunk = await asyncio.wait_for(reader.read(256 * 1024), 10)
            if not chunk:
                break
            if received % (4 * 1024 * 1024) < len(chunk):
                # Slow reader: pause now and then so the proxy's outbound buffer fills up.
                await asyncio.sleep(0.01)
                held_max = max(held_max, held())
            digest = (digest + sum(chunk[::4096])) % (1 << 32)
            received += len(chunk)
        writer.close()
        assert received == total
        assert digest == (sum(Source.CHUNK[::4096]) * 256) % (1 << 32)
        # The proxy buffered at most about one high-water mark per direction, never megabytes.
        assert 0 < held_max <= 2 * 1024 * 1024


class Trickle(asyncio.Protocol):
    """Writes ``count`` numbered lines a few at a time, pausing between: a stream of small reads."""

    def __init__(self, count: int, done: asyncio.Event) -> None:
        self.count, self.done = count, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.task = asyncio.ensure_future(self._write(cast(asyncio.Transport, transport)))

    async def _write(self, transport: asyncio.Transport) -> None:
        for i in range(self.count):
            transport.write(b"%099d\n" % i)
            if i % 64 == 63:
                await asyncio.sleep(0.001)
        transport.close()
        self.done.set()


async def test_small_pieces_queued_for_a_full_client_arrive_whole_and_in_order(tmp_path: Path) -> None:
    """A client that reads nothing for a while, behind a small receive window: what the endpoint
    trickles meanwhile queues in the proxy in many small pieces, within its bound, and reaches the
    client complete and in order once it reads."""
    count = 80_000  # 8 MB: more than the kernel's buffers and the proxy's backlog hold together
    done = asyncio.Event()
    objs = [service("trickle", VIP, 8090), endpoint_slice("trickle", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: Trickle(count, done)), \
            running_proxy(tmp_path, objs) as app:
        assert app.proxier is not None
        live = app.proxier.connections.live
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (VIP, 8090))
        reader, writer = await asyncio.open_connection(sock=sock)
        held_max = 0
        while not done.is_set() and held_max < 128 * 1024:
            held_max = max(held_max, sum(conn.buffered for conn in live))
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(reader.read(), 20)
        writer.close()
    assert data == b"".join(b"%099d\n" % i for i in range(count))
    # The proxy held some of it, never more than its bound: one 256 KiB read per direction
    # (sockets, splice), or uvloop's 256 KiB high-water mark and one read (transports).
    assert 0 < held_max <= 256 * 1024 + 256 * 1024


async def test_established_connection_survives_endpoint_and_service_removal(tmp_path: Path) -> None:
    objs = [service("rev", VIP, 8088), endpoint_slice("rev", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: ReplyAfterEof()), running_proxy(tmp_path, objs):
        reader, writer = await asyncio.open_connection(VIP, 8088)
        writer.write(b"before")
        await writer.drain()
        (tmp_path / "svc.yaml").unlink()  # the whole Service goes away
        await eventually(lambda: refused(VIP, 8088))
        writer.write(b" after")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"retfa erofeb"
        writer.close()


@pytest.mark.parametrize("family", ["IPv6"])
async def test_ipv6_service(tmp_path: Path, family: str) -> None:
    objs = [service("v6", "::1", 8089), endpoint_slice("v6", PORT, ["::1"], family=family)]
    async with servers([("::1", PORT)]), running_proxy(tmp_path, objs):
        assert await ask("::1", 8089) == "::1"


async def ask_from(source: str, ip: str, port: int) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port, local_addr=(source, 0)), 5)
    except ConnectionResetError:  # the reset may come before the client's loop saw the connect complete
        return "reset"
    try:
        return (await asyncio.wait_for(reader.read(), 5)).decode()
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()


async def test_load_balancer_source_ranges(tmp_path: Path) -> None:
    lb_ip = "127.0.0.104"
    svc = service("lb", VIP, 8090, node_port=30104, type="LoadBalancer", loadBalancerSourceRanges=["127.0.0.5/32"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip, "ipMode": "VIP"}]}}
    objs = [svc, endpoint_slice("lb", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
        assert await ask_from("127.0.0.5", lb_ip, 8090) == BACKENDS[0]
        assert await ask_from("127.0.0.6", lb_ip, 8090) in ("", "reset")
        # The ranges apply to the LB IP only: clusterIP and nodePort take anyone.
        assert await ask_from("127.0.0.6", VIP, 8090) == BACKENDS[0]
        assert await ask_from("127.0.0.6", "127.0.0.1", 30104) == BACKENDS[0]


async def test_external_ips_and_proxy_mode_lb_ips(tmp_path: Path) -> None:
    svc = service("ext", VIP, 8091, externalIPs=["127.0.0.105"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.106", "ipMode": "Proxy"}]}}
    objs = [svc, endpoint_slice("ext", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
        assert await ask("127.0.0.105", 8091) == BACKENDS[0]
        assert await refused("127.0.0.106", 8091)  # ipMode Proxy: the LB delivers to the node


async def test_client_ip_affinity(tmp_path: Path) -> None:
    svc = service("sticky", VIP, 8092, sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    objs = [svc, endpoint_slice("sticky", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS]), running_proxy(tmp_path, objs):
        for client in ("127.0.0.7", "127.0.0.8", "127.0.0.9"):
            assert len({await ask_from(client, VIP, 8092) for _ in range(6)}) == 1
        # Different clients are still spread round robin.
        firsts = {await ask_from(f"127.0.1.{i}", VIP, 8092) for i in range(1, 7)}
        assert firsts == set(BACKENDS)


class ResetMidResponse(asyncio.Protocol):
    """Sends part of an answer, then resets the connection (SO_LINGER 0), as a crashing backend."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        t.write(b"x" * 1043)
        sock = t.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        asyncio.get_running_loop().call_later(0.05, t.abort)


async def test_backend_reset_mid_response_resets_the_client(tmp_path: Path) -> None:
    objs = [service("rst", VIP, 8095), endpoint_slice("rst", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: ResetMidResponse()), running_proxy(tmp_path, objs):
        for _ in range(5):
            reader, writer = await asyncio.open_connection(VIP, 8095)
            got = b""
            with pytest.raises(ConnectionResetError):  # not a clean EOF: the data is known to be cut
                for _ in range(100):
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    if not chunk:
                        break
                    got += chunk
            writer.close()
            assert len(got) <= 1043


async def test_client_reset_resets_the_backend(tmp_path: Path) -> None:
    seen: list[BaseException | None] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"hello")  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            seen.append(exc)

    objs = [service("rst2", VIP, 8096), endpoint_slice("rst2", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: Recorder()), running_proxy(tmp_path, objs):
        reader, writer = await asyncio.open_connection(VIP, 8096)
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # linger 0: a RST
        await eventually(lambda: seen, timeout=5)
        assert isinstance(seen[0], ConnectionResetError), seen


async def test_a_failed_dial_names_the_client_and_counts_endpoints(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    objs = [service("dead", VIP, 8097), endpoint_slice("dead", PORT + 7, BACKENDS[:2])]
    async with running_proxy(tmp_path, objs):
        with caplog.at_level(logging.INFO, logger="proxy.dataplane"):
            assert await ask(VIP, 8097) == ""
            await eventually(lambda: "no endpoint accepted" in caplog.text)
    assert "from 127.0.0.1 (2 dials to 2 endpoints)" in caplog.text, caplog.text  # refused: once each


async def test_a_dead_endpoint_is_ejected_then_comes_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxy import metrics

    dead = BACKENDS[2]
    objs = [service("eject", VIP, 8098), endpoint_slice("eject", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS[:2]]), running_proxy(tmp_path, objs) as app:
        assert app.proxier is not None
        before = metrics.REGISTRY.get_sample_value("svcproxy_endpoint_ejections_total") or 0
        with caplog.at_level(logging.DEBUG, logger="proxy.dataplane"):
            answers = [await ask(VIP, 8098) for _ in range(30)]
        assert set(answers) == set(BACKENDS[:2])  # no request failed (the retry covers the first)
        dials_to_dead = [r for r in caplog.records if f"dial {dead}:{PORT} failed" in r.getMessage()]
        assert len(dials_to_dead) == 1, "after one refused connect the endpoint is skipped"
        assert metrics.REGISTRY.get_sample_value("svcproxy_endpoint_ejections_total") == before + 1
        assert metrics.REGISTRY.get_sample_value("svcproxy_endpoint_ejected_seconds",
                                                 {"endpoint": f"{dead}:{PORT}"}) is not None
        # It recovers: once its ejection (1 s) runs out it is tried again, and a success brings it back.
        async with servers([(dead, PORT)]):
            await asyncio.sleep(1.1)
            assert dead in {await ask(VIP, 8098) for _ in range(6)}
            assert app.proxier.outliers.ejections == {}


async def test_many_dead_endpoints_cannot_use_up_the_dial_ladder() -> None:
    """Five refused endpoints and one live one: every connection gets through, whichever endpoint
    the round robin starts at (the old ladder gave up after four dials)."""
    loop = asyncio.get_running_loop()
    live = "127.0.0.109"
    dead = [f"127.0.0.{i}" for i in range(104, 109)]
    pool = Pool(tuple(Endpoint(ip, PORT, Family.V4) for ip in [*dead, live]), clock=loop.time)  # no ejection
    async with servers([(live, PORT)]), forwarding_to(web_target(pool), Connections()) as port:
        answers = []
        for _ in range(6):  # each connection starts one endpoint further round
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers.append((await asyncio.wait_for(reader.read(), 5)).decode())
            writer.close()
        assert answers == [live] * 6


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_descriptor_is_left_behind() -> None:
    """Connections that end every way (clean, half-closed, reset by either side, refused dials
    first, turned away) give back every descriptor they took."""
    loop = asyncio.get_running_loop()
    backend = "127.0.0.109"
    pool = Pool((Endpoint("127.0.0.108", PORT, Family.V4), Endpoint(backend, PORT, Family.V4)), clock=loop.time)
    connections = Connections()
    async with servers([(backend, PORT)], lambda ip: ReplyAfterEof()), \
            forwarding_to(web_target(pool), connections) as port:
        before = open_descriptors()
        for i in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"abc")
            if i % 3 == 0:  # half-close, read the answer, close
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b"cba"
                writer.close()
            elif i % 3 == 1:  # the client resets
                await asyncio.sleep(0.01)
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
            else:  # the client just closes
                writer.close()
        await eventually(lambda: not connections.live, timeout=5)
        pool.update((), 0)  # and ones turned away: nothing to forward to
        for _ in range(5):
            with contextlib.suppress(ConnectionError):
                await ask("127.0.0.1", port)
        # At most as many as before (an earlier test's sockets may still be closing): none kept.
        await eventually(lambda: open_descriptors() <= before, timeout=5)


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """With the collector off, 50 proxied connections leave no connection object behind: closed
    connections are freed by reference counting (svcproxy freezes the heap to keep full
    collections short, and a cycle frozen would never be freed)."""
    import gc

    from proxy.dataplane.relay import Relay, _Leg
    from proxy.dataplane.tcp import Client, _Side

    def alive() -> int:
        return sum(isinstance(o, _Side | Client | Relay | _Leg) for o in gc.get_objects())

    loop = asyncio.get_running_loop()
    backend = "127.0.0.109"
    pool = Pool((Endpoint("127.0.0.108", PORT, Family.V4), Endpoint(backend, PORT, Family.V4)), clock=loop.time)
    connections = Connections()
    async with servers([(backend, PORT)]), forwarding_to(web_target(pool), connections) as port:
        gc.collect()
        gc.disable()
        try:
            before = alive()
            for _ in range(50):  # every other one first dials the refused endpoint
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert (await asyncio.wait_for(reader.read(), 5)).decode() == backend
                writer.close()
            await eventually(lambda: not connections.live)
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert alive() == before
        finally:
            gc.enable()
