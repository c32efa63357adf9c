"""Traffic policies and topology on loopback: what one node serves, and what its health check says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.integration.harness import ask, eventually, refused, running_proxy, servers, service, write_manifests
from tests.integration.test_http import get

VIP = "127.0.0.160"
LOCAL, REMOTE = "127.0.0.161", "127.0.0.162"
PORT = 18084


def slice_with_nodes(name: str, endpoints: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "p", "protocol": "TCP", "port": PORT}],
        "endpoints": [{"addresses": [ip], "nodeName": node, **extra.get(ip, {})} for ip, node in endpoints],
    }


async def health(port: int) -> tuple[int, dict[str, Any]]:
    code, headers, body = await get(("127.0.0.1", port), "/anything")
    assert headers["content-type"].startswith("application/json")
    return code, json.loads(body)


async def test_external_traffic_policy_local(tmp_path: Path) -> None:
    svc = service("etp", VIP, 8110, node_port=30110, externalTrafficPolicy="Local", healthCheckNodePort=30111)
    both = [svc, slice_with_nodes("etp", [(LOCAL, "node-a"), (REMOTE, "node-b")])]
    async with servers([(LOCAL, PORT), (REMOTE, PORT)]), running_proxy(tmp_path, both):
        # Every client here is this node itself, which kube-proxy sends "out to the LB and back":
        # all endpoints, on the nodePort too. (Outside clients are in tests/e2e.)
        assert {await ask("127.0.0.1", 30110) for _ in range(4)} == {LOCAL, REMOTE}
        assert {await ask(VIP, 8110) for _ in range(4)} == {LOCAL, REMOTE}
        code, body = await health(30111)
        assert code == 200
        assert body == {"service": {"namespace": "default", "name": "etp"}, "localEndpoints": 1,
                        "serviceProxyHealthy": True}

        write_manifests(tmp_path / "svc.yaml", [svc, slice_with_nodes("etp", [(REMOTE, "node-b")])])

        async def unhealthy() -> bool:
            code, body = await health(30111)
            return code == 503 and body["localEndpoints"] == 0

        await eventually(unhealthy)
        assert await ask("127.0.0.1", 30110) == REMOTE  # the node's own traffic still gets through
        assert await ask(VIP, 8110) == REMOTE

        write_manifests(tmp_path / "svc.yaml", [service("etp", VIP, 8110, node_port=30110)])
        await eventually(lambda: refused("127.0.0.1", 30111))  # Cluster policy: no health server


async def test_internal_traffic_policy_local(tmp_path: Path) -> None:
    svc = service("itp", VIP, 8112, node_port=30112, internalTrafficPolicy="Local")
    objs = [svc, slice_with_nodes("itp", [(REMOTE, "node-b")])]
    async with servers([(REMOTE, PORT)]), running_proxy(tmp_path, objs):
        assert await refused(VIP, 8112)
        assert await ask("127.0.0.1", 30112) == REMOTE  # external traffic keeps Cluster policy


async def test_terminating_fallback(tmp_path: Path) -> None:
    terminating = {"conditions": {"ready": False, "serving": True, "terminating": True}}
    gone = {"conditions": {"ready": False, "serving": False, "terminating": True}}
    objs = [service("term", VIP, 8113),
            slice_with_nodes("term", [(LOCAL, "node-a"), (REMOTE, "node-b")], **{LOCAL: terminating, REMOTE: gone})]
    async with servers([(LOCAL, PORT), (REMOTE, PORT)]), running_proxy(tmp_path, objs):
        # No ready endpoint anywhere: the serving, terminating one still gets traffic.
        assert {await ask(VIP, 8113) for _ in range(4)} == {LOCAL}


async def test_zone_hints_follow_the_node_zone(tmp_path: Path) -> None:
    hints = {LOCAL: {"zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]}},
             REMOTE: {"zone": "zone-b", "hints": {"forZones": [{"name": "zone-b"}]}}}
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}
    svc = service("topo", VIP, 8114, trafficDistribution="PreferClose")
    objs = [node, svc, slice_with_nodes("topo", [(LOCAL, "node-a"), (REMOTE, "node-b")], **hints)]
    async with servers([(LOCAL, PORT), (REMOTE, PORT)]), running_proxy(tmp_path, objs):
        await eventually(lambda: _only(VIP, 8114, {LOCAL}))
        # The node moves to a zone no endpoint is hinted for: hints are ignored, all are used.
        node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-c"
        write_manifests(tmp_path / "svc.yaml", objs)
        await eventually(lambda: _only(VIP, 8114, {LOCAL, REMOTE}))


async def _only(ip: str, port: int, expected: set[str]) -> bool:
    return {await ask(ip, port) for _ in range(6)} == expected
