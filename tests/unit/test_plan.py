"""Table.update: which sockets open and close, which pools change, which VIPs come and go."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from proxy.model import Endpoint, Family, NamespacedName, Policy, ServicePortName, ServiceState
from proxy.plan import ListenerKey, Node, Plan, PoolKey, Table, usable_endpoints
from tests.unit.factories import endpoint, make_service, make_slice, service_port, state_of

NODE = Node("node-a", ("192.168.1.10", "127.0.0.1", "fd00::10"))
WEB = NamespacedName("default", "web")
HTTP = ServicePortName("default", "web", "http", "TCP")


def tcp(ip: str, port: int) -> ListenerKey:
    return ListenerKey(ip, port, "TCP")


def opened(plan: Plan) -> set[ListenerKey]:
    return {s.key for s in plan.open}


def ips(eps: tuple[Endpoint, ...]) -> frozenset[str]:
    return frozenset(e.ip for e in eps)


def web(*slices: dict[str, Any], **spec: Any) -> ServiceState:
    """State of default/web, a NodePort service on 80/30080 (tweak with spec) with these slices."""
    spec.setdefault("type", "NodePort")
    spec.setdefault("ports", [service_port("http", 80, node_port=30080)])
    svc = make_service(**spec)
    svc["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"  # older than other()'s
    return state_of(svc, *(slices or (make_slice(),)))


def two_endpoints(*, b_node: str = "node-b") -> dict[str, Any]:
    return make_slice(endpoints=[endpoint("10.244.1.5", node="node-a"), endpoint("10.244.2.7", node=b_node)])


# -- a new service ----------------------------------------------------------------------------------

def test_new_service_opens_every_frontend() -> None:
    state = web(
        externalIPs=["203.0.113.5"], type="LoadBalancer",
        ingress=[{"ip": "198.51.100.7", "ipMode": "VIP"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}],
    )
    plan = Table(NODE).update({WEB: state})
    assert opened(plan) == {
        tcp("10.96.0.10", 80),      # clusterIP
        tcp("203.0.113.5", 80),     # externalIP
        tcp("198.51.100.7", 80),    # LB ingress, ipMode VIP (Proxy is not captured)
        tcp("192.168.1.10", 30080), tcp("127.0.0.1", 30080),  # nodePort on each IPv4 nodePort address
    }
    assert plan.add_vips == {"10.96.0.10", "203.0.113.5", "198.51.100.7"}
    assert not (plan.close or plan.retarget or plan.drop_pools or plan.remove_vips)
    # Both policies are Cluster, so clusterIP and nodePort share one pool.
    pool = PoolKey(HTTP, Family.V4, Policy.CLUSTER)
    assert {s.pool for s in plan.open} == {pool}
    assert {k: ips(v.endpoints) for k, v in plan.pools.items()} == {pool: {"10.244.1.5"}}


def test_pool_carries_affinity_timeout() -> None:
    plan = Table(NODE).update({WEB: web(sessionAffinity="ClientIP")})
    assert {p.affinity_timeout for p in plan.pools.values()} == {10800}


def test_no_usable_endpoints_opens_nothing_but_adds_vips() -> None:
    # Nothing listening means the kernel refuses connections, as kube-proxy's REJECT does.
    sl = make_slice(endpoints=[endpoint("10.244.1.5", ready=False, serving=False, terminating=False)])
    plan = Table(NODE).update({WEB: web(sl, externalIPs=["203.0.113.5"])})
    assert plan.open == []
    assert plan.pools == {}
    assert plan.add_vips == {"10.96.0.10", "203.0.113.5"}


def test_service_without_slices_opens_nothing() -> None:
    plan = Table(NODE).update({WEB: state_of(make_service())})
    assert (plan.open, plan.pools, plan.add_vips) == ([], {}, {"10.96.0.10"})


def test_endpoints_arriving_later_open_listeners() -> None:
    table = Table(NODE)
    table.update({WEB: state_of(make_service())})
    plan = table.update({WEB: state_of(make_service(), make_slice())})
    assert opened(plan) == {tcp("10.96.0.10", 80)}
    assert not plan.add_vips


# -- changes ----------------------------------------------------------------------------------------

def test_endpoint_change_updates_pools_only() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    plan = table.update({WEB: web(two_endpoints())})
    assert not (plan.open or plan.close or plan.retarget or plan.add_vips or plan.remove_vips or plan.drop_pools)
    assert {ips(p.endpoints) for p in plan.pools.values()} == {frozenset({"10.244.1.5", "10.244.2.7"})}


def test_last_endpoint_gone_closes_listeners_but_keeps_vips() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    plan = table.update({WEB: web(make_slice(endpoints=[]))})
    assert set(plan.close) == {tcp("10.96.0.10", 80), tcp("192.168.1.10", 30080), tcp("127.0.0.1", 30080)}
    assert plan.drop_pools == [PoolKey(HTTP, Family.V4, Policy.CLUSTER)]
    assert not plan.remove_vips
    assert table.vips == {"10.96.0.10"}


def test_removed_service_closes_drops_and_removes_vips() -> None:
    table = Table(NODE)
    table.update({WEB: web(externalIPs=["203.0.113.5"])})
    plan = table.update({WEB: ServiceState()})
    assert set(plan.close) == {tcp("10.96.0.10", 80), tcp("203.0.113.5", 80),
                               tcp("192.168.1.10", 30080), tcp("127.0.0.1", 30080)}
    assert plan.drop_pools == [PoolKey(HTTP, Family.V4, Policy.CLUSTER)]
    assert plan.remove_vips == {"10.96.0.10", "203.0.113.5"}
    assert (table.listeners, table.pools, table.vips, table.services) == ({}, {}, set(), {})


def test_port_change_moves_the_listener() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    plan = table.update({WEB: web(ports=[service_port("http", 8080, node_port=30080)])})
    assert plan.close == [tcp("10.96.0.10", 80)]
    assert opened(plan) == {tcp("10.96.0.10", 8080)}
    assert not (plan.add_vips or plan.remove_vips)


def test_policy_change_retargets_without_reopening() -> None:
    table = Table(NODE)
    table.update({WEB: web(two_endpoints())})
    plan = table.update({WEB: web(two_endpoints(), externalTrafficPolicy="Local")})
    assert not (plan.open or plan.close)
    local = PoolKey(HTTP, Family.V4, Policy.LOCAL)
    assert {s.key: s.pool for s in plan.retarget} == {tcp("192.168.1.10", 30080): local, tcp("127.0.0.1", 30080): local}
    assert ips(plan.pools[local].endpoints) == {"10.244.1.5"}


def test_same_state_twice_plans_nothing() -> None:
    table = Table(NODE)
    assert table.update({WEB: web()})
    assert not table.update({WEB: web()})  # re-converted from equal objects
    assert not table.update({})


def test_unknown_service_removed_plans_nothing() -> None:
    assert not Table(NODE).update({WEB: ServiceState()})


# -- services sharing addresses ---------------------------------------------------------------------

def other(name: str, *, port: int = 443, created: str = "2026-01-02T00:00:00Z",
          **spec: Any) -> tuple[NamespacedName, ServiceState]:
    svc = make_service(name=name, clusterIP="10.96.0.20", ports=[service_port("https", port)], **spec)
    if created:
        svc["metadata"]["creationTimestamp"] = created
    sl = make_slice(name=f"{name}-1", service=name, endpoints=[endpoint("10.244.9.9")],
                    ports=[{"name": "https", "protocol": "TCP", "port": 8443}])
    return NamespacedName("default", name), state_of(svc, sl)


def test_shared_vip_is_removed_with_its_last_user() -> None:
    table = Table(NODE)
    api, api_state = other("api", externalIPs=["203.0.113.5"])
    plan = table.update({WEB: web(externalIPs=["203.0.113.5"]), api: api_state})
    assert "203.0.113.5" in plan.add_vips
    assert {tcp("203.0.113.5", 80), tcp("203.0.113.5", 443)} <= opened(plan)
    plan = table.update({WEB: ServiceState()})
    assert "203.0.113.5" not in plan.remove_vips
    assert "203.0.113.5" in table.vips
    plan = table.update({api: ServiceState()})
    assert plan.remove_vips == {"203.0.113.5", "10.96.0.20"}


def test_listener_claimed_twice_goes_to_the_older_service(caplog: pytest.LogCaptureFixture) -> None:
    table = Table(NODE)
    table.update({WEB: web(externalIPs=["203.0.113.5"])})
    api, api_state = other("api", port=80, externalIPs=["203.0.113.5"])
    with caplog.at_level(logging.ERROR, logger="proxy.plan"):
        plan = table.update({api: api_state})
    assert tcp("203.0.113.5", 80) not in opened(plan) | {s.key for s in plan.retarget}
    assert table.owner[tcp("203.0.113.5", 80)] == WEB
    assert table.listeners[tcp("203.0.113.5", 80)].pool.name == HTTP
    assert tcp("10.96.0.20", 80) in opened(plan)  # the rest of api is served
    assert any("TCP 203.0.113.5:80 is wanted by default/api; default/web has it" in r.getMessage()
               for r in caplog.records)


def test_holder_keeps_the_listener_across_its_own_updates() -> None:
    table = Table(NODE)
    table.update({WEB: web(two_endpoints(), externalIPs=["203.0.113.5"])})
    api, api_state = other("api", port=80, externalIPs=["203.0.113.5"])
    table.update({api: api_state})
    plan = table.update({WEB: web(externalIPs=["203.0.113.5"])})  # endpoints change
    assert table.owner[tcp("203.0.113.5", 80)] == WEB
    assert not (plan.open or plan.close or plan.retarget)
    plan = table.update({WEB: web(externalIPs=["203.0.113.5"], externalTrafficPolicy="Local")})  # spec changes
    assert table.owner[tcp("203.0.113.5", 80)] == WEB
    assert {s.key: s.pool for s in plan.retarget}[tcp("203.0.113.5", 80)] == PoolKey(HTTP, Family.V4, Policy.LOCAL)


def test_address_moved_between_services_in_one_sync_is_retargeted() -> None:
    table = Table(NODE)
    api, api_state = other("api", port=80)
    table.update({WEB: web(externalIPs=["203.0.113.5"]), api: api_state})
    _, api_moved = other("api", port=80, externalIPs=["203.0.113.5"])
    plan = table.update({WEB: web(), api: api_moved})  # web gives it up first
    assert [s.key for s in plan.retarget] == [tcp("203.0.113.5", 80)]
    assert tcp("203.0.113.5", 80) not in plan.close
    assert table.owner[tcp("203.0.113.5", 80)] == api


def test_address_moved_between_services_in_one_sync_any_order() -> None:
    table = Table(NODE)
    api, api_state = other("api", port=80)
    table.update({WEB: web(externalIPs=["203.0.113.5"]), api: api_state})
    _, api_moved = other("api", port=80, externalIPs=["203.0.113.5"])
    plan = table.update({api: api_moved, WEB: web()})  # the checkout order is arbitrary
    assert tcp("203.0.113.5", 80) not in plan.close
    assert table.owner.get(tcp("203.0.113.5", 80)) == api


@pytest.mark.parametrize("api_first", [True, False])
def test_conflict_is_decided_by_age_then_name_never_by_arrival(api_first: bool,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Two Services given one nodePort: the same one wins whichever arrives first (and in one sync)."""
    def claimant(name: str, created: str) -> tuple[NamespacedName, ServiceState]:
        svc = make_service(name=name, clusterIP=f"10.96.0.{len(name)}", type="NodePort",
                           ports=[service_port("http", 80, node_port=31852)])
        if created:
            svc["metadata"]["creationTimestamp"] = created
        return NamespacedName("default", name), state_of(svc, make_slice(service=name))

    for stamps, winner in ((("", ""), "alpha"), (("2026-03-01T00:00:00Z", "2026-02-01T00:00:00Z"), "beta")):
        alpha, beta = claimant("alpha", stamps[0]), claimant("beta", stamps[1])
        order = [alpha, beta] if api_first else [beta, alpha]
        one_by_one, together = Table(NODE), Table(NODE)
        for key, state in order:
            one_by_one.update({key: state})
        together.update(dict(order))
        for table in (one_by_one, together):
            assert table.owner[tcp("192.168.1.10", 31852)] == NamespacedName("default", winner)
            assert table.conflicts == len([k for k in table.listeners if k.port == 31852]) > 0
            table.update({NamespacedName("default", "beta"): ServiceState()})  # beta deleted: no conflict left
            assert table.conflicts == 0
    assert "is wanted by" in caplog.text and "the oldest Service, then by name" in caplog.text


