"""Traffic counts per service port and per endpoint, kept as plain integers.

The byte path must stay cheap: a prometheus-client child costs a lock and two calls per
increment, which on every chunk would cost several percent of keepalive throughput. So each
live connection (or UDP flow) counts its own bytes in a slot, and its totals are added to its
service port's and endpoint's counts once, when it ends. A scrape adds what the live ones have
counted so far (see ``proxy.metrics.TrafficCollector``), so the exported counters still rise
while a long connection runs. Everything here runs on the data loop: no locks.

Counts appear with the first connection (or refusal) of a service port, so a node with 10,000
idle Services does not export 10,000 sets of zeros. They are dropped when the service port or the
endpoint is gone and its last connection has ended.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from proxy.model import Endpoint, ServicePortName

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the connect-duration histogram; +Inf follows."""

Address = tuple[str, int]
Live = tuple["ServiceTraffic", "EndpointTraffic | None", int, int, int, int]
"""An open connection or flow: its counts, and the bytes and datagrams in and out it has seen."""


class Counts:
    """What ended connections added up to, and how many are open (TCP connections, UDP flows)."""

    __slots__ = ("active", "bytes_in", "bytes_out", "datagrams_in", "datagrams_out", "opened", "retired")

    def __init__(self) -> None:
        self.opened = 0
        self.active = 0
        self.bytes_in = 0
        """Received from clients (on their way to an endpoint)."""
        self.bytes_out = 0
        """Received from endpoints (on their way to a client)."""
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.retired = False
        """Gone from the routing table while connections were still open: dropped after the last."""

    def ended(self, bytes_in: int, bytes_out: int, datagrams_in: int = 0, datagrams_out: int = 0) -> None:
        self.active -= 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.datagrams_in += datagrams_in
        self.datagrams_out += datagrams_out


class EndpointTraffic(Counts):
    __slots__ = ("address", "dialing", "errors", "service")

    def __init__(self, service: ServiceTraffic, address: Address) -> None:
        super().__init__()
        self.service = service
        self.address = address
        self.dialing = 0
        """Dials in progress to it from least-connections pools (their picks count before they connect)."""
        self.errors: dict[str, int] = {}
        """Failed connects by reason (refused, timeout, reset, unreachable, other)."""

    def ended(self, bytes_in: int, bytes_out: int, datagrams_in: int = 0, datagrams_out: int = 0) -> None:
        super().ended(bytes_in, bytes_out, datagrams_in, datagrams_out)
        if self.retired and not self.active:
            self.service.drop_endpoint(self)


