"""Restarts under continuous load: a new svcproxy started beside the running one takes over with
nothing failed or refused, TCP and UDP; a new one that cannot sync is not ready and the old one
keeps serving; an old one killed mid-handover leaves the new one serving everything."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
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
        Proxy.started.append(self)

    def text(self) -> str:
        return self.log.read_text()

    async def wait_ready(self, timeout: float = 20) -> None:
        await eventually(self.ready.exists, timeout=timeout)

    async def exited(self, timeout: float = 30) -> int:
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout)
        return self.proc.returncode

    started: list[Proxy] = []
    """Every instance a test started; the autouse fixture below kills what is left."""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        # and the copies it started for a restart in place (SIGUSR2), which outlive it
        for pid in map(int, re.findall(r"started svcproxy pid (\d+)", self.text())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _kill_leftovers() -> Iterator[None]:
    yield
    for proxy in Proxy.started:
        proxy.kill()
    Proxy.started.clear()


class Load:
    """Requests without pause over new TCP connections, and UDP request/answer, until stopped."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failed_at: list[tuple[float, str]] = []
        """(wall-clock time, kind) of each failure."""
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
                self.count("tcp ok" if answer == BACKEND.encode() else f"tcp answer {answer[:30]!r}")
            except ConnectionRefusedError:
                self.count("tcp refused")
            except (OSError, TimeoutError) as e:
                self.count(f"tcp {type(e).__name__}")

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
                    self.count("udp ok" if data == payload else "udp wrong")
                except TimeoutError:
                    self.count("udp lost")
                except OSError as e:  # ECONNREFUSED from an ICMP error: nothing listened
                    self.count(f"udp {type(e).__name__}")
                await asyncio.sleep(0.002)
        finally:
            sock.close()

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    def failures(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if not k.endswith(" ok")}

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if not outcome.endswith(" ok"):
            self.failed_at.append((time.time(), outcome))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "web.yaml").write_text(yaml.safe_dump_all(objects()))
    return tmp_path


def handover_name() -> str:
    return f"@svcproxy-test-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.parametrize(("workers", "mode"), [("1", "transports"), ("2", "transports"), ("1", "sockets"),
                                               ("2", "sockets")])
async def test_restart_with_identical_flags_loses_nothing(tmp: Path, workers: str, mode: str) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name, "--workers", workers, "--forwarding", mode)
        await old.wait_ready()
        load = Load()
        load.start()
        await asyncio.sleep(1.0)
        new = Proxy(tmp, "new", name, "--workers", workers, "--forwarding", mode)
        await new.wait_ready()
        await asyncio.sleep(0.5)
        old.proc.send_signal(signal.SIGTERM)
        assert await old.exited() == 0
        await asyncio.sleep(1.0)
        outcomes = await load.stop()
    assert load.failures() == {}, (outcomes, old.text()[-2000:])
    assert outcomes["tcp ok"] > 200 and outcomes["udp ok"] > 100, outcomes
    assert "the new svcproxy has synced" in old.text()
    assert not old.ready.exists()  # not ready any more once stopping


async def test_a_new_instance_that_cannot_sync_is_not_ready_and_the_old_keeps_serving(tmp: Path) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name, "--handover-timeout", "3s")
        await old.wait_ready()
        load = Load()
        load.start()
        # The same node, but its API server unreachable: it never syncs.
        stuck = Proxy(tmp, "stuck", name, source=("--master", f"http://127.0.0.1:{free_port()}"))
        await asyncio.sleep(4)
        assert stuck.proc.poll() is None and not stuck.ready.exists()
        started = time.monotonic()
        old.proc.send_signal(signal.SIGTERM)  # as if the rollout went ahead anyway
        await eventually(lambda: "did not sync within 3s" in old.text(), timeout=10)
        waited = time.monotonic() - started
        outcomes = await load.stop()  # everything up to the moment it gave up waiting
        assert await old.exited() == 0
    assert waited >= 2.5  # it kept serving while it waited, every request answered until it gave up
    gave_up = next(line for line in old.text().splitlines() if "did not sync within" in line)
    gave_up_at = datetime.datetime.strptime(gave_up[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert [f for f in load.failed_at if f[0] < gave_up_at] == [], (gave_up, load.failed_at[:5])
    assert outcomes["tcp ok"] > 200 and outcomes["udp ok"] > 50, outcomes


async def test_the_old_instance_killed_mid_handover_leaves_the_new_one_serving(tmp: Path) -> None:
    name = handover_name()
    async with backend():
        old = Proxy(tmp, "old", name)
        await old.wait_ready()
        new = Proxy(tmp, "new", name)
        await eventually(lambda: "a new svcproxy (pid" in old.text(), timeout=20)
        old.proc.send_signal(signal.SIGKILL)
        await new.wait_ready()
        load = Load()
        load.start()
        await asyncio.sleep(1.0)
        outcomes = await load.stop()
        # and the new one owns the name now, ready for the next restart
        await eventually(lambda: _owned(name), timeout=5)
    assert load.failures() == {} and outcomes["tcp ok"] > 50, outcomes


def _owned(name: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect("\0" + name[1:])
        except OSError:
            return False
        return True


async def test_sigusr2_restarts_in_place_and_tells_systemd_the_new_main_pid(tmp: Path) -> None:
    """`systemctl reload` (SIGUSR2): a fresh svcproxy with the same arguments takes over under
    load; systemd's notify socket hears READY=1, then MAINPID= of the new process, then STOPPING=1."""
    name = handover_name()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(notify.recv(4096).decode())
        return messages

    os.environ["NOTIFY_SOCKET"] = str(tmp / "notify")
    try:
        async with backend():
            old = Proxy(tmp, "old", name)  # the copy it starts is killed with it (Proxy.kill)
            await eventually(lambda: any(m.startswith("READY=1") for m in drain()), timeout=20)
            load = Load()
            load.start()
            await asyncio.sleep(0.5)
            old.proc.send_signal(signal.SIGUSR2)
            assert await old.exited() == 0
            pids = [int(line[8:]) for m in drain() for line in m.splitlines() if line.startswith("MAINPID=")]
            assert len(pids) == 1 and pids[0] != old.proc.pid
            assert f"started svcproxy pid {pids[0]}" in old.text()
            await asyncio.sleep(1.0)
            outcomes = await load.stop()
            assert old.ready.read_text().strip() == str(pids[0])  # the new one's, left in place
    finally:
        del os.environ["NOTIFY_SOCKET"]
        notify.close()
    assert load.failures() == {}, outcomes
    assert outcomes["tcp ok"] > 200 and outcomes["udp ok"] > 50, outcomes
    order = [line.split("=")[0] for m in messages for line in m.splitlines() if line.split("=")[0] in
             ("READY", "MAINPID", "STOPPING")]
    # The old one's READY first; it names the new main process before it stops (the new one's
    # own READY=1 may come at any point after it synced).
    assert order[0] == "READY" and order.index("MAINPID") < order.index("STOPPING"), messages
    assert order.count("MAINPID") == 1 and order.count("STOPPING") == 1, messages
    assert "restarting in place: started svcproxy pid" in old.text()
