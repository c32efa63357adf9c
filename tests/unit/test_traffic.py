"""Traffic counts (proxy.dataplane.traffic) and their export (metrics.TrafficCollector)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.dataplane.traffic import Live, ServiceTraffic, Traffic
from proxy.metrics import TrafficCollector
from proxy.model import Endpoint, Family, ServicePortName

WEB = ServicePortName("ns", "web", "http", "TCP")
DNS = ServicePortName("ns", "dns", "dns", "UDP")
A = Endpoint("10.0.0.1", 80, Family.V4)
B = Endpoint("10.0.0.2", 80, Family.V4)


def connection(svc: ServiceTraffic, ep: Endpoint, seconds: float = 0.001) -> None:
    svc.opened += 1
    svc.active += 1
    svc.connected(ep, seconds)


def test_connect_times_fall_in_the_first_bucket_that_holds_them() -> None:
    svc = Traffic().service(WEB)
    for seconds in (0.0004, 0.0005, 0.0006, 99.0):
        connection(svc, A, seconds)
    assert svc.connect_buckets[0] == 2  # le 0.0005 holds 0.0005 itself
    assert svc.connect_buckets[1] == 1
    assert svc.connect_buckets[-1] == 1  # +Inf
    assert svc.endpoints[A.ip, A.port].opened == 4


def test_an_ended_connection_adds_its_counts_to_service_and_endpoint() -> None:
    svc = Traffic().service(WEB)
    connection(svc, A)
    ep = svc.endpoint(A)
    svc.ended(10, 20)
    ep.ended(10, 20)
    assert (svc.active, svc.bytes_in, svc.bytes_out) == (0, 10, 20)
    assert (ep.active, ep.opened, ep.bytes_in, ep.bytes_out) == (0, 1, 10, 20)


def test_endpoints_that_left_are_dropped_once_their_last_connection_ends() -> None:
    traffic = Traffic()
    svc = traffic.service(WEB)
    connection(svc, A)
    connection(svc, B)
    a, b = svc.endpoint(A), svc.endpoint(B)
    b.ended(0, 0)
    traffic.prune(WEB, {(A.ip, A.port)})  # B left the pool; A stays
    assert set(svc.endpoints) == {(A.ip, A.port)}
    traffic.prune(WEB, set())  # A left too, but a connection to it still runs
    assert set(svc.endpoints) == {(A.ip, A.port)}
    a.ended(1, 1)
    assert svc.endpoints == {}


def test_a_removed_service_port_is_dropped_after_its_last_connection() -> None:
    traffic = Traffic()
    svc = traffic.service(WEB)
    connection(svc, A)
    traffic.prune(WEB, None)
    assert traffic.services == {WEB: svc}
    svc.ended(0, 0)
    assert traffic.services == {}
    assert traffic.service(WEB) is not svc  # a new Service of that name starts from zero


def test_a_service_port_that_comes_back_before_its_last_connection_ends_is_kept() -> None:
    traffic = Traffic()
    svc = traffic.service(WEB)
    connection(svc, A)
    traffic.prune(WEB, None)
    assert traffic.service(WEB) is svc  # back (a re-created Service): keeps counting
    svc.ended(0, 0)
    assert traffic.services == {WEB: svc}


def scrape(traffic: Traffic, live: list[Live]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(TrafficCollector(traffic, lambda: live))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def labels(name: ServicePortName, **extra: str) -> frozenset[tuple[str, str]]:
    base = {"namespace": name.namespace, "service": name.name, "port_name": name.port, "protocol": name.protocol}
    return frozenset({**base, **extra}.items())


def test_export_adds_what_open_connections_have_moved() -> None:
    traffic = Traffic()
    svc = traffic.service(WEB)
    connection(svc, A, 0.003)
    ep = svc.endpoints[A.ip, A.port]
    svc.refuse("no_endpoints")
    svc.connect_failed(B, "timeout")
    traffic.service(ServicePortName("ns", "idle", "", "TCP"))  # never used: not exported
    s = scrape(traffic, [(svc, ep, 5, 7, 0, 0), (svc, None, 1, 0, 0, 0)])
    assert s["svcproxy_service_bytes_total", labels(WEB, direction="from_client")] == 6
    assert s["svcproxy_service_bytes_total", labels(WEB, direction="from_endpoint")] == 7
    assert s["svcproxy_endpoint_bytes_total", labels(WEB, endpoint="10.0.0.1:80", direction="from_client")] == 5
    assert s["svcproxy_service_connections_active", labels(WEB)] == 1
    assert s["svcproxy_connections_refused_total", labels(WEB, reason="no_endpoints")] == 1
    assert s["svcproxy_endpoint_connect_errors_total", labels(WEB, endpoint="10.0.0.2:80", reason="timeout")] == 1
    # B only failed: its errors are exported, not zeros for connections it never had.
    assert ("svcproxy_endpoint_connections_total", labels(WEB, endpoint="10.0.0.2:80")) not in s
    assert s["svcproxy_service_connect_duration_seconds_bucket", labels(WEB, le="0.0025")] == 0
    assert s["svcproxy_service_connect_duration_seconds_bucket", labels(WEB, le="0.005")] == 1
    assert s["svcproxy_service_connect_duration_seconds_bucket", labels(WEB, le="+Inf")] == 1
    assert not any(pairs and dict(pairs).get("service") == "idle" for _, pairs in s)
    assert not any(name == "svcproxy_service_datagrams_total" for name, _ in s)  # TCP only


def test_udp_exports_datagrams_and_no_connect_times() -> None:
    traffic = Traffic()
    svc = traffic.service(DNS)
    ep = svc.flow_opened(A)
    s = scrape(traffic, [(svc, ep, 30, 60, 1, 2)])
    assert s["svcproxy_service_datagrams_total", labels(DNS, direction="from_client")] == 1
    assert s["svcproxy_endpoint_datagrams_total", labels(DNS, endpoint="10.0.0.1:80", direction="from_endpoint")] == 2
    assert s["svcproxy_service_connections_total", labels(DNS)] == 1
    assert not any(name.startswith("svcproxy_service_connect_") for name, _ in s)


def test_ipv6_endpoints_are_bracketed() -> None:
    traffic = Traffic()
    svc = traffic.service(WEB)
    connection(svc, Endpoint("fd00::1", 80, Family.V6))
    s = scrape(traffic, [])
    assert s["svcproxy_endpoint_connections_total", labels(WEB, endpoint="[fd00::1]:80")] == 1


def test_summaries_of_several_processes_add_up() -> None:
    from proxy.dataplane.traffic import merge, summarize

    one, two = Traffic(), Traffic()
    for traffic in (one, two):
        svc = traffic.service(WEB)
        connection(svc, A, 0.003)
        svc.refuse("no_endpoints")
    two.service(WEB).connect_failed(B, "refused")
    ep = one.service(WEB).endpoints[A.ip, A.port]
    total = merge([summarize(one, [(one.service(WEB), ep, 5, 7, 0, 0)]), summarize(two, [])])
    web = total[WEB]
    assert (web.opened, web.active, web.bytes_in, web.bytes_out) == (2, 2, 5, 7)
    assert web.errors == {"no_endpoints": 2}
    assert sum(web.connect_buckets) == 2
    assert web.endpoints[A.ip, A.port].opened == 2 and web.endpoints[A.ip, A.port].bytes_in == 5
    assert web.endpoints[B.ip, B.port].errors == {"refused": 1}
