"""A three-node cluster in network namespaces, with one svcproxy per node (needs root).

Layout (every address lives only inside the namespaces built here; the machine's own namespace
is never given an address, a route or a packet)::

    lan namespace:    bridge br0 (L2 only) joining the nodes and the outside client
    node N (1..3):    eth0 10.10.10.N/24, fd00:10::N/64 on the LAN
                      cbr0 10.244.N.1/24, fd00:244:N::1/64: the pod bridge
                      routes 10.244.M.0/24 via 10.10.10.M, fd00:244:M::/64 via fd00:10::M
                      ip_forward on; svcproxy reading the shared manifest directory, with
                      --nodeport-addresses the node's LAN addresses only (not 127.0.0.1, as
                      kube-proxy's nftables default "primary"; nothing here dials localhost)
    pods nNa, nNb:    eth0 10.244.N.10 / .11 and fd00:244:N::10 / ::11, default routes via
                      their node, so clusterIPs (on the node's lo) are reached through it;
                      testbed/podserver.py answers HTTP on 8080 and 9090 and echoes UDP on 5300
    client:           eth0 10.10.10.100/24, fd00:10::100/64; only the LAN is routed unless a
                      test adds a route (e.g. a LoadBalancer IP via node 1)

Probes run on worker threads that have entered a namespace with setns(2); the test process's
own threads never change namespace, so nothing is ever sent from the machine's namespace.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from testbed.routednet import bridge_netfilter

REPO = Path(__file__).resolve().parents[2]
PODSERVER = REPO / "testbed" / "podserver.py"
NAMESPACE = "e2e"
"""The Kubernetes namespace of every test object."""
HTTP_PORTS = (8080, 9090)
UDP_PORT = 5300
NODE_ZONES = {1: "zone-a", 2: "zone-b", 3: "zone-b"}
"""topology.kubernetes.io/zone of each node (the Node objects in nodes.yaml)."""
NODE_FORWARDING = {1: "sockets", 2: "splice", 3: "transports"}
"""Each node's svcproxy forwards TCP its own way (--forwarding), so every test covers every mode."""
NODE_TRANSPARENT = {1: "on", 2: "on", 3: "auto"}
"""--transparent per node: on where the mode supports it (transports does not, so auto turns it off)."""
CLIENT_IP = "10.10.10.100"
CLIENT_IP6 = "fd00:10::100"

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Namespaces and processes

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _enter_netns(name: str) -> None:
    """Thread initializer: move this worker thread (only) into network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Netns:
    """A network namespace, and worker threads inside it that probes run on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run ``fn(*args)`` on a thread inside this namespace. If entering it fails the pool is
        broken and this raises: the function never runs in the wrong namespace."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix=f"netns-{self.name}", initializer=_enter_netns, initargs=(self.name,))
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __str__(self) -> str:
        return self.name


def sh(*cmd: str, timeout: float = 20.0) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def ip(ns: Netns | str, *args: str) -> None:
    sh("ip", "-n", str(ns), *args)


def eventually(check: Callable[..., T], *args: Any, timeout: float = 8.0, interval: float = 0.1,
               what: str = "") -> T:
    """Poll ``check(*args)`` until it returns something truthy (bounded by ``timeout``); return
    that. AssertionErrors count as "not yet"; the last one is re-raised when time is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check(*args)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what or check}; last result {result!r}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------
# Probes: each runs on a thread inside a namespace and returns the answer or what went wrong


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _outcome(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return f"error: {e}"


def _http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, str] | str:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n".encode())
            data = b""
            for _ in range(1000):  # bounded: the answers are tiny
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            return _outcome(e)
    if not data:
        return "closed"
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


def _connect_and_wait(host: str, port: int, timeout: float) -> str:
    """Connect, send nothing, and report how the server ends it: "closed" (FIN), "reset" (RST),
    "timeout", or its first bytes; or why the connect failed."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            data = s.recv(65536)
        except OSError as e:
            return _outcome(e)
    return data.decode(errors="replace") if data else "closed"


def _udp_exchange(host: str, port: int, payload: bytes, timeout: float) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(payload)
            data, peer = s.recvfrom(65536)
        except OSError as e:
            return _outcome(e)
    if peer[0] != host or peer[1] != port:
        return f"reply from {peer[0]}:{peer[1]}"
    return data.decode()


# ----------------------------------------------------------------------------------------------
# The cluster


@dataclasses.dataclass
class Pod:
    name: str
    node: str
    ns: Netns
    ip4: str
    ip6: str

    def ip(self, family: int = 4) -> str:
        return self.ip6 if family == 6 else self.ip4


