"""Descriptors run out: accept and dial errors neither spin the loop nor crash svcproxy, and it
serves again once descriptors are free. Also: the default --max-connections keeps it from
running out at all."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import endpoint_slice, free_port, service

REPO = Path(__file__).resolve().parents[2]
VIP, BACKEND, PORT = "127.0.0.130", "127.0.0.131", 18110
NOFILE = 64


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


async def echo_once(timeout: float = 3.0) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(VIP, PORT), timeout)
    except OSError as e:
        return type(e).__name__
    try:
        writer.write(b"x")
        return "ok" if await asyncio.wait_for(reader.readexactly(1), timeout) == b"x" else "bad"
    except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError) as e:
        return type(e).__name__  # RuntimeError: uvloop, when the proxy closed before our write
    finally:
        writer.close()


async def live_connections(port: int) -> float | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith("svcproxy_tcp_connections "):
            return float(line.split()[1])
    return None


@pytest.mark.parametrize("limit", ["0", "default"])
async def test_out_of_descriptors(tmp_path: Path, limit: str, each_forwarding: str) -> None:
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump_all([service("fds", VIP, PORT),
                                                           endpoint_slice("fds", PORT, [BACKEND])]))
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Echo, BACKEND, PORT, reuse_address=True)
    metrics_port = free_port()
    args = [sys.executable, "-m", "proxy", "--manifests", str(tmp_path), "--hostname-override", "node-a",
            "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", f"127.0.0.1:{metrics_port}",
            "--vip-interface", "lo",
            "--nodeport-addresses", "127.0.0.1/32", "--forwarding", each_forwarding]
    if limit == "0":
        args += ["--max-connections", "0"]  # nothing holds it back: it really runs out
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(100):
            if await echo_once() == "ok":
                break
            await asyncio.sleep(0.1)
        # Hold far more connections than 64 descriptors allow.
        outcomes = []
        for _ in range(60):
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(VIP, PORT), 2)
                writer.write(b"y")
                held.append(writer)
                outcomes.append("ok" if await asyncio.wait_for(reader.readexactly(1), 2) == b"y" else "bad")
            except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError) as e:
                outcomes.append(type(e).__name__)
        assert outcomes.count("ok") >= (10 if limit == "0" else 5), outcomes
        assert outcomes.count("ok") < 60, "the limit was never reached"
        # Out of descriptors, the loop must not spin: little CPU while we wait.
        before = cpu_seconds(proc.pid)
        await asyncio.sleep(2.0)
        assert cpu_seconds(proc.pid) - before < 0.5
        assert proc.poll() is None, "svcproxy exited"
        # Free the descriptors: it serves again.
        for writer in held:
            writer.close()
        held.clear()
        deadline = time.monotonic() + 10
        while await echo_once() != "ok":
            assert time.monotonic() < deadline, "no service after the descriptors were freed"
            await asyncio.sleep(0.2)
        assert proc.poll() is None
        # and no connection is left behind in its books
        for _ in range(50):
            if await live_connections(metrics_port) == 0:
                break
            await asyncio.sleep(0.1)
        assert await live_connections(metrics_port) == 0
    finally:
        for writer in held:
            writer.close()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        backend.close()
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err, err[-3000:]
    if limit == "default":  # the limit refuses connections before descriptors run out
        assert "Too many open files" not in err, err[-3000:]
    else:
        assert "Too many open files" in err, err[-3000:]  # it did run out (accept, dial or a file read)
