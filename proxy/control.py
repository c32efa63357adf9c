"""The control plane's own thread and event loop, so its work never holds up forwarding.

Sources, the change tracker and the sync runner (watching, decoding, converting, planning) run
here; the data plane (listeners, connections, health and metrics servers) keeps the main loop.
Python switches threads every few milliseconds, so converting a 50,000-endpoint slice or planning
10,000 Services costs forwarding a share of the CPU, not a stall of the whole computation (on one
loop that was seconds). Work that holds the GIL in one C call (decoding a large document) must
still be split up by whoever does it.

The two sides meet in few places: the sync hands each plan to the data loop with
:meth:`ControlThread.on_data` and waits for it to be applied; plain values (health timestamps,
counters) are read across without locks, which the GIL makes safe for single reads and writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ControlThread:
    """Runs one root coroutine on a thread of its own until it ends or :meth:`stop` is called."""

    def __init__(self, data_loop: asyncio.AbstractEventLoop) -> None:
        self.data_loop = data_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self.done: asyncio.Future[None] = data_loop.create_future()
        """Resolves (on the data loop) when the root coroutine ends: its result or exception."""

    def start(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._thread = threading.Thread(target=self._run, args=(main,), name="svcproxy-control", daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        outcome: BaseException | None = None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            self._loop = runner.get_loop()

            async def root() -> None:
                self._task = asyncio.current_task()
                self._started.set()
                await main()

            try:
                runner.run(root())
            except asyncio.CancelledError:
                pass
            except BaseException as e:  # handed to the data loop, which decides what it means
                outcome = e
        self._started.set()  # in case root() never ran
        self.data_loop.call_soon_threadsafe(self._resolve, outcome)

    def _resolve(self, outcome: BaseException | None) -> None:
        if self.done.done():
            return
        if outcome is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(outcome)

    async def on_data(self, coro: Coroutine[Any, Any, T]) -> T:
        """From the control loop: run ``coro`` on the data loop and wait for its result."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.data_loop)
        return await asyncio.wrap_future(future)

    async def stop(self) -> None:
        """From the data loop: cancel the root coroutine, let it clean up, join the thread."""
        loop, task, thread = self._loop, self._task, self._thread
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            await asyncio.to_thread(thread.join)
        if not self.done.done():
            self.done.set_result(None)
        elif not self.done.cancelled():
            self.done.exception()  # mark it retrieved: stop() is how the outcome is dropped
