"""The routing table view: rows per frontend from live state, and its text rendering."""

from __future__ import annotations

from proxy.balancer import Pool
from proxy.model import Endpoint, Family, Policy, ServicePortName
from proxy.plan import ListenerKey, ListenerSpec, PoolKey
from proxy.table import render, view

NAME = ServicePortName("shop", "web", "http", "TCP")
A = Endpoint("10.1.0.1", 8080, Family.V4, node_name="node-a", zone="z1")
B = Endpoint("10.1.0.2", 8080, Family.V4, ready=False, serving=True, terminating=True, node_name="node-b")
V6 = Endpoint("fd00::5", 8080, Family.V6, node_name="node-a")


def clock() -> float:
    return 0.0


def test_rows_carry_frontends_policies_and_endpoint_state() -> None:
    cluster, local = PoolKey(NAME, Family.V4, Policy.CLUSTER), PoolKey(NAME, Family.V4, Policy.LOCAL)
    v6 = PoolKey(NAME, Family.V6, Policy.CLUSTER)
    serving = {
        ListenerKey("203.0.113.7", 80, "TCP"): ListenerSpec(ListenerKey("203.0.113.7", 80, "TCP"), local,
                                                            ("198.51.100.0/24",), cluster, "LoadBalancer"),
        ListenerKey("10.96.0.10", 80, "TCP"): ListenerSpec(ListenerKey("10.96.0.10", 80, "TCP"), cluster),
        ListenerKey("fd00::10", 80, "TCP"): ListenerSpec(ListenerKey("fd00::10", 80, "TCP"), v6),
    }
    pools = {cluster: Pool((A, B), affinity_timeout=600, clock=clock), local: Pool((A,), clock=clock),
             v6: Pool((V6,), clock=clock)}
    rows = view(serving, pools, node="node-a", ejected=[("10.1.0.2", 8080, 12.34)], connected=[A, A, None, B])
    assert [(r["type"], r["address"]) for r in rows] == [
        ("ClusterIP", "10.96.0.10"), ("ClusterIP", "fd00::10"), ("LoadBalancer", "203.0.113.7")]
    cip, _, lb = rows
    assert cip["sessionAffinityTimeout"] == 600 and cip["sourceRanges"] is None and cip["policy"] == "Cluster"
    assert cip["localTrafficEndpoints"] is None
    assert cip["endpoints"] == [
        {"address": "10.1.0.1", "port": 8080, "ready": True, "serving": True, "terminating": False, "local": True,
         "zone": "z1", "ejectedSeconds": 0.0, "activeConnections": 2},
        {"address": "10.1.0.2", "port": 8080, "ready": False, "serving": True, "terminating": True, "local": False,
         "zone": "", "ejectedSeconds": 12.3, "activeConnections": 1}]
    assert lb["policy"] == "Local" and lb["sourceRanges"] == ["198.51.100.0/24"]
    assert [e["address"] for e in lb["endpoints"]] == ["10.1.0.1"]
    assert [e["address"] for e in lb["localTrafficEndpoints"]] == ["10.1.0.1", "10.1.0.2"]

    text = render(rows)
    assert "TCP  10.96.0.10:80         ClusterIP    shop/web:http/TCP Cluster affinity 600s" in text
    assert "  -> 10.1.0.2:8080" in text and "serving,terminating,ejected 12.3s" in text
    assert "TCP  [fd00::10]:80" in text and "-> [fd00::5]:8080" in text
    assert "LoadBalancer shop/web:http/TCP Local from 198.51.100.0/24" in text
    assert "(node-local traffic)" in text
    assert {r["clientAddress"] for r in rows} == {"node"} and "client-address" not in text

    # With --transparent: pods keep their address at a clusterIP, every client at an eTP Local LB IP.
    rows = view(serving, pools, node="node-a", transparent=True)
    assert [r["clientAddress"] for r in rows] == ["pods", "pods", "clients"]
    assert "Local from 198.51.100.0/24 client-address clients" in render(rows)


def test_a_frontend_whose_pool_is_gone_shows_no_endpoints() -> None:
    key = ListenerKey("10.96.0.11", 53, "UDP")
    rows = view({key: ListenerSpec(key, PoolKey(NAME, Family.V4, Policy.CLUSTER))}, {}, node="node-a")
    assert rows[0]["endpoints"] == [] and rows[0]["sessionAffinityTimeout"] == 0


def test_active_connections_include_worker_processes() -> None:
    key = ListenerKey("10.96.0.10", 80, "TCP")
    pool = PoolKey(NAME, Family.V4, Policy.CLUSTER)
    rows = view({key: ListenerSpec(key, pool)}, {pool: Pool((A, B), clock=clock)}, node="node-a",
                connected=[A], elsewhere={("10.1.0.1", 8080): 3, ("10.1.0.2", 8080): 1})
    assert [e["activeConnections"] for e in rows[0]["endpoints"]] == [4, 1]
