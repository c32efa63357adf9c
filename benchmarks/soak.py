"""Soak: a Service whose endpoints never stop changing, under load, with every response checked.

    python -m benchmarks.soak                    # 10 minutes, API source (fake API server)
    python -m benchmarks.soak --duration 60      # a minute
    python -m benchmarks.soak --source manifests # endpoints rewritten in a manifest file instead

Runs as root. The process you start creates a network namespace with only ``lo`` and re-runs
this module inside it; the namespace and everything in it is deleted at the end. Inside:

* six backends ("pods") on 127.0.50.1-6:8080 answer each request with their address;
* svcproxy (a subprocess) serves the Service 127.0.60.1:80 from the fake API server (real
  list/watch protocol, real kubernetes_asyncio client) or from a manifest file;
* a driver republishes the Service's endpoints every 100 ms (a random non-empty subset of the live
  backends), stops and restarts backends (a stopped backend refuses new connections, as a pod
  whose process exited, and stays published until the next rewrite), and with the API source drops
  every watch every 5 s and forces a 410 (compaction, then a dropped watch: a relist) every 20 s;
* clients send requests over new connections, without pause, and check every answer.

Each published set keeps one member up for 5 s, so whichever recent set svcproxy holds, at least
one of its ready endpoints is up at every moment: every request must succeed. The report
gives requests, failures by kind, and svcproxy's RSS and open descriptors over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from testbed.fakeapi.server import FakeApiServer

from . import cp_net, netns

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
BACKENDS = [f"127.0.50.{i}" for i in range(1, 7)]
BACKEND_PORT = 8080
VIP, VIP_PORT = "127.0.60.1", 80
METRICS_PORT = 10249
NAMESPACE = "soak"
HOLD = 5.0
"""Seconds a backend chosen as the live member of a published set is kept up (> a relist)."""


# ---------------------------------------------------------------- backends


class Backend:
    """One pod: answers ``hello from IP`` to each request on a new connection."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.server: asyncio.AbstractServer | None = None
        self.body = f"HTTP/1.0 200 OK\r\nContent-Length: {11 + len(ip)}\r\n\r\nhello from {ip}".encode()

    @property
    def up(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        body = self.body

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def data_received(self, data: bytes) -> None:
                if data.endswith(b"\r\n\r\n") and not self.transport.is_closing():
                    self.transport.write(body)
                    self.transport.close()

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(Answer, self.ip, BACKEND_PORT, reuse_address=True, backlog=1024)

    async def stop(self) -> None:
        """Stop: new connects are refused at once, requests in flight still get their answer.

        Closing a listener resets the connections in its accept queue, which no proxy can hide
        (the handshake is done, the request may be sent), and at thousands of connections a
        second the queue is never empty. So, as a process that exits between two requests: an
        nftables rule first refuses new connections to this backend (a reset, as a closed port),
        the queue drains, then the listener closes.
        """
        if self.server is None:
            return
        await nft("add", "element", "inet", "soak", "stopped", f"{{ {self.ip} }}")
        await asyncio.sleep(0.05)
        self.server.close()
        self.server = None

    async def restart(self) -> None:
        await self.start()
        await nft("delete", "element", "inet", "soak", "stopped", f"{{ {self.ip} }}")


async def nft(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("nft", *args, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"nft {' '.join(args)}: {err.decode().strip()}")


NFT_TABLE = f"""
table inet soak {{
    set stopped {{ type ipv4_addr; }}
    chain input {{
        type filter hook input priority 0;
        ip daddr @stopped tcp dport {BACKEND_PORT} tcp flags & (syn | ack) == syn reject with tcp reset
    }}
}}
"""


# ---------------------------------------------------------------- objects


def service_object() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                     "ports": [{"name": "http", "port": VIP_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT}]}}


def slice_object(ips: list[str], generation: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": "web"},
                         "annotations": {"soak/generation": str(generation)}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips]}


