"""The kustomizations under deploy/: their files, their rendering, and the kind overlay."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy import config
from proxy.settings import Settings
from tests.deploy.conftest import (
    BASE,
    DEPLOY,
    KIND,
    KUSTOMIZATIONS,
    Obj,
    config_data,
    container_env,
    daemonset_container,
    load_yaml_docs,
    only,
    render,
)


def _kustomization(directory: Path) -> dict[str, Any]:
    docs = load_yaml_docs(directory / "kustomization.yaml")
    assert len(docs) == 1
    k: dict[str, Any] = docs[0]
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    return k


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_listed_file_exists_and_parses(name: str) -> None:
    """Needs no kustomize: each resource is a kustomization directory or a YAML file of objects
    with apiVersion, kind and metadata.name; each generator's env file is KEY=VALUE lines."""
    directory = KUSTOMIZATIONS[name]
    k = _kustomization(directory)
    resources = k.get("resources")
    assert isinstance(resources, list) and resources
    for entry in resources:
        path = (directory / entry).resolve()
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry}: a directory without kustomization.yaml"
            continue
        assert path.is_file(), f"{name}: resource {entry} does not exist"
        for obj in load_yaml_docs(path):
            assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), path
    for gen in k.get("configMapGenerator") or []:
        for env_file in gen.get("envs") or []:
            for line in (directory / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, sep, _ = line.partition("=")
                    assert sep and key.isidentifier(), f"{env_file}: not KEY=VALUE: {line!r}"


def test_no_stray_manifests() -> None:
    """Every YAML file in deploy/base is used by its kustomization (nothing silently left out)."""
    listed = {Path(str(r)).name for r in _kustomization(BASE)["resources"]}
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert present == listed


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders(name: str) -> None:
    objs = render(KUSTOMIZATIONS[name])
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "kube-system", o["kind"]


def test_deploy_is_the_base() -> None:
    """`kubectl apply -k deploy/` applies exactly deploy/base."""
    assert render(DEPLOY) == render(BASE)


def config_map_of(objs: list[Obj]) -> Mapping[str, str]:
    """The data of the ConfigMap the DaemonSet mounts its config.conf from."""
    (volume,) = [v for v in only(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    return config_data(objs, volume["configMap"]["name"])


def test_base_leaves_the_api_server_to_the_overlay() -> None:
    objs = render(BASE)
    assert config_map_of(objs)["SVCPROXY_APISERVER"] == ""
    assert container_env(objs, daemonset_container(objs))["SVCPROXY_APISERVER"] == ""


def test_kind_cluster_config() -> None:
    (cluster,) = load_yaml_docs(KIND / "cluster.yaml")
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cluster["networking"]["kubeProxyMode"] == "none"
    assert [n["role"] for n in cluster["nodes"]] == ["control-plane", "worker", "worker"]


def test_kind_overlay() -> None:
    """The locally built image, never pulled; the API server at the kind control-plane node."""
    objs = render(KIND)
    container = daemonset_container(objs)
    assert container["image"] == "svcproxy:dev"
    assert container["imagePullPolicy"] == "Never"
    data = config_map_of(objs)
    (cluster,) = load_yaml_docs(KIND / "cluster.yaml")
    url = urlsplit(container_env(objs, container)["SVCPROXY_APISERVER"])
    assert (url.scheme, url.hostname, url.port) == ("https", f"{cluster['name']}-control-plane", 6443)
    # kind's pod CIDR and debug logs, in its own config.conf
    settings = config.apply(Settings(), config.load(_written(data["config.conf"])))
    assert settings.cluster_cidr == ("10.244.0.0/16",) and settings.verbosity == 4
    # everything else comes from the base unchanged
    base = daemonset_container(render(BASE))
    assert {k: v for k, v in container.items() if k not in ("image", "imagePullPolicy", "env")} == {
        k: v for k, v in base.items() if k not in ("image", "imagePullPolicy", "env")
    }
    assert only(objs, "ClusterRole") == only(render(BASE), "ClusterRole")


def _written(text: str) -> Path:
    path = Path(tempfile.mkdtemp()) / "config.conf"
    path.write_text(text)
    return path
