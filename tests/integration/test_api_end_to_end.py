"""svcproxy against the fake API server, through the real kubernetes_asyncio client and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from proxy.app import App
from proxy.settings import Settings
from testbed.fakeapi.server import FakeApiServer
from tests.integration.harness import ask, endpoint_slice, eventually, refused, servers, service
from tests.integration.test_http import get

VIP = "127.0.0.140"
BACKENDS = ["127.0.0.141", "127.0.0.142"]
PORT = 18083


@contextlib.asynccontextmanager
async def proxy_on(api: FakeApiServer) -> AsyncIterator[App]:
    app = App(Settings(
        master=api.url, hostname_override="node-a", nodeport_addresses=("127.0.0.1/32",),
        healthz_bind_address="127.0.0.1:0", metrics_bind_address="", vip_interface="lo",
    ).validate())
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def node(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, **meta}, "spec": {}}


async def test_services_from_the_api_are_served_and_follow_changes() -> None:
    async with FakeApiServer() as api, servers([(ip, PORT) for ip in BACKENDS]):
        api.upsert(node("node-a"))
        api.upsert(service("web", VIP, 8100))
        api.upsert(endpoint_slice("web", PORT, BACKENDS[:1]))
        async with proxy_on(api) as app:
            await asyncio.wait_for(app.synced.wait(), 10)
            assert await ask(VIP, 8100) == BACKENDS[0]

            api.upsert(endpoint_slice("web", PORT, BACKENDS))  # scale up
            await eventually(lambda: _answers(VIP, 8100, set(BACKENDS)))
            api.upsert(endpoint_slice("web", PORT, BACKENDS[1:]))  # scale down
            await eventually(lambda: _answers(VIP, 8100, {BACKENDS[1]}))

            # Another proxy's Service is not ours (kube-proxy's label selector).
            other = service("other", "127.0.0.143", 8101)
            other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "someone-else"}
            api.upsert(other)
            api.upsert(endpoint_slice("other", PORT, BACKENDS))
            await asyncio.sleep(0.3)
            assert await refused("127.0.0.143", 8101)

            api.delete("Service", "default", "web")
            await eventually(lambda: refused(VIP, 8100))


async def test_node_being_deleted_fails_healthz_but_not_livez() -> None:
    async with FakeApiServer() as api:
        api.upsert(node("node-a"))
        async with proxy_on(api) as app:
            await asyncio.wait_for(app.synced.wait(), 10)
            assert (await get(app.healthz_address, "/healthz"))[0] == 200
            tainted = node("node-a")
            tainted["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
            api.upsert(tainted)
            await eventually(lambda: _code(app, "/healthz", 503))
            body = json.loads((await get(app.healthz_address, "/healthz"))[2])
            assert body["nodeEligible"] is False
            assert (await get(app.healthz_address, "/livez"))[0] == 200


async def _code(app: App, path: str, expected: int) -> bool:
    return (await get(app.healthz_address, path))[0] == expected


async def _answers(ip: str, port: int, expected: set[str]) -> bool:
    return {await ask(ip, port) for _ in range(6)} == expected


async def test_api_outage_keeps_traffic_flowing_and_missed_deletes_apply_after_relist() -> None:
    async with FakeApiServer() as api, servers([(ip, PORT) for ip in BACKENDS]):
        api.upsert(node("node-a"))
        for name, vip in (("web", VIP), ("gone", "127.0.0.144")):
            api.upsert(service(name, vip, 8102))
            api.upsert(endpoint_slice(name, PORT, BACKENDS[:1]))
        async with proxy_on(api) as app:
            await asyncio.wait_for(app.synced.wait(), 10)
            assert await ask("127.0.0.144", 8102) == BACKENDS[0]

            await api.set_down(True)
            # While the API server is away, svcproxy keeps forwarding with its last state.
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            served = 0
            while loop.time() < end:
                assert await ask(VIP, 8102) == BACKENDS[0]
                served += 1
                await asyncio.sleep(0.2)
            assert served > 20
            # Meanwhile: "gone" is deleted and history compacted, so the watch must relist (410).
            api.delete("Service", "default", "gone")
            api.compact()
            await api.set_down(False)

            # Each watch resumes after its own backoff (up to ~12 s after a 10 s outage).
            await eventually(lambda: refused("127.0.0.144", 8102), timeout=20)
            api.upsert(endpoint_slice("web", PORT, BACKENDS))  # and updates flow again
            await eventually(lambda: _answers(VIP, 8102, set(BACKENDS)), timeout=20)


async def test_malformed_object_from_the_api_is_skipped() -> None:
    async with FakeApiServer() as api, servers([(BACKENDS[0], PORT)]):
        api.upsert(node("node-a"))
        bad = service("bad", "not-an-ip", 8103)
        api.upsert(bad)
        api.upsert(service("web", VIP, 8103))
        api.upsert(endpoint_slice("web", PORT, BACKENDS[:1]))
        async with proxy_on(api) as app:
            await asyncio.wait_for(app.synced.wait(), 10)
            assert await ask(VIP, 8103) == BACKENDS[0]
