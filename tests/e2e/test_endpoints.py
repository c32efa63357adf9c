"""Which endpoints a Service uses: conditions, topology hints, per-pod targetPorts."""

from __future__ import annotations

from collections import Counter

from tests.e2e.cluster import NODE_ZONES, Cluster, endpoint, endpoint_slice, eventually, port, service
from tests.e2e.conftest import Apply


def test_terminating_endpoints_serve_when_no_ready_one_exists(cluster: Cluster, manifests: Apply) -> None:
    """Endpoints that are terminating but still serving get traffic while no ready endpoint
    exists; a ready one takes all of it; endpoints that are not serving get nothing."""
    vip = "10.96.0.60"
    n1a, n2a, n3a, n3b = (cluster.pod(n) for n in ("n1a", "n2a", "n3a", "n3b"))
    draining = [endpoint(n1a, ready=False, serving=True, terminating=True),
                endpoint(n2a, ready=False, serving=True, terminating=True),
                endpoint(n3a, ready=False, serving=False, terminating=True)]
    svc = service("term", [vip], [port(80, 8080)])
    client = cluster.pod("n3b").ns
    manifests([svc, endpoint_slice("term", draining)])
    eventually(lambda: cluster.who(client, vip, 80) in ("n1a", "n2a"))
    assert Counter(cluster.whos(client, vip, 80, 4)) == {"n1a": 2, "n2a": 2}

    manifests([svc, endpoint_slice("term", [*draining, endpoint(n3b, ready=True)])])
    eventually(lambda: cluster.who(client, vip, 80) == "n3b")
    assert set(cluster.whos(client, vip, 80, 4)) == {"n3b"}

    # Nothing ready and nothing serving: refused.
    gone = [endpoint(p, ready=False, serving=False, terminating=True) for p in (n1a, n2a, n3a)]
    manifests([svc, endpoint_slice("term", gone)])
    eventually(lambda: cluster.get(client, vip, 80) == "refused")


def test_topology_zone_hints(cluster: Cluster, manifests: Apply) -> None:
    """trafficDistribution PreferClose with zone hints: each node sends to the pods hinted for
    its own zone (node 1 is zone-a; nodes 2 and 3 share zone-b), read from the Node objects."""
    vip = "10.96.0.70"
    by_zone = [endpoint(p, zone=NODE_ZONES[int(p.node[-1])], hint_zones=[NODE_ZONES[int(p.node[-1])]])
               for p in cluster.pods]
    manifests([service("topo", [vip], [port(80, 8080)], trafficDistribution="PreferClose"),
               endpoint_slice("topo", by_zone)])
    zone_b = {"n2a", "n2b", "n3a", "n3b"}
    eventually(lambda: cluster.who(cluster.pod("n1a").ns, vip, 80) in ("n1a", "n1b"))
    assert Counter(cluster.whos(cluster.pod("n1a").ns, vip, 80, 4)) == {"n1a": 2, "n1b": 2}
    for name in ("n2a", "n3a"):
        eventually(lambda name: cluster.who(cluster.pod(name).ns, vip, 80) in zone_b, name)
        assert Counter(cluster.whos(cluster.pod(name).ns, vip, 80, 8)) == dict.fromkeys(zone_b, 2), name

    # Hints that are not on every endpoint are ignored (kube-proxy: all or nothing).
    eps = [endpoint(cluster.pod("n1a"), zone="zone-a"), *by_zone[1:]]
    manifests([service("topo", [vip], [port(80, 8080)], trafficDistribution="PreferClose"),
               endpoint_slice("topo", eps)])
    everyone = {p.name for p in cluster.pods}
    eventually(lambda: set(cluster.whos(cluster.pod("n3a").ns, vip, 80, 6)) == everyone)

    # Back to hints by zone; then every endpoint hinted for zone-b: node 1 (zone-a) has none for
    # its zone, so it uses them all rather than none.
    manifests([service("topo", [vip], [port(80, 8080)], trafficDistribution="PreferClose"),
               endpoint_slice("topo", by_zone)])
    eventually(lambda: set(cluster.whos(cluster.pod("n1a").ns, vip, 80, 6)) == {"n1a", "n1b"})
    manifests([service("topo", [vip], [port(80, 8080)], trafficDistribution="PreferClose"),
               endpoint_slice("topo", [endpoint(p, hint_zones=["zone-b"]) for p in cluster.pods])])
    eventually(lambda: set(cluster.whos(cluster.pod("n1a").ns, vip, 80, 6)) == everyone)
    # Each node reloads the manifests on its own schedule: wait for node 2 too.
    eventually(lambda: set(cluster.whos(cluster.pod("n2a").ns, vip, 80, 6)) == everyone)


def test_named_target_port_resolves_per_pod(cluster: Cluster, manifests: Apply) -> None:
    """targetPort "http" is 8080 on node 1's pods and 9090 on node 2's: two slices, each with its
    own number, and every pod is reached on its own port."""
    vip = "10.96.0.80"
    manifests([
        service("named", [vip], [port(80, "http")]),
        endpoint_slice("named", cluster.node(1).pods, ports=[("http", "TCP", 8080)], name="named-a"),
        endpoint_slice("named", cluster.node(2).pods, ports=[("http", "TCP", 9090)], name="named-b"),
    ])
    client = cluster.pod("n3a").ns
    eventually(lambda: cluster.get(client, vip, 80).startswith("hello from"))
    answers = Counter(cluster.get(client, vip, 80) for _ in range(8))
    assert answers == {
        "hello from n1a (10.244.1.10:8080)\n": 2, "hello from n1b (10.244.1.11:8080)\n": 2,
        "hello from n2a (10.244.2.10:9090)\n": 2, "hello from n2b (10.244.2.11:9090)\n": 2,
    }


def test_connect_failure_is_retried_on_another_endpoint(cluster: Cluster, manifests: Apply) -> None:
    """svcproxy beyond kube-proxy: an endpoint that refuses (nothing on its port) costs a retry,
    not a failed connection. Every connection is answered by the pod that listens."""
    vip = "10.96.0.81"
    manifests([
        service("retry", [vip], [port(80, "http")]),
        endpoint_slice("retry", [cluster.pod("n1a"), cluster.pod("n3a")], ports=[("http", "TCP", 7777)],
                       name="retry-dead"),
        endpoint_slice("retry", [cluster.pod("n2a")], ports=[("http", "TCP", 8080)], name="retry-live"),
    ])
    client = cluster.pod("n1b").ns
    eventually(lambda: cluster.who(client, vip, 80) == "n2a")
    assert cluster.whos(client, vip, 80, 6) == ["n2a"] * 6