def test_health_check_port_conflicts_are_counted_until_resolved() -> None:
    def claimant(name: str) -> tuple[NamespacedName, ServiceState]:
        svc = make_service(name=name, clusterIP=f"10.96.0.{len(name)}", type="LoadBalancer",
                           externalTrafficPolicy="Local", healthCheckNodePort=32000,
                           ports=[service_port("http", 80 + len(name), node_port=31000 + len(name))])
        return NamespacedName("default", name), state_of(svc, make_slice(service=name))

    table = Table(NODE)
    table.update(dict([claimant("alpha"), claimant("beta")]))
    assert table.conflicts == len(table.health) > 0  # each node address's port is contested
    table.update({NamespacedName("default", "alpha"): ServiceState()})
    assert table.conflicts == 0


def test_an_older_service_arriving_later_takes_the_listener_over() -> None:
    table = Table(NODE)
    api, api_state = other("api", port=80, externalIPs=["203.0.113.5"])
    table.update({api: api_state})
    plan = table.update({WEB: web(externalIPs=["203.0.113.5"])})  # web is older
    assert table.owner[tcp("203.0.113.5", 80)] == WEB
    assert tcp("203.0.113.5", 80) in {s.key for s in plan.retarget}


def test_released_listener_goes_to_the_waiting_service() -> None:
    table = Table(NODE)
    table.update({WEB: web(externalIPs=["203.0.113.5"])})
    api, api_state = other("api", port=80, externalIPs=["203.0.113.5"])
    table.update({api: api_state})  # conflict: web keeps 203.0.113.5:80
    plan = table.update({WEB: ServiceState()})
    assert "203.0.113.5" in table.vips  # api still uses it...
    assert table.owner.get(tcp("203.0.113.5", 80)) == api  # ...so api must now be served there
    assert tcp("203.0.113.5", 80) in {s.key for s in plan.retarget} | opened(plan)