# ---------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.backends = {ip: Backend(ip) for ip in BACKENDS}
        self.published: list[str] = []
        self.requests = 0
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []
        self.answers: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.api: FakeApiServer | None = None
        self.generation = 0
        self.hold: dict[str, float] = {}
        self.anchor = BACKENDS[0]
        self.stops: list[float] = []
        """When backends were stopped (seconds into the run), to set beside the failures."""
        """Backend -> until when it must stay up (it is the live member of a recent endpoint set)."""
        self.stop = asyncio.Event()

    # publishing

    def publish(self, ips: list[str]) -> None:
        self.generation += 1
        self.published = sorted(ips)
        obj = slice_object(self.published, self.generation)
        if self.api is not None:
            self.api.upsert(obj)
        else:
            path = self.workdir / "manifests" / "web.yaml"
            tmp = path.with_name(".web.tmp")
            tmp.write_text(yaml.safe_dump_all([service_object(), obj]))
            tmp.replace(path)
        self.events["endpoint rewrites"] += 1

    async def driver(self) -> None:
        """Every 100 ms: new endpoints; now and then a backend stops or starts; API faults."""
        tick = 0
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
            tick += 1
            now = time.monotonic()
            up = [ip for ip, b in self.backends.items() if b.up]
            # Republish a random non-empty subset of the live backends, as the EndpointSlice
            # controller would (a stopped pod is not ready); it replaces the previous rewrite.
            chosen = self.rng.sample(up, self.rng.randint(1, len(up)))
            # Every set includes the current anchor, which stays up for HOLD seconds after it was
            # last published: whatever set svcproxy holds (it may lag behind by a dropped watch or
            # a relist), a ready endpoint of it is up. That is the soak's condition; every other
            # backend may die at any moment. The anchor moves every 10 s, so all of them churn.
            if tick % 100 == 1 or not self.backends[self.anchor].up:
                self.anchor = self.rng.choice(up)
            if self.anchor not in chosen:
                chosen.append(self.anchor)
            self.hold[self.anchor] = now + HOLD
            self.publish(chosen)
            # Stop a backend, often a published one: it stays published (dead) until the next
            # rewrite, the window in which kube-proxy's kernel modes send connections to a dead pod.
            if self.rng.random() < 0.3:
                victim = self.rng.choice(self.published)
                if self.hold.get(victim, 0.0) < now and self.backends[victim].up:
                    await self.backends[victim].stop()
                    self.events["backends stopped"] += 1
                    self.stops.append(round(now - self.t0, 3))
            for b in self.backends.values():
                if not b.up and self.rng.random() < 0.2:
                    await b.restart()
                    self.events["backends started"] += 1
            if self.api is not None:
                if tick % 200 == 0:  # every 20 s: history compacted, watches cut -> 410 -> relist
                    self.api.compact()
                    self.api.drop_watches()
                    self.events["forced 410s"] += 1
                elif tick % 50 == 0:  # every 5 s: watches cut -> resume from the resourceVersion
                    self.api.drop_watches()
                    self.events["watches dropped"] += 1

    async def client(self, index: int) -> None:
        # Source addresses rotate over 127.0.70.0/24 and the pace is steady: at thousands of
        # connections a second, one address would reuse its ports while their last use is still
        # in TIME_WAIT on the proxy's side, and the failures would be the kernel's, not the proxy's.
        gap = self.args.clients / self.args.rate
        next_at = time.monotonic()
        n = index
        while not self.stop.is_set():
            next_at += gap
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self.requests += 1
            n += self.args.clients
            kind = await self.one_request(f"127.0.70.{n % 250 + 1}")
            if kind.startswith("ok "):
                self.answers[kind[3:]] += 1
            else:
                self.failures[kind.split(":")[0]] += 1
                if len(self.examples) < 20:
                    t = time.monotonic() - self.t0
                    last = max((s for s in self.stops if s <= t), default=None)
                    since = f" ({(t - last) * 1000:.0f} ms after a backend stopped)" if last is not None else ""
                    self.examples.append(f"{t:.3f}s {kind}{since} [{dt.datetime.now().strftime('%H:%M:%S,%f')[:-3]}]")

    async def one_request(self, source: str = "127.0.0.1") -> str:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(VIP, VIP_PORT, local_addr=(source, 0)), 5)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "connect timeout"
        except OSError as e:
            return f"connect error: {e}"
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
        except RuntimeError:  # uvloop: the proxy closed the connection before the request went out
            return "closed before the request"
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "response timeout"
        except OSError as e:
            return f"error: {e}"
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200") or not body.startswith(b"hello from 127.0.50."):
            return "empty answer" if not data else f"wrong answer: {data[:60]!r}"
        return "ok " + body.decode().split()[-1]

    async def sampler(self, pid: int) -> None:
        while not self.stop.is_set():
            self.samples.append({"t": round(time.monotonic() - self.t0, 1),
                                 "rss_kib": cp_net.status_kib(pid, "VmRSS"), "fds": cp_net.fd_count(pid),
                                 "requests": self.requests, "failures": sum(self.failures.values())})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.sample_every)

    async def run(self) -> dict[str, Any]:
        table = self.workdir / "soak.nft"
        table.write_text(NFT_TABLE)
        await nft("-f", str(table))
        for b in self.backends.values():
            await b.start()
        source: list[str]
        if self.args.source == "api":
            self.api = FakeApiServer()
            await self.api.start()
            self.api.upsert(service_object())
            source = ["--master", self.api.url]
        else:
            (self.workdir / "manifests").mkdir()
            source = ["--manifests", str(self.workdir / "manifests")]
        self.publish(list(BACKENDS))
        log = open(self.workdir / "svcproxy.log", "wb")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen([sys.executable, "-m", "proxy", *source, "--hostname-override", "node-a",
                                 "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
                                 "--healthz-bind-address", "127.0.0.1:10256", "--nodeport-addresses", "127.0.0.1/32",
                                 "--vip-interface", "lo", *(["-v", "4"] if os.environ.get("SOAK_KEEP") else [])],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            for _ in range(200):  # up to 20 s to serve the first request
                if (await self.one_request()).startswith("ok "):
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"svcproxy never served the Service; see {self.workdir}/svcproxy.log")
            self.t0 = time.monotonic()
            tasks = [asyncio.create_task(self.driver()), asyncio.create_task(self.sampler(proc.pid)),
                     *(asyncio.create_task(self.client(i)) for i in range(self.args.clients))]
            await asyncio.sleep(self.args.duration)
            self.stop.set()
            await asyncio.gather(*tasks)
            if proc.poll() is not None:
                raise RuntimeError(f"svcproxy exited ({proc.returncode}) during the soak")
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
            if self.api is not None:
                await self.api.stop()
            for b in self.backends.values():
                if b.server is not None:
                    b.server.close()
            await nft("delete", "table", "inet", "soak")
        return {"duration_s": self.args.duration, "source": self.args.source, "clients": self.args.clients,
                "rate": self.args.rate,
                "requests": self.requests, "failures": dict(self.failures), "examples": self.examples,
                "answers": dict(sorted(self.answers.items())), "events": dict(self.events),
                "samples": self.samples}


