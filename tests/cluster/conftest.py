"""The cluster tier: svcproxy against Kubernetes' own control plane, built from source.

Skipped, with the reason, where Go or root is missing; under CI (``CI`` set) a missing
prerequisite is a failure instead, so the tier can never silently not run there.
Run it alone with ``./scripts/test tests/cluster``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import controlplane
from tests.cluster.harness import KubeCluster


def missing() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "ss", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if shutil.which("go") is None:
        return "needs Go to build the control plane (https://go.dev/doc/install)"
    if controlplane.built_binaries() is None:
        return "the control plane is not built: scripts/controlplane build"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = missing()
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.root)
            if reason and not os.environ.get("CI"):
                item.add_marker(pytest.mark.skip(reason=f"cluster tier: {reason}"))


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    reason = missing()
    if reason:
        pytest.fail(f"cluster tier required under CI: {reason}")
    binaries = controlplane.built_binaries()
    assert binaries is not None
    c = KubeCluster(tmp_path_factory.mktemp("cluster"), binaries)
    try:
        c.up()
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.down()


@pytest.fixture(autouse=True)
def _all_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """svcproxy, the kubelets and the control plane must survive every test."""
    yield
    if "kube" in request.fixturenames:
        c: KubeCluster = request.getfixturevalue("kube")
        dead = c.dead()
        assert not dead, f"exited: {dead}\n{c.log_tails()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        c = getattr(item, "funcargs", {}).get("kube")
        if isinstance(c, KubeCluster):
            report.sections.append(("cluster logs", c.log_tails()))
