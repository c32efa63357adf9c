"""Hot reload of manifest files: changes reach the dataplane quickly; broken files change nothing."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import (
    ask,
    endpoint_slice,
    eventually,
    refused,
    running_proxy,
    servers,
    service,
    write_manifests,
)

VIP = "127.0.0.110"
VIP2 = "127.0.0.111"
BACKENDS = ["127.0.0.112", "127.0.0.113"]
PORT = 18081


async def answers(ip: str, port: int, n: int = 6) -> set[str]:
    return {await ask(ip, port) for _ in range(n)}


async def test_endpoint_and_service_added_and_removed_within_two_seconds(tmp_path: Path) -> None:
    first = [service("web", VIP, 8090), endpoint_slice("web", PORT, BACKENDS[:1])]
    async with servers([(ip, PORT) for ip in BACKENDS]), running_proxy(tmp_path, first):
        assert await answers(VIP, 8090) == {BACKENDS[0]}

        write_manifests(tmp_path / "svc.yaml", [service("web", VIP, 8090), endpoint_slice("web", PORT, BACKENDS)])
        await eventually(lambda: serves(VIP, 8090, set(BACKENDS)), timeout=2.0)

        # A second Service in a new file.
        write_manifests(tmp_path / "other.yaml", [service("other", VIP2, 8091),
                                                  endpoint_slice("other", PORT, BACKENDS[1:])])
        await eventually(lambda: serves(VIP2, 8091, {BACKENDS[1]}), timeout=2.0)

        write_manifests(tmp_path / "svc.yaml", [service("web", VIP, 8090), endpoint_slice("web", PORT, BACKENDS[1:])])
        await eventually(lambda: serves(VIP, 8090, {BACKENDS[1]}), timeout=2.0)

        (tmp_path / "other.yaml").unlink()
        await eventually(lambda: refused(VIP2, 8091), timeout=2.0)
        assert await answers(VIP, 8090) == {BACKENDS[1]}


async def serves(ip: str, port: int, expected: set[str]) -> bool:
    return await answers(ip, port) == expected


@pytest.mark.parametrize("broken", [
    "kind: Service\nmetadata: {name: web\n",                       # YAML syntax error
    "- just\n- a list\n",                                           # not an object
    "kind: Service\nspec: {}\n",                                    # no metadata.name
])
async def test_broken_manifest_keeps_serving_last_good_state(
    tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    objs = [service("web", VIP, 8092), endpoint_slice("web", PORT, BACKENDS[:1])]
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
        caplog.set_level(logging.ERROR)
        (tmp_path / "svc.yaml").write_text(broken)
        await eventually(lambda: "svc.yaml" in caplog.text, timeout=2.0)
        assert await answers(VIP, 8092) == {BACKENDS[0]}
        # Fixing the file applies the fix.
        write_manifests(tmp_path / "svc.yaml", [service("web", VIP, 8092)])
        await eventually(lambda: refused(VIP, 8092), timeout=2.0)


async def test_invalid_service_is_logged_and_others_keep_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = service("bad", VIP2, 8093)
    bad["spec"]["ports"][0]["port"] = 70000
    objs = [service("web", VIP, 8094), endpoint_slice("web", PORT, BACKENDS[:1]), bad,
            endpoint_slice("bad", PORT, BACKENDS[:1])]
    caplog.set_level(logging.ERROR)
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, objs):
        assert await answers(VIP, 8094) == {BACKENDS[0]}
        assert await refused(VIP2, 8093)
        assert "Service default/bad: spec.ports[0].port: 70000 is out of range" in caplog.text


async def test_files_rewritten_in_place_under_load_lose_no_request(tmp_path: Path) -> None:
    """Editors save in place: truncate, then write. The poller must never act on the gap."""
    objs = [service("web", VIP, 8093), endpoint_slice("web", PORT, BACKENDS)]
    text = yaml.safe_dump_all(objs)
    cut = len(text) // 2
    async with servers([(ip, PORT) for ip in BACKENDS]), running_proxy(tmp_path, objs):
        failures: list[str] = []
        answered = 0
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    got = await ask(VIP, 8093, timeout=2.0)
                except OSError as e:
                    failures.append(repr(e))
                else:
                    if got in BACKENDS:
                        answered += 1
                    else:
                        failures.append(repr(got))

        clients = [asyncio.create_task(client()) for _ in range(4)]
        for _ in range(40):  # bounded: 40 saves, each one poll interval or so apart
            fd = os.open(tmp_path / "svc.yaml", os.O_WRONLY | os.O_TRUNC)
            try:
                await asyncio.sleep(0.03)  # the truncated file, as a slow editor leaves it
                os.write(fd, text[:cut].encode())
                await asyncio.sleep(0.03)  # half written: the slice cut short
                os.write(fd, text[cut:].encode())
            finally:
                os.close(fd)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
    assert not failures, f"{len(failures)} failed of {answered + len(failures)}: {failures[:5]}"
    assert answered > 100
