"""Control-plane benchmark: svcproxy at 10,000 Services, under endpoint churn, and with idle connections.

    python -m benchmarks.controlplane                 # 10k Services x 10 endpoints, 100 changes/s for 30 s
    python -m benchmarks.controlplane --smoke         # 200 Services, 5 s of changes, 500 idle connections
    python -m benchmarks.controlplane --profile       # also py-spy svcproxy during start-up and churn

Runs as root. Like the data-plane benchmark, the process you start (the "outer") creates a network
namespace with only ``lo`` and re-runs this module inside it (``--inner``); all addresses are in
127.0.0.0/8 and the outer deletes the namespace and everything in it at the end. Phases:

1. Start-up: svcproxy (a subprocess) against the fake API server (in this process, real
   list/watch wire protocol, real kubernetes_asyncio client in svcproxy), then the same objects
   from ``--manifests`` files: time until every service listener exists, RSS and open fds.
2. Churn: EndpointSlice upserts at ``--rate`` for ``--duration`` s; for each, the time until a
   connection through the service reaches the new endpoints (or is refused, for a scale to 0).
3. Idle connections: a fresh svcproxy with one Service; RSS per idle proxied connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

from testbed.fakeapi.server import FakeApiServer

from . import cp_net, cp_profile, cp_report, netns
from . import cp_objects as objs
from .dataplane import machine_facts, raise_nofile, remove_stale_workdirs
from .procs import MachineCpu, Supervisor, tcp_counters, tree_cpu_seconds
from .targets import check_svcproxy, find_svcproxy

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
FULL = {"services": 10_000, "endpoints_per_service": 10, "rate": 100.0, "duration": 30.0, "idle_conns": 10_000}
SMOKE = {"services": 200, "endpoints_per_service": 10, "rate": 100.0, "duration": 5.0, "idle_conns": 500}
API_PORT, IDLE_API_PORT = 6443, 6444
METRICS_PORT, HEALTHZ_PORT = 10249, 10256
IDLE_VIP, HOLD_IP, HOLD_PORT = "127.30.0.1", "127.31.0.1", 9000
RESERVED_PORTS = "6443-6444,8080,9000,10249-10260"
FD_RESERVE = 1000  # fds kept free in each process besides 2 per idle connection
CHANGE_TIMEOUT = 5.0  # a change not visible after this long counts as lost
PROBE_GAP = 0.001  # least time between two probes of one change: the resolution
SAMPLE = 100  # services probed end to end after programming


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.controlplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, help="Services, one EndpointSlice each (default 10000)")
    p.add_argument("--endpoints-per-service", type=int, help="endpoints per Service (default 10)")
    p.add_argument("--rate", type=float, help="EndpointSlice changes per second (default 100)")
    p.add_argument("--duration", type=float, help="seconds of changes (default 30)")
    p.add_argument("--idle-conns", type=int, help="idle connections through one Service (default 10000, "
                   "fewer if RLIMIT_NOFILE does not allow them)")
    p.add_argument("--scale-every", type=int, default=10, help="every Nth change scales a Service to 0 "
                   "endpoints or back instead of replacing its endpoints (0: never; default 10)")
    p.add_argument("--no-manifests", action="store_true", help="skip the --manifests start-up run")
    p.add_argument("--smoke", action="store_true", help="200 Services, 5 s of changes, 500 idle connections "
                   "(explicit options win)")
    p.add_argument("--profile", action="store_true", help="py-spy svcproxy during API start-up and churn "
                   "(slows it down: the numbers of a profiled run are not for the targets)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory, or a .md file path")
    p.add_argument("--svcproxy-cmd", help="command that starts svcproxy (default: look for it)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-workdir", action="store_true", help="keep manifests, logs and raw profiles")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problem = objs.check_scale(args.services, args.endpoints_per_service)
    if problem:
        p.error(problem)
    if not 0 < args.rate <= 2000 or not 0 < args.duration <= 600 or not 0 <= args.idle_conns <= 100_000:
        p.error("--rate must be in (0, 2000], --duration in (0, 600], --idle-conns in [0, 100000]")
    if args.scale_every < 0:
        p.error("--scale-every must be >= 0")
    return args


# ---------------------------------------------------------------- svcproxy processes


@dataclass
class Proxy:
    pid: int
    name: str
    wall0: float
    """time.time() just before it was started."""
    t0: float
    """time.monotonic() just before it was started."""
    metrics_port: int


def proxy_argv(cmd: list[str], source: list[str], metrics_port: int, healthz_port: int) -> list[str]:
    return [*cmd, *source, "--hostname-override", "node-a", "--vip-interface", "lo",
            "--metrics-bind-address", f"127.0.0.1:{metrics_port}",
            "--healthz-bind-address", f"127.0.0.1:{healthz_port}",
            "--nodeport-addresses", "127.0.0.1/32", "--drain-timeout", "2s"]


def start_proxy(sup: Supervisor, name: str, argv: list[str], metrics_port: int) -> Proxy:
    wall0, t0 = time.time(), time.monotonic()
    pid = sup.start(name, argv)
    return Proxy(pid, name, wall0, t0, metrics_port)


async def scrape(port: int, timeout: float = 10.0) -> dict[str, float]:
    """The unlabelled samples of svcproxy's /metrics."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics",
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    text = await resp.text()
                break
            except (aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    return {}
                await asyncio.sleep(0.1)
    samples: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line.startswith("#") or "{" in name or not value:
            continue
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def memory(pid: int) -> dict[str, Any]:
    return {"rss_kib": cp_net.status_kib(pid, "VmRSS"), "hwm_kib": cp_net.status_kib(pid, "VmHWM"),
            "fds": cp_net.fd_count(pid)}


class Profiler:
    """py-spy recordings of svcproxy when --profile is on; a no-op otherwise."""

    def __init__(self, enabled: bool, workdir: Path) -> None:
        self.pyspy = cp_profile.find_pyspy() if enabled else None
        self.enabled = enabled
        self.dir = workdir / "profiles"
        self.summaries: dict[str, str] = {}
        self._rec: tuple[str, cp_profile.Recording] | None = None

    def start(self, phase: str, pid: int) -> None:
        if not self.enabled:
            return
        if self.pyspy is None:
            self.summaries[phase] = "py-spy not found"
            return
        self.dir.mkdir(exist_ok=True)
        rec = cp_profile.attach(self.pyspy, pid, self.dir / f"{phase}.txt")
        if rec is None:
            self.summaries[phase] = "py-spy could not attach"
        else:
            self._rec = (phase, rec)

    def stop(self) -> None:
        if self._rec is None:
            return
        phase, rec = self._rec
        self._rec = None
        error = rec.stop()
        self.summaries[phase] = f"py-spy failed: {error}" if error else cp_profile.summarize(rec.out, rec.seconds)
        print(f"[cp] profile {phase}: {rec.out}", flush=True)


# ---------------------------------------------------------------- phase 1: start-up


async def measure_startup(proxy: Proxy, sup: Supervisor, expected: int, timeout: float) -> dict[str, Any]:
    """Poll the kernel's listening sockets until svcproxy has one per Service; then its own view."""
    observed = None
    while time.monotonic() - proxy.t0 < timeout:
        if not sup.alive(proxy.name):
            raise RuntimeError(f"svcproxy exited during start-up:\n{sup.log_tail(proxy.name)}")
        if cp_net.listening(objs.SERVICE_PORT) >= expected:
            observed = time.monotonic() - proxy.t0
            break
        await asyncio.sleep(0.05)
    metrics = await scrape(proxy.metrics_port)
    result: dict[str, Any] = {
        "expected_listeners": expected,
        "listeners": cp_net.listening(objs.SERVICE_PORT),
        "observed_s": observed,
        "syncs": metrics.get("kubeproxy_sync_proxy_rules_duration_seconds_count"),
    }
    last = metrics.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    result["sync_end_s"] = last - proxy.wall0 if last else None
    if result["syncs"] == 1:
        result["sync_duration_s"] = metrics.get("kubeproxy_sync_proxy_rules_duration_seconds_sum")
    await asyncio.sleep(1.0)  # let the start-up garbage go before reading memory
    result.update(memory(proxy.pid))
    return result


async def verify(services: list[int], expect: dict[int, frozenset[str] | None]) -> dict[str, int]:
    """Probe each service once: does it reach one of its own endpoints (or refuse if it has none)?"""
    sem = asyncio.Semaphore(50)
    ok = bad = 0

    async def one(i: int) -> None:
        nonlocal ok, bad
        async with sem:
            for _ in range(3):  # a dropped SYN is not a wrong answer: ask again
                res = await cp_net.probe(objs.cluster_ip(i), objs.SERVICE_PORT)
                if res != cp_net.STALLED:
                    break
        want = expect[i]
        if (want is None and res in (cp_net.REFUSED, cp_net.CUT)) or (want is not None and res in want):
            ok += 1
        else:
            bad += 1
            if bad <= 5:
                print(f"[cp] verify: service {i} answered {res!r}", flush=True)

    await asyncio.gather(*(one(i) for i in services))
    return {"probed": len(services), "ok": ok, "bad": bad}


# ---------------------------------------------------------------- phase 2: churn


@dataclass
class Change:
    svc: int
    kind: str  # rollout, scale-down, scale-up
    old: frozenset[str] | None  # endpoint addresses before; None = no endpoints (refused)
    new: frozenset[str] | None
    sent: float
    version: int
    at: float
    """Seconds since the first change was sent."""


def _matches(res: str, want: frozenset[str] | None) -> bool:
    return res in (cp_net.REFUSED, cp_net.CUT) if want is None else res in want


async def observe(ch: Change, versions: list[int]) -> dict[str, Any]:
    """Probe the service until it shows the new state. The latency is the end of the first probe
    that shows it (an upper bound); ``lower_ms`` is that probe's start."""
    ip = objs.cluster_ip(ch.svc)
    out: dict[str, Any] = {"kind": ch.kind, "status": "", "ms": None, "lower_ms": None, "probes": 0,
                           "unexpected": 0, "stalled": 0}
    while True:
        start = time.monotonic()
        res = await cp_net.probe(ip, objs.SERVICE_PORT)
        end = time.monotonic()
        out["probes"] += 1
        if versions[ch.svc] != ch.version:  # a later change to this Service was sent meanwhile
            return {**out, "status": "superseded", "last": res}
        if res == cp_net.STALLED:
            out["stalled"] += 1
        elif _matches(res, ch.new):
            return {**out, "status": "ok", "ms": round((end - ch.sent) * 1000, 3),
                    "lower_ms": round((start - ch.sent) * 1000, 3)}
        elif not _matches(res, ch.old) and res != cp_net.CUT:
            out["unexpected"] += 1
        if end - ch.sent > CHANGE_TIMEOUT:
            return {**out, "status": "timeout", "last": res}
        await asyncio.sleep(max(0.0, start + PROBE_GAP - time.monotonic()))


async def settle(ch: Change, plan: Churn) -> dict[str, Any]:
    try:
        return {"at_s": round(ch.at, 4), **await observe(ch, plan.versions)}
    finally:
        plan.pending.discard(ch.svc)


class Churn:
    """Which Service each change touches and what it does to it."""

    def __init__(self, services: int, per_service: int, scale_every: int, rng: random.Random) -> None:
        self.per = per_service
        self.scale_every = scale_every
        self.order = list(range(services))
        rng.shuffle(self.order)
        self.cursor = 0
        self.gen = [0] * services
        self.state: list[frozenset[str] | None] = [
            frozenset(objs.endpoints(i, per_service, 0)) for i in range(services)]
        self.versions = [0] * services
        self.down: list[int] = []  # scaled to 0, to be scaled back up
        self.touched: set[int] = set()
        self.pending: set[int] = set()
        """Services whose last change is still being watched for."""

    def _next_service(self) -> int:
        for _ in range(len(self.order)):
            i = self.order[self.cursor % len(self.order)]
            self.cursor += 1
            if self.state[i] is not None and i not in self.pending:
                return i
        raise RuntimeError("no service is free for a change (all scaled down or changing)")

    def next(self, k: int) -> tuple[int, str, list[str]]:
        """The k-th change: (service, kind, new endpoint addresses). A Service whose last change
        has not been seen yet is left alone, so no change is overtaken by the next one."""
        toggle = self.scale_every and k % self.scale_every == self.scale_every - 1
        back = next((i for i in self.down if i not in self.pending), None) if toggle else None
        if back is not None:
            self.down.remove(back)
            i, kind = back, "scale-up"
        elif toggle and len(self.order) > 1:
            i = self._next_service()
            self.down.append(i)
            kind = "scale-down"
        else:
            i, kind = self._next_service(), "rollout"
        self.pending.add(i)
        self.touched.add(i)
        if kind == "scale-down":
            return i, kind, []
        self.gen[i] = 1 - self.gen[i]
        return i, kind, objs.endpoints(i, self.per, self.gen[i])


async def churn(api: FakeApiServer, proxy: Proxy, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    plan = Churn(args.services, args.endpoints_per_service, args.scale_every, rng)
    total = max(1, round(args.rate * args.duration))
    before = await scrape(proxy.metrics_port)
    cpu0, machine0, tcp0 = tree_cpu_seconds(proxy.pid), MachineCpu.read(), tcp_counters()
    tasks: list[asyncio.Task[dict[str, Any]]] = []
    late = 0.0
    start = time.monotonic() + 0.1
    for k in range(total):
        due = start + k / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        i, kind, ips = plan.next(k)
        plan.versions[i] += 1
        old, new = plan.state[i], frozenset(ips) or None
        plan.state[i] = new
        slice_obj = objs.endpoint_slice(i, ips)
        sent = time.monotonic()
        api.upsert(slice_obj)
        change = Change(i, kind, old, new, sent, plan.versions[i], sent - start)
        tasks.append(asyncio.create_task(settle(change, plan)))
    sending = time.monotonic() - start
    changes = await asyncio.gather(*tasks)
    cpu1, machine = tree_cpu_seconds(proxy.pid), MachineCpu.read().since(machine0)
    wall = time.monotonic() - start
    tcp = {k: v - tcp0[k] for k, v in tcp_counters().items()}
    after = await scrape(proxy.metrics_port)
    sync_key = "kubeproxy_sync_proxy_rules_duration_seconds"
    syncs = after.get(f"{sync_key}_count", 0) - before.get(f"{sync_key}_count", 0)
    sync_s = after.get(f"{sync_key}_sum", 0) - before.get(f"{sync_key}_sum", 0)
    final = await verify(sorted(plan.touched), dict(enumerate(plan.state)))
    return {
        "sent": total, "send_seconds": sending, "rate_achieved": total / sending if sending else None,
        "worst_send_lateness_ms": late * 1000, "changes": changes,
        "proxy_cpu_s": cpu1 - cpu0, "syncs": syncs, "sync_mean_ms": sync_s / syncs * 1000 if syncs else None,
        "final_check": final, **memory(proxy.pid), **machine, "wall_s": wall,
        "tcp": tcp,
    }


# ---------------------------------------------------------------- phase 3: idle connections


def idle_capacity(wanted: int) -> tuple[int, str]:
    """How many idle connections fit: svcproxy needs 2 fds per connection, and so does this process
    (client + backend side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = max(0, (soft - FD_RESERVE) // 2)
    if wanted <= fit:
        return wanted, ""
    limit = f"RLIMIT_NOFILE is {soft}" + (" (the hard limit: it cannot be raised here)" if soft == hard else "")
    return fit, (f"{limit}; svcproxy needs 2 fds per connection and so does the benchmark (client and "
                 f"backend side), with {FD_RESERVE} kept free: {fit:,} connections instead of {wanted:,}")


async def idle_phase(sup: Supervisor, cmd: list[str], args: argparse.Namespace) -> dict[str, Any]:
    count, why = idle_capacity(args.idle_conns)
    hold = cp_net.HoldServer()
    await hold.start(HOLD_IP, HOLD_PORT)
    api = FakeApiServer(port=IDLE_API_PORT)
    api.upsert(objs.service(0, ip=IDLE_VIP, svc_name="idle", ns="default"))
    api.upsert(objs.endpoint_slice(0, [HOLD_IP], port=HOLD_PORT, svc_name="idle", ns="default"))
    await api.start()
    socks: list[socket.socket] = []
    proxy = start_proxy(sup, "svcproxy-idle", proxy_argv(cmd, ["--master", api.url], METRICS_PORT + 2,
                                                         HEALTHZ_PORT + 2), METRICS_PORT + 2)
    try:
        if not await cp_net.wait_until(lambda: cp_net.listening(objs.SERVICE_PORT) >= 1, 60):
            raise RuntimeError(f"idle service never got a listener:\n{sup.log_tail(proxy.name)}")
        # Warm up: the first connections load code and grow pools that later ones reuse.
        warm = [await cp_net.connect(IDLE_VIP, objs.SERVICE_PORT) for _ in range(100)]
        await cp_net.wait_until(lambda: hold.live >= 100, 10)
        for s in warm:
            s.close()
        await cp_net.wait_until(lambda: hold.live == 0, 10)
        await asyncio.sleep(1.0)
        before = memory(proxy.pid)
        sem, errors = asyncio.Semaphore(200), 0

        async def one() -> None:
            nonlocal errors
            async with sem:
                try:
                    socks.append(await cp_net.connect(IDLE_VIP, objs.SERVICE_PORT))
                except OSError:
                    errors += 1

        t = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        all_up = await cp_net.wait_until(lambda: hold.live >= len(socks), 60)
        opened = time.monotonic() - t
        await asyncio.sleep(2.0)
        after = memory(proxy.pid)
        result = {
            "wanted": args.idle_conns, "connections": len(socks), "capped_reason": why, "connect_errors": errors,
            "backend_live": hold.live, "all_reached_backend": all_up, "open_seconds": opened,
            "before": before, "after": after, "kernel_tcp": cp_net.sockstat_tcp(),
        }
        if socks and before["rss_kib"] and after["rss_kib"]:
            result["bytes_per_conn"] = (after["rss_kib"] - before["rss_kib"]) * 1024 / len(socks)
            result["fds_per_conn"] = (after["fds"] - before["fds"]) / len(socks)
        return result
    finally:
        for s in socks:
            s.close()
        await cp_net.wait_until(lambda: hold.live == 0, 10)
        sup.stop(proxy.name)
        hold.close()
        await api.stop()


# ---------------------------------------------------------------- inner (in the namespace)


def write_manifests(directory: Path, objects: list[dict[str, Any]], files: int = 4) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    services = [o for o in objects if o["kind"] == "Service"]
    slices = [o for o in objects if o["kind"] == "EndpointSlice"]
    for f in range(files):
        docs = services[f::files] + slices[f::files]
        (directory / f"services-{f}.yaml").write_text(yaml.dump_all(docs, Dumper=dumper, sort_keys=False))


async def startup_run(label: str, source: list[str], sup: Supervisor, cmd: list[str], expected: int,
                      args: argparse.Namespace, profiler: Profiler, port_offset: int) -> tuple[Proxy, dict[str, Any]]:
    argv = proxy_argv(cmd, source, METRICS_PORT + port_offset, HEALTHZ_PORT + port_offset)
    machine0 = MachineCpu.read()
    proxy = start_proxy(sup, f"svcproxy-{label}", argv, METRICS_PORT + port_offset)
    profiler.start(f"startup-{label}", proxy.pid)
    try:
        result = await measure_startup(proxy, sup, expected, timeout=max(60.0, args.services / 100))
    finally:
        profiler.stop()
    result.update(MachineCpu.read().since(machine0), wall_s=time.monotonic() - proxy.t0)
    result.update(log_times(sup.logdir / f"{proxy.name}.log", proxy.wall0))
    rng = random.Random(args.seed)
    sample = sorted({*rng.sample(range(args.services), min(SAMPLE, args.services)), args.services - 1})
    expect = {i: frozenset(objs.endpoints(i, args.endpoints_per_service, 0)) for i in sample}
    result["verify"] = await verify(sample, dict(expect))
    print(f"[cp] start-up {label}: {_brief(result)}", flush=True)
    return proxy, result


def log_times(log: Path, wall0: float) -> dict[str, float]:
    """When svcproxy's source started (its first log line about it), in seconds since its start."""
    marks = {"source_started_s": ("watching the Kubernetes API", "reading Services and EndpointSlices")}
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        for key, needles in marks.items():
            if key not in out and any(n in line for n in needles):
                with contextlib.suppress(ValueError):
                    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    out[key] = stamp - wall0
    return out


async def time_lists(url: str) -> dict[str, float]:
    """How long the fake API server alone takes to answer the two LISTs svcproxy makes (read, not decoded)."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for kind, path in (("Service", "/api/v1/services"),
                           ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices")):
            t = time.monotonic()
            async with http.get(url + path, params={"resourceVersion": "0"}) as resp:
                body = await resp.read()
            out[f"{kind}_s"] = time.monotonic() - t
            out[f"{kind}_mib"] = len(body) / 2**20
    return out


def _brief(r: dict[str, Any]) -> str:
    t = r["observed_s"]
    return (f"{r['listeners']}/{r['expected_listeners']} listeners after "
            f"{'never' if t is None else f'{t:.2f} s'}, RSS {(r['rss_kib'] or 0) / 1024:.0f} MiB, "
            f"{r['fds']} fds, verify {r['verify']['ok']}/{r['verify']['probed']}")


async def run_inner(plan: dict[str, Any]) -> int:
    args = argparse.Namespace(**plan["args"])
    workdir = Path(plan["workdir"])
    raw_path = workdir / "raw.json"
    raw: dict[str, Any] = {"args": plan["args"], "startup": {}, "errors": []}
    cmd: list[str] = plan["svcproxy_cmd"]
    sup = Supervisor(workdir)
    profiler = Profiler(args.profile, workdir)
    ident = cp_net.IdentServer()
    rng = random.Random(args.seed)
    objects = objs.all_objects(args.services, args.endpoints_per_service)
    try:
        await ident.start(objs.TARGET_PORT)
        # 1. API source, then 2. churn on the same svcproxy.
        api = FakeApiServer(port=API_PORT)
        for obj in objects:
            api.upsert(obj)
        await api.start()
        try:
            raw["api_lists"] = await time_lists(api.url)
            proxy, raw["startup"]["api"] = await startup_run("api", ["--master", api.url], sup, cmd,
                                                             args.services, args, profiler, 0)
            raw_path.write_text(json.dumps(raw, indent=1))
            print(f"[cp] churn: {args.rate:g} changes/s for {args.duration:g} s", flush=True)
            profiler.start("churn", proxy.pid)
            try:
                raw["churn"] = await churn(api, proxy, args, rng)
            finally:
                profiler.stop()
            raw_path.write_text(json.dumps(raw, indent=1))
            print(f"[cp] churn: {cp_report.churn_brief(raw['churn'])}", flush=True)
            sup.stop(proxy.name)
        finally:
            await api.stop()
        # 1b. The same objects from manifest files.
        if not args.no_manifests:
            mdir = workdir / "manifests"
            write_manifests(mdir, objects)
            proxy, raw["startup"]["manifests"] = await startup_run("manifests", ["--manifests", str(mdir)], sup,
                                                                   cmd, args.services, args, profiler, 1)
            sup.stop(proxy.name)
            raw_path.write_text(json.dumps(raw, indent=1))
        del objects
        # 3. Idle connections.
        if args.idle_conns:
            raw["idle"] = await idle_phase(sup, cmd, args)
            print(f"[cp] idle: {cp_report.idle_brief(raw['idle'])}", flush=True)
        raw["profiles"] = profiler.summaries
        raw_path.write_text(json.dumps(raw, indent=1))
        return 0
    except (RuntimeError, OSError, TimeoutError) as exc:
        raw["errors"].append(str(exc))
        raw["profiles"] = profiler.summaries
        raw_path.write_text(json.dumps(raw, indent=1))
        print(f"[cp] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ident.close()
        sup.close()


def inner(plan_path: Path) -> int:
    import uvloop

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    plan = json.loads(plan_path.read_text())
    if not netns.is_isolated(plan["host_netns"]):
        print("refusing to run: not in a private network namespace with only lo", file=sys.stderr)
        return 2
    netns.tune_current()
    # The fixed ports below must never be handed out as ephemeral ports (1024-65535 in the namespace).
    netns.set_sysctl("net/ipv4/ip_local_reserved_ports", RESERVED_PORTS)
    try:
        return uvloop.run(run_inner(plan))
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- outer (host namespace)


def output_paths(out: Path, smoke: bool) -> tuple[Path, Path]:
    if out.suffix == ".md":
        md = out
    else:
        md = out / f"{dt.date.today().isoformat()}-controlplane{'-smoke' if smoke else ''}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    return md, md.with_suffix(".json")


def outer(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a network namespace", file=sys.stderr)
        return 2
    cmd, where = find_svcproxy(REPO, args.svcproxy_cmd)
    problem = check_svcproxy(cmd, REPO) if cmd else where
    if cmd is None or problem:
        print(f"svcproxy is not usable: {problem}", file=sys.stderr)
        return 2
    version = _git_version()  # before the run: the code measured, even if the checkout changes meanwhile
    print(f"[cp] svcproxy command: {shlex.join(cmd)} (git {version})", flush=True)
    raise_nofile()
    for stale in netns.cleanup_stale():
        print(f"[cp] removed stale namespace {stale}", flush=True)
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{netns.PREFIX}{os.getpid()}-cp-"))
    plan_args = {k: v for k, v in vars(args).items() if k not in ("out", "inner")}
    plan = {"workdir": str(workdir), "args": plan_args, "svcproxy_cmd": cmd, "host_netns": netns.current_id()}
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    bound = 600 + args.duration * 2 + args.services / 20  # every phase is bounded; this bounds the whole

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        with netns.namespace() as ns:
            print(f"[cp] namespace {ns}, workdir {workdir}", flush=True)
            child = subprocess.Popen([*netns.exec_prefix(ns), sys.executable, "-m", "benchmarks.controlplane",
                                      "--inner", str(plan_path)], cwd=REPO)
            try:
                rc = child.wait(timeout=bound)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                raise KeyboardInterrupt from None
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raw_path = workdir / "raw.json"
        if not raw_path.exists():
            print(f"[cp] inner run produced no results (exit {rc})", file=sys.stderr)
            return rc or 1
        raw = json.loads(raw_path.read_text())
        meta = machine_facts()
        meta = {k: meta[k] for k in ("nproc", "kernel", "cpu", "python") if k in meta}
        meta["memory"] = _mem_total()
        meta["nofile"] = str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        meta["svcproxy"] = version
        meta["date"] = dt.date.today().isoformat()
        meta["command"] = shlex.join(["python", "-m", "benchmarks.controlplane", *argv])
        md, js = output_paths(args.out, args.smoke)
        md.write_text(cp_report.markdown(raw, meta))
        js.write_text(json.dumps({"meta": meta, **raw}, indent=1))
        print(f"[cp] wrote {md}", flush=True)
        return rc
    except KeyboardInterrupt:
        print("[cp] interrupted; namespace and processes cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep_workdir:
            (workdir / "KEEP").touch()
            print(f"[cp] kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _git_version() -> str:
    """The checkout's commit, marked dirty when proxy/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "proxy"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head or '?'}{' (proxy/ modified)' if dirty else ''}"


def _mem_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        return inner(args.inner)
    return outer(args, argv)


if __name__ == "__main__":
    sys.exit(main())
