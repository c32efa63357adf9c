"""ClusterIP Services, as seen from pods on every node and from outside the cluster."""

from __future__ import annotations

import shutil
from collections import Counter

from tests.e2e.cluster import Cluster, endpoint_slice, eventually, port, service
from tests.e2e.conftest import Apply

VIP = "10.96.0.10"


def test_cluster_ip_answers_on_every_node_round_robin_over_all_pods(cluster: Cluster, manifests: Apply) -> None:
    """A clusterIP answers from pods on every node, and each node round-robins over the pods
    of all nodes: six pods, twelve connections, each pod twice."""
    manifests([service("web", [VIP], [port(80, 8080)]), endpoint_slice("web", cluster.pods)])
    everyone = {p.name for p in cluster.pods}
    for node in cluster.nodes:
        client = node.pods[0].ns
        eventually(lambda client: cluster.who(client, VIP, 80) in everyone, client)
        answers = Counter(cluster.whos(client, VIP, 80, 12))
        assert answers == dict.fromkeys(everyone, 2), f"from {node.name}"
    # The other pod on a node shares its node's round robin.
    answers = Counter(cluster.whos(cluster.pod("n1b").ns, VIP, 80, 6))
    assert answers == dict.fromkeys(everyone, 1)


def test_cluster_ip_is_not_reachable_from_outside(cluster: Cluster, manifests: Apply) -> None:
    """The outside client has no route to the service CIDR, so a clusterIP is unreachable. (With
    a route via a node it answers, as in kube-proxy, which masquerades off-cluster traffic to
    clusterIPs; other ports of the clusterIP stay refused.)"""
    manifests([service("web", [VIP], [port(80, 8080)]), endpoint_slice("web", cluster.pods)])
    cluster.wait_vip(VIP)
    eventually(lambda: cluster.who(cluster.pod("n1a").ns, VIP, 80).startswith("n"))
    assert cluster.get(cluster.client, VIP, 80) == "unreachable"
    with cluster.route(cluster.client, "10.96.0.0/16", cluster.node(2).ip4):
        eventually(lambda: cluster.who(cluster.client, VIP, 80).startswith("n"))
        assert cluster.get(cluster.client, VIP, 22) == "refused"
        # Not the node's own services (healthz is on 0.0.0.0:10256): svcproxy's VIP guard, which
        # needs nft (kube-proxy #72236).
        if shutil.which("nft"):
            assert cluster.get(cluster.client, VIP, 10256) == "refused"


def test_cluster_ip_without_endpoints_refuses(cluster: Cluster, manifests: Apply) -> None:
    """No endpoints: the clusterIP refuses (kube-proxy REJECTs), and starts answering once a
    slice appears."""
    vip = "10.96.0.11"
    pod = cluster.pod("n2a").ns
    manifests([service("empty", [vip], [port(80, 8080)])])
    # Nothing to wait for but the VIP; meanwhile a connection must never be answered.
    eventually(lambda: cluster.get(pod, vip, 80) == "refused")
    manifests([service("empty", [vip], [port(80, 8080)]), endpoint_slice("empty", [cluster.pod("n3b")])])
    eventually(lambda: cluster.who(pod, vip, 80) == "n3b")


def test_internal_traffic_policy_local(cluster: Cluster, manifests: Apply) -> None:
    """internalTrafficPolicy: Local sends a pod only to pods on its own node; on a node without
    one the clusterIP refuses (kube-proxy drops)."""
    vip = "10.96.0.51"
    eps = [cluster.pod("n1a"), cluster.pod("n2a"), cluster.pod("n2b")]
    manifests([service("itp", [vip], [port(80, 8080)], internalTrafficPolicy="Local"),
               endpoint_slice("itp", eps)])
    eventually(lambda: cluster.who(cluster.pod("n2b").ns, vip, 80).startswith("n2"))
    eventually(lambda: cluster.who(cluster.pod("n1b").ns, vip, 80) == "n1a")
    assert set(cluster.whos(cluster.pod("n1b").ns, vip, 80, 4)) == {"n1a"}
    assert set(cluster.whos(cluster.pod("n2a").ns, vip, 80, 4)) == {"n2a", "n2b"}
    cluster.wait_vip(vip)  # node 3 has synced the Service, and has no local endpoint
    assert cluster.whos(cluster.pod("n3a").ns, vip, 80, 2) == ["refused"] * 2


def test_headless_and_external_name_bind_nothing_and_break_nothing(cluster: Cluster, manifests: Apply) -> None:
    """A headless Service (clusterIP None) and an ExternalName Service get no socket on any node
    (TCP or UDP, on any address), and a normal Service beside them keeps working."""
    vip = "10.96.0.40"
    pods = cluster.pods
    manifests([
        service("headless", ["None"], [port(7070, 8080)]),
        endpoint_slice("headless", pods, ports=[("http", "TCP", 8080)],
                       labels={"service.kubernetes.io/headless": ""}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "external", "namespace": "e2e"},
         "spec": {"type": "ExternalName", "externalName": "backend.example.invalid",
                  "ports": [{"name": "http", "port": 7071, "protocol": "TCP"}]}},
        # A slice for the ExternalName Service too (a user may well write one): still nothing.
        endpoint_slice("external", pods, ports=[("http", "TCP", 8080)]),
        service("beside", [vip], [port(80, 8080)]),
        endpoint_slice("beside", pods),
    ])
    for node in cluster.nodes:
        eventually(lambda node: cluster.who(node.pods[0].ns, vip, 80).startswith("n"), node)
    for node in cluster.nodes:
        ports = {p for _, _, p in cluster.listening(node.ns)}
        assert not ports & {7070, 7071}, f"{node.name} listens on {sorted(ports)}"
        assert cluster.get(node.pods[1].ns, node.ip4, 7070) == "refused"
    assert Counter(cluster.whos(cluster.pod("n3a").ns, vip, 80, 6)) == {p.name: 1 for p in pods}