# -- families, policies, endpoint choice -----------------------------------------------------------

def test_ipv6_cluster_ip_uses_only_ipv6_endpoints() -> None:
    v4 = make_slice(name="web-v4", endpoints=[endpoint("10.244.1.5")])
    v6 = make_slice(name="web-v6", address_type="IPv6", endpoints=[endpoint("fd00:244::5")])
    table = Table(NODE)
    plan = table.update({WEB: web(v4, v6, clusterIPs=["10.96.0.10", "fd00:96::10"])})
    pool_of = {s.key: s.pool for s in plan.open}
    assert pool_of[tcp("fd00:96::10", 80)] == PoolKey(HTTP, Family.V6, Policy.CLUSTER)
    assert ips(plan.pools[PoolKey(HTTP, Family.V6, Policy.CLUSTER)].endpoints) == {"fd00:244::5"}
    assert ips(plan.pools[PoolKey(HTTP, Family.V4, Policy.CLUSTER)].endpoints) == {"10.244.1.5"}
    assert tcp("fd00::10", 30080) in pool_of  # the IPv6 nodePort address serves the IPv6 endpoints


def test_family_without_endpoints_gets_no_listener() -> None:
    plan = Table(NODE).update({WEB: web(clusterIPs=["10.96.0.10", "fd00:96::10"])})
    assert tcp("fd00:96::10", 80) not in opened(plan)
    assert tcp("fd00::10", 30080) not in opened(plan)
    assert "fd00:96::10" in plan.add_vips


