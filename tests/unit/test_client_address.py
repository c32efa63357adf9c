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


def target(*, external_local: bool) -> Target:
    sources = LocalSources()
    sources.update([NODE4, NODE6], ["10.244.0.0/16", "fd00:244::/40"])
    return Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0),
                  local_sources=sources, external_local=external_local)


@pytest.mark.parametrize(("client", "endpoint", "external_local", "kept"), [
    # From a pod, to any Service address: kept, whichever node the endpoint is on ...
    (POD4, OTHER_POD4, False, True),
    (POD6, OTHER_POD6, False, True),
    (POD4, OTHER_POD4, True, True),
    # ... but a pod reaching itself through its Service sees the node (the hairpin).
    (POD4, POD4, False, False),
    (POD6, POD6, True, False),
    # From the node itself: the node's address.
    (NODE4, POD4, False, False),
    ("127.0.0.1", POD4, True, False),
    ("::1", POD6, True, False),
    # From outside: kept on externalTrafficPolicy: Local frontends, masqueraded elsewhere.
    (OUTSIDE4, POD4, True, True),
    (OUTSIDE6, POD6, True, True),
    (OUTSIDE4, POD4, False, False),
    (OUTSIDE6, POD6, False, False),
], ids=["pod-v4", "pod-v6", "pod-to-etp-local", "hairpin-v4", "hairpin-v6", "node", "loopback", "loopback-v6",
        "outside-etp-local", "outside-etp-local-v6", "outside-etp-cluster", "outside-etp-cluster-v6"])
def test_kube_proxys_rules(client: str, endpoint: str, external_local: bool, kept: bool) -> None:
    assert target(external_local=external_local).keeps_client_address(client, endpoint) is kept


def test_without_a_cluster_cidr_no_client_is_a_pod() -> None:
    t = Target(ServiceTraffic(ServicePortName("ns", "web", "http", "TCP")), Pool((), clock=lambda: 0.0))
    assert not t.keeps_client_address(POD4, OTHER_POD4)
