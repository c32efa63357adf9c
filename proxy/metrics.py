"""Every Prometheus metric svcproxy exports, declared in one place, under kube-proxy's names.

Pure modules never import this; the proxier, health handlers and app record into it.
"""

from __future__ import annotations

import itertools
from collections import Counter as CounterType
from collections.abc import Callable, Iterable, Iterator
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dataplane.traffic import CONNECT_BUCKETS, Live, Summaries, Summary, Traffic, merge, summarize

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

__all__ = ["REGISTRY", "Collector", "Counter", "OutlierCollector", "TrackerCollector", "TrafficCollector",
           "WatchCollector", "WorkerCollector", "routes"]


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


SERVICE_LABELS = ("namespace", "service", "port_name", "protocol")
_LE = [*(repr(b) for b in CONNECT_BUCKETS), "+Inf"]  # "1.0", "0.0005": as prometheus-client writes them
_SERVICE_FAMILIES = (
    # (kind, name, help, extra labels)
    ("counter", "svcproxy_service_connections", "Connections admitted (UDP: flows opened)", ()),
    ("gauge", "svcproxy_service_connections_active", "Connections (UDP: flows) open now", ()),
    ("counter", "svcproxy_service_bytes",
     "Bytes received from clients (direction from_client) and from endpoints (from_endpoint)", ("direction",)),
    ("counter", "svcproxy_service_datagrams", "UDP datagrams received from clients and from endpoints",
     ("direction",)),
    ("counter", "svcproxy_service_connect_retries", "Dials to another endpoint after a failed one", ()),
    ("counter", "svcproxy_service_transparent_connections",
     "Connections (UDP: flows) whose endpoint saw the client's own address (--transparent); the others saw "
     "this node's", ()),
    ("counter", "svcproxy_connections_refused",
     "Connections reset or closed without reaching an endpoint (UDP: datagrams that could open no flow), by "
     "reason: no_endpoints, source_ranges, max_connections, max_connections_per_service, endpoints_failed "
     "(every dial failed), local_resource (this node ran out of descriptors, memory or ports)", ("reason",)),
    ("counter", "svcproxy_endpoint_connections", "Connections (UDP: flows) made to each endpoint", ("endpoint",)),
    ("gauge", "svcproxy_endpoint_connections_active", "Connections (UDP: flows) open now to each endpoint",
     ("endpoint",)),
    ("counter", "svcproxy_endpoint_bytes",
     "Bytes received from clients (direction from_client) and from the endpoint (from_endpoint)",
     ("endpoint", "direction")),
    ("counter", "svcproxy_endpoint_datagrams", "UDP datagrams received from clients and from the endpoint",
     ("endpoint", "direction")),
    ("counter", "svcproxy_endpoint_connect_errors",
     "Failed dials to each endpoint, by reason: refused, timeout, reset, unreachable, other", ("endpoint", "reason")),
)


class TrafficCollector(Collector):
    """Traffic per service port and per endpoint (svcproxy's own; kube-proxy cannot count it).

    Ended connections are counted in :class:`Traffic`; what open ones have moved so far is added
    at each scrape (``live``), so bytes rise while a long connection runs. ``others`` are the
    latest summaries of worker processes. For UDP a connection is a flow (one client address and
    port). Service ports appear with their first connection or refusal: a node with 10,000 idle
    Services exports nothing for them."""

    def __init__(self, traffic: Traffic, live: Callable[[], Iterable[Live]],
                 others: Callable[[], Iterable[Summaries]] = tuple) -> None:
        self._traffic = traffic
        self._live = live
        self._others = others

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, doc, labels=[*SERVICE_LABELS, *extra])
            for kind, name, doc, extra in _SERVICE_FAMILIES}
        connect = HistogramMetricFamily(
            "svcproxy_service_connect_duration_seconds",
            "From accepting a TCP connection to its endpoint connection being made, retries included",
            labels=list(SERVICE_LABELS))

        def add(name: str, labels: list[str], value: float) -> None:
            families[name].add_metric(labels, value)

        def traffic(prefix: str, labels: list[str], c: Summary, udp: bool) -> None:
            add(f"{prefix}_connections", labels, c.opened)
            add(f"{prefix}_connections_active", labels, c.active)
            add(f"{prefix}_bytes", [*labels, "from_client"], c.bytes_in)
            add(f"{prefix}_bytes", [*labels, "from_endpoint"], c.bytes_out)
            if udp:
                add(f"{prefix}_datagrams", [*labels, "from_client"], c.datagrams_in)
                add(f"{prefix}_datagrams", [*labels, "from_endpoint"], c.datagrams_out)

        summaries = merge([summarize(self._traffic, self._live()), *self._others()])
        for name, svc in summaries.items():
            labels = [name.namespace, name.name, name.port, name.protocol]
            udp = name.protocol == "UDP"
            traffic("svcproxy_service", labels, svc, udp)
            add("svcproxy_service_transparent_connections", labels, svc.transparent)
            for reason, n in sorted(svc.errors.items()):
                add("svcproxy_connections_refused", [*labels, reason], n)
            if not udp:
                add("svcproxy_service_connect_retries", labels, svc.retries)
                cumulative = list(itertools.accumulate(svc.connect_buckets))
                connect.add_metric(labels, list(zip(_LE, cumulative, strict=True)), svc.connect_sum)
            for (ip, port), ep in svc.endpoints.items():
                ep_labels = [*labels, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"]
                for reason, n in sorted(ep.errors.items()):
                    add("svcproxy_endpoint_connect_errors", [*ep_labels, reason], n)
                if ep.opened:  # else only failed dials so far
                    traffic("svcproxy_endpoint", ep_labels, ep, udp)
        yield from families.values()
        yield connect


class WorkerCounts(Protocol):
    restarts: int

    def running(self) -> int: ...

    def connections_each(self) -> dict[int, int]: ...


class WorkerCollector(Collector):
    """Worker processes (--workers): how many run, and how often one had to be started again."""

    def __init__(self, workers: WorkerCounts, own_connections: Callable[[], int]) -> None:
        self._workers = workers
        self._own = own_connections

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("svcproxy_workers", "Processes forwarding TCP now (this one and its helpers)",
                                value=1 + self._workers.running())
        yield CounterMetricFamily("svcproxy_worker_restarts", "Helper processes that exited and were started "
                                  "again", value=self._workers.restarts)
        each = GaugeMetricFamily("svcproxy_worker_connections",
                                 "Proxied TCP connections open in each process (0: the main one; helpers report "
                                 "every second): how evenly the load is spread", labels=["worker"])
        for index, n in sorted({0: self._own(), **self._workers.connections_each()}.items()):
            each.add_metric([str(index)], n)
        yield each


def routes() -> list[web.RouteDef]:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text="userspace")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    return [web.get("/metrics", handle), web.get("/proxyMode", proxy_mode), web.get("/healthz", healthz)]
