"""What --transparent costs on connection-per-request: wrk in a pod, through svcproxy, to nginx in
another pod, with and without transparent source addresses, side by side in one run.

``python -m benchmarks.transparent [--duration 8] [--reps 4] [--base REV] [--out FILE.md]`` (root;
nginx and wrk installed). ``--base REV`` adds a third run per repetition, ``--transparent on`` with
that git revision's proxy, to measure a change of the transparent path side by side. The network
is testbed/routednet.py's: a node namespace and two pods on routed veths, deleted afterwards.
svcproxy is started for each run with ``--transparent on`` or ``off`` (the order alternates per
repetition), the pod's wrk runs ``-H "Connection: close"`` at a clusterIP,
and the endpoint (nginx) reports what it saw: with ``on`` every request must come from the client
pod's address, with ``off`` from the node's, or the run fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import wrk as wrkmod
from benchmarks.procs import tree_cpu_seconds
from benchmarks.targets import export_revision
from testbed import routednet
from testbed.routednet import POD_A, POD_B

REPO = Path(__file__).resolve().parent.parent
VIP, PORT = "10.96.0.10", 80
NGINX = """\
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log warn;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    log_format peer '$remote_addr';
    access_log {dir}/access.log peer buffer=64k flush=1s;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    server {{
        listen {ip}:8080 backlog=4096;
        location / {{ return 200 "hello world\\n"; }}
    }}
}}
"""


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def wait_ready(ns: str, timeout: float = 20.0) -> None:
    probe = (f"import socket; s = socket.create_connection(('{VIP}', {PORT}), 1); "
             "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); assert b'200' in s.recv(100)")
    deadline = time.monotonic() + timeout
    while subprocess.run(in_ns(ns, sys.executable, "-c", probe), capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("svcproxy did not start serving")
        time.sleep(0.2)


def one_run(names: dict[str, str], workdir: Path, mode: str, duration: float, script: Path,
            env: dict[str, str] | None = None) -> tuple[float, float, set[str]]:
    """(req/s, svcproxy CPU seconds per 1000 requests, the client addresses nginx saw); ``env``
    for another revision's proxy."""
    log = workdir / "access.log"
    log.write_text("")  # nginx appends: truncating starts this run's record
    proxy = subprocess.Popen(in_ns(names["node"], sys.executable, "-m", "proxy", "--manifests", str(workdir / "m"),
                                   "--hostname-override", "node-a", "--healthz-bind-address", "127.0.0.1:0",
                                   "--metrics-bind-address", "", "--cluster-cidr", routednet.CLUSTER_CIDRS,
                                   "--transparent", mode, "--handover-socket", ""),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **env} if env else None)
    try:
        wait_ready(names["pb"])  # from the client pod, so nginx sees only the address under test
        before = tree_cpu_seconds(proxy.pid)
        w = wrkmod.WORKLOADS["close"]
        argv = in_ns(names["pb"], *wrkmod.command(f"http://{VIP}:{PORT}/", w, duration, script))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
        result = wrkmod.parse(done.stdout)
        cpu = tree_cpu_seconds(proxy.pid) - before
    finally:
        proxy.terminate()
        proxy.wait(30)
    time.sleep(1.5)  # nginx flushes its log buffer every second
    seen = set(log.read_text().split())
    return result.requests / (result.duration_us / 1e6), 1000 * cpu / max(1, result.requests), seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--base", metavar="REV", help="also run --transparent on with this git revision's proxy")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    for tool in ("nginx", "wrk", "nft", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="svcproxy-tproxy-"))
    (workdir / "m").mkdir()
    (workdir / "m" / "svc.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIP": VIP, "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
         "endpoints": [{"addresses": [POD_A.ip4], "nodeName": "node-a"}]}]))
    (workdir / "nginx.conf").write_text(NGINX.format(dir=workdir, ip=POD_A.ip4))
    script = wrkmod.write_script(workdir)
    rows: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    base_env: dict[str, str] = {}
    if args.base:
        _, base_env, short = export_revision(REPO, args.base, workdir / "base")
        base = f"on @ {short}"
        rows[base] = []
    with routednet.routed_node() as names:
        nginx = subprocess.Popen(in_ns(names["pa"], "nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf")))
        try:
            for rep in range(args.reps):
                modes = list(rows) if rep % 2 == 0 else list(reversed(rows))
                for mode in modes:
                    rate, cpu, seen = one_run(names, workdir, mode.split()[0], args.duration, script,
                                              base_env if mode != mode.split()[0] else None)
                    expected = {POD_B.ip4} if mode.startswith("on") else {POD_A.gateway4}
                    if seen != expected:
                        raise SystemExit(f"--transparent {mode}: nginx saw {sorted(seen)}, expected {sorted(expected)}")
                    rows[mode].append((rate, cpu))
                    print(f"[tproxy] rep {rep + 1} --transparent {mode:<12} {rate:9,.0f} req/s  "
                          f"{cpu:.3f} CPU-s per 1000 requests", flush=True)
        finally:
            nginx.terminate()
            nginx.wait(10)
    ratios = [on[0] / off[0] for on, off in zip(rows["on"], rows["off"], strict=True)]
    cpu_ratios = [on[1] / off[1] for on, off in zip(rows["on"], rows["off"], strict=True)]
    command = f"python -m benchmarks.transparent --duration {args.duration:g} --reps {args.reps}" + (
        f" --base {args.base}" if args.base else "")
    lines = [f"# --transparent on connection-per-request — {dt.date.today()}", "",
             f"Command: `{command}` (root). wrk `-t1 -c50 -H \"Connection: close\"` in one pod, nginx (1 worker) "
             "in another, svcproxy (sockets mode) in the node namespace between them, on routed veths "
             "(testbed/routednet.py); nginx's access log confirmed the address it saw in every run.", "",
             "| --transparent | req/s (median) | svcproxy CPU-s per 1000 requests (median) |", "|---|--:|--:|"]
    for mode in rows:
        lines.append(f"| {mode} | {statistics.median(r for r, _ in rows[mode]):,.0f} | "
                     f"{statistics.median(c for _, c in rows[mode]):.3f} |")
    lines += ["", f"on / off, per repetition: req/s {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"CPU per request {', '.join(f'{r:.2f}' for r in cpu_ratios)}. "
              f"Medians: {statistics.median(ratios):.2f}x req/s, {statistics.median(cpu_ratios):.2f}x CPU per request.",
              ""]
    if args.base:
        rates = [on[0] / b[0] for on, b in zip(rows["on"], rows[base], strict=True)]
        cpus = [on[1] / b[1] for on, b in zip(rows["on"], rows[base], strict=True)]
        lines += [f"on / {base}, per repetition: req/s {', '.join(f'{r:.2f}' for r in rates)}; "
                  f"CPU per request {', '.join(f'{r:.2f}' for r in cpus)}. "
                  f"Medians: {statistics.median(rates):.2f}x req/s, {statistics.median(cpus):.2f}x CPU per request.",
                  ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
