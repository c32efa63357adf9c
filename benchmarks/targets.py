"""What wrk is pointed at: one backend directly, or a balancer over both backends."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

from . import backends, netns
from .backends import BACKENDS
from .procs import Supervisor, tree_cpu_seconds, wait_tcp


class TargetError(RuntimeError):
    """A target could not be started or did not forward correctly."""


class Target:
    name = ""
    label = ""
    host = "127.0.0.1"
    port = 0
    # Backends a handful of fresh connections must reach (proves round robin works).
    expect_backends = frozenset(b.name for b in BACKENDS)

    def __init__(self, sup: Supervisor, workdir: Path) -> None:
        self.sup = sup
        self.workdir = workdir

    def start(self) -> None:
        """Start the proxy (if any) and wait until it accepts."""

    def stop(self) -> None:
        self.sup.stop(self.name)

    def activate(self) -> None:
        """Called right before each measurement of this target."""

    def deactivate(self) -> None:
        """Called right after each measurement of this target."""

    def cpu_seconds(self) -> float | None:
        """CPU used so far by the proxy process tree; None when there is no proxy process."""
        proc = self.sup.procs.get(self.name)
        return tree_cpu_seconds(proc.pid) if proc else None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def verify(self) -> None:
        seen = backends.probe(self.host, self.port, 4)
        if set(seen) != self.expect_backends:
            raise TargetError(
                f"{self.name}: expected backends {sorted(self.expect_backends)}, 4 connections reached {seen}"
            )

    def _start_daemon(self, argv: list[str], timeout: float = 10, env: dict[str, str] | None = None) -> None:
        self.sup.start(self.name, argv, env)
        if not wait_tcp(self.host, self.port, timeout, partial(self.sup.alive, self.name)):
            code = self.sup.procs[self.name].poll()
            why = f"exited with code {code}" if code is not None else f"did not accept within {timeout:.0f}s"
            tail = self.sup.log_tail(self.name)
            raise TargetError(f"{self.name} ({self.host}:{self.port}) {why}:\n{tail}")


class Direct(Target):
    name, label = "direct", "direct (1 backend)"
    host, port = BACKENDS[0].direct
    expect_backends = frozenset({BACKENDS[0].name})


HAPROXY_CONF = """\
global
    nbthread {threads}
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {host}:{port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""


class HAProxy(Target):
    name, label = "haproxy", "HAProxy (tcp)"
    port = 8090
    threads = 1

    def start(self) -> None:
        servers = "\n".join(f"    server {b.name} {b.direct[0]}:{b.direct[1]}" for b in BACKENDS)
        conf = self.workdir / f"{self.name}.cfg"
        conf.write_text(HAPROXY_CONF.format(host=self.host, port=self.port, servers=servers, threads=self.threads))
        # -db: stay in the foreground, one process (no master-worker) to account CPU for.
        self._start_daemon(["haproxy", "-db", "-f", str(conf)])


NGINX_STREAM_CONF = """\
load_module {module};
worker_processes 1;
daemon off;
pid {dir}/nginx-stream.pid;
error_log {dir}/nginx-stream.error.log warn;
events {{
    worker_connections 8192;
}}
stream {{
    upstream be {{
{servers}
    }}
    server {{
        listen {host}:{port} backlog=65535;
        proxy_pass be;
        proxy_connect_timeout 5s;
    }}
}}
"""


class HAProxy2(HAProxy):
    name, label = "haproxy-t2", "HAProxy (tcp, nbthread 2)"
    port = 8092
    threads = 2


class NginxStream(Target):
    name, label = "nginx", "nginx stream"
    port = 8091

    def start(self) -> None:
        servers = "\n".join(f"        server {b.direct[0]}:{b.direct[1]};" for b in BACKENDS)
        conf = self.workdir / "nginx-stream.conf"
        conf.write_text(
            NGINX_STREAM_CONF.format(
                module="/usr/lib/nginx/modules/ngx_stream_module.so",
                dir=self.workdir,
                servers=servers,
                host=self.host,
                port=self.port,
            )
        )
        self._start_daemon(
            ["nginx", "-p", str(self.workdir), "-e", str(self.workdir / "nginx-stream.error.log"), "-c", str(conf)]
        )


# The shape kube-proxy's nftables mode generates: service chain -> numgen vmap -> endpoint
# chains that DNAT. `output` hook because wrk's packets are locally generated. The endpoint
# addresses are 127.0.0.2, not the 127.0.0.1 sockets the direct runs used: rewriting onto
# 4-tuples still in TIME_WAIT from those runs gets SYNs dropped by PAWS in the
# Connection: close workload.
NFT_TABLE = "svcbench"
NFT_RULES = """\
table ip {table} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr {vip} tcp dport {port} jump svc-bench
    }}
    chain svc-bench {{
        numgen inc mod {n} vmap {{ {vmap} }}
    }}
{endpoints}
}}
"""
NFT_ENDPOINT = """\
    chain ep-{name} {{
        meta l4proto tcp dnat to {addr}:{port}
    }}"""


class Dnat(Target):
    name, label = "dnat", "nft DNAT (kernel)"
    host, port = "127.0.0.10", 80

    def start(self) -> None:
        vmap = ", ".join(f"{i} : goto ep-{b.name}" for i, b in enumerate(BACKENDS))
        endpoints = "\n".join(NFT_ENDPOINT.format(name=b.name, addr=b.dnat[0], port=b.dnat[1]) for b in BACKENDS)
        self.rules = self.workdir / "dnat.nft"
        self.rules.write_text(
            NFT_RULES.format(
                table=NFT_TABLE, vip=self.host, port=self.port, n=len(BACKENDS), vmap=vmap, endpoints=endpoints
            )
        )

    def verify(self) -> None:
        # Loopback DNAT may need route_localnet: try without it first, then once with it.
        try:
            super().verify()
        except (OSError, RuntimeError) as exc:
            print(f"[bench] dnat: {exc}; retrying with route_localnet=1", flush=True)
            netns.set_sysctl("net/ipv4/conf/all/route_localnet", "1")
            super().verify()

    def activate(self) -> None:
        subprocess.run(["nft", "-f", str(self.rules)], check=True, capture_output=True)

    def deactivate(self) -> None:
        # Deleting the only nat chain also unregisters conntrack in this namespace, so the
        # other targets do not pay for it.
        subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], check=False, capture_output=True)

    def stop(self) -> None:
        self.deactivate()

    def cpu_seconds(self) -> float | None:
        return None  # kernel softirq work, charged to nobody; see the machine CPU column


