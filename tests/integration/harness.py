"""Real loopback backends, manifests and an in-process svcproxy for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import App
from proxy.dataplane import forwarding as forwarding_modes
from proxy.dataplane.connections import Connections
from proxy.dataplane.target import Target
from proxy.settings import Settings

forwarding = Settings.forwarding
"""The forwarding mode running_proxy uses (the ``each_forwarding`` fixture runs a test in each)."""
WORKERS = int(os.environ.get("SVCPROXY_TEST_WORKERS", "1"))
"""--workers for running_proxy: ``SVCPROXY_TEST_WORKERS=2 ./scripts/test tests/integration`` runs the
tier with helper processes (exact round-robin counts and instant metrics are one process's)."""


def service(name: str, cluster_ip: str, port: int, *, node_port: int = 0, ns: str = "default",
            **spec: Any) -> dict[str, Any]:
    ports: dict[str, Any] = {"name": "p", "protocol": "TCP", "port": port, "targetPort": port}
    if node_port:
        ports["nodePort"] = node_port
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": cluster_ip,
                 "ports": [ports], **spec},
    }


def endpoint_slice(service_name: str, port: int, ips: Sequence[str], *, name: str = "", ns: str = "default",
                   family: str = "IPv4") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-1", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": family,
        "ports": [{"name": "p", "protocol": "TCP", "port": port}],
        "endpoints": [{"addresses": [ip], "nodeName": "node-a"} for ip in ips],
    }


def write_manifests(path: Path, objects: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(objects))
    tmp.replace(path)  # atomic, so the poller never reads half a file


@contextlib.asynccontextmanager
async def running_proxy(directory: Path, objects: Sequence[dict[str, Any]] = (), **overrides: Any
                        ) -> AsyncIterator[App]:
    """svcproxy on the manifests in ``directory`` (``objects`` are written to svc.yaml first)."""
    if objects:
        write_manifests(directory / "svc.yaml", objects)
    settings = Settings(**{
        "manifests": directory, "hostname_override": "node-a", "nodeport_addresses": ("127.0.0.1/32",),
        "healthz_bind_address": "127.0.0.1:0", "metrics_bind_address": "127.0.0.1:0",
        "vip_interface": "lo", "transparent": "off", "manifest_poll_interval": 0.1, "drain_timeout": 1.0,
        "forwarding": forwarding, "workers": WORKERS, **overrides,
    }).validate()
    app = App(settings)
    await app.start()
    try:
        await asyncio.wait_for(app.synced.wait(), 5)
        yield app
    finally:
        await app.stop()


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def forwarding_to(target: Target, connections: Connections, mode: str = "") -> AsyncIterator[int]:
    """A forwarding mode (default: the test's) serving ``target`` on a loopback port (yielded),
    without the rest of svcproxy."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    forwarder = forwarding_modes.forwarder(mode or forwarding, asyncio.get_running_loop(), connections)
    stop = await forwarder.serve(sock, target)
    try:
        yield port
    finally:
        stop()
        forwarder.close()


class Whoami(asyncio.Protocol):
    """Answers each connection with its name, then closes."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.name)  # type: ignore[attr-defined]
        transport.close()


@contextlib.asynccontextmanager
async def servers(addresses: Sequence[tuple[str, int]], factory: Callable[[str], asyncio.Protocol] | None = None
                  ) -> AsyncIterator[list[asyncio.AbstractServer]]:
    """Backends on each (ip, port); by default each answers with "ip" and closes."""
    loop = asyncio.get_running_loop()
    made = []
    try:
        for ip, port in addresses:
            def make(ip: str = ip) -> asyncio.Protocol:
                return factory(ip) if factory else Whoami(ip.encode())

            made.append(await loop.create_server(make, ip, port, reuse_address=True))
        yield made
    finally:
        for server in made:
            server.close()


async def ask(ip: str, port: int, timeout: float = 5.0) -> str:
    """Connect, read until the server closes, return what it said."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    try:
        return (await asyncio.wait_for(reader.read(), timeout)).decode()
    finally:
        writer.close()


async def refused(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 2)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def eventually(check: Callable[[], Any], timeout: float = 2.0, interval: float = 0.05) -> Any:
    """Poll an (async or plain) check until it returns something truthy; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
        except (OSError, AssertionError) as e:  # not there yet (e.g. refused): keep polling
            result = None
            last: BaseException | None = e
        else:
            last = None
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}") from last
        await asyncio.sleep(interval)


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def hung_listener(ip: str, port: int) -> Iterator[None]:
    """A listener with a full accept queue: it drops SYNs, so every dial to it hangs until its timeout."""
    hung = socket.socket()
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind((ip, port))
    hung.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((ip, port))
            fillers.append(s)
        yield
    finally:
        for s in [*fillers, hung]:
            s.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(address: tuple[str, int] | None) -> Samples:
    """GET /metrics and parse it with prometheus-client's own parser: {(sample, labels): value}."""
    assert address is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), 5)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly these labels, or None when it is not exported."""
    return samples.get((name, frozenset(labels.items())))
