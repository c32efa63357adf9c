"""The seed scenario on a real control plane: a Deployment behind a NodePort Service.

The API server allocates the clusterIP, the scheduler places the pods, the kubelet stand-ins run
them and kube-controller-manager writes the EndpointSlices; svcproxy on each node reads all of it
with deploy/base's ServiceAccount.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.cluster.harness import KubeCluster
from tests.cluster.objects import NAMESPACE, deployment, namespace, service
from tests.e2e.cluster import _http_get, eventually

NODE_PORT = 31852
LB_IP = "203.0.113.10"


def round_robin(kube: KubeCluster, host: str, port: int, pods: set[str], ns: object = None) -> bool:
    """Two rounds through ``host:port`` reach every ready pod exactly twice (round robin)."""
    where = ns or kube.client
    seen = Counter(kube.who(where, host, port) for _ in range(2 * len(pods)))  # type: ignore[arg-type]
    assert set(seen) == pods and set(seen.values()) == {2}, f"{host}:{port}: {dict(seen)}, pods {sorted(pods)}"
    return True


@pytest.fixture(scope="module")
def web(kube: KubeCluster) -> Iterator[set[str]]:
    """Deployment ``web`` (3 replicas) behind NodePort Service ``web`` (80 -> http, nodePort 31852)."""
    kube.apply(namespace(), deployment("web", 3),
               service("web", type="NodePort", node_port=NODE_PORT, selector="web"))
    pods = eventually(lambda: len(kube.ready_pods(NAMESPACE, "app=web")) == 3 and kube.ready_pods(NAMESPACE, "app=web"),
                      timeout=60, interval=0.5, what="3 ready web pods")
    for node in kube.nodes:
        eventually(round_robin, kube, node.ip, NODE_PORT, set(pods), timeout=30, interval=0.5,
                   what=f"web through {node.name}")
    yield set(pods)
    kube.kubectl("delete", "-n", NAMESPACE, "service/web", "deployment/web", "--wait=false")


def test_node_port_on_every_node_round_robin_over_all_pods(kube: KubeCluster, web: set[str]) -> None:
    ips = set(kube.ready_pods(NAMESPACE, "app=web").values())
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16") for ip in ips), ips
    nodes = {p["spec"]["nodeName"] for p in kube.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=web")["items"]}
    assert len(nodes) >= 2, f"the scheduler placed every pod on {nodes}"
    for node in kube.nodes:
        round_robin(kube, node.ip, NODE_PORT, web)


def test_cluster_ip_is_allocated_by_the_api_server_and_served_on_every_node(kube: KubeCluster,
                                                                            web: set[str]) -> None:
    svc = kube.kubectl_json("get", "service", "-n", NAMESPACE, "web")
    cluster_ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network("10.96.0.0/16")
    assert svc["spec"]["ports"][0]["nodePort"] == NODE_PORT
    for node in kube.nodes:
        round_robin(kube, cluster_ip, 80, web, node.ns)
        # kube-proxy's rule: a nodePort is not open on the clusterIP
        assert kube.who(node.ns, cluster_ip, NODE_PORT) == "refused"
    assert kube.who(kube.client, kube.node(1).ip, 80) == "refused"


def test_load_balancer_ingress_ip_written_to_status(kube: KubeCluster, web: set[str]) -> None:
    kube.apply(service("web-lb", type="LoadBalancer", selector="web"))
    kube.kubectl("patch", "service", "-n", NAMESPACE, "web-lb", "--subresource=status", "--type=merge",
                 "-p", f'{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}","ipMode":"VIP"}}]}}}}}}')
    node_port = kube.kubectl_json("get", "service", "-n", NAMESPACE, "web-lb")["spec"]["ports"][0]["nodePort"]
    try:
        with kube.route(kube.client, f"{LB_IP}/32", kube.node(1).ip):
            eventually(round_robin, kube, LB_IP, 80, web, timeout=20, interval=0.5, what="the LB IP served")
        for node in kube.nodes:
            round_robin(kube, node.ip, node_port, web)
    finally:
        kube.kubectl("delete", "service", "-n", NAMESPACE, "web-lb")


def test_external_name_and_headless_services_bind_nothing(kube: KubeCluster, web: set[str]) -> None:
    kube.apply(service("ext", type="ExternalName", port=7777, target=7777, externalName="example.invalid"),
               service("headless", port=7778, selector="web", clusterIP="None"),
               service("marker", port=7779, selector="web"))
    try:
        marker_ip = kube.kubectl_json("get", "service", "-n", NAMESPACE, "marker")["spec"]["clusterIP"]
        # The headless Service gets real EndpointSlices from the controller (labelled headless) ...
        eventually(lambda: kube.kubectl_json("get", "endpointslices", "-n", NAMESPACE, "-l",
                                             "kubernetes.io/service-name=headless")["items"], timeout=20,
                   what="headless slices")
        # ... and once every node serves the Service created after both, neither has a listener.
        for node in kube.nodes:
            eventually(round_robin, kube, marker_ip, 7779, web, node.ns, timeout=20, interval=0.5,
                       what=f"marker on {node.name}")
            ports = {p for _, p in kube.listening(node)}
            assert 7777 not in ports and 7778 not in ports, sorted(ports)
    finally:
        kube.kubectl("delete", "service", "-n", NAMESPACE, "ext", "headless", "marker")


def test_pods_keep_their_address_through_a_cluster_ip(kube: KubeCluster, web: set[str]) -> None:
    """--transparent (the default auto; on in nodes 2 and 3, which do not run transports): a pod on
    node 2 or 3 calling the clusterIP is seen at its own address by every other pod, those on its
    own node's bridge included (the nodes run br_netfilter), and at its node's by itself."""
    items = kube.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=web")["items"]
    node_of = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in items}
    ip_of = {p["metadata"]["name"]: p["status"]["podIP"] for p in items}
    client = next((name for name in sorted(web) if node_of[name] in ("node2", "node3")), None)
    assert client is not None, f"no web pod on node 2 or 3: {node_of}"
    cluster_ip = kube.kubectl_json("get", "service", "-n", NAMESPACE, "web")["spec"]["clusterIP"]
    ns = kube.pod_netns(ip_of[client])
    node_addresses = {n.ip for n in kube.nodes} | {f"10.244.{n.index}.1" for n in kube.nodes}
    seen: dict[str, str] = {}
    for _ in range(3 * len(web)):
        answer = ns.call(_http_get, cluster_ip, 80, "/peer", 2.0)
        assert not isinstance(answer, str), answer
        name, _, peer = answer[1].split()
        seen[name] = peer
    assert set(seen) == web, seen
    assert any(node_of[name] != node_of[client] for name in seen), f"every web pod is on {node_of[client]}"
    for name, peer in seen.items():
        if name != client:
            assert peer == ip_of[client], (name, node_of, seen)
        else:  # itself (the hairpin): a node address
            assert peer in node_addresses, (name, seen)