SVC_VIP, SVC_PORT = "127.0.0.20", 80
SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {vip}
  clusterIPs: [{vip}]
  ports:
  - name: http
    protocol: TCP
    port: {port}
    targetPort: {target_port}
"""
SLICE_YAML = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels:
    kubernetes.io/service-name: bench
addressType: IPv4
ports:
- name: http
  port: {target_port}
  protocol: TCP
endpoints:
{endpoints}
"""


class Svcproxy(Target):
    name, label = "svcproxy", "svcproxy"
    host, port = SVC_VIP, SVC_PORT
    extra: tuple[str, ...] = ()

    def __init__(self, sup: Supervisor, workdir: Path, command: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(sup, workdir)
        self.command = command
        self.env = env or {}

    def start(self) -> None:
        if not self.command:
            raise TargetError(f"{self.name} command not set")
        target_port = BACKENDS[0].svc[1]
        manifests = self.workdir / f"manifests-{self.name}"
        manifests.mkdir(exist_ok=True)
        (manifests / "service.yaml").write_text(
            SERVICE_YAML.format(vip=self.host, port=self.port, target_port=target_port)
        )
        endpoints = "\n".join(f"- addresses: [{b.svc[0]}]\n  conditions: {{ready: true}}" for b in BACKENDS)
        (manifests / "endpointslice.yaml").write_text(SLICE_YAML.format(target_port=target_port, endpoints=endpoints))
        argv = [
            *self.command,
            "--manifests",
            str(manifests),
            "--nodeport-addresses",
            "127.0.0.1/32",
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
            # Two svcproxy targets run side by side: neither may take the other over.
            "--handover-socket",
            "",
            *self.extra,
        ]
        self._start_daemon(argv, timeout=30, env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env))


