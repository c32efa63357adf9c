"""Runner: syncs coalesce, respect min_interval, recur every max_interval and retry after failure.

Real time with small intervals; every test finishes well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.runner import Runner

SLACK = 0.005
"""uvloop's timers have millisecond resolution, so a sleep may end a hair before time.monotonic says."""


class Recorder:
    """A sync function that records when it started; it can be told to fail or to take time."""

    def __init__(self, *, fail_first: int = 0, duration: float = 0.0) -> None:
        self.starts: list[float] = []
        self.fail_first = fail_first
        self.duration = duration
        self.during_first: list[Callable[[], None]] = []

    async def __call__(self) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) > 100:  # a runner gone wild: end its loop, so the test fails instead of hanging
            raise asyncio.CancelledError
        if len(self.starts) == 1:
            for hook in self.during_first:
                hook()
        # Always yield, as a real sync does.
        await asyncio.sleep(self.duration)
        if len(self.starts) <= self.fail_first:
            raise RuntimeError("apply failed")

    async def wait_for(self, n: int, timeout: float = 0.8) -> None:
        deadline = time.monotonic() + timeout
        while len(self.starts) < n:
            assert time.monotonic() < deadline, f"only {len(self.starts)} runs, wanted {n}"
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(runner: Runner) -> AsyncIterator[None]:
    task = asyncio.create_task(runner.loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_first_request_runs_at_once() -> None:
    rec = Recorder()
    runner = Runner(rec, min_interval=0.5, max_interval=10)
    async with running(runner):
        asked = time.monotonic()
        runner.request()
        await rec.wait_for(1)
    assert rec.starts[0] - asked < 0.1


async def test_nothing_runs_before_a_request_or_the_period() -> None:
    rec = Recorder()
    async with running(Runner(rec, min_interval=0, max_interval=10)):
        await asyncio.sleep(0.1)
    assert rec.starts == []


async def test_many_requests_coalesce_into_one_run() -> None:
    rec = Recorder()
    runner = Runner(rec, min_interval=0, max_interval=10)
    for _ in range(20):
        runner.request()
    async with running(runner):
        await rec.wait_for(1)
        await asyncio.sleep(0.1)
    assert len(rec.starts) == 1


async def test_requests_during_a_run_coalesce_into_one_follow_up() -> None:
    rec = Recorder(duration=0.05)
    runner = Runner(rec, min_interval=0, max_interval=10)
    rec.during_first = [runner.request] * 5
    async with running(runner):
        runner.request()
        await rec.wait_for(2)
        await asyncio.sleep(0.15)
    assert len(rec.starts) == 2


async def test_min_interval_between_run_starts() -> None:
    rec = Recorder()
    runner = Runner(rec, min_interval=0.15, max_interval=10)
    async with running(runner):
        runner.request()
        await rec.wait_for(1)
        runner.request()
        await rec.wait_for(2)
        runner.request()
        await rec.wait_for(3)
    gaps = [b - a for a, b in zip(rec.starts, rec.starts[1:], strict=False)]
    assert all(0.15 - SLACK <= g < 0.4 for g in gaps), gaps


async def test_periodic_run_after_max_interval() -> None:
    rec = Recorder()
    began = time.monotonic()
    async with running(Runner(rec, min_interval=0, max_interval=0.05)):
        await rec.wait_for(4)  # nobody asked
    gaps = [b - a for a, b in zip([began, *rec.starts], rec.starts, strict=False)]
    assert all(g >= 0.05 - SLACK for g in gaps), gaps


async def test_failed_run_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(fail_first=1)
    runner = Runner(rec, min_interval=0, max_interval=10, retry_interval=0.05)
    with caplog.at_level(logging.ERROR, logger="proxy.runner"):
        async with running(runner):
            runner.request()
            await rec.wait_for(2)
            await asyncio.sleep(0.15)  # the retry succeeded: no more runs until asked
    assert len(rec.starts) == 2
    assert 0.05 - SLACK <= rec.starts[1] - rec.starts[0] < 0.4
    assert any("sync failed" in r.getMessage() for r in caplog.records)


async def test_request_after_failure_does_not_wait_for_retry() -> None:
    rec = Recorder(fail_first=1)
    runner = Runner(rec, min_interval=0, max_interval=10, retry_interval=5)
    async with running(runner):
        runner.request()
        await rec.wait_for(1)
        await asyncio.sleep(0.02)
        runner.request()
        await rec.wait_for(2, timeout=0.3)


async def test_retry_still_respects_min_interval() -> None:
    rec = Recorder(fail_first=1)
    runner = Runner(rec, min_interval=0.15, max_interval=10, retry_interval=0.01)
    async with running(runner):
        runner.request()
        await rec.wait_for(2)
    assert rec.starts[1] - rec.starts[0] >= 0.15 - SLACK


@pytest.mark.parametrize(("lo", "hi"), [(-1, 10), (1, 0), (5, 1)])
def test_invalid_intervals_are_refused(lo: float, hi: float) -> None:
    async def noop() -> None:
        pass

    with pytest.raises(ValueError, match="invalid intervals"):
        Runner(noop, min_interval=lo, max_interval=hi)