class ServiceTraffic(Counts):
    """One service port's counts, shared by all its frontends (clusterIP, nodePort, ...)."""

    __slots__ = ("_registry", "connect_buckets", "connect_sum", "endpoints", "name", "refused", "retries",
                 "transparent")

    def __init__(self, name: ServicePortName, registry: Traffic | None = None) -> None:
        super().__init__()
        self.name = name
        self._registry = registry
        self.endpoints: dict[Address, EndpointTraffic] = {}
        self.connect_buckets = [0] * (len(CONNECT_BUCKETS) + 1)
        """Connects per histogram bucket (not cumulative; the last is +Inf)."""
        self.connect_sum = 0.0
        self.retries = 0
        """Dials beyond the first for a connection: another endpoint tried after a failure."""
        self.transparent = 0
        """Connections (UDP: flows) whose endpoint saw the client's own address (--transparent)."""
        self.refused: dict[str, int] = {}
        """Connections (UDP: datagrams that could open no flow) turned away, by reason."""

    def endpoint(self, ep: Endpoint) -> EndpointTraffic:
        key = (ep.ip, ep.port)
        return _take(self.endpoints, key, lambda: EndpointTraffic(self, key))

    def connected(self, ep: Endpoint, seconds: float) -> EndpointTraffic:
        """A connection reached ``ep`` ``seconds`` after it was accepted (retries included)."""
        self.connect_buckets[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
        self.connect_sum += seconds
        counts = self.endpoint(ep)
        counts.opened += 1
        counts.active += 1
        return counts

    def flow_opened(self, ep: Endpoint) -> EndpointTraffic:
        """A UDP flow to ``ep`` began."""
        self.opened += 1
        self.active += 1
        counts = self.endpoint(ep)
        counts.opened += 1
        counts.active += 1
        return counts

    def connect_failed(self, ep: Endpoint, reason: str) -> None:
        errors = self.endpoint(ep).errors
        errors[reason] = errors.get(reason, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def ended(self, bytes_in: int, bytes_out: int, datagrams_in: int = 0, datagrams_out: int = 0) -> None:
        super().ended(bytes_in, bytes_out, datagrams_in, datagrams_out)
        if self.retired and not self.active and self._registry is not None:
            self._registry.drop(self)

    def drop_endpoint(self, counts: EndpointTraffic) -> None:
        _drop(self.endpoints, counts.address, counts)

    def prune(self, current: Collection[Address]) -> None:
        """Forget endpoints no longer in any of this port's pools (once their connections end)."""
        for key in [k for k in self.endpoints if k not in current]:
            _retire(self.endpoints, key)


class Traffic:
    """Every service port's counts, created on first use."""

    def __init__(self) -> None:
        self.services: dict[ServicePortName, ServiceTraffic] = {}

    def service(self, name: ServicePortName) -> ServiceTraffic:
        return _take(self.services, name, lambda: ServiceTraffic(name, self))

    def prune(self, name: ServicePortName, current: Collection[Address] | None) -> None:
        """After a sync changed ``name``'s pools: ``current`` is the endpoints it still has, None
        when the service port is gone."""
        counts = self.services.get(name)
        if counts is None:
            return
        counts.prune(current or ())
        if current is None:
            _retire(self.services, name)

    def drop(self, counts: ServiceTraffic) -> None:
        _drop(self.services, counts.name, counts)

    def load(self, name: ServicePortName) -> Callable[[Endpoint], int]:
        """``name``'s open connections (UDP: flows) and dials in progress per endpoint, for
        least-connections pools; looked up per call, so it creates no counts for a service port
        that has had no traffic."""
        services = self.services

        def active(ep: Endpoint) -> int:
            counts = services.get(name)
            endpoint = counts.endpoints.get((ep.ip, ep.port)) if counts is not None else None
            return endpoint.active + endpoint.dialing if endpoint is not None else 0

        return active


K = TypeVar("K")
C = TypeVar("C", bound=Counts)


def _take(table: dict[K, C], key: K, make: Callable[[], C]) -> C:
    """The counts under ``key``, made on first use; counts retired but still there are kept."""
    counts = table.get(key)
    if counts is None:
        counts = table[key] = make()
    else:
        counts.retired = False
    return counts


def _retire(table: dict[K, C], key: K) -> None:
    """``key`` left the routing table: forget it now, or when its last connection ends."""
    if table[key].active:
        table[key].retired = True
    else:
        del table[key]


def _drop(table: dict[K, C], key: K, counts: C) -> None:
    if table.get(key) is counts:  # not a newer one made under the same key
        del table[key]


@dataclasses.dataclass
class Summary:
    """Plain numbers for one service port or endpoint, open connections included: what a scrape
    exports, and what a worker process sends its parent (picklable, and added up with ``add``)."""

    opened: int = 0
    active: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    """Endpoints: failed dials by reason. Service ports: refusals by reason."""

    def add(self, other: Summary) -> None:
        self.opened += other.opened
        self.active += other.active
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.datagrams_in += other.datagrams_in
        self.datagrams_out += other.datagrams_out
        for reason, n in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + n


@dataclasses.dataclass
class PortSummary(Summary):
    retries: int = 0
    transparent: int = 0
    connect_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_sum: float = 0.0
    endpoints: dict[Address, Summary] = dataclasses.field(default_factory=dict)

    def add(self, other: Summary) -> None:
        super().add(other)
        if isinstance(other, PortSummary):
            self.retries += other.retries
            self.transparent += other.transparent
            self.connect_buckets = [a + b for a, b in zip(self.connect_buckets, other.connect_buckets, strict=True)]
            self.connect_sum += other.connect_sum
            for address, ep in other.endpoints.items():
                self.endpoints.setdefault(address, Summary()).add(ep)


Summaries = dict[ServicePortName, PortSummary]


def summarize(traffic: Traffic, live: Iterable[Live]) -> Summaries:
    """Every used service port's numbers: what ended connections added up to plus what open ones
    have moved so far. Ports never used (no connection, no refusal) are left out."""
    running: dict[int, list[int]] = {}
    for svc, ep, *moved in live:
        for counts in (svc, ep):
            if counts is not None:
                acc = running.setdefault(id(counts), [0, 0, 0, 0])
                for i, n in enumerate(moved):
                    acc[i] += n

    def numbers(c: Counts, errors: dict[str, int]) -> dict[str, Any]:
        b_in, b_out, d_in, d_out = running.get(id(c), (0, 0, 0, 0))
        return {"opened": c.opened, "active": c.active, "bytes_in": c.bytes_in + b_in,
                "bytes_out": c.bytes_out + b_out, "datagrams_in": c.datagrams_in + d_in,
                "datagrams_out": c.datagrams_out + d_out, "errors": dict(errors)}

    out: Summaries = {}
    for name, svc in traffic.services.items():
        if svc.opened or svc.refused:
            out[name] = PortSummary(
                **numbers(svc, svc.refused), retries=svc.retries, transparent=svc.transparent,
                connect_buckets=list(svc.connect_buckets),
                connect_sum=svc.connect_sum,
                endpoints={address: Summary(**numbers(ep, ep.errors)) for address, ep in svc.endpoints.items()})
    return out


def merge(parts: Iterable[Summaries]) -> Summaries:
    """Several processes' summaries as one."""
    total: Summaries = {}
    for part in parts:
        for name, summary in part.items():
            total.setdefault(name, PortSummary()).add(summary)
    return total
