"""--endpoint-drain-timeout: connections to an endpoint that left (deleted or terminating) are
reset after the deadline and counted; the others run on; off by default, as kube-proxy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.harness import endpoint_slice, eventually, running_proxy, servers, service, write_manifests

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.190"
BACKENDS = ["127.0.0.191", "127.0.0.192"]
PORT = 18190


class Hold(asyncio.Protocol):
    """Says which backend it is, then keeps the connection open."""

    def __init__(self, ip: str) -> None:
        self.ip = ip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.ip.encode().ljust(16))  # type: ignore[attr-defined]


async def hold_one() -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(VIP, 8190)
    return (await reader.readexactly(16)).decode().strip(), reader, writer


async def cut(reader: asyncio.StreamReader) -> bool:
    """True once the connection has been closed or reset by the proxy."""
    try:
        return await asyncio.wait_for(reader.read(1), 0.05) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("how", ["deleted", "terminating"])
async def test_connections_to_an_endpoint_that_left_are_reset_after_the_deadline(tmp_path: Path, how: str) -> None:
    from proxy import metrics

    objs = [service("drain", VIP, 8190), endpoint_slice("drain", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS], lambda ip: Hold(ip)), \
            running_proxy(tmp_path, objs, endpoint_drain_timeout=1.0):
        before = metrics.REGISTRY.get_sample_value("svcproxy_endpoint_drained_connections_total") or 0
        held = [await hold_one() for _ in range(4)]  # round robin: two on each
        assert sorted(ip for ip, _, _ in held) == sorted(BACKENDS * 2)
        leaving = BACKENDS[0]
        after = endpoint_slice("drain", PORT, BACKENDS)
        if how == "deleted":
            after["endpoints"] = [e for e in after["endpoints"] if e["addresses"] != [leaving]]
        else:
            after["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
        write_manifests(tmp_path / "svc.yaml", [service("drain", VIP, 8190), after])
        started = asyncio.get_running_loop().time()
        # New connections go to the other endpoint at once.
        await eventually(lambda: _new_goes_to(BACKENDS[1]), timeout=3)
        doomed = [r for ip, r, _ in held if ip == leaving]
        kept = [r for ip, r, _ in held if ip != leaving]
        await asyncio.sleep(0.5)
        assert not any([await cut(r) for r in doomed])  # not before the deadline
        for r in doomed:
            await eventually(lambda r=r: cut(r), timeout=3)
        assert asyncio.get_running_loop().time() - started >= 1.0
        assert not any([await cut(r) for r in kept])  # the others run on
        assert metrics.REGISTRY.get_sample_value("svcproxy_endpoint_drained_connections_total") == before + 2
        for _, _, w in held:
            w.close()


async def _new_goes_to(ip: str) -> bool:
    answers = []
    for _ in range(2):
        got, _, writer = await hold_one()
        answers.append(got)
        writer.close()
    return set(answers) == {ip}


async def test_by_default_connections_to_a_deleted_endpoint_run_on(tmp_path: Path) -> None:
    objs = [service("drain", VIP, 8190), endpoint_slice("drain", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS], lambda ip: Hold(ip)), running_proxy(tmp_path, objs):
        held = [await hold_one() for _ in range(2)]
        write_manifests(tmp_path / "svc.yaml", [service("drain", VIP, 8190),
                                                endpoint_slice("drain", PORT, BACKENDS[1:])])
        await eventually(lambda: _new_goes_to(BACKENDS[1]), timeout=3)
        await asyncio.sleep(1.0)
        assert not any([await cut(r) for _, r, _ in held])
        for _, _, w in held:
            w.close()
