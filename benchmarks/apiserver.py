"""Control-plane start-up against the real kube-apiserver, side by side with the fake one.

    python -m benchmarks.apiserver            # 10,000 Services + 10,000 EndpointSlices (10 endpoints each)
    python -m benchmarks.apiserver --smoke    # 200 of each

Runs as root and needs the built control plane (``scripts/controlplane build``). The process you
start creates a network namespace with only ``lo`` and re-runs this module inside it; the control
plane (testbed/controlplane.py: etcd, kube-apiserver, controller manager, scheduler), svcproxy and
the fake API server all run there, and the namespace is deleted at the end. Phases:

1. The objects are created through the API: Services without selectors (the API server allocates
   each clusterIP) and one EndpointSlice each, managed by this benchmark (the EndpointSlice
   controller leaves them alone), ``--concurrency`` requests at a time.
2. svcproxy starts with the admin kubeconfig: the time until every Service has its listener
   (counted in the kernel's socket table), the LIST pages it read, and its RSS.
3. The same objects, read back from the real API server, are served by the fake API server
   (tests' protocol-faithful fake, one LIST response): the same measurements, for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config

from testbed import controlplane
from testbed.fakeapi.server import FakeApiServer

from . import cp_net, cp_report, netns
from .dataplane import machine_facts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
PORT, TARGET_PORT = 80, 8080
NAMESPACES = 10
FAKE_PORT = 7443
METRICS_PORT = 10249


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.apiserver", description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=None, help="Services, one EndpointSlice each (default 10000)")
    p.add_argument("--endpoints-per-service", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=32, help="create requests in flight (default 32)")
    p.add_argument("--smoke", action="store_true", help="200 Services")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds svcproxy may take to start (default 300)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory, or a .md file path")
    p.add_argument("--no-report", action="store_true", help="print the results, write no file")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.services is None:
        args.services = 200 if args.smoke else 10_000
    if not 1 <= args.services <= 60_000 or not 1 <= args.endpoints_per_service <= 100:
        p.error("--services must be in [1, 60000], --endpoints-per-service in [1, 100]")
    return args


# ---------------------------------------------------------------- objects


def service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i:05d}", "namespace": f"ns-{i % NAMESPACES}"},
            "spec": {"type": "ClusterIP",
                     "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}]}}


def endpoint_slice(i: int, per_service: int) -> dict[str, Any]:
    # Loopback addresses are not valid endpoints for the API server; these exist nowhere, and the
    # benchmark never connects to them (it measures programming, not forwarding).
    ips = [f"10.{100 + j}.{i // 256 % 256}.{i % 256}" for j in range(per_service)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i:05d}-1", "namespace": f"ns-{i % NAMESPACES}",
                         "labels": {"kubernetes.io/service-name": f"svc-{i:05d}",
                                    "endpointslice.kubernetes.io/managed-by": "benchmark"}},
            "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips]}


async def create_all(kubeconfig: Path, services: int, per_service: int, concurrency: int) -> dict[str, Any]:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
    cfg.connection_pool_maxsize = concurrency
    async with client.ApiClient(cfg) as api:
        core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        for n in range(NAMESPACES):
            await core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{n}"}})
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            ns = f"ns-{i % NAMESPACES}"
            async with sem:
                # Raw responses: decoding each answer into a model would make this client the bottleneck.
                for resp in (await core.create_namespaced_service(ns, service(i), _preload_content=False),
                             await discovery.create_namespaced_endpoint_slice(ns, endpoint_slice(i, per_service),
                                                                              _preload_content=False)):
                    if resp.status != 201:
                        raise RuntimeError(f"create #{i}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
                    resp.release()

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(services)))
        took = time.monotonic() - started
        # Read everything back once, raw, for the fake server's run.
        svc = await core.list_service_for_all_namespaces(_preload_content=False)
        slices = await discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False)
        items = {"Service": json.loads(await svc.read())["items"],
                 "EndpointSlice": json.loads(await slices.read())["items"]}
    return {"create_s": round(took, 2), "objects_per_s": round(2 * services / took, 1), "items": items}


# ---------------------------------------------------------------- svcproxy


async def scrape() -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", METRICS_PORT)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.decode(errors="replace")


def sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


cleanup: dict[str, float] = {}
"""Seconds ``svcproxy --cleanup`` took after each run (it removes the run's VIPs)."""


async def startup(label: str, source: list[str], expected: int, workdir: Path, timeout: float) -> dict[str, Any]:
    log = open(workdir / f"svcproxy-{label}.log", "wb")  # noqa: SIM115 - the child holds it
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *source, "--hostname-override", "node-a",
                             "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
                             "--healthz-bind-address", "127.0.0.1:10256", "--nodeport-addresses", "127.0.0.1/32"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        observed = None
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"svcproxy ({label}) exited: see {workdir}/svcproxy-{label}.log")
            if cp_net.listening(PORT) >= expected:
                observed = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # let start-up garbage go before reading memory
        metrics = await scrape()
        pages = [line for line in metrics.splitlines() if line.startswith("svcproxy_watch_list_pages_total")]
        return {"label": label, "expected_listeners": expected, "listeners": cp_net.listening(PORT),
                "start_to_all_listeners_s": round(observed, 2) if observed else None,
                "rss_mib": round((cp_net.status_kib(proc.pid, "VmRSS") or 0) / 1024, 1),
                "hwm_mib": round((cp_net.status_kib(proc.pid, "VmHWM") or 0) / 1024, 1),
                "list_pages": {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in pages},
                "first_sync_s": round(sample(metrics, "kubeproxy_sync_proxy_rules_duration_seconds_sum") or 0, 3)}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t1 = time.monotonic()
        subprocess.run([sys.executable, "-m", "proxy", "--cleanup"], cwd=REPO, capture_output=True, timeout=600)
        cleanup[label] = round(time.monotonic() - t1, 1)