def test_internal_traffic_policy_local_restricts_cluster_ip_only() -> None:
    plan = Table(NODE).update({WEB: web(two_endpoints(), internalTrafficPolicy="Local")})
    pool_of = {s.key: s.pool for s in plan.open}
    assert ips(plan.pools[pool_of[tcp("10.96.0.10", 80)]].endpoints) == {"10.244.1.5"}
    assert ips(plan.pools[pool_of[tcp("192.168.1.10", 30080)]].endpoints) == {"10.244.1.5", "10.244.2.7"}


def test_external_traffic_policy_local_restricts_external_frontends_only() -> None:
    state = web(two_endpoints(), externalTrafficPolicy="Local", externalIPs=["203.0.113.5"])
    plan = Table(NODE).update({WEB: state})
    pool_of = {s.key: s.pool for s in plan.open}
    assert ips(plan.pools[pool_of[tcp("10.96.0.10", 80)]].endpoints) == {"10.244.1.5", "10.244.2.7"}
    for k in (tcp("203.0.113.5", 80), tcp("192.168.1.10", 30080)):
        assert ips(plan.pools[pool_of[k]].endpoints) == {"10.244.1.5"}


def test_external_local_policy_without_local_endpoints_keeps_cluster_endpoints_for_local_traffic() -> None:
    # kube-proxy sends this node's and its pods' traffic to an eTP Local frontend to Cluster
    # endpoints, so the nodePort listens; its Local pool is empty (other clients are reset).
    sl = make_slice(endpoints=[endpoint("10.244.2.7", node="node-b")])
    table = Table(NODE)
    plan = table.update({WEB: web(sl, externalTrafficPolicy="Local")})
    assert tcp("192.168.1.10", 30080) in opened(plan)
    spec = table.listeners[tcp("192.168.1.10", 30080)]
    assert spec.pool.policy is Policy.LOCAL and table.pools[spec.pool].endpoints == ()
    assert spec.local_traffic_pool is not None and spec.local_traffic_pool.policy is Policy.CLUSTER
    assert [e.ip for e in table.pools[spec.local_traffic_pool].endpoints] == ["10.244.2.7"]
    assert table.listeners[tcp("10.96.0.10", 80)].local_traffic_pool is None  # internal traffic: no
    # Outside clients of the nodePort keep their address (kube-proxy does not masquerade eTP Local);
    # the clusterIP is no external frontend, whatever the policy.
    assert spec.external == "Local" and table.listeners[tcp("10.96.0.10", 80)].external == ""


