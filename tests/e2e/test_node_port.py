"""NodePort and LoadBalancer Services, as seen from a client outside the cluster."""

from __future__ import annotations

import json
from collections import Counter

from tests.e2e.cluster import CLIENT_IP, NODE_ZONES, Cluster, endpoint_slice, eventually, node_object, port, service
from tests.e2e.conftest import Apply

NOT_SERVED = ("reset", "closed")
"""How svcproxy turns away a client outside loadBalancerSourceRanges: it accepts, then closes.
(kube-proxy drops the SYN; README says "reset", which only holds when the client spoke first:
see test_load_balancer_source_ranges_reset_a_silent_client.)"""


def test_node_port_answers_on_every_node(cluster: Cluster, manifests: Apply) -> None:
    """nodePort 31852 answers from outside on every node's IP, round robin over all pods;
    clusterIP:nodePort and nodeIP:port are refused."""
    vip = "10.96.0.20"
    manifests([service("np", [vip], [port(80, 8080, node_port=31852)], type="NodePort"),
               endpoint_slice("np", cluster.pods)])
    everyone = {p.name: 1 for p in cluster.pods}
    for node in cluster.nodes:
        eventually(lambda node: cluster.who(cluster.client, node.ip4, 31852).startswith("n"), node)
        assert Counter(cluster.whos(cluster.client, node.ip4, 31852, 6)) == everyone, node.name
    # A pod reaches the nodePort on another node's IP as well.
    assert cluster.who(cluster.pod("n1a").ns, cluster.node(3).ip4, 31852).startswith("n")
    # kube-proxy: a nodePort is a port of the node's addresses, not of clusterIPs.
    assert cluster.get(cluster.pod("n1a").ns, vip, 31852) == "refused"
    assert cluster.get(cluster.pod("n2a").ns, vip, 80).startswith("hello from")
    assert cluster.get(cluster.client, cluster.node(2).ip4, 80) == "refused"


def test_load_balancer_ip_node_port_cluster_ip_and_source_ranges(cluster: Cluster, manifests: Apply) -> None:
    """A LoadBalancer ingress IP (ipMode VIP), routed by the client to node 1, answers; so do its
    nodePort and clusterIP. loadBalancerSourceRanges admits only the listed clients at the LB IP
    (others get no answer), never restricts the nodePort or the clusterIP, and follows a change
    of the ranges. An ingress IP with ipMode Proxy is not captured."""
    vip, lb, lb_proxy_mode = "10.96.0.30", "203.0.113.10", "203.0.113.11"

    def objects(ranges: list[str]) -> list[dict[str, object]]:
        return [
            service("lb", [vip], [port(80, 8080, node_port=31853)], type="LoadBalancer",
                    loadBalancerSourceRanges=ranges,
                    status={"loadBalancer": {"ingress": [{"ip": lb, "ipMode": "VIP"},
                                                         {"ip": lb_proxy_mode, "ipMode": "Proxy"}]}}),
            endpoint_slice("lb", cluster.pods),
        ]

    client, pod = cluster.client, cluster.pod("n1a").ns
    n1 = cluster.node(1)
    manifests(objects([f"{CLIENT_IP}/32"]))
    with cluster.route(client, f"{lb}/32", n1.ip4), cluster.route(client, f"{lb_proxy_mode}/32", n1.ip4):
        eventually(lambda: cluster.who(client, lb, 80).startswith("n"))
        assert Counter(cluster.whos(client, lb, 80, 6)) == {p.name: 1 for p in cluster.pods}
        for node in cluster.nodes:
            eventually(lambda node: cluster.who(client, node.ip4, 31853).startswith("n"), node, what=node.name)
        assert cluster.who(pod, vip, 80).startswith("n")
        # A pod on node 1 is not in the source ranges: not served at the LB IP...
        assert cluster.get(pod, lb, 80) in NOT_SERVED
        # ...but the ranges never apply to the clusterIP or the nodePort.
        assert cluster.who(pod, vip, 80).startswith("n")
        assert cluster.who(pod, n1.ip4, 31853).startswith("n")
        # ipMode Proxy: the LB delivers to nodes itself; the node does not capture that IP.
        assert cluster.get(client, lb_proxy_mode, 80) in ("unreachable", "timeout", "refused")

        manifests(objects(["10.10.10.200/32"]))
        eventually(lambda: cluster.get(client, lb, 80) in NOT_SERVED)
        assert cluster.who(client, n1.ip4, 31853).startswith("n")
        manifests(objects([]))  # no ranges: everyone
        eventually(lambda: cluster.who(pod, lb, 80).startswith("n"))
        assert cluster.who(client, lb, 80).startswith("n")


