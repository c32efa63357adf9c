"""--transparent on (nodes 1 and 2 run it): the address each pod sees its client at, case by case
as kube-proxy's iptables and nftables modes with the --cluster-cidr local detector keep or replace
it, across nodes, IPv4 and IPv6, TCP and UDP. Each pod answers ``GET /peer`` and the datagram
``peer?`` with the peer address it sees."""

from __future__ import annotations

from tests.e2e.cluster import CLIENT_IP, CLIENT_IP6, UDP_PORT, Cluster, Node, endpoint_slice, eventually, port, service
from tests.e2e.conftest import Apply


def peer(cluster: Cluster, ns: object, host: str, port_: int) -> str:
    answer = cluster.http(ns, host, port_, "/peer")  # type: ignore[arg-type]
    return answer[1].split()[-1] if isinstance(answer, tuple) else answer


def udp_peer(cluster: Cluster, ns: object, host: str, port_: int) -> str:
    answer = cluster.udp(ns, host, port_, b"peer?")  # type: ignore[arg-type]
    return answer.split()[-1] if " peer " in answer else answer


def node_addresses(node: Node) -> set[str]:
    n = node.index
    return {node.ip4, node.ip6, f"10.244.{n}.1", f"fd00:244:{n}::1"}


def test_a_pod_keeps_its_address_across_nodes_but_not_to_itself(cluster: Cluster, manifests: Apply) -> None:
    v4, v6 = "10.96.0.90", "fd00:96::90"
    n1a, n2a = cluster.pod("n1a"), cluster.pod("n2a")
    manifests([service("seen", [v4, v6], [port(80, 8080), port(53, UDP_PORT, name="dns", protocol="UDP")],
                       ipFamilyPolicy="RequireDualStack"),
               endpoint_slice("seen", [n2a], ports=(("http", "TCP", 8080), ("dns", "UDP", UDP_PORT))),
               endpoint_slice("seen", [n2a], family=6, name="seen-v6",
                              ports=(("http", "TCP", 8080), ("dns", "UDP", UDP_PORT)))])
    eventually(lambda: peer(cluster, n1a.ns, v4, 80) == n1a.ip4, timeout=10, what="n1a seen as itself")
    # From a pod on node 1 to an endpoint on node 2: the pod's own address, both families, both protocols.
    assert peer(cluster, n1a.ns, v6, 80) == n1a.ip6
    assert udp_peer(cluster, n1a.ns, v4, 53) == n1a.ip4
    assert udp_peer(cluster, n1a.ns, v6, 53) == n1a.ip6
    # A pod on the endpoint's own bridge keeps its address too: the nodes run br_netfilter, as
    # Kubernetes nodes do, and svcproxy's bridge table hands the bridged reply to the node's IP layer.
    n2b = cluster.pod("n2b")
    assert peer(cluster, n2b.ns, v4, 80) == n2b.ip4
    assert peer(cluster, n2b.ns, v6, 80) == n2b.ip6
    assert udp_peer(cluster, n2b.ns, v4, 53) == n2b.ip4
    assert udp_peer(cluster, n2b.ns, v6, 53) == n2b.ip6
    # The endpoint reaching itself through its Service (the hairpin): its node's address.
    assert peer(cluster, n2a.ns, v4, 80) in node_addresses(cluster.node(2))
    assert udp_peer(cluster, n2a.ns, v4, 53) in node_addresses(cluster.node(2))
    # A node itself: its own address.
    assert peer(cluster, cluster.node(1).ns, v4, 80) in node_addresses(cluster.node(1))
    # Many in a row from another pod: every reply finds its way back.
    n1b = cluster.pod("n1b")
    assert {peer(cluster, n1b.ns, v4, 80) for _ in range(10)} == {n1b.ip4}


def test_outside_clients_keep_their_address_on_local_policy_only(cluster: Cluster, manifests: Apply) -> None:
    n2a = cluster.pod("n2a")
    manifests([service("ext-local", ["10.96.0.91", "fd00:96::91"], [port(80, 8080, node_port=31891)], type="NodePort",
                       externalTrafficPolicy="Local", ipFamilyPolicy="RequireDualStack"),
               endpoint_slice("ext-local", [n2a]), endpoint_slice("ext-local", [n2a], family=6, name="ext-local-v6"),
               service("ext-cluster", ["10.96.0.92"], [port(80, 8080, node_port=31892)], type="NodePort"),
               endpoint_slice("ext-cluster", [n2a])])
    node1, node2 = cluster.node(1), cluster.node(2)
    eventually(lambda: peer(cluster, cluster.client, node2.ip4, 31891) == CLIENT_IP, timeout=10,
               what="the client seen as itself")
    assert peer(cluster, cluster.client, node2.ip6, 31891) == CLIENT_IP6
    # externalTrafficPolicy: Cluster, through another node: kube-proxy masquerades, so the node.
    assert peer(cluster, cluster.client, node1.ip4, 31892) in node_addresses(node1)
    # So is a pod (kube-proxy's KUBE-EXT chain masquerades every client of an eTP Cluster nodePort).
    assert peer(cluster, cluster.pod("n1a").ns, node1.ip4, 31892) in node_addresses(node1)
