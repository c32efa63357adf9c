"""The e2e cluster fixture: built once per session, torn down even when tests fail.

Each test writes its Services and EndpointSlices with the ``manifests`` fixture, into its own
file of the shared manifest directory; the file is removed after the test. Tests use their own
clusterIPs and ports, so they never wait for each other's objects to go away.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import Cluster, endpoint_slice, eventually, missing_requirements, port, service

Apply = Callable[..., None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = missing_requirements()
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"e2e cluster: {reason}"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    try:
        c.up()
        # A Service on every pod, so "svcproxy has synced" can be seen from each node.
        c.apply("sentinel", [service("sentinel", ["10.96.0.2"], [port(80)]),
                             endpoint_slice("sentinel", c.pods)])
        for node in c.nodes:
            eventually(lambda node: c.who(node.pods[0].ns, "10.96.0.2", 80).startswith("n"), node, timeout=30,
                       what=f"svcproxy on {node.name} serving")
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.down()


@pytest.fixture(autouse=True)
def _proxies_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every svcproxy must survive every test."""
    yield
    if "cluster" in request.fixturenames:
        c: Cluster = request.getfixturevalue("cluster")
        dead = c.dead_proxies()
        assert not dead, f"svcproxy exited on {dead}:\n{c.log_tails()}"


@pytest.fixture
def manifests(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Apply]:
    """``apply(objects, name=...)`` writes the test's manifests; they are deleted afterwards."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)
    written: set[str] = set()

    def apply(objects: Sequence[dict[str, Any]], name: str = "") -> None:
        file = f"{base}-{name}" if name else base
        written.add(file)
        cluster.apply(file, objects)

    yield apply
    for file in written:
        cluster.delete(file)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        c = getattr(item, "funcargs", {}).get("cluster")
        if isinstance(c, Cluster):
            report.sections.append(("svcproxy logs", c.log_tails()))