@dataclasses.dataclass
class Node:
    index: int
    name: str
    ns: Netns
    ip4: str
    ip6: str
    pods: list[Pod]
    proxy: subprocess.Popen[bytes] | None = None


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.manifests = workdir / "manifests"
        self.logs = workdir / "logs"
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.lan = Netns(f"spe2e-{tag}-lan")
        self.client = Netns(f"spe2e-{tag}-client")
        self.nodes: list[Node] = []
        for n in (1, 2, 3):
            node_ns = Netns(f"spe2e-{tag}-node{n}")
            pods = [Pod(f"n{n}{suffix}", f"node{n}", Netns(f"spe2e-{tag}-n{n}{suffix}"),
                        f"10.244.{n}.{host}", f"fd00:244:{n}::{host}") for suffix, host in (("a", 10), ("b", 11))]
            self.nodes.append(Node(n, f"node{n}", node_ns, f"10.10.10.{n}", f"fd00:10::{n}", pods))
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    # -- set-up and tear-down ----------------------------------------------------------------

    @property
    def pods(self) -> list[Pod]:
        return [p for node in self.nodes for p in node.pods]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    def namespaces(self) -> list[Netns]:
        return [self.lan, self.client, *(n.ns for n in self.nodes), *(p.ns for p in self.pods)]

    def up(self) -> None:
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._network()
        self.apply("nodes", [node_object(n.name, NODE_ZONES[n.index]) for n in self.nodes])
        for pod in self.pods:
            self.start(pod.ns, pod.name, sys.executable, str(PODSERVER), pod.name, "--addr", pod.ip4,
                       "--addr", pod.ip6, *(f"--tcp={p}" for p in HTTP_PORTS), f"--udp={UDP_PORT}")
        for node in self.nodes:
            node.proxy = self.start(
                node.ns, f"svcproxy-{node.name}", sys.executable, "-m", "proxy",
                "--manifests", str(self.manifests), "--hostname-override", node.name,
                "--healthz-bind-address", "0.0.0.0:10256", "--metrics-bind-address", "127.0.0.1:10249",
                "--nodeport-addresses", f"{node.ip4}/32,{node.ip6}/128", "--drain-timeout", "1s",
                "--cluster-cidr", "10.244.0.0/16,fd00:244::/40", "--forwarding", NODE_FORWARDING[node.index],
                "--transparent", NODE_TRANSPARENT[node.index])
        for pod in self.pods:
            eventually(lambda pod: "ready" in self.log(pod.name), pod, timeout=20, what=f"{pod.name} serving")

    def _network(self) -> None:
        for ns in self.namespaces():
            sh("ip", "netns", "add", ns.name)
            # Before any interface exists, so each one inherits these: no DAD delay on IPv6
            # addresses, no reverse-path filtering (asymmetric replies from VIPs are fine).
            sysctls = ["net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0",
                       "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.rp_filter=0"]
            if ns in [n.ns for n in self.nodes]:
                sysctls += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", *bridge_netfilter()]
            sh("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w", *sysctls)
            ip(ns, "link", "set", "lo", "up")
        ip(self.lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip(self.lan, "link", "set", "br0", "up")

        def lan_port(ns: Netns, port: str, addrs: Sequence[str]) -> None:
            ip(self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
            ip(self.lan, "link", "set", port, "master", "br0", "up")
            for addr in addrs:
                ip(ns, "addr", "add", addr, "dev", "eth0", *(["nodad"] if ":" in addr else []))
            ip(ns, "link", "set", "eth0", "up")

        lan_port(self.client, "client", [f"{CLIENT_IP}/24", f"{CLIENT_IP6}/64"])
        for node in self.nodes:
            n = node.index
            lan_port(node.ns, node.name, [f"{node.ip4}/24", f"{node.ip6}/64"])
            ip(node.ns, "link", "add", "cbr0", "type", "bridge", "mcast_snooping", "0")
            ip(node.ns, "addr", "add", f"10.244.{n}.1/24", "dev", "cbr0")
            ip(node.ns, "addr", "add", f"fd00:244:{n}::1/64", "dev", "cbr0", "nodad")
            ip(node.ns, "link", "set", "cbr0", "up")
            for pod in node.pods:
                port = f"veth-{pod.name}"
                ip(node.ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", pod.ns.name)
                ip(node.ns, "link", "set", port, "master", "cbr0", "up")
                ip(pod.ns, "addr", "add", f"{pod.ip4}/24", "dev", "eth0")
                ip(pod.ns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
                ip(pod.ns, "link", "set", "eth0", "up")
                ip(pod.ns, "route", "add", "default", "via", f"10.244.{n}.1")
                ip(pod.ns, "-6", "route", "add", "default", "via", f"fd00:244:{n}::1")
            for other in self.nodes:
                if other is not node:
                    m = other.index
                    ip(node.ns, "route", "add", f"10.244.{m}.0/24", "via", other.ip4)
                    ip(node.ns, "-6", "route", "add", f"fd00:244:{m}::/64", "via", other.ip6)

    def down(self) -> None:
        """Stop everything and delete every namespace; safe to call on a half-built cluster."""
        for _, proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for ns in self.namespaces():
            ns.close()
            if not Path("/run/netns", ns.name).exists():
                continue
            pids = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for _, proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for ns in self.namespaces():
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)

    # -- processes ---------------------------------------------------------------------------

    def start(self, ns: Netns, name: str, *argv: str) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``ns``; its output goes to logs/NAME.log."""
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *argv], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def run(self, ns: Netns, *argv: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for node in self.nodes:
            tail = self.log(f"svcproxy-{node.name}").splitlines()[-lines:]
            parts.append(f"--- svcproxy on {node.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def dead_proxies(self) -> list[str]:
        return [n.name for n in self.nodes if n.proxy is not None and n.proxy.poll() is not None]

    # -- manifests ---------------------------------------------------------------------------

    def apply(self, name: str, objects: Sequence[dict[str, Any]]) -> None:
        """Write (or replace) manifests/NAME.yaml, then wait (up to 3 s) until every node has
        applied a change, so a test does not race one node's reload against another's."""
        before = [self._changes(node) for node in self.nodes]
        path = self.manifests / f"{name}.yaml"
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(yaml.safe_dump_all(objects))
        tmp.replace(path)  # atomic: a poller never reads half a file
        self._await_reload(before)

    def delete(self, name: str) -> None:
        before = [self._changes(node) for node in self.nodes]
        (self.manifests / f"{name}.yaml").unlink(missing_ok=True)
        self._await_reload(before)

    def _changes(self, node: Node) -> tuple[float, float]:
        """(changes seen so far, changes pending) from a node's svcproxy metrics; (-1, -1) if none."""
        answer = self.http(node.ns, "127.0.0.1", 10249, "/metrics")
        if isinstance(answer, str):
            return -1.0, -1.0
        seen = pending = 0.0
        for line in answer[1].splitlines():
            name, _, value = line.partition(" ")
            if name in ("kubeproxy_sync_proxy_rules_service_changes_total",
                        "kubeproxy_sync_proxy_rules_endpoint_changes_total"):
                seen += float(value)
            elif name in ("kubeproxy_sync_proxy_rules_service_changes_pending",
                          "kubeproxy_sync_proxy_rules_endpoint_changes_pending"):
                pending += float(value)
        return seen, pending

    def _await_reload(self, before: list[tuple[float, float]]) -> None:
        deadline = time.monotonic() + 3.0  # bounded: a write that changes nothing never shows
        for node, (seen_before, _) in zip(self.nodes, before, strict=True):
            while time.monotonic() < deadline:
                seen, pending = self._changes(node)
                if seen > seen_before and pending == 0:
                    break
                time.sleep(0.05)

    # -- probes ------------------------------------------------------------------------------

    def http(self, ns: Netns, host: str, port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, str] | str:
        """GET from inside ``ns``: (status, body), or "refused", "reset", "timeout", "unreachable",
        "closed" (accepted, then closed without an answer)."""
        return ns.call(_http_get, host, port, path, timeout)

    def get(self, ns: Netns, host: str, port: int, timeout: float = 2.0) -> str:
        """The body of a GET (whatever the status), or what went wrong, as for :meth:`http`."""
        answer = self.http(ns, host, port, "/", timeout)
        return answer if isinstance(answer, str) else answer[1]

    def who(self, ns: Netns, host: str, port: int, timeout: float = 2.0) -> str:
        """Which pod answered ("n2a") or what went wrong ("refused", ...)."""
        body = self.get(ns, host, port, timeout)
        return body.split()[2] if body.startswith("hello from ") else body

    def whos(self, ns: Netns, host: str, port: int, count: int) -> list[str]:
        return [self.who(ns, host, port) for _ in range(count)]

    def silent(self, ns: Netns, host: str, port: int, timeout: float = 2.0) -> str:
        """Connect without sending anything: how does the other side end it? (see _connect_and_wait)"""
        return ns.call(_connect_and_wait, host, port, timeout)

    def udp(self, ns: Netns, host: str, port: int, payload: bytes = b"ping", timeout: float = 2.0) -> str:
        """One datagram from a fresh socket (so a new flow) and its answer, or what went wrong."""
        return ns.call(_udp_exchange, host, port, payload, timeout)

    def listening(self, ns: Netns) -> set[tuple[str, str, int]]:
        """(proto, address, port) of every listening TCP and bound UDP socket in ``ns``."""
        out = self.run(ns, "ss", "-Hlntu")
        found = set()
        for line in out.stdout.splitlines():
            cols = line.split()
            if len(cols) >= 5:
                addr, _, port = cols[4].rpartition(":")
                found.add((cols[0], addr.strip("[]").split("%")[0], int(port)))
        return found

    def vips(self, node: Node) -> set[str]:
        """Addresses on the node's lo but loopback: what svcproxy put there (its VIP interface)."""
        out = self.run(node.ns, "ip", "-o", "addr", "show", "dev", "lo").stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()} - {"127.0.0.1", "::1"}

    def wait_vip(self, vip: str, timeout: float = 8.0) -> None:
        """Until every node has ``vip``: each has synced the Service that brought it."""
        for node in self.nodes:
            eventually(lambda node: vip in self.vips(node), node, timeout=timeout, what=f"{vip} on {node.name}")

    @contextlib.contextmanager
    def route(self, ns: Netns, dst: str, via: str) -> Iterator[None]:
        """A route for the duration of a block (e.g. a LoadBalancer IP, for the client)."""
        ip(ns, *(["-6"] if ":" in dst else []), "route", "add", dst, "via", via)
        try:
            yield
        finally:
            subprocess.run(["ip", "-n", ns.name, "route", "del", dst, "via", via], capture_output=True)


def node_object(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "topology.kubernetes.io/zone": zone}}}


