"""Which connections keep the client's own address on the way to the endpoint: kube-proxy's rules
(iptables and nftables modes, with the --cluster-cidr local detector), case by case."""

from __future__ import annotations

import pytest

from proxy.balancer import Pool
from proxy.dataplane.target import LocalSources, Target
from proxy.dataplane.traffic import ServiceTraffic
from proxy.model import ServicePortName

NODE4, NODE6 = "192.0.2.10", "2001:db8::10"
POD4, POD6 = "10.244.1.5", "fd00:244:1::5"
OTHER_POD4, OTHER_POD6 = "10.244.2.7", "fd00:244:2::7"
OUTSIDE4, OUTSIDE6 = "203.0.113.9", "2001:db8:ffff::9"


def target(*, external: str = "") -> Target:
    sources = LocalSources()
    sources.update([NODE4, NODE6], ["10.244.0.0/16", "fd00:244::/40"])
    return Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0),
                  local_sources=sources, external=external)


CLUSTER_IP, ETP_CLUSTER, ETP_LOCAL = "", "Cluster", "Local"


@pytest.mark.parametrize(("client", "endpoint", "frontend", "kept"), [
    # At a clusterIP, a pod keeps its address, whichever node the endpoint is on ...
    (POD4, OTHER_POD4, CLUSTER_IP, True),
    (POD6, OTHER_POD6, CLUSTER_IP, True),
    # ... but a pod reaching itself through its Service sees the node (the hairpin).
    (POD4, POD4, CLUSTER_IP, False),
    (POD6, POD6, ETP_LOCAL, False),
    # The node itself is the node, everywhere.
    (NODE4, POD4, CLUSTER_IP, False),
    ("127.0.0.1", POD4, ETP_LOCAL, False),
    ("::1", POD6, ETP_LOCAL, False),
    # Off-cluster clients of a clusterIP are masqueraded.
    (OUTSIDE4, POD4, CLUSTER_IP, False),
    # At a nodePort, externalIP or LB IP: kept with externalTrafficPolicy: Local, pods included ...
    (OUTSIDE4, POD4, ETP_LOCAL, True),
    (OUTSIDE6, POD6, ETP_LOCAL, True),
    (POD4, OTHER_POD4, ETP_LOCAL, True),
    # ... and masqueraded with Cluster, pods included (kube-proxy's KUBE-EXT chain marks them all).
    (OUTSIDE4, POD4, ETP_CLUSTER, False),
    (OUTSIDE6, POD6, ETP_CLUSTER, False),
    (POD4, OTHER_POD4, ETP_CLUSTER, False),
    # An endpoint on the node's own address (hostNetwork) answers through the output path: the node.
    (POD4, NODE4, CLUSTER_IP, False),
    (OUTSIDE6, NODE6, ETP_LOCAL, False),
], ids=["pod-v4", "pod-v6", "hairpin-v4", "hairpin-v6", "node", "loopback", "loopback-v6", "outside-to-cluster-ip",
        "outside-etp-local", "outside-etp-local-v6", "pod-etp-local", "outside-etp-cluster",
        "outside-etp-cluster-v6", "pod-etp-cluster", "host-network-endpoint", "host-network-endpoint-v6"])
def test_kube_proxys_rules(client: str, endpoint: str, frontend: str, kept: bool) -> None:
    assert target(external=frontend).keeps_client_address(client, endpoint) is kept


def test_without_a_cluster_cidr_no_client_is_a_pod() -> None:
    t = Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0))
    assert not t.keeps_client_address(POD4, OTHER_POD4)


def test_a_changed_cluster_cidr_or_node_address_is_seen_at_once() -> None:
    sources = LocalSources()
    assert not sources.is_pod(POD4) and not sources.is_node(NODE4)  # remembered ...
    sources.update([NODE4], ["10.244.0.0/16"])
    assert sources.is_pod(POD4) and sources.is_node(NODE4)  # ... and forgotten on an update
    assert POD4 in sources and OUTSIDE4 not in sources


def test_two_pods_on_one_bridge_are_the_node_to_each_other_without_br_netfilter() -> None:
    """The reply between two pods on one of the node's links (a bridge) never reaches its IP layer,
    so it could not be steered back: the node's address then. Across links it is kept."""
    sources = LocalSources()
    sources.update([NODE4, "10.244.1.1"], ["10.244.0.0/16"], [f"{NODE4}/24", "10.244.1.1/24", "127.0.0.1/8"])
    t = Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0),
               local_sources=sources)
    assert not t.keeps_client_address("10.244.1.5", "10.244.1.7")  # one bridge
    assert t.keeps_client_address("10.244.2.5", "10.244.1.7")  # a pod of another node
    assert t.keeps_client_address("10.244.1.5", "10.244.3.7")  # to another node's pod
    lb = Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0),
                local_sources=sources, external="Local")
    assert lb.keeps_client_address("192.0.2.50", "10.244.1.7")  # a neighbour on the node's LAN, to a pod


def test_two_pods_on_a_steered_bridge_keep_their_address() -> None:
    """Where br_netfilter lets --transparent steer a bridge's replies (tproxy.Steering.steer_bridges),
    pods on that bridge keep their address with each other, per family; the node and the hairpin
    stay the node."""
    sources = LocalSources()
    interfaces = ["10.244.1.1/24", "fd00:244:1::1/64", "10.244.9.1/24"]
    sources.update(["10.244.1.1", "fd00:244:1::1", "10.244.9.1"], ["10.244.0.0/16", "fd00:244::/40"], interfaces,
                   ["10.244.1.0/24"])
    t = Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0),
               local_sources=sources)
    assert t.keeps_client_address("10.244.1.5", "10.244.1.7")  # the steered bridge, IPv4
    assert not t.keeps_client_address("fd00:244:1::5", "fd00:244:1::7")  # its IPv6 is not steered
    assert not t.keeps_client_address("10.244.9.5", "10.244.9.7")  # another bridge, not steered
    assert not t.keeps_client_address("10.244.1.5", "10.244.1.5")  # the hairpin
    assert not t.keeps_client_address("10.244.1.1", "10.244.1.7")  # the node, on its bridge
    sources.update(["10.244.1.1"], ["10.244.0.0/16"], interfaces)  # br_netfilter turned off
    assert not t.keeps_client_address("10.244.1.5", "10.244.1.7")