def test_internal_local_policy_without_local_endpoints_opens_no_cluster_ip_listener() -> None:
    sl = make_slice(endpoints=[endpoint("10.244.2.7", node="node-b")])
    plan = Table(NODE).update({WEB: web(sl, internalTrafficPolicy="Local")})
    assert tcp("10.96.0.10", 80) not in opened(plan)
    assert tcp("192.168.1.10", 30080) in opened(plan)


def ep(ip: str, *, ready: bool = True, serving: bool = True, terminating: bool = False,
       node: str = "node-a", family: Family = Family.V4) -> Endpoint:
    return Endpoint(ip, 8080, family, ready, serving, terminating, node)


@pytest.mark.parametrize(
    ("endpoints", "policy", "expected"),
    [
        ([ep("a"), ep("b", ready=False, terminating=True)], Policy.CLUSTER, {"a"}),
        ([ep("a", ready=False, terminating=True), ep("b", ready=False, terminating=True)], Policy.CLUSTER, {"a", "b"}),
        ([ep("a", ready=False, serving=False, terminating=True)], Policy.CLUSTER, set()),
        ([ep("a", ready=False, terminating=True), ep("b", ready=False, serving=False, terminating=True)],
         Policy.CLUSTER, {"a"}),
        ([ep("a", ready=False, serving=True, terminating=False)], Policy.CLUSTER, set()),
        ([ep("a", node="node-b"), ep("b", ready=False, terminating=True)], Policy.LOCAL, {"b"}),
        ([ep("a", node="node-b")], Policy.LOCAL, set()),
        ([ep("a"), ep("fd00::1", family=Family.V6)], Policy.CLUSTER, {"a"}),
    ],
    ids=["ready-only", "terminating-fallback", "not-serving-excluded", "fallback-skips-not-serving",
         "unready-not-terminating", "local-fallback", "local-none", "family"],
)
def test_usable_endpoints(endpoints: list[Endpoint], policy: Policy, expected: set[str]) -> None:
    assert ips(usable_endpoints(endpoints, Family.V4, policy, "node-a")) == expected


