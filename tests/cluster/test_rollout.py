"""Scaling and a rolling update of a Deployment under bounded load: no request fails while a ready
pod exists. The EndpointSlices come from kube-controller-manager, the terminations from the
kubelet stand-in honouring each pod's grace period (podserver lingers 1 s after SIGTERM)."""

from __future__ import annotations

from tests.cluster.harness import KubeCluster, Load
from tests.cluster.objects import NAMESPACE, deployment, namespace, service
from tests.e2e.cluster import eventually

NODE_PORT = 31853


def settled(kube: KubeCluster, replicas: int) -> dict[str, str]:
    """Exactly ``replicas`` pods exist, all ready, and every node's svcproxy routes to all of them."""
    pods = kube.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=roll")["items"]
    ready = kube.ready_pods(NAMESPACE, "app=roll")
    if len(pods) != replicas or len(ready) != replicas:
        return {}
    for node in kube.nodes:
        seen = {kube.who(kube.client, node.ip, NODE_PORT) for _ in range(2 * replicas)}
        if seen != set(ready):
            return {}
    return ready


def test_scale_3_5_2_and_rolling_update_lose_no_request(kube: KubeCluster) -> None:
    kube.apply(namespace(), deployment("roll", 3), service("roll", type="NodePort", node_port=NODE_PORT,
                                                          selector="roll"))
    first = eventually(settled, kube, 3, timeout=60, interval=0.5, what="3 pods served")
    targets = [(node.ip, NODE_PORT) for node in kube.nodes]
    steps = []
    with Load(kube.client, targets, workers=3, max_seconds=240) as load:
        for replicas in (5, 2):
            kube.kubectl("scale", "-n", NAMESPACE, "deployment/roll", f"--replicas={replicas}")
            eventually(settled, kube, replicas, timeout=60, interval=0.5, what=f"{replicas} pods served")
            steps.append((replicas, load.result.total, len(load.result.failures)))
        kube.apply(deployment("roll", 2, version="2"))
        kube.kubectl("rollout", "status", "-n", NAMESPACE, "deployment/roll", "--timeout=90s", timeout=100)
        last = eventually(settled, kube, 2, timeout=60, interval=0.5, what="the new pods served")
        steps.append(("v2", load.result.total, len(load.result.failures)))
    result = load.result
    print(f"load: {result.total} requests, {len(result.failures)} failed; steps {steps}; {dict(result.answers)}")
    assert not result.failures, f"{len(result.failures)} of {result.total} failed: {result.failures[:10]}"
    assert result.total >= 200, f"the load was too light to mean anything: {result.total} requests ({steps})"
    assert not set(last) & set(first), "the rolling update replaced every pod"
    # every generation of pod answered some of the load
    assert set(first) <= set(result.answers) and set(last) <= set(result.answers), dict(result.answers)
    kube.kubectl("delete", "-n", NAMESPACE, "service/roll", "deployment/roll", "--wait=false")
