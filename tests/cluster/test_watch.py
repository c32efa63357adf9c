"""Watch behaviour against the real API server: bookmarks, a restart under traffic, and a resumed
watch that finds its resourceVersion compacted away (410) and relists without losing a delete."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.cluster.harness import KubeCluster, Load, Node
from tests.cluster.objects import NAMESPACE, deployment, namespace, service
from tests.e2e.cluster import eventually

NODE_PORT = 31854


def counter(kube: KubeCluster, node: Node, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return kube.metrics(node).get(f"{name}{{{label_text}}}", 0.0)


def cluster_ip(kube: KubeCluster, name: str) -> str:
    return str(kube.kubectl_json("get", "service", "-n", NAMESPACE, name)["spec"]["clusterIP"])


@pytest.fixture(scope="module")
def pods(kube: KubeCluster) -> Iterator[set[str]]:
    kube.apply(namespace(), deployment("watch", 2),
               service("watch", type="NodePort", node_port=NODE_PORT, selector="watch"))
    ready = eventually(lambda: len(kube.ready_pods(NAMESPACE, "app=watch")) == 2
                       and kube.ready_pods(NAMESPACE, "app=watch"), timeout=60, interval=0.5, what="2 pods")
    for node in kube.nodes:
        eventually(lambda node: kube.who(kube.client, node.ip, NODE_PORT) in ready, node, timeout=30,
                   what=f"served through {node.name}")
    yield set(ready)
    kube.kubectl("delete", "-n", NAMESPACE, "service/watch", "deployment/watch", "--wait=false")


def test_bookmarks_are_received(kube: KubeCluster, pods: set[str]) -> None:
    # kube-apiserver sends a BOOKMARK about once a minute to each watch that allows them.
    for node in kube.nodes:
        eventually(lambda node: counter(kube, node, "svcproxy_watch_events_total", resource="Service",
                                        type="BOOKMARK") > 0, node, timeout=90, interval=2,
                   what=f"a Service BOOKMARK on {node.name}")


def test_api_server_restart_under_traffic(kube: KubeCluster, pods: set[str]) -> None:
    with Load(kube.client, [(node.ip, NODE_PORT) for node in kube.nodes], workers=3, max_seconds=120) as load:
        time.sleep(1)
        kube.restart_apiserver()
        # svcproxy kept serving from what it had; it also catches up with changes made afterwards.
        kube.apply(service("after-restart", port=81, selector="watch"))
        ip = cluster_ip(kube, "after-restart")
        for node in kube.nodes:
            eventually(lambda node: kube.who(node.ns, ip, 81) in pods, node, timeout=45, interval=0.5,
                       what=f"a Service created after the restart, on {node.name}")
    kube.kubectl("delete", "service", "-n", NAMESPACE, "after-restart")
    result = load.result
    assert not result.failures, f"{len(result.failures)} of {result.total} failed: {result.failures[:10]}"
    assert result.total >= 50, result.total


def test_resumed_watch_after_compaction_relists_without_losing_a_delete(kube: KubeCluster, pods: set[str]) -> None:
    node = kube.node(2)
    assert node.proxy is not None
    kube.apply(service("gone", port=82, selector="watch"))
    gone = cluster_ip(kube, "gone")
    eventually(lambda: kube.who(node.ns, gone, 82) in pods, timeout=30, what="gone served on node2")
    expired = counter(kube, node, "svcproxy_watch_expired_total", resource="Service")
    lists = counter(kube, node, "svcproxy_watch_lists_total", resource="Service")

    # Stopped, node2's svcproxy cannot read its watches. The restart closes them before the delete
    # is sent (else the events would wait in its socket buffer), and the compaction removes the
    # history it would resume from: when it runs again, its watch must get 410 and relist.
    os.kill(node.proxy.pid, signal.SIGSTOP)
    try:
        kube.restart_apiserver()
        kube.kubectl("delete", "service", "-n", NAMESPACE, "gone")
        kube.apply(service("fresh", port=83, selector="watch"))
        revision = int(kube.etcd("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        kube.etcd("/v3/kv/compaction", {"revision": revision, "physical": True})
    finally:
        os.kill(node.proxy.pid, signal.SIGCONT)

    fresh = cluster_ip(kube, "fresh")
    eventually(lambda: kube.who(node.ns, fresh, 83) in pods, timeout=60, interval=0.5, what="fresh on node2")
    eventually(lambda: (gone, 82) not in kube.listening(node), timeout=10, what="gone's listener closed on node2")
    assert kube.who(node.ns, gone, 82) != "hello", "the deleted Service still answers"
    assert counter(kube, node, "svcproxy_watch_expired_total", resource="Service") > expired
    assert counter(kube, node, "svcproxy_watch_lists_total", resource="Service") > lists
    assert "expired" in kube.log(f"svcproxy-{node.name}")
    kube.kubectl("delete", "service", "-n", NAMESPACE, "fresh")
