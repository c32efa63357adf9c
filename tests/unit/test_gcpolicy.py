"""The heap freezer: what exists is frozen every interval, so full collections walk only what is new."""

from __future__ import annotations

import asyncio
import gc

from proxy.gcpolicy import HeapFreezer


async def test_the_heap_is_frozen_every_interval_until_stopped() -> None:
    freezer = HeapFreezer(asyncio.get_running_loop(), interval=0.02)
    try:
        gc.unfreeze()
        freezer.start()
        kept = [[i] for i in range(1000)]  # tracked objects that live on
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() >= len(kept)
        walked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(o) in walked for o in kept)  # no collection walks them any more
        freezer.stop()
        gc.unfreeze()
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() == 0  # stopped: no more freezes
    finally:
        freezer.stop()
        gc.unfreeze()
