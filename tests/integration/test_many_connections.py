"""Ten thousand concurrent connections through one Service (or as many as the descriptor limit
lets one process hold): every one answered while all are open, counted in
svcproxy_tcp_connections, the next ones refused cleanly at --max-connections, and every
descriptor given back when they close.

Each proxied connection holds two descriptors, so 10,000 need a limit above 20,000. Root may raise
its limit; in a container without CAP_SYS_RESOURCE the hard limit stands, and the test holds as
many connections as svcproxy's default --max-connections allows under it (9,744 under 20,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from proxy.settings import Settings
from tests.integration.harness import endpoint_slice, free_port, service
from tests.integration.test_fd_exhaustion import live_connections

REPO = Path(__file__).resolve().parents[2]
VIP, BACKEND, PORT = "127.0.0.132", "127.0.0.133", 18112
WANTED = 10_000
ECHO = f"""
import asyncio, uvloop
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(d)
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "{BACKEND}", {PORT}, reuse_address=True,
                                                            backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
uvloop.run(main())
"""


def raise_nofile(wanted: int) -> int:
    """Raise this process's descriptor limit (children inherit it) toward ``wanted``; the result."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def refused_total(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("svcproxy_connections_refused_total{") and 'reason="max_connections"' in line)


async def echo_once() -> str:
    held: list[asyncio.StreamWriter] = []
    try:
        return await open_echo(held)
    finally:
        for writer in held:
            writer.close()


async def open_echo(held: list[asyncio.StreamWriter]) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(VIP, PORT), 10)
    except OSError as e:
        return type(e).__name__
    held.append(writer)
    try:
        writer.write(b"x")
        return "ok" if await asyncio.wait_for(reader.readexactly(1), 10) == b"x" else "bad"
    except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError) as e:
        return type(e).__name__  # a reset: refused at the limit


async def test_ten_thousand_concurrent_connections(tmp_path: Path) -> None:
    limit = raise_nofile(2 * WANTED + 1024)
    connections = min(WANTED, Settings().connection_limit())  # what svcproxy will accept under it
    if connections < 9_000:
        pytest.skip(f"a descriptor limit of {limit} allows only {connections} connections")
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump_all([service("many", VIP, PORT),
                                                           endpoint_slice("many", PORT, [BACKEND])]))
    backend = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    metrics_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--manifests", str(tmp_path), "--hostname-override",
                             "node-a", "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address",
                             f"127.0.0.1:{metrics_port}", "--vip-interface", "lo", "--nodeport-addresses",
                             "127.0.0.1/32", "--max-connections", str(connections)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    held: list[asyncio.StreamWriter] = []
    try:
        assert backend.stdout is not None and backend.stdout.readline().strip() == "ready"
        for _ in range(100):
            if await echo_once() == "ok":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("svcproxy never served the Service")
        await asyncio.sleep(0.2)  # the probe's connection is gone from its books
        baseline = fd_count(proc.pid)
        gate = asyncio.Semaphore(256)  # connects in flight: the listen backlogs hold this many

        async def one() -> str:
            async with gate:
                return await open_echo(held)

        started = time.monotonic()
        outcomes = await asyncio.gather(*(one() for _ in range(connections)))
        opened_in = time.monotonic() - started
        assert outcomes.count("ok") == connections, {o: outcomes.count(o) for o in set(outcomes)}
        assert await live_connections(metrics_port) == connections
        assert fd_count(proc.pid) >= baseline + 2 * connections  # both legs of each, really open
        # At the limit, the next ones are refused at once and counted; nothing else breaks.
        extra = await asyncio.gather(*(open_echo(held) for _ in range(10)))
        assert all(o != "ok" for o in extra), extra
        assert await refused_total(metrics_port) >= 10
        for writer in held[:100]:
            writer.close()
        await asyncio.sleep(0.5)
        assert await echo_once() == "ok"  # room again: served
        for writer in held:
            writer.close()
        held.clear()
        deadline = time.monotonic() + 30
        while await live_connections(metrics_port) != 0 or fd_count(proc.pid) > baseline + 8:
            assert time.monotonic() < deadline, (await live_connections(metrics_port), fd_count(proc.pid), baseline)
            await asyncio.sleep(0.2)
        assert proc.poll() is None, "svcproxy exited"
        print(f"\n{connections} connections opened and echoed in {opened_in:.1f} s (descriptor limit {limit})")
    finally:
        for writer in held:
            writer.close()
        for p in (proc, backend):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
            if p.poll() is None:
                p.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err and "Too many open files" not in err, err[-3000:]
