"""IPv6 and dual-stack Services."""

from __future__ import annotations

from collections import Counter

from tests.e2e.cluster import Cluster, endpoint_slice, eventually, port, service
from tests.e2e.conftest import Apply


def test_ipv6_service(cluster: Cluster, manifests: Apply) -> None:
    """An IPv6-only clusterIP and nodePort reach IPv6 pods from pods and from the client."""
    vip = "fd00:96::91"
    eps = [cluster.pod("n2a"), cluster.pod("n3b")]
    manifests([service("v6", [vip], [port(80, 8080, node_port=31856)], type="NodePort"),
               endpoint_slice("v6", eps, family=6)])
    pod = cluster.pod("n1a").ns
    eventually(lambda: cluster.get(pod, vip, 80).startswith("hello from"))
    assert Counter(cluster.get(pod, vip, 80) for _ in range(4)) == {
        "hello from n2a (fd00:244:2::10:8080)\n": 2, "hello from n3b (fd00:244:3::11:8080)\n": 2}
    for node in cluster.nodes:
        eventually(lambda node: cluster.who(cluster.client, node.ip6, 31856) in ("n2a", "n3b"), node)
        # No IPv4 side at all.
        assert cluster.get(cluster.client, node.ip4, 31856) == "refused"


def test_dual_stack_service(cluster: Cluster, manifests: Apply) -> None:
    """clusterIPs [v4, v6] with IPv4 and IPv6 slices: each family reaches the pods of its own
    family only, on the clusterIPs and on the nodePort of each node address."""
    v4, v6 = "10.96.0.90", "fd00:96::90"
    manifests([service("ds", [v4, v6], [port(80, 8080, node_port=31855)], type="NodePort"),
               endpoint_slice("ds", cluster.pods, family=4),
               endpoint_slice("ds", cluster.pods, family=6)])
    pod = cluster.pod("n2b").ns
    eventually(lambda: cluster.get(pod, v6, 80).startswith("hello from"))
    eventually(lambda: cluster.get(pod, v4, 80).startswith("hello from"))
    v4_answers = {cluster.get(pod, v4, 80) for _ in range(6)}
    v6_answers = {cluster.get(pod, v6, 80) for _ in range(6)}
    assert v4_answers == {f"hello from {p.name} ({p.ip4}:8080)\n" for p in cluster.pods}
    assert v6_answers == {f"hello from {p.name} ({p.ip6}:8080)\n" for p in cluster.pods}
    for node in cluster.nodes:
        eventually(lambda node: "(fd00:244:" in cluster.get(cluster.client, node.ip6, 31855), node)
        eventually(lambda node: "(10.244." in cluster.get(cluster.client, node.ip4, 31855), node)
