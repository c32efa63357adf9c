"""Shared test set-up: every async test runs on uvloop, as svcproxy does in production."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, object]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _no_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp sessions (the Kubernetes client's too) and subprocesses trust the environment: keep
    test traffic on loopback and in the tests' own namespaces, never sent via a proxy."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