def test_external_traffic_policy_local(cluster: Cluster, manifests: Apply) -> None:
    """externalTrafficPolicy: Local: a node serves its nodePort only from its own pods; a node
    without one does not serve it, and its healthCheckNodePort says 503 with localEndpoints 0
    while the others say 200 with their local count."""
    vip = "10.96.0.50"
    eps = [cluster.pod("n1a"), cluster.pod("n2a"), cluster.pod("n2b")]
    manifests([service("etp", [vip], [port(80, 8080, node_port=31854)], type="LoadBalancer",
                       externalTrafficPolicy="Local", healthCheckNodePort=32000),
               endpoint_slice("etp", eps)])
    n1, n2, n3 = cluster.nodes
    client = cluster.client
    eventually(lambda: cluster.who(client, n2.ip4, 31854).startswith("n2"))
    eventually(lambda: cluster.who(client, n1.ip4, 31854) == "n1a")
    assert set(cluster.whos(client, n1.ip4, 31854, 4)) == {"n1a"}
    assert set(cluster.whos(client, n2.ip4, 31854, 4)) == {"n2a", "n2b"}

    def health(node_ip: str) -> tuple[int, dict[str, object]]:
        answer = cluster.http(client, node_ip, 32000, "/healthz")
        assert isinstance(answer, tuple), answer
        return answer[0], json.loads(answer[1])

    want = {"namespace": "e2e", "name": "etp"}
    for node, code, count in ((n1, 200, 1), (n2, 200, 2), (n3, 503, 0)):
        status, body = eventually(lambda node: health(node.ip4), node)
        assert (status, body["localEndpoints"], body["service"]) == (code, count, want), node.name
        assert body["serviceProxyHealthy"] is True
    # Node 3 has synced (its health check answers) and has no local endpoint: outside clients are
    # reset (kube-proxy drops); the port stays open for local traffic, which uses Cluster endpoints.
    assert cluster.whos(client, n3.ip4, 31854, 2) == ["reset"] * 2
    # The clusterIP (internal traffic) still uses every endpoint.
    assert set(cluster.whos(cluster.pod("n3a").ns, vip, 80, 3)) == {"n1a", "n2a", "n2b"}

    # The pod on node 1 goes away: node 1 turns unhealthy and stops serving.
    manifests([service("etp", [vip], [port(80, 8080, node_port=31854)], type="LoadBalancer",
                       externalTrafficPolicy="Local", healthCheckNodePort=32000),
               endpoint_slice("etp", eps[1:])])
    eventually(lambda: health(n1.ip4)[0] == 503)
    assert health(n1.ip4)[1]["localEndpoints"] == 0
    assert cluster.get(client, n1.ip4, 31854) == "reset"


def test_load_balancer_source_ranges_reset_a_silent_client(cluster: Cluster, manifests: Apply) -> None:
    """README: "loadBalancerSourceRanges ... other clients are reset". A client that connects
    and waits for the server to speak must get a reset too."""
    vip, lb = "10.96.0.31", "203.0.113.12"
    manifests([service("lbsilent", [vip], [port(80, 8080, node_port=31859)], type="LoadBalancer",
                       loadBalancerSourceRanges=["10.10.10.200/32"],
                       status={"loadBalancer": {"ingress": [{"ip": lb, "ipMode": "VIP"}]}}),
               endpoint_slice("lbsilent", cluster.pods)])
    pod = cluster.pod("n1a").ns
    eventually(lambda: cluster.get(pod, lb, 80) in NOT_SERVED)
    assert [cluster.silent(pod, lb, 80) for _ in range(3)] == ["reset"] * 3


