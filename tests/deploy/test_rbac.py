"""The ClusterRole grants what svcproxy's API source lists and watches, and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from unittest import mock

from tests.deploy.conftest import BASE, Obj, load_yaml_docs, only

ALLOWED: Mapping[tuple[str, str], set[str]] = {
    # kube-proxy's system:node-proxier, less core `endpoints` (svcproxy reads EndpointSlices only)
    # and less servicecidrs (not watched).
    ("", "services"): {"list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch", "update"},
    ("events.k8s.io", "events"): {"create", "patch", "update"},
}
"""The most the ClusterRole may grant. Events are allowed for when svcproxy records some; it
records none yet, so the ClusterRole leaves them out."""


def grants(role: Obj) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def watched() -> dict[tuple[str, str], set[str]]:
    """What proxy.sources.kube lists and watches: its reflectors, built without an API server."""
    from proxy.sources import kube

    api: Any = mock.MagicMock()
    handler: Any = mock.MagicMock()
    out: dict[tuple[str, str], set[str]] = {}
    for r in kube.reflectors(api, handler, node_name="node-a", on_node=lambda _: None,
                             settings=kube.WatchSettings()):
        group = r.resource.api_version.rpartition("/")[0]
        out[(group, r.kind.lower() + "s")] = {"list", "watch"}
    return out


def test_no_wildcards_and_nothing_beyond_the_allowed(rendered: list[Obj]) -> None:
    granted = grants(only(rendered, "ClusterRole"))
    for (group, resource), verbs in granted.items():
        assert "*" not in (group, resource) and "*" not in verbs
        assert (group, resource) in ALLOWED, f"grants {resource!r} in API group {group!r}"
        assert verbs <= ALLOWED[(group, resource)], f"{resource}: {sorted(verbs - ALLOWED[(group, resource)])}"
    assert not any(resource in ("secrets", "configmaps", "pods") for _, resource in granted)


def test_grants_everything_svcproxy_watches(rendered: list[Obj]) -> None:
    granted = grants(only(rendered, "ClusterRole"))
    for key, verbs in watched().items():
        assert verbs <= granted.get(key, set()), f"svcproxy watches {key} but the ClusterRole does not allow it"


def test_no_core_endpoints() -> None:
    """svcproxy reads discovery.k8s.io/v1 EndpointSlices, never v1 Endpoints."""
    assert ("", "endpoints") not in watched()
    assert ("", "endpoints") not in grants(load_yaml_docs(BASE / "clusterrole.yaml")[0])


def test_bound_to_the_daemonsets_service_account(rendered: list[Obj]) -> None:
    role, binding, sa = (only(rendered, k) for k in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount"))
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert only(rendered, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]

