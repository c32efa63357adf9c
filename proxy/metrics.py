"""Every Prometheus metric svcproxy exports, declared in one place, under kube-proxy's names.

Pure modules never import this; the proxier, health handlers and app record into it.
"""

from __future__ import annotations

from collections import Counter as CounterType
from collections.abc import Callable, Iterator
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# kube-proxy's buckets: 1 ms doubling, 15 of them.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))

sync_duration = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS,
    registry=REGISTRY,
)
sync_last_timestamp = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
    registry=REGISTRY,
)
conflicts = Gauge(
    "svcproxy_service_conflicts",
    "Addresses and ports (nodePorts, clusterIP:port, health check ports) wanted by more than one Service; "
    "the oldest Service has each",
    registry=REGISTRY,
)
listeners_failed = Gauge(
    "svcproxy_listeners_failed",
    "Service addresses and ports that cannot be bound now (e.g. taken by another process); retried every second",
    registry=REGISTRY,
)
connections_refused = Counter(
    "svcproxy_connections_refused",
    "TCP connections reset at once because --max-connections (reason total) or "
    "--max-connections-per-service (reason service) was reached",
    ["service", "reason"],
    registry=REGISTRY,
)
endpoint_drained = Counter(
    "svcproxy_endpoint_drained_connections",
    "TCP connections reset because their endpoint left (deleted, not ready or terminating) more than "
    "--endpoint-drain-timeout ago",
    registry=REGISTRY,
)
loop_lag = Histogram(
    "svcproxy_loop_lag_seconds",
    "How late the data plane's timers ran (sampled every 50 ms): time forwarding stood still",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
healthz_total = Counter(
    "kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=REGISTRY
)
livez_total = Counter(
    "kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=REGISTRY
)

__all__ = ["REGISTRY", "Counter", "OutlierCollector", "TrackerCollector", "WatchCollector", "routes"]


class ChangeCounts(Protocol):
    """What the tracker exposes for the changes pending/total metrics (a structural type)."""

    service_changes_pending: int
    endpoint_changes_pending: int
    service_changes_total: int
    endpoint_changes_total: int


class TrackerCollector(Collector):
    """Reads the change counts straight from the tracker at scrape time, so they cannot drift."""

    def __init__(self, tracker: ChangeCounts, last_queued: Callable[[], float | None]) -> None:
        self._tracker = tracker
        self._last_queued = last_queued

    def collect(self) -> Iterator[Metric]:
        t = self._tracker
        yield GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes", value=t.endpoint_changes_pending,
        )
        yield CounterMetricFamily(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes", value=t.endpoint_changes_total,
        )
        yield GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes", value=t.service_changes_pending,
        )
        yield CounterMetricFamily(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes", value=t.service_changes_total,
        )
        queued = self._last_queued()
        if queued is not None:
            yield GaugeMetricFamily(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued", value=queued,
            )


class WatchCounts(Protocol):
    """What the API source counts (proxy.sources.WatchStats, a structural type)."""

    events: CounterType[tuple[str, str]]
    lists: CounterType[str]
    pages: CounterType[str]
    expired: CounterType[str]


class WatchCollector(Collector):
    """The API source's list/watch counts, read at scrape time (svcproxy's own; kube-proxy has none)."""

    def __init__(self, stats: WatchCounts) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily("svcproxy_watch_events", "Watch events received from the API server",
                                     labels=["resource", "type"])
        for (kind, type_), n in sorted(self._stats.events.items()):
            events.add_metric([kind, type_], n)
        yield events
        for name, doc, counts in (
            ("svcproxy_watch_lists", "Full lists (initial, and relists after a 410)", self._stats.lists),
            ("svcproxy_watch_list_pages", "LIST responses (pages of --list-page-size items)", self._stats.pages),
            ("svcproxy_watch_expired", "Expired resourceVersions (410 Gone)", self._stats.expired),
        ):
            family = CounterMetricFamily(name, doc, labels=["resource"])
            for kind, n in sorted(counts.items()):
                family.add_metric([kind], n)
            yield family


class EjectionCounts(Protocol):
    ejections_total: int

    def ejected_now(self) -> list[tuple[str, int, float]]: ...


class OutlierCollector(Collector):
    """Live connections and outlier ejection (svcproxy's own): how often, and which endpoints are
    out right now."""

    def __init__(self, outliers: EjectionCounts, live: Callable[[], int]) -> None:
        self._outliers = outliers
        self._live = live

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("svcproxy_tcp_connections", "Proxied TCP connections open now",
                                value=self._live())
        yield CounterMetricFamily("svcproxy_endpoint_ejections",
                                  "Endpoints ejected after a failed connect (each ejection counted)",
                                  value=self._outliers.ejections_total)
        now = GaugeMetricFamily("svcproxy_endpoint_ejected_seconds",
                                "Seconds left of each current ejection, per endpoint", labels=["endpoint"])
        for ip, port, left in self._outliers.ejected_now():
            now.add_metric([f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"], left)
        yield now


def routes() -> list[web.RouteDef]:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text="userspace")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    return [web.get("/metrics", handle), web.get("/proxyMode", proxy_mode), web.get("/healthz", healthz)]