def test_terminating_fallback_keeps_service_listening() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    draining = make_slice(endpoints=[endpoint("10.244.1.5", ready=False, serving=True, terminating=True)])
    plan = table.update({WEB: web(draining)})
    assert not plan.close
    assert {ips(p.endpoints) for p in plan.pools.values()} == {frozenset({"10.244.1.5"})}


# -- loadBalancerSourceRanges ----------------------------------------------------------------------

def test_source_ranges_apply_to_lb_listeners_only_by_family() -> None:
    v4 = make_slice(name="web-v4")
    v6 = make_slice(name="web-v6", address_type="IPv6", endpoints=[endpoint("fd00:244::5")])
    state = web(v4, v6, type="LoadBalancer", clusterIPs=["10.96.0.10", "fd00:96::10"], externalIPs=["203.0.113.5"],
                loadBalancerSourceRanges=["10.0.0.0/8", "fd00::/8"],
                ingress=[{"ip": "198.51.100.7"}, {"ip": "2001:db8::7"}])
    plan = Table(NODE).update({WEB: state})
    ranges = {s.key: s.source_ranges for s in plan.open}
    assert ranges.pop(tcp("198.51.100.7", 80)) == ("10.0.0.0/8",)
    assert ranges.pop(tcp("2001:db8::7", 80)) == ("fd00::/8",)
    assert set(ranges) >= {tcp("10.96.0.10", 80), tcp("203.0.113.5", 80), tcp("192.168.1.10", 30080)}
    assert set(ranges.values()) == {None}  # clusterIP, externalIP and nodePort: anyone


def test_no_source_ranges_means_anyone() -> None:
    plan = Table(NODE).update({WEB: web(type="LoadBalancer", ingress=[{"ip": "198.51.100.7"}])})
    assert {s.key: s.source_ranges for s in plan.open}[tcp("198.51.100.7", 80)] is None


# -- node changes ----------------------------------------------------------------------------------

def test_set_node_reopens_node_ports_only() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    plan = table.set_node(Node("node-a", ("192.168.1.10", "192.168.2.10")))
    assert plan.close == [tcp("127.0.0.1", 30080)]
    assert opened(plan) == {tcp("192.168.2.10", 30080)}
    assert not (plan.retarget or plan.add_vips or plan.remove_vips or plan.drop_pools)


def test_set_node_with_same_facts_plans_nothing() -> None:
    table = Table(NODE)
    table.update({WEB: web()})
    assert not table.set_node(Node("node-a", NODE.nodeport_addresses))