# ---------------------------------------------------------------- report


def markdown(raw: dict[str, Any], meta: dict[str, str]) -> str:
    s = raw["samples"]
    failed = sum(raw["failures"].values())
    rss = [x["rss_kib"] for x in s if x["rss_kib"]]
    fds = [x["fds"] for x in s if x["fds"] is not None]
    half = len(s) // 2
    late_rss = [x["rss_kib"] for x in s[half:] if x["rss_kib"]]
    late_fds = [x["fds"] for x in s[half:] if x["fds"] is not None]
    verdict = "met" if failed == 0 else "missed"
    lines = [
        f"# Soak, {meta['date']}", "",
        f"Command: `{meta['command']}` (as root). svcproxy {meta['svcproxy']}; "
        f"{meta.get('nproc', '?')} cores.", "",
        f"{raw['duration_s']:.0f} s, source `{raw['source']}`, {raw['clients']} clients sending requests "
        f"over new connections at {raw['rate']:.0f} per second in all; endpoints rewritten every 100 ms; "
        "backends stopped and started at random (a stopped one refuses connects while it may still be "
        "published; one member of each published set is kept up for 5 s); with the API source, every watch "
        "dropped every 5 s and a 410 forced every 20 s. At least one published endpoint was up at every moment.",
        "", "| measure | value | target |", "|---|--:|---|",
        f"| requests | {raw['requests']:,} ({raw['requests'] / raw['duration_s']:.0f}/s) | |",
        f"| failed | {failed} | 0 ({verdict}) |",
        f"| RSS first / second half max / overall max (MiB) | {rss[0] / 1024:.1f} / "
        f"{max(late_rss) / 1024:.1f} / {max(rss) / 1024:.1f} | flat |" if rss and late_rss else "| RSS | n/a | |",
        f"| open fds first / second half max / overall max | {fds[0]} / {max(late_fds)} / {max(fds)} | flat |"
        if fds and late_fds else "| fds | n/a | |",
        "", "Events: " + ", ".join(f"{k} {v:,}" for k, v in raw["events"].items()) + ".",
        "", "Answers per backend: " + ", ".join(f"{k} {v:,}" for k, v in raw["answers"].items()) + ".", ""]
    if failed:
        lines += ["Failures by kind: " + ", ".join(f"{k} {v}" for k, v in raw["failures"].items()) + ".", "",
                  "First failures:", "", *(f"- {e}" for e in raw["examples"]), ""]
    every = s[1]["t"] - s[0]["t"] if len(s) > 1 else 0
    lines += [f"Samples (every {every:.0f} s):", "", "| t (s) | RSS (MiB) | fds | requests | failed |",
              "|--:|--:|--:|--:|--:|"]
    for x in s:
        lines.append(f"| {x['t']:.0f} | {(x['rss_kib'] or 0) / 1024:.1f} | {x['fds']} | {x['requests']:,} | "
                     f"{x['failures']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- outer


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600, at most 3600)")
    p.add_argument("--source", choices=("api", "manifests"), default="api")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--rate", type=float, default=2000.0, help="requests per second in all (default 2000)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS/fd samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory, or a .md file path")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.duration <= 3600 or not 1 <= args.clients <= 250 or not 0 < args.rate <= 20000:
        p.error("--duration must be in (0, 3600], --clients in [1, 250], --rate in (0, 20000]")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        if not netns.inner_is_isolated(args.inner):
            return 2
        import uvloop

        netns.tune_current()
        raw = uvloop.run(Soak(args, args.inner).run())
        (args.inner / "raw.json").write_text(json.dumps(raw, indent=1))
        return 0
    if os.geteuid() != 0:
        print("run as root: the soak creates a network namespace", file=sys.stderr)
        return 2
    raw = netns.run_and_report("soak", argv, timeout=args.duration + 120, out=args.out, report=markdown)
    return 1 if raw is None or raw["failures"] else 0

if __name__ == "__main__":
    sys.exit(main())
