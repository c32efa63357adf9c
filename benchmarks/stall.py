"""Stalls: how long control-plane work (parsing, decoding, converting, planning) holds forwarding.

    python -m benchmarks.stall                       # both sources, about a minute
    python -m benchmarks.stall --source manifests    # a 50,000-endpoint slice rewritten 3 times
    python -m benchmarks.stall --source api          # 10,000 Services relisted 3 times (410s)

Runs as root, in a network namespace with only ``lo`` that it creates and deletes. Inside, a
backend (testbed/podserver.py) serves the probe Service 127.0.60.1:80; a probe process sends one
request after another over new connections and records each one's latency, while the driver
makes svcproxy do heavy control-plane work on *other* Services:

* manifests: a file with an unrelated Service and one EndpointSlice of 50,000 endpoints (about
  4 MB of YAML) is written, then rewritten three times (one endpoint changed each time);
* api (the fake API server, real list/watch): 10,000 Services with 10 endpoints each are
  listed at start; then, three times, every EndpointSlice changes while svcproxy's watch is held
  silent, the history is compacted and the watches cut, so svcproxy relists 10,000 changed
  slices at once (100,000 endpoints converted, planned and applied).

The report gives, per phase, the probe's requests, failures, p50, p99 and worst latency, and
svcproxy's own loop watchdog: how often and how long its data loop stood still. Target (issue 9):
no stall over 50 ms as the watchdog sees it (the probe's worst request also carries the
machine's contention: two cores shared by everything here).

``STALL_PYSPY=/path/to/py-spy`` also records every thread of svcproxy (speedscope format, kept
with ``STALL_KEEP=1``), to find what held the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from testbed.fakeapi.server import FakeApiServer

from . import cp_objects, cp_report, netns

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
BACKEND, BACKEND_PORT = "127.0.50.1", 8080
VIP, VIP_PORT = "127.0.60.1", 80
TARGET_MS = 50.0
METRICS_PORT = 10249


def loop_lag() -> dict[str, float]:
    """svcproxy's own view: its data loop's lag histogram, as {upper bound: cumulative count}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "svcproxy_loop_lag_seconds":
            return {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    return {}


def lags_over(buckets: dict[str, float], limit: float) -> tuple[int, str]:
    """How many lags exceeded ``limit`` seconds, and the bucket the largest fell in."""
    total = buckets.get("+Inf", 0.0)
    below = max((v for le, v in buckets.items() if le != "+Inf" and float(le) <= limit), default=0.0)
    largest = min((float(le) for le, v in buckets.items() if v == total and le != "+Inf"), default=float("inf"))
    return int(total - below), f"<= {largest * 1000:g} ms" if largest != float("inf") else "> 5 s"


def probe_service() -> list[dict[str, Any]]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "probe", "namespace": "stall"},
           "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                    "ports": [{"name": "http", "port": VIP_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "probe-1", "namespace": "stall", "labels": {"kubernetes.io/service-name": "probe"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
           "endpoints": [{"addresses": [BACKEND], "conditions": {"ready": True}}]}
    return [svc, eps]