class Svcproxy2(Svcproxy):
    """svcproxy with one helper process (``--workers 2``)."""

    name, label = "svcproxy-w2", "svcproxy (--workers 2)"
    host = "127.0.0.22"
    extra = ("--workers", "2")


class SvcproxyTransports(Svcproxy):
    """svcproxy forwarding on uvloop's transports (``--forwarding transports``, the mode before
    ``sockets`` became the default)."""

    name, label = "svcproxy-transports", "svcproxy (--forwarding transports)"
    host = "127.0.0.23"
    extra = ("--forwarding", "transports")


class SvcproxySplice(Svcproxy):
    """svcproxy splicing bulk transfers in the kernel (``--forwarding splice``)."""

    name, label = "svcproxy-splice", "svcproxy (--forwarding splice)"
    host = "127.0.0.24"
    extra = ("--forwarding", "splice")


class SvcproxyBase(Svcproxy):
    """svcproxy as of another git revision (``--svcproxy-base REV``), on its own address, measured
    beside the working tree's: a change's cost, read from one run."""

    name, label = "svcproxy-base", "svcproxy (base)"
    host = "127.0.0.21"


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (Direct, HAProxy, HAProxy2, NginxStream, Dnat, Svcproxy, Svcproxy2, SvcproxyTransports,
                        SvcproxySplice, SvcproxyBase)}
WORKING_TREE = frozenset(name for name, cls in TARGETS.items() if issubclass(cls, Svcproxy) and cls is not SvcproxyBase)
"""The targets that run this working tree's svcproxy, each with its own flags."""


def make(name: str, sup: Supervisor, workdir: Path, plan: dict[str, Any]) -> Target:
    if name in WORKING_TREE:
        cls = TARGETS[name]
        assert issubclass(cls, Svcproxy)
        return cls(sup, workdir, plan.get("svcproxy_cmd") or [])
    if name == SvcproxyBase.name:
        base = plan.get("svcproxy_base") or {}
        return SvcproxyBase(sup, workdir, base.get("cmd") or [], base.get("env"))
    return TARGETS[name](sup, workdir)


def export_revision(repo: Path, rev: str, dest: Path) -> tuple[list[str], dict[str, str], str]:
    """The tree of ``rev`` in ``dest``, and how to run its svcproxy with this Python (its
    dependencies are the working tree's): (argv, env, short commit)."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=repo, check=True, capture_output=True,
                           text=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "proxy"], cwd=repo, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return [sys.executable, "-m", "proxy"], {"PYTHONPATH": str(dest)}, short


# Tools each target needs beyond wrk + nginx (backends).
NEEDS: dict[str, list[str]] = {"haproxy": ["haproxy"], "haproxy-t2": ["haproxy"], "dnat": ["nft"]}


def find_svcproxy(repo: Path, override: str | None) -> tuple[list[str] | None, str]:
    """Locate the svcproxy command: (argv, where) or (None, why not)."""
    if override:
        return shlex.split(override), "--svcproxy-cmd"
    for script in (repo / ".venv/bin/svcproxy", Path(sys.executable).parent / "svcproxy"):
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)], str(script)
    found = shutil.which("svcproxy")
    if found:
        return [found], found
    try:
        spec = importlib.util.find_spec("proxy.__main__")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).is_relative_to(repo):
        return [sys.executable, "-m", "proxy"], f"{sys.executable} -m proxy"
    return None, (
        "no svcproxy console script (in .venv/bin, beside this python, on PATH) and no importable proxy/__main__.py"
    )


def check_svcproxy(argv: list[str], repo: Path) -> str | None:
    """Run `svcproxy --help`; return an error message if it does not work."""
    try:
        done = subprocess.run([*argv, "--help"], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(argv)} --help` failed: {exc}"
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        return f"`{shlex.join(argv)} --help` exited {done.returncode}:\n{tail}"
    return None
