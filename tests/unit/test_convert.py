"""Service and EndpointSlice objects to model values: what is proxied, how, and what is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxy import convert
from proxy.model import Endpoint, Family, Policy, ServicePortName
from tests.unit.factories import endpoint, make_service, make_slice, service_port, slice_port, state_of

Obj = dict[str, Any]


def ports_of(svc: Obj) -> Any:
    return convert.service_state_ports(svc)


def only_port(svc: Obj) -> Any:
    ports = ports_of(svc)
    assert ports is not None and len(ports) == 1
    return ports[0]


def addrs(eps: tuple[Endpoint, ...]) -> set[tuple[str, int]]:
    return {(e.ip, e.port) for e in eps}


HTTP = ServicePortName("default", "web", "http", "TCP")


# -- what is proxied at all -----------------------------------------------------------------------

def test_plain_cluster_ip_service_is_proxied() -> None:
    sp = only_port(make_service())
    assert sp.name == HTTP
    assert (sp.port, sp.protocol, sp.cluster_ips) == (80, "TCP", ("10.96.0.10",))


@pytest.mark.parametrize(
    "svc",
    [
        make_service(type="ExternalName", externalName="db.example.com", clusterIP=""),
        make_service(type="ExternalName", externalName="db.example.com"),
        make_service(clusterIP="None"),
        make_service(clusterIP=""),
        make_service(labels={convert.SERVICE_PROXY_NAME_LABEL: "other-proxy"}),
        make_service(labels={convert.HEADLESS_LABEL: ""}),
    ],
    ids=["externalname", "externalname-with-ip", "headless-None", "headless-empty", "proxy-name", "headless-label"],
)
def test_services_kube_proxy_skips(svc: Obj) -> None:
    assert ports_of(svc) is None


@pytest.mark.parametrize(
    "sl",
    [
        make_slice(labels={convert.HEADLESS_LABEL: ""}),
        make_slice(labels={convert.SERVICE_PROXY_NAME_LABEL: "other-proxy"}),
        make_slice(address_type="FQDN", endpoints=[endpoint("db.example.com")]),
    ],
    ids=["headless-label", "proxy-name", "fqdn"],
)
def test_slices_kube_proxy_skips(sl: Obj) -> None:
    assert convert.endpoint_slice(sl) is None


def test_plain_slice_is_kept() -> None:
    info = convert.endpoint_slice(make_slice())
    assert info is not None
    assert (info.service, info.family, [e.ip for e in info.endpoints]) == ("web", Family.V4, ["10.244.1.5"])


def test_namespace_defaults_to_default() -> None:
    svc = make_service()
    del svc["metadata"]["namespace"]
    assert only_port(svc).name.namespace == "default"


# -- endpoints ------------------------------------------------------------------------------------

def test_named_target_port_resolves_per_slice() -> None:
    # targetPort "http" resolves to 8080 on some pods and 9090 on others: two slices.
    svc = make_service(ports=[service_port("http", 80, target_port="http")])
    a = make_slice(name="web-a", endpoints=[endpoint("10.244.1.5")], ports=[slice_port("http", 8080)])
    b = make_slice(name="web-b", endpoints=[endpoint("10.244.2.7")], ports=[slice_port("http", 9090)])
    assert addrs(state_of(svc, a, b).endpoints_of(HTTP)) == {("10.244.1.5", 8080), ("10.244.2.7", 9090)}


def test_ports_match_by_name_and_protocol() -> None:
    svc = make_service(ports=[service_port("dns", 53, "UDP"), service_port("dns-tcp", 53, "TCP")])
    sl = make_slice(ports=[slice_port("dns", 5353, "UDP"), slice_port("dns-tcp", 5354, "TCP"),
                           slice_port("dns", 9999, "TCP")])  # right name, wrong protocol: unused
    state = state_of(svc, sl)
    assert addrs(state.endpoints_of(ServicePortName("default", "web", "dns", "UDP"))) == {("10.244.1.5", 5353)}
    assert addrs(state.endpoints_of(ServicePortName("default", "web", "dns-tcp", "TCP"))) == {("10.244.1.5", 5354)}


def test_unnamed_single_port_matches_unnamed_slice_port() -> None:
    svc = make_service(ports=[{"protocol": "TCP", "port": 80, "targetPort": 8080}])
    sl = make_slice(ports=[{"protocol": "TCP", "port": 8080}])
    assert addrs(state_of(svc, sl).endpoints_of(ServicePortName("default", "web", "", "TCP"))) == {
        ("10.244.1.5", 8080)}


def test_slice_without_port_number_is_ignored() -> None:
    info = convert.endpoint_slice(make_slice(ports=[{"name": "", "protocol": "TCP", "port": None}]))
    assert info is not None and info.ports == ()


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({}, (True, True, False)),
        ({"ready": False}, (False, True, False)),
        ({"serving": False}, (True, False, False)),
        ({"terminating": True}, (True, True, True)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
    ],
)
def test_condition_defaults(conditions: Obj, expected: tuple[bool, bool, bool]) -> None:
    ep = endpoint("10.244.1.5")
    ep["conditions"] = conditions
    info = convert.endpoint_slice(make_slice(endpoints=[ep]))
    assert info is not None
    e = info.endpoints[0]
    assert (e.ready, e.serving, e.terminating) == expected


def test_missing_conditions_object_means_ready() -> None:
    ep = endpoint("10.244.1.5")
    del ep["conditions"]
    info = convert.endpoint_slice(make_slice(endpoints=[ep]))
    assert info is not None
    assert (info.endpoints[0].ready, info.endpoints[0].serving, info.endpoints[0].terminating) == (True, True, False)


def test_only_first_address_is_used() -> None:
    info = convert.endpoint_slice(make_slice(endpoints=[endpoint("10.244.1.5", "10.244.1.6", "10.244.1.7")]))
    assert info is not None
    assert [e.ip for e in info.endpoints] == ["10.244.1.5"]


def test_node_and_zone_are_kept() -> None:
    info = convert.endpoint_slice(make_slice(endpoints=[endpoint("10.244.1.5", node="node-b", zone="z2")]))
    assert info is not None
    assert (info.endpoints[0].node_name, info.endpoints[0].zone) == ("node-b", "z2")


@pytest.mark.parametrize(
    ("hints", "zones", "nodes"),
    [
        ({}, None, None),
        ({"zone_hints": ["z1", "z2"]}, frozenset({"z1", "z2"}), None),
        ({"node_hints": ["node-a"]}, None, frozenset({"node-a"})),
        ({"zone_hints": [], "node_hints": []}, frozenset(), frozenset()),
    ],
    ids=["none", "zones", "nodes", "empty"],
)
def test_topology_hints(hints: Obj, zones: frozenset[str] | None, nodes: frozenset[str] | None) -> None:
    info = convert.endpoint_slice(make_slice(endpoints=[endpoint("10.244.1.5", **hints)]))
    assert info is not None
    assert (info.endpoints[0].zone_hints, info.endpoints[0].node_hints) == (zones, nodes)


def test_dual_stack_slices_stay_apart_by_family() -> None:
    svc = make_service(clusterIPs=["10.96.0.10", "fd00:96::10"], ipFamilyPolicy="RequireDualStack")
    v4 = make_slice(name="web-v4", endpoints=[endpoint("10.244.1.5")])
    v6 = make_slice(name="web-v6", address_type="IPv6", endpoints=[endpoint("fd00:244::5")])
    eps = state_of(svc, v4, v6).endpoints_of(HTTP)
    assert {(e.ip, e.family) for e in eps} == {("10.244.1.5", Family.V4), ("fd00:244::5", Family.V6)}


def test_duplicate_endpoint_across_slices_is_kept_once_preferring_ready() -> None:
    svc = make_service()
    a = make_slice(name="web-a", endpoints=[endpoint("10.244.1.5", ready=False, terminating=True)])
    b = make_slice(name="web-b", endpoints=[endpoint("10.244.1.5"), endpoint("10.244.1.6")])
    for order in ((a, b), (b, a)):
        eps = state_of(svc, *order).endpoints_of(HTTP)
        assert sorted((e.ip, e.port, e.ready) for e in eps) == [("10.244.1.5", 8080, True), ("10.244.1.6", 8080, True)]


def test_slice_order_does_not_change_the_state() -> None:
    # Equal inputs must give equal states, or every resync would look like a change.
    svc = make_service()
    a = make_slice(name="web-a", endpoints=[endpoint("10.244.1.9"), endpoint("10.244.1.5")])
    b = make_slice(name="web-b", endpoints=[endpoint("10.244.2.1")])
    assert state_of(svc, a, b) == state_of(svc, b, a)


def test_ipv6_addresses_are_normalised() -> None:
    svc = make_service(clusterIP="FD00:96:0::10")
    info = convert.endpoint_slice(make_slice(address_type="IPv6", endpoints=[endpoint("FD00:244:0:0::5")]))
    assert only_port(svc).cluster_ips == ("fd00:96::10",)
    assert info is not None and info.endpoints[0].ip == "fd00:244::5"


# -- frontends ------------------------------------------------------------------------------------

def test_cluster_ips_both_families() -> None:
    sp = only_port(make_service(clusterIPs=["10.96.0.10", "fd00:96::10"]))
    assert sp.cluster_ips == ("10.96.0.10", "fd00:96::10")


def test_cluster_ip_without_cluster_ips_as_in_hand_written_manifests() -> None:
    svc = make_service()
    del svc["spec"]["clusterIPs"]
    assert only_port(svc).cluster_ips == ("10.96.0.10",)


def test_node_port_and_external_ips() -> None:
    svc = make_service(type="NodePort", ports=[service_port("http", 80, node_port=30080)],
                       externalIPs=["203.0.113.5", "2001:db8::5"])
    sp = only_port(svc)
    assert sp.node_port == 30080
    assert sp.external_ips == ("203.0.113.5", "2001:db8::5")


@pytest.mark.parametrize(
    ("ingress", "captured"),
    [
        ([{"ip": "198.51.100.7"}], ("198.51.100.7",)),
        ([{"ip": "198.51.100.7", "ipMode": "VIP"}], ("198.51.100.7",)),
        ([{"ip": "198.51.100.7", "ipMode": "Proxy"}], ()),
        ([{"hostname": "lb.example.com"}], ()),
        ([{"ip": "198.51.100.7", "ipMode": "Proxy"}, {"ip": "198.51.100.8", "ipMode": "VIP"}], ("198.51.100.8",)),
    ],
    ids=["default-vip", "vip", "proxy", "hostname-only", "mixed"],
)
def test_load_balancer_ingress_ip_mode(ingress: list[Obj], captured: tuple[str, ...]) -> None:
    sp = only_port(make_service(type="LoadBalancer", ports=[service_port(node_port=30080)], ingress=ingress))
    assert sp.captured_lb_ips == captured


@pytest.mark.parametrize(
    ("spec", "timeout"),
    [
        ({}, 0),
        ({"sessionAffinity": "None"}, 0),
        ({"sessionAffinity": "ClientIP"}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60),
        ({"sessionAffinity": "None", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 0),
    ],
    ids=["absent", "none", "clientip-default", "clientip-empty-config", "clientip-60", "none-with-config"],
)
def test_session_affinity_timeout(spec: Obj, timeout: int) -> None:
    svc = make_service(**spec)
    if not spec:
        del svc["spec"]["sessionAffinity"]
    assert only_port(svc).affinity_timeout == timeout


def test_load_balancer_source_ranges_are_normalised() -> None:
    sp = only_port(make_service(type="LoadBalancer", loadBalancerSourceRanges=[" 10.1.2.3/8 ", "2001:db8::/32"]))
    assert sp.load_balancer_source_ranges == ("10.0.0.0/8", "2001:db8::/32")


@pytest.mark.parametrize(
    ("spec", "internal", "external"),
    [
        ({}, Policy.CLUSTER, Policy.CLUSTER),
        ({"internalTrafficPolicy": "Local"}, Policy.LOCAL, Policy.CLUSTER),
        ({"type": "NodePort", "externalTrafficPolicy": "Local"}, Policy.CLUSTER, Policy.LOCAL),
        ({"type": "NodePort", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"},
         Policy.LOCAL, Policy.LOCAL),
    ],
)
def test_traffic_policies(spec: Obj, internal: Policy, external: Policy) -> None:
    sp = only_port(make_service(**spec))
    assert (sp.internal_policy, sp.external_policy) == (internal, external)


def test_health_check_node_port_read_and_topology_fields_accepted() -> None:
    # trafficDistribution and the topology-mode annotation only steer the EndpointSlice
    # controller's hints; a Service carrying them converts like any other.
    svc = make_service(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=31999,
                       trafficDistribution="PreferClose",
                       annotations={"service.kubernetes.io/topology-mode": "Auto"})
    sp = only_port(svc)
    assert sp.health_check_node_port == 31999


def test_every_port_shares_the_service_frontends() -> None:
    svc = make_service(ports=[service_port("http", 80), service_port("https", 443)], externalIPs=["203.0.113.5"])
    ports = ports_of(svc)
    assert [(p.name.port, p.port, p.external_ips) for p in ports] == [
        ("http", 80, ("203.0.113.5",)), ("https", 443, ("203.0.113.5",))]


# -- malformed objects ----------------------------------------------------------------------------

def _set(path: str | tuple[str, ...], value: Any) -> Callable[[Obj], None]:
    """A mutator setting a dotted path (list indices as numbers); value ... deletes the key."""
    def mutate(obj: Obj) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        node: Any = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is ...:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


BAD_SERVICES = [
    ("missing-name", _set("metadata.name", ...), "metadata.name"),
    ("bad-cluster-ips", _set("spec.clusterIPs", ["10.96.0.300"]), "spec.clusterIPs[0]"),
    ("cluster-ip-mismatch", _set("spec.clusterIPs", ["10.96.0.11"]), "spec.clusterIPs[0]"),
    ("port-0", _set("spec.ports.0.port", 0), "spec.ports[0].port"),
    ("port-70000", _set("spec.ports.0.port", 70000), "spec.ports[0].port"),
    ("port-string", _set("spec.ports.0.port", "80"), "spec.ports[0].port"),
    ("port-true", _set("spec.ports.0.port", True), "spec.ports[0].port"),
    ("port-missing", _set("spec.ports.0.port", ...), "spec.ports[0].port"),
    ("protocol-http", _set("spec.ports.0.protocol", "HTTP"), "spec.ports[0].protocol"),
    ("protocol-lowercase", _set("spec.ports.0.protocol", "tcp"), "spec.ports[0].protocol"),
    ("ports-not-list", _set("spec.ports", {"port": 80}), "spec.ports"),
    ("port-not-object", _set("spec.ports", [80]), "spec.ports[0]"),
    ("node-port-70000", _set("spec.ports.0.nodePort", 70000), "spec.ports[0].nodePort"),
    ("duplicate-port", _set("spec.ports", [service_port("http", 80), service_port("http", 81)]), "spec.ports[1].name"),
    ("bad-external-ip", _set("spec.externalIPs", ["203.0.113"]), "spec.externalIPs[0]"),
    ("external-ips-string", _set("spec.externalIPs", "203.0.113.5"), "spec.externalIPs"),
    ("bad-lb-ip", _set("status.loadBalancer.ingress", [{"ip": "lb"}]), "status.loadBalancer.ingress[0].ip"),
    ("bad-source-range", _set("spec.loadBalancerSourceRanges", ["10.0.0.0/33"]), "spec.loadBalancerSourceRanges[0]"),
    ("bad-itp", _set("spec.internalTrafficPolicy", "Nearby"), "spec.internalTrafficPolicy"),
    ("bad-etp", _set("spec.externalTrafficPolicy", "local"), "spec.externalTrafficPolicy"),
    ("affinity-too-long",
     _set("spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 86401}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ("labels-not-object", _set("metadata.labels", ["a"]), "metadata.labels"),
    ("bad-proxy-protocol", _set("metadata.annotations", {convert.PROXY_PROTOCOL_ANNOTATION: "v3"}),
     f"metadata.annotations[{convert.PROXY_PROTOCOL_ANNOTATION}]"),
    ("bad-load-balancing", _set("metadata.annotations", {convert.LOAD_BALANCING_ANNOTATION: "random"}),
     f"metadata.annotations[{convert.LOAD_BALANCING_ANNOTATION}]"),
]


@pytest.mark.parametrize(("mutate", "field"), [b[1:] for b in BAD_SERVICES], ids=[b[0] for b in BAD_SERVICES])
def test_malformed_service_names_object_and_field(mutate: Callable[[Obj], None], field: str) -> None:
    svc = make_service("shop", "cart", sessionAffinity="ClientIP")
    mutate(svc)
    with pytest.raises(convert.InvalidObject) as info:
        convert.service_state_ports(svc)
    assert info.value.field == field
    assert field in str(info.value)
    assert str(info.value).startswith("Service ")
    if field != "metadata.name":
        assert "shop/cart" in str(info.value)


def test_bad_cluster_ip_in_hand_written_manifest_names_cluster_ip() -> None:
    svc = make_service("shop", "cart", clusterIP="10.96.0.300")
    del svc["spec"]["clusterIPs"]
    with pytest.raises(convert.InvalidObject) as info:
        convert.service_state_ports(svc)
    assert info.value.field == "spec.clusterIP"


BAD_SLICES = [
    ("missing-name", _set("metadata.name", ...), "metadata.name"),
    ("no-service-label", _set(("metadata", "labels", convert.SERVICE_NAME_LABEL), ...),
     f"metadata.labels[{convert.SERVICE_NAME_LABEL}]"),
    ("empty-service-label", _set(("metadata", "labels", convert.SERVICE_NAME_LABEL), ""),
     f"metadata.labels[{convert.SERVICE_NAME_LABEL}]"),
    ("wrong-family", _set("endpoints", [endpoint("fd00:244::5")]), "endpoints[0].addresses[0]"),
    ("not-an-ip", _set("endpoints", [endpoint("pod-a")]), "endpoints[0].addresses[0]"),
    ("no-addresses", _set("endpoints", [endpoint()]), "endpoints[0].addresses"),
    ("bad-address-type", _set("addressType", "IPv5"), "addressType"),
    ("missing-address-type", _set("addressType", ...), "addressType"),
    ("port-0", _set("ports.0.port", 0), "ports[0].port"),
    ("port-string", _set("ports.0.port", "8080"), "ports[0].port"),
    ("bad-protocol", _set("ports.0.protocol", "ICMP"), "ports[0].protocol"),
    ("endpoints-not-list", _set("endpoints", {"addresses": ["10.244.1.5"]}), "endpoints"),
    ("ready-string", _set("endpoints.0.conditions.ready", "yes"), "endpoints[0].conditions.ready"),
]


@pytest.mark.parametrize(("mutate", "field"), [b[1:] for b in BAD_SLICES], ids=[b[0] for b in BAD_SLICES])
def test_malformed_slice_names_object_and_field(mutate: Callable[[Obj], None], field: str) -> None:
    sl = make_slice("shop", "cart-x1y2z", "cart")
    mutate(sl)
    with pytest.raises(convert.InvalidObject) as info:
        convert.endpoint_slice(sl)
    assert info.value.field == field
    assert field in str(info.value)
    assert str(info.value).startswith("EndpointSlice ")
    if field != "metadata.name":
        assert "shop/cart-x1y2z" in str(info.value)


@pytest.mark.parametrize(("value", "version"), [("v1", 1), ("v2", 2), (" v2 ", 2), ("none", 0), ("", 0)])
def test_the_proxy_protocol_annotation_applies_to_tcp_ports(value: str, version: int) -> None:
    svc = make_service("shop", "cart", annotations={convert.PROXY_PROTOCOL_ANNOTATION: value},
                       ports=[service_port("http", 80), service_port("dns", 53, "UDP")])
    ports = convert.service_state_ports(svc)
    assert ports is not None
    assert [(p.protocol, p.proxy_protocol) for p in ports] == [("TCP", version), ("UDP", 0)]


@pytest.mark.parametrize(("value", "least"), [("least-connections", True), (" least-connections ", True),
                                            ("round-robin", False), ("", False)])
def test_the_load_balancing_annotation_applies_to_every_port(value: str, least: bool) -> None:
    svc = make_service("shop", "cart", annotations={convert.LOAD_BALANCING_ANNOTATION: value},
                       ports=[service_port("http", 80), service_port("dns", 53, "UDP")])
    ports = convert.service_state_ports(svc)
    assert ports is not None
    assert [p.least_connections for p in ports] == [least, least]


def test_invalid_object_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    assert issubclass(convert.InvalidObject, ValueError)


def test_single_port_slices_share_their_endpoints_with_the_service_state() -> None:
    """100,000 endpoints are kept once, not once per slice and again per service port."""
    sl = make_slice(endpoints=[endpoint("10.244.1.5"), endpoint("10.244.1.6")])
    info = convert.endpoint_slice(sl)
    assert info is not None
    ports = convert.service_state_ports(make_service())
    assert ports is not None
    ((_, eps),) = convert.merge_endpoints(ports, [info])
    assert [e.port for e in eps] == [8080, 8080]
    assert all(any(e is s for s in info.endpoints) for e in eps)


def test_multi_port_slices_get_one_endpoint_per_port() -> None:
    sl = make_slice(ports=[slice_port("http", 8080), slice_port("metrics", 9090)])
    info = convert.endpoint_slice(sl)
    assert info is not None
    svc = make_service(ports=[service_port("http", 80), service_port("metrics", 90)])
    ports = convert.service_state_ports(svc)
    assert ports is not None
    merged = dict(convert.merge_endpoints(ports, [info]))
    assert [(e.ip, e.port) for eps in merged.values() for e in eps] == [("10.244.1.5", 8080), ("10.244.1.5", 9090)]
