"""Per-service and per-endpoint traffic metrics, scraped over HTTP from a running svcproxy and parsed
with prometheus-client's parser."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    Samples,
    endpoint_slice,
    eventually,
    running_proxy,
    sample,
    scrape,
    servers,
    service,
    write_manifests,
)
from tests.integration.test_udp import PORT as UDP_PORT
from tests.integration.test_udp import client, echo_servers, exchange, udp_service, udp_slice

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.160"
BACKENDS = ["127.0.0.161", "127.0.0.162"]
DEAD = "127.0.0.163"  # nothing listens there: dials are refused
PORT = 18090


class Double(asyncio.Protocol):
    """Answers every chunk with the chunk twice, so the two directions' counts differ."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data * 2)


def svc_labels(name: str, protocol: str = "TCP", port_name: str = "p") -> dict[str, str]:
    return {"namespace": "default", "service": name, "port_name": port_name, "protocol": protocol}


@contextlib.asynccontextmanager
async def talking(port: int, payload: bytes) -> AsyncIterator[asyncio.StreamWriter]:
    """A connection through the Service that has sent ``payload`` and read the doubled answer."""
    reader, writer = await asyncio.open_connection(VIP, port)
    try:
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(2 * len(payload)), 5) == payload * 2
        yield writer
    finally:
        writer.close()
        await writer.wait_closed()


def endpoint_values(samples: Samples, name: str, labels: dict[str, str], **extra: str) -> dict[str, float]:
    """Per endpoint: the value of ``name`` for the service port ``labels``."""
    out = {}
    for (metric, pairs), value in samples.items():
        d = dict(pairs)
        if metric == name and "endpoint" in d and all(d.get(k) == v for k, v in {**labels, **extra}.items()):
            out[d["endpoint"]] = value
    return out


async def test_connections_bytes_and_connect_times_per_service_and_endpoint(tmp_path: Path) -> None:
    objs = [service("tm", VIP, 8120), endpoint_slice("tm", PORT, BACKENDS)]
    labels = svc_labels("tm")
    async with servers([(ip, PORT) for ip in BACKENDS], lambda ip: Double()), \
            running_proxy(tmp_path, objs) as app:
        before = await scrape(app.metrics_address)
        assert sample(before, "svcproxy_service_connections_total", **labels) is None  # unused: not exported

        async with talking(8120, b"x" * 100):
            # An open connection's bytes are counted before it ends.
            now = await scrape(app.metrics_address)
            assert sample(now, "svcproxy_service_connections_active", **labels) == 1
            assert sample(now, "svcproxy_service_bytes_total", **labels, direction="from_client") == 100
            assert sample(now, "svcproxy_service_bytes_total", **labels, direction="from_endpoint") == 200
            assert sum(endpoint_values(now, "svcproxy_endpoint_connections_active", labels).values()) == 1
        for _ in range(3):
            async with talking(8120, b"y" * 10):
                pass

        async def all_ended() -> Samples | None:
            s = await scrape(app.metrics_address)
            return s if sample(s, "svcproxy_service_connections_active", **labels) == 0 else None

        after = await eventually(all_ended)
        assert sample(after, "svcproxy_service_connections_total", **labels) == 4
        assert sample(after, "svcproxy_service_bytes_total", **labels, direction="from_client") == 130
        assert sample(after, "svcproxy_service_bytes_total", **labels, direction="from_endpoint") == 260
        # Round robin: two each, and the endpoints' bytes add up to the service's.
        assert endpoint_values(after, "svcproxy_endpoint_connections_total", labels) == \
            {f"{ip}:{PORT}": 2 for ip in BACKENDS}
        assert sum(endpoint_values(after, "svcproxy_endpoint_bytes_total", labels, direction="from_client")
                   .values()) == 130
        assert set(endpoint_values(after, "svcproxy_endpoint_connections_active", labels).values()) == {0}
        assert sample(after, "svcproxy_service_connect_duration_seconds_count", **labels) == 4
        assert sample(after, "svcproxy_service_connect_duration_seconds_bucket", **labels, le="+Inf") == 4
        assert sample(after, "svcproxy_service_connect_duration_seconds_bucket", **labels, le="1.0") == 4
        assert 0 < (sample(after, "svcproxy_service_connect_duration_seconds_sum", **labels) or 0) < 4
        assert sample(after, "svcproxy_service_connect_retries_total", **labels) == 0
        assert sample(after, "svcproxy_service_datagrams_total", **labels, direction="from_client") is None


