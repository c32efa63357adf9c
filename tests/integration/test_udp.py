"""UDP through svcproxy on loopback: flows, big datagrams, TCP+UDP on one port, endpoint removal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.integration.harness import eventually, running_proxy, write_manifests

VIP = "127.0.0.150"
BACKENDS = ["127.0.0.151", "127.0.0.152", "127.0.0.153"]
PORT = 15353


def udp_service(name: str, port: int, *, tcp_too: bool = False) -> dict[str, Any]:
    ports = [{"name": "dns", "protocol": "UDP", "port": port, "targetPort": PORT}]
    if tcp_too:
        ports.append({"name": "dns-tcp", "protocol": "TCP", "port": port, "targetPort": PORT})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": VIP, "ports": ports}}


def udp_slice(name: str, ips: list[str], *, tcp_too: bool = False) -> dict[str, Any]:
    ports = [{"name": "dns", "protocol": "UDP", "port": PORT}]
    if tcp_too:
        ports.append({"name": "dns-tcp", "protocol": "TCP", "port": PORT})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": ports, "endpoints": [{"addresses": [ip]} for ip in ips]}


class Echo(asyncio.DatagramProtocol):
    """Answers each datagram with "<its ip>|" + the datagram."""

    def __init__(self, ip: str) -> None:
        self.tag = ip.encode() + b"|"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.tag + data, addr)


@asynccontextmanager
async def echo_servers(ips: list[str]) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    made = [await loop.create_datagram_endpoint(lambda ip=ip: Echo(ip), local_addr=(ip, PORT)) for ip in ips]
    try:
        yield
    finally:
        for transport, _ in made:
            transport.close()


class Client(asyncio.DatagramProtocol):
    """A UDP client socket with a queue of what came back (uvloop has no sock_recvfrom)."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait((data, addr))

    def close(self) -> None:
        self.transport.close()


async def client() -> Client:
    _, proto = await asyncio.get_running_loop().create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
    return proto


async def exchange(c: Client, data: bytes, port: int = 53, timeout: float = 2.0) -> tuple[bytes, Any]:
    c.transport.sendto(data, (VIP, port))
    return await asyncio.wait_for(c.replies.get(), timeout)


async def test_udp_flows_round_robin_and_reply_from_the_service_address(tmp_path: Path) -> None:
    objs = [udp_service("dns", 53), udp_slice("dns", BACKENDS)]
    async with echo_servers(BACKENDS), running_proxy(tmp_path, objs):
        clients = [await client() for _ in range(6)]
        try:
            seen = []
            for c in clients:
                reply, source = await exchange(c, b"query")
                assert source == (VIP, 53)  # replies come from the address the client asked
                ip, _, body = reply.partition(b"|")
                assert body == b"query"
                seen.append(ip.decode())
                # The same client stays on its flow's endpoint.
                for _ in range(3):
                    assert (await exchange(c, b"again"))[0] == ip + b"|again"
            assert sorted(seen) == sorted(BACKENDS * 2)
        finally:
            for c in clients:
                c.close()


async def test_64k_datagrams_are_not_truncated(tmp_path: Path) -> None:
    objs = [udp_service("big", 53), udp_slice("big", BACKENDS[:1])]
    async with echo_servers(BACKENDS[:1]), running_proxy(tmp_path, objs):
        c = await client()
        try:
            payload = bytes(range(256)) * 250  # 64000 bytes; the reply adds the tag
            reply, _ = await exchange(c, payload)
            assert reply == BACKENDS[0].encode() + b"|" + payload
        finally:
            c.close()


async def test_tcp_and_udp_on_the_same_port(tmp_path: Path) -> None:
    objs = [udp_service("dns", 53, tcp_too=True), udp_slice("dns", BACKENDS[:1], tcp_too=True)]
    loop = asyncio.get_running_loop()

    class TcpTag(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"tcp")  # type: ignore[attr-defined]
            transport.close()

    server = await loop.create_server(TcpTag, BACKENDS[0], PORT, reuse_address=True)
    try:
        async with echo_servers(BACKENDS[:1]), running_proxy(tmp_path, objs):
            c = await client()
            try:
                assert (await exchange(c, b"udp"))[0] == BACKENDS[0].encode() + b"|udp"
            finally:
                c.close()
            reader, writer = await asyncio.open_connection(VIP, 53)
            assert await reader.read() == b"tcp"
            writer.close()
    finally:
        server.close()


async def test_flow_to_a_removed_endpoint_moves_to_a_current_one(tmp_path: Path) -> None:
    objs = [udp_service("dns", 53), udp_slice("dns", BACKENDS[:1])]
    async with echo_servers(BACKENDS[:2]), running_proxy(tmp_path, objs):
        c = await client()
        try:
            assert (await exchange(c, b"x"))[0].startswith(BACKENDS[0].encode())
            write_manifests(tmp_path / "svc.yaml", [udp_service("dns", 53), udp_slice("dns", BACKENDS[1:2])])

            async def moved() -> bool:
                return (await exchange(c, b"x", timeout=0.5))[0].startswith(BACKENDS[1].encode())

            await eventually(moved, timeout=2.0)
        finally:
            c.close()


async def test_idle_flows_are_closed(tmp_path: Path) -> None:
    objs = [udp_service("dns", 53), udp_slice("dns", BACKENDS[:1])]
    async with echo_servers(BACKENDS[:1]), running_proxy(tmp_path, objs, udp_idle_timeout=0.3) as app:
        assert app.proxier is not None
        c = await client()
        try:
            await exchange(c, b"x")
            frontend = next(lst.udp for lst in app.proxier.listeners.open.values() if lst.udp is not None)
            assert len(frontend.flows) == 1
            await eventually(lambda: not frontend.flows, timeout=2.0)
            assert (await exchange(c, b"y"))[0].endswith(b"|y")  # a new flow opens on demand
        finally:
            c.close()
