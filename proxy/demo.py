"""``svcproxy demo``: svcproxy on the embedded default, on loopback, without root.

Starts three small HTTP backends (127.0.0.11-13), writes a NodePort Service (clusterIP
127.0.0.10) and its EndpointSlice to a temporary directory, runs svcproxy on them, shows requests
going round-robin through the clusterIP and the nodePort, then keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop
import yaml

from proxy import app
from proxy.cli import setup_logging
from proxy.settings import Settings

BACKEND_PORT = 8080


def manifests(cluster_ip: str, port: int, node_port: int, backends: Sequence[str]) -> list[dict[str, Any]]:
    service: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "type": "NodePort", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": BACKEND_PORT,
                       "nodePort": node_port}],
        },
    }
    endpoint_slice: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "demo-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "demo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": BACKEND_PORT}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "demo-node"}
                      for ip in backends],
    }
    return [service, endpoint_slice]


async def fetch(host: str, port: int) -> str:
    """One HTTP GET on a new connection; the response body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return data.partition(b"\r\n\r\n")[2].decode().strip()


async def run(args: argparse.Namespace) -> int:
    backends = [f"127.0.0.{11 + i}" for i in range(args.backends)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo_backend",
         *(f"backend-{i + 1}={ip}:{BACKEND_PORT}" for i, ip in enumerate(backends))],
        stdout=subprocess.PIPE, text=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="svcproxy-demo-") as tmp:
        proxy = None
        try:
            assert proc.stdout is not None
            if (await loop.run_in_executor(None, proc.stdout.readline)).strip() != "ready":
                print("demo backends failed to start", file=sys.stderr)
                return 1
            path = Path(tmp, "demo.yaml")
            path.write_text(yaml.safe_dump_all(manifests(args.cluster_ip, args.port, args.node_port, backends)))
            proxy = app.App(Settings(
                manifests=Path(tmp), hostname_override="demo-node", nodeport_addresses=("127.0.0.1/32",),
                healthz_bind_address=args.healthz_bind_address, metrics_bind_address=args.metrics_bind_address,
                vip_interface="lo", drain_timeout=2.0,
            ).validate())
            await proxy.start()
            await asyncio.wait_for(proxy.synced.wait(), 10)
            print(f"svcproxy is serving Service default/demo from {path}\n")
            for label, host, port in (("clusterIP", args.cluster_ip, args.port),
                                      ("nodePort ", "127.0.0.1", args.node_port)):
                for i in range(args.requests):
                    print(f"  {label} {host}:{port}  request {i + 1}: {await fetch(host, port)}")
            print(f"\n  clusterIP:nodePort {args.cluster_ip}:{args.node_port}: ", end="")
            try:
                await fetch(args.cluster_ip, args.node_port)
                print("answered (unexpected)")
            except OSError:
                print("refused, as in kube-proxy")
            assert proxy.healthz_address is not None
            h_host, h_port = proxy.healthz_address
            print(
                "\nTry it yourself while this runs:\n"
                f"  curl http://{args.cluster_ip}:{args.port}/\n"
                f"  curl http://127.0.0.1:{args.node_port}/\n"
                f"  wrk -t1 -c50 -d10s http://{args.cluster_ip}:{args.port}/\n"
                f"  curl http://{h_host}:{h_port}/healthz\n"
                + (f"  curl http://{proxy.metrics_address[0]}:{proxy.metrics_address[1]}/metrics\n"
                   if proxy.metrics_address else "")
                + f"  edit {path} and watch svcproxy reload it\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
            waiter = loop.create_task(proxy.wait())
            stopper = loop.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()
            print("\nstopping", flush=True)
            return 0
        finally:
            if proxy is not None:
                await proxy.stop()
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            proc.kill()


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="svcproxy demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--cluster-ip", default="127.0.0.10")
    p.add_argument("--port", type=int, default=8080, help="service port (default 8080: no root needed)")
    p.add_argument("--node-port", type=int, default=30080)
    p.add_argument("--backends", type=int, default=3, choices=range(1, 10))
    p.add_argument("--requests", type=int, default=6, help="requests shown per frontend")
    p.add_argument("--healthz-bind-address", default="127.0.0.1:10256")
    p.add_argument("--metrics-bind-address", default="127.0.0.1:10249")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging(args.verbosity, None)
    return uvloop.run(run(args))