async def test_connect_errors_retries_and_refusals(tmp_path: Path) -> None:
    lb_ip = "127.0.0.164"
    half = service("half", VIP, 8121)
    dead = service("dead", VIP, 8122)
    lb = service("lbr", VIP, 8123, type="LoadBalancer", loadBalancerSourceRanges=["127.0.0.5/32"])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip, "ipMode": "VIP"}]}}
    objs = [half, endpoint_slice("half", PORT, [BACKENDS[0], DEAD]), dead, endpoint_slice("dead", PORT, [DEAD]),
            lb, endpoint_slice("lbr", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)], lambda ip: Double()), running_proxy(tmp_path, objs) as app:
        for _ in range(4):  # every connection gets through: a refused dial moves on to the live endpoint
            async with talking(8121, b"z"):
                pass
        # Every endpoint refuses: the client is closed without a byte, counted as refused.
        reader, writer = await asyncio.open_connection(VIP, 8122)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # Outside loadBalancerSourceRanges: reset, counted.
        with contextlib.suppress(ConnectionResetError):  # at connect or at the read, as the race goes
            reader, writer = await asyncio.open_connection(lb_ip, 8123, local_addr=("127.0.0.6", 0))
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            finally:
                writer.close()

        s = await scrape(app.metrics_address)
        errors = endpoint_values(s, "svcproxy_endpoint_connect_errors_total", svc_labels("half"), reason="refused")
        assert set(errors) == {f"{DEAD}:{PORT}"} and errors[f"{DEAD}:{PORT}"] >= 1
        # Each refused dial was followed by a retry on the other endpoint.
        assert sample(s, "svcproxy_service_connect_retries_total", **svc_labels("half")) == errors[f"{DEAD}:{PORT}"]
        assert endpoint_values(s, "svcproxy_endpoint_connections_total", svc_labels("half")) == \
            {f"{BACKENDS[0]}:{PORT}": 4}
        assert sample(s, "svcproxy_connections_refused_total", **svc_labels("dead"), reason="endpoints_failed") == 1
        assert sample(s, "svcproxy_connections_refused_total", **svc_labels("lbr"), reason="source_ranges") == 1
        assert sample(s, "svcproxy_service_connections_total", **svc_labels("lbr")) == 0


async def test_series_of_removed_endpoints_and_services_are_dropped(tmp_path: Path) -> None:
    objs = [service("gone", VIP, 8124), endpoint_slice("gone", PORT, BACKENDS)]
    labels = svc_labels("gone")
    async with servers([(ip, PORT) for ip in BACKENDS], lambda ip: Double()), \
            running_proxy(tmp_path, objs) as app:
        async with talking(8124, b"a"), talking(8124, b"b"):
            pass
        async with talking(8124, b"held"):
            s = await scrape(app.metrics_address)
            active = endpoint_values(s, "svcproxy_endpoint_connections_active", labels)
            held = next(ep for ep, n in active.items() if n == 1)
            kept = next(ip for ip in BACKENDS if f"{ip}:{PORT}" != held)
            write_manifests(tmp_path / "svc.yaml", [service("gone", VIP, 8124), endpoint_slice("gone", PORT, [kept])])

            async def synced() -> bool:
                return app.proxier is not None and all(
                    len(p.endpoints) == 1 for k, p in app.proxier.pools.items() if k.name.name == "gone")

            await eventually(synced)
            # Gone from the Service, but a connection still runs: its series stay until it ends.
            s = await scrape(app.metrics_address)
            assert endpoint_values(s, "svcproxy_endpoint_connections_active", labels)[held] == 1

        async def endpoint_dropped() -> bool:
            s = await scrape(app.metrics_address)
            return set(endpoint_values(s, "svcproxy_endpoint_connections_total", labels)) == {f"{kept}:{PORT}"}

        await eventually(endpoint_dropped)
        s = await scrape(app.metrics_address)
        assert sample(s, "svcproxy_service_connections_total", **labels) == 3

        (tmp_path / "svc.yaml").unlink()  # the Service and its slice are deleted

        async def service_dropped() -> bool:
            s = await scrape(app.metrics_address)
            return not any(dict(pairs).get("service") == "gone" for _, pairs in s)

        await eventually(service_dropped)


async def test_udp_flows_and_datagrams(tmp_path: Path) -> None:
    objs = [udp_service("udpm", 53), udp_slice("udpm", BACKENDS[:1])]
    labels = svc_labels("udpm", "UDP", "dns")
    async with echo_servers(BACKENDS[:1]), running_proxy(tmp_path, objs, udp_idle_timeout=0.5) as app:
        first, second = await client(), await client()
        try:
            for _ in range(3):
                await exchange(first, b"ping")  # 4 bytes out, "127.0.0.161|ping" (16 bytes) back
            await exchange(second, b"pong!")
            s = await scrape(app.metrics_address)
            assert sample(s, "svcproxy_service_connections_total", **labels) == 2  # one flow per client
            assert sample(s, "svcproxy_service_connections_active", **labels) == 2
            assert sample(s, "svcproxy_service_datagrams_total", **labels, direction="from_client") == 4
            assert sample(s, "svcproxy_service_datagrams_total", **labels, direction="from_endpoint") == 4
            assert sample(s, "svcproxy_service_bytes_total", **labels, direction="from_client") == 3 * 4 + 5
            assert sample(s, "svcproxy_service_bytes_total", **labels, direction="from_endpoint") == 3 * 16 + 17
            assert sample(s, "svcproxy_service_connect_retries_total", **labels) is None  # TCP only

            async def expired() -> Samples | None:  # idle flows end; what they counted stays
                s = await scrape(app.metrics_address)
                return s if sample(s, "svcproxy_service_connections_active", **labels) == 0 else None

            s = await eventually(expired, timeout=5)
            assert sample(s, "svcproxy_service_datagrams_total", **labels, direction="from_client") == 4
            assert endpoint_values(s, "svcproxy_endpoint_datagrams_total", labels, direction="from_endpoint") == \
                {f"{BACKENDS[0]}:{UDP_PORT}": 4}
        finally:
            first.close()
            second.close()

