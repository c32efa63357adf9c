"""The GC policy: a slow full collection freezes what it walked, a quick one does not, and
frozen objects are still freed by reference counting."""

from __future__ import annotations

import gc
import weakref

from proxy.gcpolicy import FreezeSlowCollections


class Thing:
    pass


def test_a_slow_full_collection_freezes_the_heap_and_a_quick_one_does_not() -> None:
    policy = FreezeSlowCollections(slow=10.0)  # nothing is that slow: never freezes
    gc.unfreeze()
    policy.install()
    try:
        gc.collect()
        assert policy.freezes == 0 and gc.get_freeze_count() == 0
        policy.slow = 0.0  # every full collection counts as slow now
        kept = [Thing() for _ in range(1000)]
        gc.collect(1)
        assert policy.freezes == 0  # young collections never freeze
        gc.collect()
        assert policy.freezes == 1 and gc.get_freeze_count() >= len(kept)
        walked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(o) in walked for o in kept)  # no collection walks them any more
        ref = weakref.ref(kept[0])
        del kept
        assert ref() is None  # frozen, yet freed by reference counting
    finally:
        policy.remove()
        gc.unfreeze()
    assert policy not in gc.callbacks
