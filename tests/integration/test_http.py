"""/healthz, /livez and /metrics over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.integration.harness import endpoint_slice, running_proxy, servers, service

VIP = "127.0.0.120"
BACKEND = "127.0.0.121"
PORT = 18082


async def get(address: tuple[str, int] | None, path: str) -> tuple[int, dict[str, str], bytes]:
    assert address is not None
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_healthz_and_livez(tmp_path: Path) -> None:
    objs = [service("web", VIP, 8095), endpoint_slice("web", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)]), running_proxy(tmp_path, objs) as app:
        code, headers, body = await get(app.healthz_address, "/healthz")
        assert code == 200
        assert headers["content-type"].startswith("application/json")
        assert headers["x-content-type-options"] == "nosniff"
        doc = json.loads(body)
        assert doc["nodeEligible"] is True and doc["lastUpdated"] == doc["currentTime"]
        code, _, body = await get(app.healthz_address, "/livez")
        assert code == 200 and "nodeEligible" not in json.loads(body)

        # A change that waits longer than 2 x syncPeriod makes both unhealthy.
        app.tracker.oldest_pending = time.monotonic() - 2 * app.settings.sync_period - 1
        code, _, body = await get(app.healthz_address, "/healthz")
        assert code == 503 and json.loads(body)["lastUpdated"] != json.loads(body)["currentTime"]
        assert (await get(app.healthz_address, "/livez"))[0] == 503
        app.tracker.oldest_pending = None


async def test_metrics(tmp_path: Path) -> None:
    objs = [service("web", VIP, 8096), endpoint_slice("web", PORT, [BACKEND])]
    async with servers([(BACKEND, PORT)]), running_proxy(tmp_path, objs) as app:
        await get(app.healthz_address, "/healthz")
        code, headers, body = await get(app.metrics_address, "/metrics")
        text = body.decode()
        assert code == 200 and headers["content-type"].startswith("text/plain")
        samples = {line.split(" ")[0]: float(line.split(" ")[1])
                   for line in text.splitlines() if line and not line.startswith("#")}
        assert samples["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 1
        assert samples["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > time.time() - 60
        assert samples["kubeproxy_sync_proxy_rules_service_changes_total"] >= 1
        assert samples["kubeproxy_sync_proxy_rules_endpoint_changes_total"] >= 1
        assert samples["kubeproxy_sync_proxy_rules_service_changes_pending"] == 0
        assert samples["kubeproxy_sync_proxy_rules_endpoint_changes_pending"] == 0
        assert samples['kubeproxy_proxy_healthz_total{code="200"}'] >= 1
        assert (await get(app.metrics_address, "/proxyMode"))[2] == b"userspace"
