"""svcproxy.io/load-balancing: least-connections through a running svcproxy, in each forwarding
mode: a new connection goes to the endpoint with the fewest open ones; without the annotation,
round robin (the control)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.convert import LOAD_BALANCING_ANNOTATION
from tests.integration.harness import endpoint_slice, eventually, running_proxy, servers, service

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.110"
BACKENDS = ["127.0.0.111", "127.0.0.112"]
PORT = 18110


class Hold(asyncio.Protocol):
    """Says its name and keeps the connection open until the client closes it."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.name + b"\n")  # type: ignore[attr-defined]


async def connect() -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(VIP, 80)
    return (await asyncio.wait_for(reader.readline(), 5)).decode().strip(), writer


@pytest.mark.parametrize("balancing", ["least-connections", "round-robin"])
async def test_new_connections_go_to_the_endpoint_with_fewest_open(tmp_path: Path, balancing: str) -> None:
    svc = service("lc", VIP, 80)
    svc["metadata"]["annotations"] = {LOAD_BALANCING_ANNOTATION: balancing}
    svc["spec"]["ports"][0]["targetPort"] = PORT
    objs = [svc, endpoint_slice("lc", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS], lambda ip: Hold(ip.encode())), \
            running_proxy(tmp_path, objs) as app:
        assert app.proxier is not None
        traffic = app.proxier.traffic

        def open_on(ip: str) -> int:
            counts = next(iter(traffic.services.values()), None)
            endpoint = counts.endpoints.get((ip, PORT)) if counts is not None else None
            return endpoint.active if endpoint is not None else 0

        held = [await connect() for _ in range(4)]
        assert sorted(name for name, _ in held) == sorted(BACKENDS * 2)  # even while they are even
        first = BACKENDS[0]
        for name, writer in held:
            if name == first:
                writer.close()
        await eventually(lambda: open_on(first) == 0)
        later = [await connect() for _ in range(2)]
        names = [name for name, _ in later]
        if balancing == "least-connections":
            assert names == [first, first]  # 0 and 1 open there, against 2
        else:
            assert sorted(names) == sorted(BACKENDS)  # round robin takes no notice
        for _, writer in held + later:
            writer.close()


async def test_dials_in_progress_are_counted_and_released(tmp_path: Path) -> None:
    """A least-connections pick counts its dial as a connection until it connects or fails; after
    connections that met a dead endpoint (refused, then ejected) and a live one, nothing is left
    counted as dialling, so the balance is not skewed by leaks."""
    dead = "127.0.0.113"  # nothing listens there
    svc = service("lc", VIP, 80)
    svc["metadata"]["annotations"] = {LOAD_BALANCING_ANNOTATION: "least-connections"}
    svc["spec"]["ports"][0]["targetPort"] = PORT
    objs = [svc, endpoint_slice("lc", PORT, [BACKENDS[0], dead])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: Hold(ip.encode())), \
            running_proxy(tmp_path, objs) as app:
        assert app.proxier is not None
        held = [await connect() for _ in range(6)]
        assert {name for name, _ in held} == {BACKENDS[0]}
        counts = next(iter(app.proxier.traffic.services.values()))
        assert counts.endpoints[(dead, PORT)].errors.get("refused", 0) >= 1  # it was tried
        assert {address: c.dialing for address, c in counts.endpoints.items()} == {(BACKENDS[0], PORT): 0,
                                                                                  (dead, PORT): 0}
        assert counts.endpoints[(BACKENDS[0], PORT)].active == 6
        for _, writer in held:
            writer.close()