async def run_inner(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    binaries = controlplane.built_binaries()
    if binaries is None:
        raise SystemExit("the control plane is not built: scripts/controlplane build")
    cp = controlplane.ControlPlane(binaries, controlplane.Options(state_dir=workdir / "cp"))
    result: dict[str, Any] = {"kubernetes": controlplane.kubernetes_version(), "etcd": controlplane.etcd_version()}
    t0 = time.monotonic()
    cp.start()
    result["controlplane_up_s"] = round(time.monotonic() - t0, 2)
    try:
        print(f"[api] control plane up in {result['controlplane_up_s']}s; creating {args.services} Services and "
              f"EndpointSlices", flush=True)
        created = await create_all(cp.admin_kubeconfig, args.services, args.endpoints_per_service, args.concurrency)
        items = created.pop("items")
        result["create"] = created
        print(f"[api] created in {created['create_s']}s; starting svcproxy on the real API server", flush=True)
        # +1: the `kubernetes` Service is on 443, not counted on port 80.
        result["real"] = await startup("real", ["--kubeconfig", str(cp.admin_kubeconfig)], args.services,
                                       workdir, args.timeout)
        print(f"[api] real: {result['real']}", flush=True)
    finally:
        cp.stop()
    async with FakeApiServer(port=FAKE_PORT) as fake:
        for kind in ("Service", "EndpointSlice"):
            api_version = "v1" if kind == "Service" else "discovery.k8s.io/v1"
            for obj in items[kind]:
                fake.upsert({**obj, "kind": kind, "apiVersion": api_version})
        result["fake"] = await startup("fake", ["--master", fake.url], args.services, workdir, args.timeout)
    print(f"[api] fake: {result['fake']}", flush=True)
    for label, seconds in cleanup.items():
        result[label]["cleanup_s"] = seconds
    return result


def markdown(raw: dict[str, Any], meta: dict[str, str]) -> str:
    real, fake = raw["real"], raw["fake"]

    def ratio(key: str) -> str:
        a, b = real.get(key), fake.get(key)
        return f"{a / b:.2f}x" if a and b else "n/a"

    rows = [("start -> every listener (s)", "start_to_all_listeners_s"), ("RSS after start-up (MiB)", "rss_mib"),
            ("peak RSS (MiB)", "hwm_mib"), ("first sync (s)", "first_sync_s")]
    lines = [f"# svcproxy start-up against the real API server ({meta['date']})", "",
             f"Command: `{meta['command']}` (as root). svcproxy {meta['svcproxy']}; Kubernetes {raw['kubernetes']} "
             f"and etcd {raw['etcd']} built from source (testbed/controlplane.py, etcd without fsync). "
             f"Machine: {meta.get('nproc', '?')} cores, {meta.get('cpu', '?')}, kernel {meta.get('kernel', '?')}.", "",
             f"{raw['services']} Services (clusterIPs allocated by the API server) and as many EndpointSlices of "
             f"{raw['endpoints_per_service']} endpoints, created through the API in {raw['create']['create_s']} s "
             f"({raw['create']['objects_per_s']} objects/s, {raw['concurrency']} requests in flight). Then svcproxy "
             "was started against the real API server, and afterwards against the fake API server serving the same "
             "objects (read back from the real one), in the same namespace, one after the other.", "",
             "| measure | real kube-apiserver | fake API server | real / fake |", "|---|--:|--:|--:|"]
    for label, key in rows:
        lines.append(f"| {label} | {real.get(key)} | {fake.get(key)} | {ratio(key)} |")
    lines += ["", f"LIST responses read (svcproxy asks for pages of 500): real {real['list_pages']}, fake "
              f"{fake['list_pages']}. The first list asks for resourceVersion 0, which kube-apiserver serves from "
              "its watch cache in one piece, ignoring the limit (client-go's informers get the same), and so does "
              "the fake. A relist after a 410 is a consistent read, which both page.",
              "", "Both runs add every clusterIP to the VIP interface (one netlink request each); `svcproxy "
              f"--cleanup` then removed them in {real.get('cleanup_s', '?')} s and {fake.get('cleanup_s', '?')} s.",
              ""]
    return "\n".join(lines) + "\n"


def outer(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a network namespace", file=sys.stderr)
        return 2
    if controlplane.built_binaries() is None:
        print("the control plane is not built: scripts/controlplane build", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix=f"{netns.PREFIX}{os.getpid()}-api-"))
    try:
        print(f"[api] workdir {workdir}", flush=True)
        rc = netns.run_inside("benchmarks.apiserver", argv, workdir, timeout=args.timeout * 2 + 900)
        raw_path = workdir / "raw.json"
        if rc or not raw_path.exists():
            print(f"[api] inner run failed ({rc})", file=sys.stderr)
            return rc or 1
        raw = json.loads(raw_path.read_text())
        facts = machine_facts()
        meta = {k: str(facts[k]) for k in ("nproc", "kernel", "cpu") if k in facts}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        meta |= {"date": dt.date.today().isoformat(), "svcproxy": head.stdout.strip() or "?",
                 "command": shlex.join(["python", "-m", "benchmarks.apiserver", *argv])}
        report = markdown(raw, meta)
        print(report)
        if not args.no_report:
            md = cp_report.save(args.out, f"{meta['date']}-apiserver{'-smoke' if args.smoke else ''}.md",
                                report, meta, raw)
            print(f"[api] wrote {md}", flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        if not netns.inner_is_isolated(args.inner):
            return 2
        raw = asyncio.run(run_inner(args, args.inner))
        raw |= {"services": args.services, "endpoints_per_service": args.endpoints_per_service,
                "concurrency": args.concurrency}
        (args.inner / "raw.json").write_text(json.dumps(raw, indent=1))
        return 0
    return outer(args, argv)


if __name__ == "__main__":
    sys.exit(main())
