"""Restarts under continuous load: a new svcproxy started beside the running one takes over with
nothing failed or refused, TCP and UDP; a new one that cannot sync is not ready and the old one
keeps serving; an old one killed mid-handover leaves the new one serving everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import Whoami, eventually, free_port

REPO = Path(__file__).resolve().parents[2]
VIP, BACKEND = "127.0.0.180", "127.0.0.181"
TCP_PORT, UDP_PORT, TARGET = 8180, 8181, 18180


def objects() -> list[dict[str, Any]]:
    ports = [{"name": "http", "protocol": "TCP", "port": TCP_PORT, "targetPort": TARGET},
             {"name": "dns", "protocol": "UDP", "port": UDP_PORT, "targetPort": TARGET}]
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": VIP, "ports": ports}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
             "addressType": "IPv4", "endpoints": [{"addresses": [BACKEND]}],
             "ports": [{"name": "http", "protocol": "TCP", "port": TARGET},
                       {"name": "dns", "protocol": "UDP", "port": TARGET}]}]


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(lambda: Whoami(BACKEND.encode()), BACKEND, TARGET, reuse_address=True)
    udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(BACKEND, TARGET))
    try:
        yield
    finally:
        tcp.close()
        udp.close()


class Proxy:
    """One svcproxy process, on the manifests in ``tmp/manifests`` unless ``source`` says otherwise."""

    def __init__(self, tmp: Path, name: str, handover: str, *extra: str, source: tuple[str, ...] = ()) -> None:
        self.ready = tmp / f"{name}.ready"
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *(source or ("--manifests", str(tmp / "manifests"))),
                 "--hostname-override", "node-a",
                 "--healthz-bind-address", f"127.0.0.1:{free_port()}", "--metrics-bind-address", "",
                 "--vip-interface", "lo", "--nodeport-addresses", "127.0.0.1/32", "--handover-socket", handover,
                 "--ready-file", str(self.ready), "--drain-timeout", "5s", *extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    async def wait_ready(self, timeout: float = 20) -> None:
        await eventually(self.ready.exists, timeout=timeout)

    async def exited(self, timeout: float = 30) -> int:
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Load:
    """Requests without pause over new TCP connections, and UDP request/answer, until stopped."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, tcp_clients: int = 4) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._tcp()) for _ in range(tcp_clients)] + [loop.create_task(self._udp())]

    async def _tcp(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(VIP, TCP_PORT), 5)
                answer = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                self.outcomes["tcp ok" if answer == BACKEND.encode() else f"tcp answer {answer[:30]!r}"] += 1
            except ConnectionRefusedError:
                self.outcomes["tcp refused"] += 1
            except (OSError, TimeoutError) as e:
                self.outcomes[f"tcp {type(e).__name__}"] += 1

    async def _udp(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((VIP, UDP_PORT))  # one flow, as a resolver's
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                payload = f"q{n}".encode()
                await loop.sock_sendall(sock, payload)
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 100), 2)
                    self.outcomes["udp ok" if data == payload else "udp wrong"] += 1
                except TimeoutError:
                    self.outcomes["udp lost"] += 1
                except OSError as e:  # ECONNREFUSED from an ICMP error: nothing listened
                    self.outcomes[f"udp {type(e).__name__}"] += 1
                await asyncio.sleep(0.002)
        finally:
            sock.close()

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    def failures(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if not k.endswith(" ok")}


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "web.yaml").write_text(yaml.safe_dump_all(objects()))
    return tmp_path


def handover_name() -> str:
    return f"@svcproxy-test-{os.getpid()}-{time.monotonic_ns()}"


async def test_restart_with_identical_flags_loses_nothing(tmp: Path) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name)
        new: Proxy | None = None
        try:
            await old.wait_ready()
            load = Load()
            load.start()
            await asyncio.sleep(1.0)
            new = Proxy(tmp, "new", name)
            await new.wait_ready()
            await asyncio.sleep(0.5)
            old.proc.send_signal(signal.SIGTERM)
            assert await old.exited() == 0
            await asyncio.sleep(1.0)
            outcomes = await load.stop()
        finally:
            old.kill()
            if new is not None:
                new.kill()
    assert load.failures() == {}, (outcomes, old.text()[-2000:])
    assert outcomes["tcp ok"] > 200 and outcomes["udp ok"] > 100, outcomes
    assert "the new svcproxy has synced" in old.text()
    assert not old.ready.exists()  # not ready any more once stopping


async def test_a_new_instance_that_cannot_sync_is_not_ready_and_the_old_keeps_serving(tmp: Path) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name, "--handover-timeout", "3s")
        stuck: Proxy | None = None
        try:
            await old.wait_ready()
            load = Load()
            load.start()
            # The same node, but its API server unreachable: it never syncs.
            stuck = Proxy(tmp, "stuck", name, source=("--master", f"http://127.0.0.1:{free_port()}"))
            await asyncio.sleep(4)
            assert stuck.proc.poll() is None and not stuck.ready.exists()
            started = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)  # as if the rollout went ahead anyway
            assert await old.exited() == 0
            waited = time.monotonic() - started
            outcomes = await load.stop()
        finally:
            old.kill()
            if stuck is not None:
                stuck.kill()
    ok_before_exit = outcomes["tcp ok"]
    assert ok_before_exit > 200, outcomes
    assert "did not sync within 3s" in old.text(), old.text()[-2000:]
    assert waited >= 2.5  # it kept serving while it waited
    assert {k: v for k, v in load.failures().items() if not k.startswith(("tcp refused", "udp"))} == {}


async def test_the_old_instance_killed_mid_handover_leaves_the_new_one_serving(tmp: Path) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name)
        new: Proxy | None = None
        try:
            await old.wait_ready()
            new = Proxy(tmp, "new", name)
            await eventually(lambda: "a new svcproxy (pid" in old.text(), timeout=20)
            old.proc.send_signal(signal.SIGKILL)
            await new.wait_ready()
            load = Load()
            load.start()
            await asyncio.sleep(1.0)
            outcomes = await load.stop()
            # and the new one owns the name now: a third instance registers with it
            await eventually(lambda: "took over" in new.text() or _owned(name), timeout=5)
        finally:
            old.kill()
            if new is not None:
                new.kill()
    assert load.failures() == {} and outcomes["tcp ok"] > 50, outcomes


def _owned(name: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect("\0" + name[1:])
        except OSError:
            return False
        return True
