"""Every Kubernetes object under deploy/ against the API's own schemas, strictly (no unknown field).

kubernetes-validate ships the OpenAPI-derived JSON schemas of each Kubernetes release, so this
runs offline. Checked: each resource file as written, and what each kustomization renders, for the
oldest release we support and the newest one the package knows.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import KUSTOMIZATIONS, REPO, Obj, load_yaml_docs, render

kv: Any = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the dev extras)")

OLDEST = "1.31.0"


def versions() -> list[str]:
    return sorted({OLDEST, kv.latest_version()})


def _validate(obj: Obj, where: str) -> None:
    for version in versions():
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            pytest.fail(f"{where}: {obj['kind']} {obj['metadata']['name']} invalid for Kubernetes {version} "
                        f"at {path or '/'}: {e.message}")


def _resource_files() -> list[str]:
    files: list[str] = []
    for directory in KUSTOMIZATIONS.values():
        (k,) = load_yaml_docs(directory / "kustomization.yaml")
        files += [str((directory / r).relative_to(REPO)) for r in k["resources"] if (directory / r).is_file()]
    return files


@pytest.mark.parametrize("path", _resource_files())
def test_resource_file(path: str) -> None:
    """Without kustomize: the files as written (namespace and generated names still missing)."""
    for obj in load_yaml_docs(REPO / path):
        _validate(obj, path)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered(name: str) -> None:
    for obj in render(KUSTOMIZATIONS[name]):
        _validate(obj, f"kustomize build {name}")


def test_validator_rejects_an_unknown_field() -> None:
    """The check has teeth: strict mode refuses a misspelt field."""
    bad = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": True}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, OLDEST, strict=True)
