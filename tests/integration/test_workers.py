"""--workers: helper processes accept from the main process's TCP listeners."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import App
from tests.integration import harness
from tests.integration.harness import (
    ask,
    endpoint_slice,
    eventually,
    free_port,
    refused,
    running_proxy,
    sample,
    scrape,
    servers,
    service,
    stop_process,
    write_manifests,
)
from tests.integration.test_udp import client, echo_servers, exchange, udp_service, udp_slice

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.170"
BACKENDS = ["127.0.0.171", "127.0.0.172"]
NEW = "127.0.0.173"
PORT = 18095


class Hold(asyncio.Protocol):
    """Says its address at once and keeps the connection open until the client closes."""

    def __init__(self, ip: str) -> None:
        self.ip = ip.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.ip)  # type: ignore[attr-defined]


def helper_pids(app: App) -> list[int]:
    assert app.proxier is not None and app.proxier.workers is not None
    return [w.process.pid for w in app.proxier.workers.workers.values()]


async def open_held(port: int, count: int) -> list[tuple[str, asyncio.StreamWriter]]:
    held = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(VIP, port)
        held.append(((await asyncio.wait_for(reader.read(64), 5)).decode(), writer))
    return held


@contextlib.asynccontextmanager
async def svcproxy_process(tmp: Path, objs: list[dict[str, Any]], *extra: str
                           ) -> AsyncIterator[tuple[tuple[str, int], int]]:
    """svcproxy as its own process (as run for real), with its metrics address and pid."""
    (tmp / "m").mkdir()
    write_manifests(tmp / "m" / "svc.yaml", objs)
    ready, metrics_port = tmp / "ready", free_port()
    with open(tmp / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--manifests", str(tmp / "m"), "--hostname-override", "node-a",
             "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", f"127.0.0.1:{metrics_port}",
             "--vip-interface", "lo", "--nodeport-addresses", "127.0.0.1/32", "--handover-socket", "",
             "--ready-file", str(ready), "--drain-timeout", "2s", "--forwarding", harness.forwarding, *extra],
            cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT)
    try:
        await eventually(ready.exists, timeout=20)
        yield ("127.0.0.1", metrics_port), proc.pid
    finally:
        stop_process(proc, 15)


async def test_helpers_share_the_listeners_and_their_counts_add_up(tmp_path: Path) -> None:
    objs = [service("wk", VIP, 8130), endpoint_slice("wk", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS], Hold), \
            svcproxy_process(tmp_path, objs, "--workers", "3") as (metrics_address, main_pid):
        held: list[tuple[str, asyncio.StreamWriter]] = []
        try:
            # The main process frozen: the helpers alone accept and forward, from the same sockets.
            os.kill(main_pid, signal.SIGSTOP)
            try:
                held += await asyncio.gather(*(open_one(8130) for _ in range(30)))
            finally:
                os.kill(main_pid, signal.SIGCONT)
            held += await asyncio.gather(*(open_one(8130) for _ in range(30)))
            # Every connection reached an endpoint, spread evenly: round robin in each process.
            counts = {ip: sum(1 for who, _ in held if who == ip) for ip in BACKENDS}
            assert sum(counts.values()) == 60 and min(counts.values()) >= 30 - 3, counts

            async def reported() -> dict[str, float] | None:
                s = await scrape(metrics_address)
                each = {dict(labels)["worker"]: v for (name, labels), v in s.items()
                        if name == "svcproxy_worker_connections"}
                return each if sum(each.values()) == 60 else None

            each = await eventually(reported, timeout=5)
            assert set(each) == {"0", "1", "2"}
            assert each["1"] + each["2"] >= 30, each
            s = await scrape(metrics_address)
            assert sample(s, "svcproxy_workers") == 3
            assert sample(s, "svcproxy_tcp_connections") == 60
        finally:
            for _, writer in held:
                writer.close()

        async def all_counted() -> bool:
            s = await scrape(metrics_address)
            labels = {"namespace": "default", "service": "wk", "port_name": "p", "protocol": "TCP"}
            return sample(s, "svcproxy_service_connections_total", **labels) == 60 and \
                sample(s, "svcproxy_service_connections_active", **labels) == 0

        await eventually(all_counted, timeout=5)


async def open_one(port: int) -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(VIP, port)
    return (await asyncio.wait_for(reader.read(64), 5)).decode(), writer


async def test_changes_reach_the_helpers(tmp_path: Path) -> None:
    objs = [service("wc", VIP, 8131), endpoint_slice("wc", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in [*BACKENDS, NEW]], Hold), \
            running_proxy(tmp_path, objs, workers=2):
        write_manifests(tmp_path / "svc.yaml", [service("wc", VIP, 8131), endpoint_slice("wc", PORT, [NEW])])

        async def moved() -> bool:
            held = await open_held(8131, 20)
            for _, writer in held:
                writer.close()
            return {who for who, _ in held} == {NEW}

        await eventually(moved, timeout=5)
        (tmp_path / "svc.yaml").unlink()
        # The helper's copy of the listening socket is closed too: nobody accepts any more.
        await eventually(lambda: refused(VIP, 8131), timeout=5)
        assert all(await asyncio.gather(*(refused(VIP, 8131) for _ in range(20))))


async def test_a_helper_that_dies_is_started_again(tmp_path: Path) -> None:
    objs = [service("wd", VIP, 8132), endpoint_slice("wd", PORT, BACKENDS)]
    async with servers([(ip, PORT) for ip in BACKENDS]), running_proxy(tmp_path, objs, workers=2) as app:
        (old,) = helper_pids(app)
        os.kill(old, signal.SIGKILL)

        async def restarted() -> bool:
            pids = helper_pids(app)
            return len(pids) == 1 and pids[0] != old

        await eventually(restarted, timeout=10)
        s = await scrape(app.metrics_address)
        assert sample(s, "svcproxy_worker_restarts_total") == 1
        # Every connection is served meanwhile and after, by whichever process takes it.
        answers = await asyncio.gather(*(ask(VIP, 8132) for _ in range(40)))
        assert set(answers) == set(BACKENDS)


async def test_udp_stays_in_the_main_process_and_helpers_exit_with_it(tmp_path: Path) -> None:
    objs = [udp_service("wu", 53), udp_slice("wu", BACKENDS[:1])]
    async with echo_servers(BACKENDS[:1]), running_proxy(tmp_path, objs, workers=2) as app:
        pids = helper_pids(app)
        c = await client()
        try:
            for _ in range(5):
                reply, _ = await exchange(c, b"q")
                assert reply == BACKENDS[0].encode() + b"|q"
        finally:
            c.close()
    for pid in pids:  # stopped with the app: no helper left behind
        await eventually(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=5)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def test_helpers_apply_source_ranges_and_drain_on_sigterm(tmp_path: Path) -> None:
    lb_ip = "127.0.0.174"
    svc = service("wl", VIP, 8133, type="LoadBalancer", loadBalancerSourceRanges=["127.0.0.5/32"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip, "ipMode": "VIP"}]}}
    async with servers([(BACKENDS[0], PORT)], lambda ip: Echo()), \
            svcproxy_process(tmp_path, [svc, endpoint_slice("wl", PORT, BACKENDS[:1])], "--workers", "2") \
            as (_, main_pid):
        (helper,) = children(main_pid)
        os.kill(main_pid, signal.SIGSTOP)  # what follows is the helper's doing alone
        try:
            reader, writer = await asyncio.open_connection(lb_ip, 8133, local_addr=("127.0.0.6", 0))
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""  # outside the ranges: refused
            writer.close()
            reader, writer = await asyncio.open_connection(lb_ip, 8133, local_addr=("127.0.0.5", 0))
            writer.write(b"one")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"one"
        finally:
            os.kill(main_pid, signal.SIGCONT)
        # SIGTERM: every process stops accepting, and the helper's open connection runs on.
        os.kill(main_pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"two"
        writer.close()
        await eventually(lambda: not os.path.exists(f"/proc/{helper}") or _zombie(helper), timeout=10)


async def test_pools_go_to_the_helpers_in_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of pools are not pickled in one message (it held the data loop 300 ms at 10,000)."""
    from proxy import proxier as proxier_module

    monkeypatch.setattr(proxier_module, "POOLS_PER_MESSAGE", 2)
    async with servers([(BACKENDS[0], PORT)]), running_proxy(tmp_path, [], workers=2) as app:
        assert app.proxier is not None and app.proxier.workers is not None
        sent: list[dict[Any, Any]] = []
        post = app.proxier.workers.post

        def record(message: tuple[Any, ...], fds: Any = ()) -> None:
            if message[0] == "pools":
                sent.append(message[1])
            post(message, fds)

        monkeypatch.setattr(app.proxier.workers, "post", record)
        objs = []
        for i in range(5):
            objs += [service(f"ws{i}", f"127.0.0.{180 + i}", 8134), endpoint_slice(f"ws{i}", PORT, BACKENDS[:1])]
        write_manifests(tmp_path / "svc.yaml", objs)
        await eventually(lambda: sum(map(len, sent)) >= 5, timeout=5)
        assert max(map(len, sent)) <= 2
        assert {key.name.name for part in sent for key in part} == {f"ws{i}" for i in range(5)}
        assert set(await asyncio.gather(*(ask(f"127.0.0.{180 + i}", 8134) for i in range(5)))) == {BACKENDS[0]}
