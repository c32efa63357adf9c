"""Shared test set-up: every async test runs on uvloop, as svcproxy does in production."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, object]:
    return {"uvloop": uvloop.new_event_loop}
