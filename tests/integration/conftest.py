"""Fixtures for the integration tests."""

from __future__ import annotations

import pytest

from proxy.dataplane.connections import MODES
from tests.integration import harness


@pytest.fixture(params=MODES)
def each_forwarding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per forwarding mode (``--forwarding``): every guarantee holds in each."""
    mode: str = request.param
    monkeypatch.setattr(harness, "forwarding", mode)
    return mode
