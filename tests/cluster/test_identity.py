"""deploy/ against the real API server: svcproxy's RBAC is sufficient and minimal, and the
manifests are accepted by a server-side dry run."""

from __future__ import annotations

import pytest

from tests.cluster.harness import REPO, KubeCluster

SA = "system:serviceaccount:kube-system:svcproxy"


def can(kube: KubeCluster, verb: str, resource: str) -> bool:
    """``kubectl auth can-i`` as svcproxy itself (its TokenRequest token, not impersonation)."""
    out = kube.kubectl("auth", "can-i", verb, resource, "--all-namespaces", check=False,
                       kubeconfig=kube.proxy_kubeconfig)
    return out.strip().splitlines()[0] == "yes"


def test_svcproxy_runs_as_the_deploy_base_service_account(kube: KubeCluster) -> None:
    assert kube.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                        kubeconfig=kube.proxy_kubeconfig) == SA
    # Every svcproxy listed and is watching with that identity, and the API never refused it.
    for node in kube.nodes:
        log = kube.log(f"svcproxy-{node.name}")
        assert "initial sync done" in log and "Forbidden" not in log


@pytest.mark.parametrize(("verb", "resource"), [
    ("list", "services"), ("watch", "services"), ("list", "endpointslices.discovery.k8s.io"),
    ("watch", "endpointslices.discovery.k8s.io"), ("get", "nodes"), ("list", "nodes"), ("watch", "nodes"),
])
def test_granted_what_it_reads(kube: KubeCluster, verb: str, resource: str) -> None:
    assert can(kube, verb, resource)


@pytest.mark.parametrize(("verb", "resource"), [
    ("list", "secrets"), ("get", "secrets"), ("list", "pods"), ("list", "endpoints"), ("list", "configmaps"),
    ("create", "services"), ("update", "services"), ("patch", "endpointslices.discovery.k8s.io"),
    ("delete", "nodes"), ("create", "events"), ("get", "services"),
])
def test_refused_everything_else(kube: KubeCluster, verb: str, resource: str) -> None:
    assert not can(kube, verb, resource)


def test_listing_secrets_with_its_token_is_forbidden(kube: KubeCluster) -> None:
    out = kube.kubectl("get", "secrets", "-A", check=False, kubeconfig=kube.proxy_kubeconfig)
    assert "Forbidden" in out and f'User "{SA}" cannot list resource "secrets"' in out, out


@pytest.mark.parametrize("overlay", ["deploy", "deploy/kind"])
def test_kustomization_accepted_by_a_server_side_dry_run(kube: KubeCluster, overlay: str) -> None:
    out = kube.kubectl("apply", "--dry-run=server", "-k", str(REPO / overlay))
    for kind in ("serviceaccount/svcproxy", "clusterrole.rbac.authorization.k8s.io/svcproxy",
                 "clusterrolebinding.rbac.authorization.k8s.io/svcproxy", "daemonset.apps/svcproxy"):
        assert kind in out and "(server dry run)" in out, out
    assert "configmap/svcproxy-config-" in out, out