# -- topology hints --------------------------------------------------------------------------------

def hinted(ip: str, zones: set[str] | None = None, nodes: set[str] | None = None, **kw: Any) -> Endpoint:
    return dataclasses.replace(
        ep(ip, **kw), zone_hints=None if zones is None else frozenset(zones),
        node_hints=None if nodes is None else frozenset(nodes))


@pytest.mark.parametrize(
    ("endpoints", "zone", "expected"),
    [
        ([hinted("a", {"z1"}), hinted("b", {"z2"})], "z1", {"a"}),
        ([hinted("a", {"z1"}), hinted("b")], "z1", {"a", "b"}),
        ([hinted("a", {"z2"}), hinted("b", {"z3"})], "z1", {"a", "b"}),
        ([hinted("a", {"z1"}), hinted("b", {"z2"})], "", {"a", "b"}),
        ([hinted("a", {"z1", "z2"}), hinted("b", {"z2"})], "z2", {"a", "b"}),
        ([hinted("a", {"z1"}, {"node-b"}), hinted("b", {"z2"}, {"node-a"})], "z1", {"b"}),
        ([hinted("a", {"z1"}, {"node-b"}), hinted("b", {"z2"}, {"node-c"})], "z1", {"a"}),
        ([hinted("a", {"z1"}, {"node-a"}), hinted("b", {"z2"})], "z2", {"b"}),
        ([hinted("a", {"z1"}), hinted("b", {"z2"}), hinted("c", ready=False)], "z1", {"a"}),
        ([hinted("a", {"z2"}, ready=False, terminating=True), hinted("b", {"z1"}, ready=False, terminating=True)],
         "z1", {"a", "b"}),
    ],
    ids=["same-zone", "unhinted-endpoint-disables", "no-hint-for-zone", "node-without-zone", "multi-zone-hint",
         "node-hints-first", "zone-when-no-node-hint-here", "zone-when-node-hints-incomplete",
         "unready-ignored", "terminating-fallback-ignores-hints"],
)
def test_topology_hints_narrow_cluster_endpoints(endpoints: list[Endpoint], zone: str, expected: set[str]) -> None:
    assert ips(usable_endpoints(endpoints, Family.V4, Policy.CLUSTER, "node-a", zone)) == expected


def test_local_policy_ignores_topology_hints() -> None:
    endpoints = [hinted("a", {"z2"}, node="node-a"), hinted("b", {"z1"}, node="node-a"), hinted("c", {"z1"}, node="x")]
    assert ips(usable_endpoints(endpoints, Family.V4, Policy.LOCAL, "node-a", "z1")) == {"a", "b"}


def test_zone_change_replans_pools_without_listener_churn() -> None:
    sl = make_slice(endpoints=[endpoint("10.244.1.5", zone_hints=["z1"]), endpoint("10.244.2.7", zone_hints=["z2"])])
    table = Table(Node("node-a", NODE.nodeport_addresses, "z1"))
    plan = table.update({WEB: web(sl)})
    assert {ips(p.endpoints) for p in plan.pools.values()} == {frozenset({"10.244.1.5"})}
    plan = table.set_node(Node("node-a", NODE.nodeport_addresses, "z2"))
    assert {ips(p.endpoints) for p in plan.pools.values()} == {frozenset({"10.244.2.7"})}
    assert not (plan.open or plan.close or plan.retarget)


# -- healthCheckNodePort (externalTrafficPolicy: Local) ---------------------------------------------

def local_lb(*slices: dict[str, Any], **spec: Any) -> ServiceState:
    spec.setdefault("externalTrafficPolicy", "Local")
    return web(*slices, type="LoadBalancer", healthCheckNodePort=31999, **spec)