def big_slice(count: int, generation: int) -> list[dict[str, Any]]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "big", "namespace": "stall"},
           "spec": {"type": "ClusterIP", "clusterIP": "127.0.61.1", "clusterIPs": ["127.0.61.1"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}
    endpoints = [{"addresses": [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"], "conditions": {"ready": True},
                  "nodeName": "node-a"} for i in range(count)]
    endpoints[0]["addresses"] = [f"10.255.{generation >> 8 & 255}.{generation & 255}"]
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "big-1", "namespace": "stall", "labels": {"kubernetes.io/service-name": "big"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints}
    return [svc, eps]


# ---------------------------------------------------------------- the probe (its own process)


def probe(seconds: float) -> dict[str, Any]:
    """One request after another on new connections; every latency, with its start time."""
    samples: list[tuple[float, float]] = []
    failures: dict[str, int] = {}
    t0 = time.monotonic()
    while (start := time.monotonic()) - t0 < seconds:
        try:
            with socket.create_connection((VIP, VIP_PORT), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            ok = data.startswith(b"HTTP/1.1 200")
        except OSError as e:
            ok, data = False, type(e).__name__.encode()
        if ok:
            samples.append((round(start - t0, 4), time.monotonic() - start))
        else:
            kind = data[:40].decode(errors="replace") or "empty"
            failures[kind] = failures.get(kind, 0) + 1
            time.sleep(0.01)
    return {"samples": samples, "failures": failures}


# ---------------------------------------------------------------- the driver


class Stall:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.marks: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.marks.append((round(time.monotonic() - self.t0, 3), what))

    async def wait_served(self) -> None:
        for _ in range(600):
            with contextlib.suppress(OSError), socket.create_connection((VIP, VIP_PORT), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"svcproxy never served the probe Service; see {self.workdir}/svcproxy.log")

    async def phase(self, source: str) -> dict[str, Any]:
        api: FakeApiServer | None = None
        manifests = self.workdir / f"manifests-{source}"
        if source == "api":
            api = FakeApiServer()
            await api.start()
            for obj in probe_service():
                api.upsert(obj)
            for obj in cp_objects.all_objects(self.args.services, 10):
                api.upsert(obj)
            flags = ["--master", api.url]
        else:
            manifests.mkdir()
            (manifests / "probe.yaml").write_text(yaml.safe_dump_all(probe_service()))
            flags = ["--manifests", str(manifests)]
        log = open(self.workdir / f"svcproxy-{source}.log", "wb")  # noqa: SIM115 - the child holds it
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", *flags, "--hostname-override", "node-a",
                                  "--healthz-bind-address", "127.0.0.1:10256",
                                  "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
                                  "--nodeport-addresses", "127.0.0.1/32", "--vip-interface", "lo"],
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        probe_proc = spy = None
        try:
            await self.wait_served()
            await asyncio.sleep(2)  # let the start-up work settle: this measures steady state
            if os.environ.get("STALL_PYSPY"):  # a timeline of every thread, for finding a stall
                spy = subprocess.Popen([os.environ["STALL_PYSPY"], "record", "--threads", "--idle", "--rate", "500",
                                        "--format", "speedscope", "-o", str(self.workdir / f"spy-{source}.json"),
                                        "--pid", str(proxy.pid), "--duration", "30"])
            before = await asyncio.to_thread(loop_lag)
            seconds = 4 + 3 * self.args.every
            probe_proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.stall", "--probe", str(seconds), cwd=REPO,
                stdout=asyncio.subprocess.PIPE)
            self.t0 = time.monotonic()
            await asyncio.sleep(2)
            for round_ in range(3):
                if api is not None:
                    # Every slice changes while svcproxy's watch hears nothing, then the history is
                    # compacted and the watch cut: its relist brings 10,000 changed objects at once.
                    api.stall_watches()
                    generation = (round_ + 1) % len(cp_objects.ENDPOINT_BASES)
                    for i in range(self.args.services):
                        api.upsert(cp_objects.endpoint_slice(i, cp_objects.endpoints(i, 10, generation)))
                    self.mark("every slice changed, compact + cut watches (relist)")
                    api.compact()
                    api.drop_watches()
                else:
                    self.mark(f"write a {self.args.endpoints:,}-endpoint slice")
                    tmp = manifests / ".big.tmp"
                    await asyncio.to_thread(tmp.write_text, yaml.dump_all(big_slice(self.args.endpoints, round_),
                                                                          Dumper=yaml.CSafeDumper))
                    tmp.replace(manifests / "big.yaml")
                await asyncio.sleep(self.args.every)
            out, _ = await probe_proc.communicate()
            result = json.loads(out)
            after = await asyncio.to_thread(loop_lag)
            lag = {le: after[le] - before.get(le, 0.0) for le in after}
            if proxy.poll() is not None:
                raise RuntimeError(f"svcproxy exited ({proxy.returncode})")
        finally:
            if probe_proc is not None and probe_proc.returncode is None:
                probe_proc.kill()
            if spy is not None:
                spy.terminate()
                spy.wait(10)
            proxy.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proxy.wait(15)
            if proxy.poll() is None:
                proxy.kill()
            if api is not None:
                await api.stop()
        lat = [s[1] * 1000 for s in result["samples"]]
        worst = sorted(result["samples"], key=lambda s: -s[1])[:5]
        return {"source": source, "requests": len(lat) + sum(result["failures"].values()),
                "failures": result["failures"], "p50_ms": cp_report.percentile(lat, 50),
                "p99_ms": cp_report.percentile(lat, 99), "max_ms": max(lat, default=None),
                "worst": [{"at_s": t, "ms": round(v * 1000, 1)} for t, v in worst], "marks": self.marks,
                "loop_lag_buckets": lag}

    async def run(self) -> dict[str, Any]:
        backend = subprocess.Popen([sys.executable, "testbed/podserver.py", "probe", "--addr", BACKEND,
                                    "--tcp", str(BACKEND_PORT)], cwd=REPO)
        try:
            phases = []
            for source in (["manifests", "api"] if self.args.source == "both" else [self.args.source]):
                self.marks = []
                phases.append(await self.phase(source))
        finally:
            backend.terminate()
            backend.wait(10)
        return {"services": self.args.services, "endpoints": self.args.endpoints, "phases": phases}


def markdown(raw: dict[str, Any], meta: dict[str, str]) -> str:
    lines = [f"# Stalls: control-plane work vs forwarding ({meta['date']})", "",
             f"`{meta['command']}` at svcproxy {meta['svcproxy']}, {meta['nproc']} CPUs. "
             f"Target: no request held more than {TARGET_MS:.0f} ms by control-plane work.", "",
             "Worst is the probe's slowest request (the whole machine: 2 cores shared by svcproxy, the "
             "parser child, the probe, the backend and the driver); loop lags are svcproxy's own "
             "watchdog (`svcproxy_loop_lag_seconds`, sampled every 50 ms).", "",
             "| phase | work | requests | failed | p50 ms | p99 ms | worst ms | loop lags > 50 ms | largest lag "
             "| target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in raw["phases"]:
        work = (f"{raw['endpoints']:,}-endpoint slice rewritten 3x" if p["source"] == "manifests"
                else f"{raw['services']:,} changed slices relisted 3x")
        over, largest = lags_over(p["loop_lag_buckets"], TARGET_MS / 1000)
        ok = not p["failures"] and not over
        lines.append(f"| {p['source']} | {work} | {p['requests']:,} | {sum(p['failures'].values())} | "
                     f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['max_ms']:.1f} | {over} | {largest} | "
                     f"{'met' if ok else 'MISSED'} |")
    lines.append("")
    for p in raw["phases"]:
        worst = ", ".join(f"{w['ms']} ms at {w['at_s']} s" for w in p["worst"])
        marks = ", ".join(f"{what} at {t} s" for t, what in p["marks"])
        lines += [f"- {p['source']}: worst requests {worst}; driver: {marks}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("both", "manifests", "api"), default="both")
    p.add_argument("--services", type=int, default=10_000, help="Services for the api phase (default 10,000)")
    p.add_argument("--endpoints", type=int, default=50_000, help="endpoints in the manifests' big slice")
    p.add_argument("--every", type=float, default=5.0, help="seconds between rounds of work (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory, or a .md file path")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.services <= 20_000 or not 1 <= args.endpoints <= 200_000 or not 1 <= args.every <= 60:
        p.error("--services in [1, 20000], --endpoints in [1, 200000], --every in [1, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(min(args.probe, 600.0))))
        return 0
    if args.inner:
        if not netns.inner_is_isolated(args.inner):
            return 2
        raw = asyncio.run(Stall(args, args.inner).run())
        (args.inner / "raw.json").write_text(json.dumps(raw, indent=1))
        return 0
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a network namespace", file=sys.stderr)
        return 2
    raw = netns.run_and_report("stall", argv, timeout=600, out=args.out, report=markdown)
    return 0 if raw is not None else 1

if __name__ == "__main__":
    sys.exit(main())
