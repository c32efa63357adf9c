"""The data-loop watchdog: a callback that holds the loop shows up as lag, and is logged."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxy.dataplane.watchdog import LoopWatchdog


async def test_a_held_loop_is_observed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []
    dog = LoopWatchdog(asyncio.get_running_loop(), seen.append, interval=0.01, warn_after=0.1)
    dog.start()
    try:
        await asyncio.sleep(0.05)
        assert seen and max(seen) < 0.1  # an idle loop runs its timers on time
        with caplog.at_level(logging.WARNING):
            time.sleep(0.2)  # the loop is held
            await asyncio.sleep(0.05)
        assert 0.15 <= dog.worst < 1.0 and max(seen) == dog.worst
        assert "the data plane stood still for" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            time.sleep(0.2)
            await asyncio.sleep(0.05)
        assert "stood still" not in caplog.text  # at most once a minute
    finally:
        dog.stop()
    count = len(seen)
    await asyncio.sleep(0.05)
    assert len(seen) == count  # stopped