# ----------------------------------------------------------------------------------------------
# Manifest builders (Services and EndpointSlices as the API server would hold them)


def port(port: int, target: int | str = 8080, *, name: str = "http", protocol: str = "TCP",
         node_port: int = 0) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "protocol": protocol, "port": port, "targetPort": target}
    if node_port:
        spec["nodePort"] = node_port
    return spec


def service(name: str, cluster_ips: Sequence[str], ports: Sequence[dict[str, Any]], *, type: str = "ClusterIP",
            status: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
            **spec: Any) -> dict[str, Any]:
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips if ip != "None"]
    body: dict[str, Any] = {"type": type, "ports": list(ports), **spec}
    if cluster_ips:
        body |= {"clusterIP": cluster_ips[0], "clusterIPs": list(cluster_ips)}
    if families:
        body |= {"ipFamilies": families,
                 "ipFamilyPolicy": "RequireDualStack" if len(families) > 1 else "SingleStack"}
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels or {}},
                           "spec": body}
    if status is not None:
        obj["status"] = status
    return obj


def endpoint(pod: Pod, family: int = 4, *, ready: bool | None = None, serving: bool | None = None,
             terminating: bool | None = None, zone: str | None = None, hint_zones: Iterable[str] = ()
             ) -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    ep: dict[str, Any] = {"addresses": [pod.ip(family)], "nodeName": pod.node, "conditions": conditions,
                          "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name}}
    if zone:
        ep["zone"] = zone
    if hint_zones:
        ep["hints"] = {"forZones": [{"name": z} for z in hint_zones]}
    return ep


def endpoint_slice(service_name: str, endpoints: Sequence[Pod | dict[str, Any]], *, family: int = 4,
                   ports: Sequence[tuple[str, str, int]] = (("http", "TCP", 8080),), name: str = "",
                   labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A slice of ``service_name``; Pods become endpoints with no conditions (ready)."""
    eps = [e if isinstance(e, dict) else endpoint(e, family) for e in endpoints]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-{'v6' if family == 6 else 'v4'}", "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service_name,
                                "endpointslice.kubernetes.io/managed-by": "e2e", **(labels or {})}},
        "addressType": "IPv6" if family == 6 else "IPv4",
        "ports": [{"name": n, "protocol": proto, "port": p} for n, proto, p in ports],
        "endpoints": eps,
    }


def missing_requirements() -> str:
    """Why the cluster cannot be built here, or ''."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if shutil.which("ss") is None:
        return "needs iproute2 (ss)"
    return ""