def test_external_ips(cluster: Cluster, manifests: Apply) -> None:
    """spec.externalIPs are captured like LB IPs: routed by the client to node 2, they answer."""
    vip, external = "10.96.0.32", "203.0.113.20"
    manifests([service("extip", [vip], [port(80, 8080)], externalIPs=[external]),
               endpoint_slice("extip", cluster.pods)])
    with cluster.route(cluster.client, f"{external}/32", cluster.node(2).ip4):
        eventually(lambda: cluster.who(cluster.client, external, 80).startswith("n"))
        assert Counter(cluster.whos(cluster.client, external, 80, 6)) == {p.name: 1 for p in cluster.pods}


def test_session_affinity_client_ip(cluster: Cluster, manifests: Apply) -> None:
    """sessionAffinity: ClientIP pins a client to one pod (per node), on the nodePort and the
    clusterIP alike."""
    vip = "10.96.0.33"
    manifests([service("sticky", [vip], [port(80, 8080, node_port=31860)], type="NodePort",
                       sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
               endpoint_slice("sticky", cluster.pods)])
    for node in cluster.nodes:
        first = eventually(lambda node: (w := cluster.who(cluster.client, node.ip4, 31860)).startswith("n") and w, node)
        assert cluster.whos(cluster.client, node.ip4, 31860, 5) == [first] * 5, node.name
    pod = cluster.pod("n2b").ns
    first = cluster.who(pod, vip, 80)
    assert cluster.whos(pod, vip, 80, 5) == [first] * 5


def test_proxy_health_and_node_deletion(cluster: Cluster) -> None:
    """Each node answers /healthz on :10256 (the LB health check for eTP Cluster); a Node being
    deleted fails /healthz (nodeEligible false) but not /livez, and still forwards."""
    n2 = cluster.node(2)
    for node in cluster.nodes:
        answer = cluster.http(cluster.client, node.ip4, 10256, "/healthz")
        assert isinstance(answer, tuple) and answer[0] == 200, (node.name, answer)
        assert json.loads(answer[1])["nodeEligible"] is True
    nodes = [node_object(n.name, NODE_ZONES[n.index]) for n in cluster.nodes]
    deleting = json.loads(json.dumps(nodes))
    deleting[1]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    try:
        cluster.apply("nodes", deleting)
        eventually(lambda: cluster.http(cluster.client, n2.ip4, 10256, "/healthz")[0] == 503)
        healthz = cluster.http(cluster.client, n2.ip4, 10256, "/healthz")
        assert isinstance(healthz, tuple) and json.loads(healthz[1])["nodeEligible"] is False
        livez = cluster.http(cluster.client, n2.ip4, 10256, "/livez")
        assert isinstance(livez, tuple) and livez[0] == 200
        assert cluster.who(n2.pods[0].ns, "10.96.0.2", 80).startswith("n")  # still forwarding
        assert cluster.http(cluster.client, cluster.node(1).ip4, 10256, "/healthz")[0] == 200
    finally:
        cluster.apply("nodes", nodes)
    eventually(lambda: cluster.http(cluster.client, n2.ip4, 10256, "/healthz")[0] == 200)


def test_external_traffic_policy_local_from_a_local_pod_uses_cluster_endpoints(
        cluster: Cluster, manifests: Apply) -> None:
    vip = "10.96.0.52"
    manifests([service("etp2", [vip], [port(80, 8080, node_port=31857)], type="LoadBalancer",
                       externalTrafficPolicy="Local", healthCheckNodePort=32001),
               endpoint_slice("etp2", [cluster.pod("n1a")])])
    eventually(lambda: cluster.who(cluster.client, cluster.node(1).ip4, 31857) == "n1a")
    # A pod on node 3 (no local endpoint) reaches its own node's nodePort (once node 3 reloaded).
    eventually(lambda: cluster.who(cluster.pod("n3a").ns, cluster.node(3).ip4, 31857) == "n1a")
