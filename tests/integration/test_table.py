"""The routing table of a running instance: /debug/services on the metrics address and
`svcproxy table`, showing frontends by type, endpoints with their state, ejections and live
connections."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from tests.integration.harness import endpoint_slice, eventually, running_proxy, servers, service

VIP, NODE_PORT = "127.0.0.160", 31860
BACKENDS = ["127.0.0.161", "127.0.0.162"]
PORT = 18160


async def debug_services(port: int) -> list[dict]:  # type: ignore[type-arg]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /debug/services HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.0 200"), head
    return json.loads(body)  # type: ignore[no-any-return]


async def test_the_table_shows_frontends_endpoints_ejections_and_connections(tmp_path: Path) -> None:
    live, dead = BACKENDS
    objs = [service("web", VIP, 8160, node_port=NODE_PORT, sessionAffinity="None"),
            endpoint_slice("web", PORT, BACKENDS)]
    objs[1]["endpoints"][1]["nodeName"] = "node-b"  # another node's pod

    class Hold(asyncio.Protocol):  # answers, then keeps the connection open
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"hello")  # type: ignore[attr-defined]

    async with servers([(live, PORT)], lambda ip: Hold()), running_proxy(tmp_path, objs) as app:
        assert app.metrics_address is not None
        reader, writer = await asyncio.open_connection(VIP, 8160)  # lands on live, or on dead then live
        assert await reader.readexactly(5) == b"hello"
        for _ in range(3):  # make sure the dead one has been dialled, refused and ejected
            r, w = await asyncio.open_connection(VIP, 8160)
            await r.readexactly(5)
            w.close()
        assert app.proxier is not None
        connections = app.proxier.connections.live
        await eventually(lambda: len(connections) == 1)  # the three closed; the first still open

        rows = await debug_services(app.metrics_address[1])
        by_type = {r["type"]: r for r in rows}
        assert set(by_type) == {"ClusterIP", "NodePort"}
        cip = by_type["ClusterIP"]
        assert (cip["address"], cip["port"], cip["protocol"], cip["service"], cip["policy"]) == (
            VIP, 8160, "TCP", "default/web:p/TCP", "Cluster")
        assert (by_type["NodePort"]["address"], by_type["NodePort"]["port"]) == ("127.0.0.1", NODE_PORT)
        eps = {e["address"]: e for e in cip["endpoints"]}
        assert eps[live]["local"] is True and eps[dead]["local"] is False
        assert eps[live]["ready"] and not eps[live]["terminating"]
        assert eps[dead]["ejectedSeconds"] > 0 and eps[live]["ejectedSeconds"] == 0
        assert eps[live]["activeConnections"] == 1 and eps[dead]["activeConnections"] == 0

        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "table", "--metrics-address",
                                                       f"127.0.0.1:{app.metrics_address[1]}"],
                                      capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith(f"TCP  {VIP}:8160"))
        assert "ClusterIP" in lines[header] and "default/web:p/TCP Cluster" in lines[header]
        block = lines[header + 1:header + 3]
        assert any(f"-> {live}:{PORT}" in line and "ready" in line and "local" in line and line.endswith(" 1")
                   for line in block), block
        assert any(f"-> {dead}:{PORT}" in line and "ejected" in line for line in block), block

        writer.close()

        async def idle() -> bool:
            rows = await debug_services(app.metrics_address[1])
            return all(e["activeConnections"] == 0 for r in rows for e in r["endpoints"])

        await eventually(idle, timeout=5)


async def test_svcproxy_table_says_when_nothing_answers() -> None:
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "table", "--metrics-address",
                                                   "127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.startswith("svcproxy table: cannot read http://127.0.0.1:9/debug/services:"), out.stderr


async def test_configz_shows_the_configuration_in_force(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, [], drain_timeout=3.0) as app:
        assert app.metrics_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", app.metrics_address[1])
        writer.write(b"GET /configz HTTP/1.0\r\nHost: x\r\n\r\n")
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.0 200"), head
    configz = json.loads(body)
    assert configz["kubeproxy.config.k8s.io"]["kind"] == "KubeProxyConfiguration"
    assert configz["kubeproxy.config.k8s.io"]["hostnameOverride"] == "node-a"
    assert configz["svcproxy.io"]["drainTimeout"] == "3s"
    assert configz["svcproxy.io"]["manifests"] == str(tmp_path)
