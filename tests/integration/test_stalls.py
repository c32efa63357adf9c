"""Control-plane work does not stop forwarding: a large manifest is parsed, converted and planned
while the data plane keeps answering (its own watchdog says how long it ever stood still)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from tests.integration.harness import ask, endpoint_slice, eventually, running_proxy, servers, service

VIP, BIG_VIP = "127.0.0.170", "127.0.0.171"
BACKEND = "127.0.0.172"
PORT = 18150


async def test_forwarding_goes_on_while_a_50000_endpoint_slice_loads(tmp_path: Path) -> None:
    probe = [service("probe", VIP, 8150), endpoint_slice("probe", PORT, [BACKEND])]
    big = endpoint_slice("big", PORT, [f"10.9.{i >> 8}.{i & 255}" for i in range(50_000)])
    text = await asyncio.to_thread(yaml.dump_all, [service("big", BIG_VIP, 8151), big], Dumper=yaml.CSafeDumper)
    (tmp_path.parent / "big.tmp").write_text(text)  # ~3.7 MB, outside the manifests directory
    async with servers([(BACKEND, PORT)]), running_proxy(tmp_path, probe) as app:
        assert app.watchdog is not None and app.proxier is not None
        listeners = app.proxier.listeners.open
        app.watchdog.worst = 0.0  # start-up is not what this measures
        (tmp_path.parent / "big.tmp").replace(tmp_path / "big.yaml")
        slowest, answered = 0.0, 0
        deadline = time.monotonic() + 60
        while not any(key.ip == BIG_VIP for key in listeners) and time.monotonic() < deadline:
            started = time.monotonic()
            assert await ask(VIP, 8150) == BACKEND
            slowest = max(slowest, time.monotonic() - started)
            answered += 1
        await eventually(lambda: any(key.ip == BIG_VIP for key in listeners), timeout=1)
        # Parsed inline, libyaml alone held the GIL (and so every request) for about 0.5 s; on
        # the data loop, conversion and planning added 1 s more.
        assert answered > 50 and slowest < 0.25, (answered, slowest)
        assert app.watchdog.worst < 0.25, app.watchdog.worst
