"""Watch ingest rate: how many Service and EndpointSlice events per second svcproxy applies.

``python -m benchmarks.ingest [--count N]``: the fake API server (testbed/fakeapi, in this
process, on 127.0.0.1) and svcproxy as a subprocess through the real kubernetes_asyncio client.
After the initial (empty) sync, N Services are created at once, then one 10-endpoint
EndpointSlice for each; each phase ends when svcproxy's change counters have moved by N and
nothing is pending. ClusterIPs are in 127.0.0.0/8 and nothing is sent to them. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

from testbed.fakeapi.server import FakeApiServer


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kubeproxy_sync_proxy_rules_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def wait_for(port: int, counter: str, target: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = await asyncio.to_thread(metrics, port)
        except OSError:  # not serving yet
            await asyncio.sleep(0.05)
            continue
        pending = m.get(counter.replace("_total", "_pending"), 1)
        if m.get(counter, 0) >= target and pending == 0:
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{counter} did not reach {target} in {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(count: int) -> None:
    mport = free_port()
    async with FakeApiServer() as api:
        api.upsert({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "--master", api.url, "--hostname-override", "node-a",
                                  "--vip-interface", "lo", "--healthz-bind-address", "127.0.0.1:0",
                                  "--metrics-bind-address", f"127.0.0.1:{mport}",
                                  "--nodeport-addresses", "127.0.0.1/32", "--log-level", "warning"])
        try:
            await wait_for(mport, "kubeproxy_sync_proxy_rules_service_changes_total", 0, 30)
            base = await asyncio.to_thread(metrics, mport)
            results = []
            for kind, counter in (("Service", "service"), ("EndpointSlice", "endpoint")):
                name = f"kubeproxy_sync_proxy_rules_{counter}_changes_total"
                start = time.monotonic()
                for i in range(count):
                    api.upsert(service(i) if kind == "Service" else endpoint_slice(i))
                    if i % 500 == 499:
                        await asyncio.sleep(0)  # let the server stream what is queued
                done = await wait_for(mport, name, base.get(name, 0) + count, 120)
                results.append((kind, count, done - start))
            for kind, n, secs in results:
                print(f"{kind}: {n} events in {secs:.2f} s = {n / secs:,.0f} events/s")
        finally:
            proxy.terminate()
            proxy.wait(10)


def service(i: int) -> dict[str, object]:
    ip = f"127.40.{i // 250}.{i % 250 + 1}"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": "bench"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(i: int) -> dict[str, object]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"s{i}-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"127.41.{i % 250}.{j + 1}"], "conditions": {"ready": True}}
                          for j in range(10)]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__)
    p.add_argument("--count", type=int, default=5000)
    asyncio.run(run(p.parse_args().count))


if __name__ == "__main__":
    main()