def test_health_server_on_each_node_port_address() -> None:
    table = Table(NODE)
    plan = table.update({WEB: local_lb(two_endpoints())})
    assert sorted(plan.health_open) == sorted((tcp(ip, 31999), WEB) for ip in NODE.nodeport_addresses)
    assert plan.local_endpoints == {WEB: 1}  # 10.244.1.5 on node-a; 10.244.2.7 is on node-b


def test_no_health_server_for_cluster_policy() -> None:
    plan = Table(NODE).update({WEB: local_lb(externalTrafficPolicy="Cluster")})
    assert (plan.health_open, plan.local_endpoints) == ([], {})


def test_health_server_stays_while_local_endpoints_change() -> None:
    table = Table(NODE)
    table.update({WEB: local_lb(two_endpoints())})
    plan = table.update({WEB: local_lb(two_endpoints(b_node="node-a"))})
    assert plan.local_endpoints == {WEB: 2}
    assert (plan.health_open, plan.health_close) == ([], [])
    draining = make_slice(endpoints=[endpoint("10.244.1.5", ready=False, terminating=True)])
    plan = table.update({WEB: local_lb(draining)})
    assert plan.local_endpoints == {WEB: 0}  # terminating pods still get traffic, but the LB is told 503
    assert plan.health_close == []


def test_health_server_closes_with_policy_or_service() -> None:
    table = Table(NODE)
    table.update({WEB: local_lb()})
    plan = table.update({WEB: local_lb(externalTrafficPolicy="Cluster")})
    assert sorted(plan.health_close) == sorted(tcp(ip, 31999) for ip in NODE.nodeport_addresses)
    table.update({WEB: local_lb()})
    plan = table.update({WEB: ServiceState()})
    assert sorted(plan.health_close) == sorted(tcp(ip, 31999) for ip in NODE.nodeport_addresses)
    assert table.health == {}


def test_health_server_follows_node_port_addresses() -> None:
    table = Table(NODE)
    table.update({WEB: local_lb()})
    plan = table.set_node(Node("node-a", ("192.168.1.10", "192.168.2.10")))
    assert sorted(plan.health_close) == [tcp("127.0.0.1", 31999), tcp("fd00::10", 31999)]
    assert plan.health_open == [(tcp("192.168.2.10", 31999), WEB)]


def health_port_reused() -> tuple[Table, NamespacedName, ServiceState]:
    """web holds health port 31999; api, created in the same sync period, gets the freed port."""
    table = Table(Node("node-a", ("192.168.1.10",)))
    table.update({WEB: local_lb()})
    api, api_state = other("api", type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=31999)
    return table, api, api_state


def test_health_port_handed_over_when_freed_first() -> None:
    table, api, api_state = health_port_reused()
    plan = table.update({WEB: ServiceState(), api: api_state})
    assert table.health == {tcp("192.168.1.10", 31999): api}
    assert plan.health_close == [tcp("192.168.1.10", 31999)]  # applied before health_open
    assert plan.health_open == [(tcp("192.168.1.10", 31999), api)]


def test_health_port_handed_over_in_any_order() -> None:
    table, api, api_state = health_port_reused()
    plan = table.update({api: api_state, WEB: ServiceState()})  # the checkout order is arbitrary
    assert table.health == {tcp("192.168.1.10", 31999): api}
    assert (tcp("192.168.1.10", 31999), api) in plan.health_open


def test_health_port_released_goes_to_the_waiting_service(caplog: pytest.LogCaptureFixture) -> None:
    table, api, api_state = health_port_reused()
    with caplog.at_level(logging.ERROR, logger="proxy.plan"):
        table.update({api: api_state})
    assert table.health == {tcp("192.168.1.10", 31999): WEB}  # the older Service
    assert any("31999" in r.getMessage() for r in caplog.records)
    plan = table.update({WEB: ServiceState()})
    assert table.health == {tcp("192.168.1.10", 31999): api}
    assert (tcp("192.168.1.10", 31999), api) in plan.health_open
