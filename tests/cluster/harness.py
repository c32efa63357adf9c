"""A three-node cluster on a real Kubernetes control plane, in network namespaces (needs root).

Layout (all addresses exist only inside the namespaces made here)::

    lan:          bridge br0 joining the control plane, the nodes and the outside client
    cp:           eth0 10.10.10.250/24; ``scripts/controlplane up`` (etcd, kube-apiserver,
                  kube-controller-manager, kube-scheduler built from source), API server on
                  192.0.2.1:6443 (its own address on lo)
    node N:       eth0 10.10.10.N/24, route 192.0.2.1 via cp; cbr0 10.244.N.1/24 for its pods;
                  routes to the other nodes' pod CIDRs; the kubelet stand-in (testbed/kubelet.py)
                  and svcproxy, authenticated as deploy/base's ServiceAccount
    pods:         made by the kubelet stand-ins for the Pods the scheduler binds to their node
    client:       eth0 10.10.10.100/24

The test process stays in the machine's namespace and sends nothing from it: kubectl runs inside
the control-plane namespace, probes on threads that entered a namespace (tests/e2e/cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.routednet import bridge_netfilter
from tests.e2e.cluster import Netns, _http_get, eventually, ip, sh

REPO = Path(__file__).resolve().parents[2]
APISERVER_IP = "192.0.2.1"
CP_LAN_IP = "10.10.10.250"
CLIENT_IP = "10.10.10.100"
ZONES = {1: "zone-a", 2: "zone-b", 3: "zone-b"}
FORWARDING = {1: "transports", 2: "sockets", 3: "splice"}
"""Each node's svcproxy forwards TCP its own way (--forwarding), so every test covers every mode."""
CLUSTER_CIDR = "10.244.0.0/16"


@dataclass
class Node:
    index: int
    ns: Netns
    kubelet: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def ip(self) -> str:
        return f"10.10.10.{self.index}"


@dataclass
class LoadResult:
    """What a bounded request loop saw: answers per pod, and every failure with its kind."""

    answers: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.answers.values()) + len(self.failures)


class Load:
    """Requests from the client namespace, one connection each, until stopped (or a hard bound)."""

    def __init__(self, ns: Netns, targets: list[tuple[str, int]], *, workers: int = 4,
                 max_seconds: float = 180.0) -> None:
        self.ns, self.targets, self.workers, self.max_seconds = ns, targets, workers, max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._futures: list[Any] = []

    def _loop(self, offset: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        i = offset
        while not self._stop.is_set() and time.monotonic() < deadline:
            host, port = self.targets[i % len(self.targets)]
            i += 1
            answer = _http_get(host, port, "/", 3.0)
            with self._lock:
                if isinstance(answer, tuple) and answer[0] == 200 and answer[1].startswith("hello from "):
                    self.result.answers[answer[1].split()[2]] += 1
                else:
                    self.result.failures.append(f"{host}:{port} {answer!r} at {time.time():.3f}")
            time.sleep(0.005)

    def __enter__(self) -> Load:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.workers, initializer=_enter, initargs=(self.ns.name,))
        self._futures = [self._pool.submit(self._loop, i) for i in range(self.workers)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=30)
        self._pool.shutdown()


def _enter(name: str) -> None:
    from tests.e2e.cluster import _enter_netns

    _enter_netns(name)


class KubeCluster:
    def __init__(self, workdir: Path, binaries: Path) -> None:
        self.workdir = workdir
        self.bin = binaries
        self.logs = workdir / "logs"
        self.tag = uuid.uuid4().hex[:6]
        self.lan = Netns(f"spk-{self.tag}-lan")
        self.cp = Netns(f"spk-{self.tag}-cp")
        self.client = Netns(f"spk-{self.tag}-client")
        self.nodes = [Node(n, Netns(f"spk-{self.tag}-node{n}")) for n in (1, 2, 3)]
        self.controlplane: subprocess.Popen[str] | None = None
        self.kubeconfig = Path()
        self.proxy_kubeconfig = workdir / "svcproxy.kubeconfig"
        self.proxy_token = ""
        self.processes: list[subprocess.Popen[Any]] = []

    def namespaces(self) -> list[Netns]:
        return [self.lan, self.cp, self.client, *(n.ns for n in self.nodes)]

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    # -- set-up ----------------------------------------------------------------------------------

    def up(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._network()
        self._control_plane()
        self._proxy_identity()
        for node in self.nodes:
            node.kubelet = self._nsenter(node.ns, f"kubelet-{node.name}", sys.executable, "-m", "testbed.kubelet",
                                         "--kubeconfig", str(self.kubeconfig), "--node-name", node.name,
                                         "--node-ip", node.ip, "--zone", ZONES[node.index],
                                         "--pod-cidr", f"10.244.{node.index}.0/24",
                                         "--netns-prefix", f"spk-{self.tag}-n{node.index}",
                                         "--linger", "1", "--log-dir", str(self.logs))
        eventually(lambda: len(self.kubectl_json("get", "nodes")["items"]) == 3, timeout=30, what="3 nodes")
        for node in self.nodes:
            node.proxy = self.start_proxy(node)
        for node in self.nodes:
            eventually(lambda node: "initial sync done" in self.log(f"svcproxy-{node.name}"), node, timeout=30,
                       what=f"svcproxy on {node.name} synced")

    def _network(self) -> None:
        for ns in self.namespaces():
            sh("ip", "netns", "add", ns.name)
            sysctls = ["net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.rp_filter=0"]
            if ns in [n.ns for n in self.nodes]:
                sysctls += ["net.ipv4.ip_forward=1", *bridge_netfilter()]
            sh("ip", "netns", "exec", ns.name, "sysctl", "-q", "-w", *sysctls)
            ip(ns, "link", "set", "lo", "up")
        ip(self.lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip(self.lan, "link", "set", "br0", "up")

        def lan_port(ns: Netns, port: str, addr: str) -> None:
            ip(self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
            ip(self.lan, "link", "set", port, "master", "br0", "up")
            ip(ns, "addr", "add", addr, "dev", "eth0")
            ip(ns, "link", "set", "eth0", "up")

        lan_port(self.cp, "cp", f"{CP_LAN_IP}/24")
        lan_port(self.client, "client", f"{CLIENT_IP}/24")
        for node in self.nodes:
            n = node.index
            lan_port(node.ns, node.name, f"{node.ip}/24")
            ip(node.ns, "route", "add", f"{APISERVER_IP}/32", "via", CP_LAN_IP)
            ip(node.ns, "link", "add", "cbr0", "type", "bridge", "mcast_snooping", "0")
            ip(node.ns, "addr", "add", f"10.244.{n}.1/24", "dev", "cbr0")
            ip(node.ns, "link", "set", "cbr0", "up")
            for other in self.nodes:
                if other is not node:
                    ip(node.ns, "route", "add", f"10.244.{other.index}.0/24", "via", other.ip)
        ip(self.cp, "route", "add", CLUSTER_CIDR, "via", "10.10.10.1")  # pods reaching the API server

    def _control_plane(self) -> None:
        err = open(self.logs / "controlplane.log", "ab")  # noqa: SIM115 - the child keeps it
        self.controlplane = subprocess.Popen(
            ["ip", "netns", "exec", self.cp.name, str(REPO / "scripts" / "controlplane"), "up",
             "--dir", str(self.workdir / "cp"), "--advertise-address", APISERVER_IP],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        err.close()
        assert self.controlplane.stdout is not None
        last = ""
        for line in self.controlplane.stdout:  # ends when `up` prints the kubeconfig (or dies)
            last = line.strip()
            if last.endswith(".kubeconfig"):
                break
        if not last.endswith(".kubeconfig"):
            raise RuntimeError(f"scripts/controlplane up failed:\n{self.log('controlplane')[-3000:]}")
        self.kubeconfig = Path(last)

    def _proxy_identity(self) -> None:
        """deploy/base's ServiceAccount, ClusterRole and binding; a TokenRequest token for svcproxy."""
        base = REPO / "deploy" / "base"
        self.kubectl("apply", "-n", "kube-system", "-f", str(base / "serviceaccount.yaml"),
                     "-f", str(base / "clusterrole.yaml"), "-f", str(base / "clusterrolebinding.yaml"))
        self.proxy_token = self.kubectl("create", "token", "svcproxy", "-n", "kube-system",
                                        "--duration", "24h").strip()
        ca = yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["certificate-authority"]
        self.proxy_kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "svcproxy",
            "clusters": [{"name": "c", "cluster": {"server": f"https://{APISERVER_IP}:6443",
                                                   "certificate-authority": ca}}],
            "users": [{"name": "svcproxy", "user": {"token": self.proxy_token}}],
            "contexts": [{"name": "svcproxy", "context": {"cluster": "c", "user": "svcproxy"}}]}))

    def start_proxy(self, node: Node) -> subprocess.Popen[bytes]:
        return self._exec(node.ns, f"svcproxy-{node.name}", sys.executable, "-m", "proxy",
                          "--kubeconfig", str(self.proxy_kubeconfig), "--hostname-override", node.name,
                          "--nodeport-addresses", f"{node.ip}/32", "--cluster-cidr", CLUSTER_CIDR,
                          "--drain-timeout", "1s", "--healthz-bind-address", "0.0.0.0:10256",
                          "--metrics-bind-address", "127.0.0.1:10249", "--forwarding", FORWARDING[node.index])

    def _exec(self, ns: Netns, name: str, *argv: str) -> subprocess.Popen[bytes]:
        return self._start(name, ["ip", "netns", "exec", ns.name, *argv])

    def _nsenter(self, ns: Netns, name: str, *argv: str) -> subprocess.Popen[bytes]:
        # Only the network namespace: pod namespaces made by the child must be visible to all.
        return self._start(name, ["nsenter", f"--net=/run/netns/{ns.name}", *argv])

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes.append(proc)
        return proc

    # -- tear-down -------------------------------------------------------------------------------

    def down(self) -> None:
        procs = [p for p in self.processes if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        if self.controlplane is not None and self.controlplane.poll() is None:
            self.controlplane.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.controlplane.wait(30)
        pod_ns = [n for n in os.listdir("/run/netns") if n.startswith(f"spk-{self.tag}-n")] \
            if os.path.isdir("/run/netns") else []
        for ns in self.namespaces():
            ns.close()
        for name in [*pod_ns, *(ns.name for ns in self.namespaces())]:
            if not Path("/run/netns", name).exists():
                continue
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for p in [*self.processes, self.controlplane]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)

    # -- the API ---------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                kubeconfig: Path | None = None) -> str:
        out = subprocess.run(["ip", "netns", "exec", self.cp.name, str(self.bin / "kubectl"),
                              "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
                             input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout if check else out.stdout + out.stderr

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def pod_netns(self, pod_ip: str) -> Netns:
        """The network namespace a kubelet stand-in made for the pod at ``pod_ip``."""
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name.startswith(f"spk-{self.tag}-n") and name.rpartition("-")[2].startswith("p"):
                addrs = subprocess.run(["ip", "-n", name, "-4", "-o", "addr"], capture_output=True, text=True).stdout
                if f" {pod_ip}/" in addrs:
                    return Netns(name)
        raise AssertionError(f"no namespace holds pod {pod_ip}")

    def ready_pods(self, namespace: str, selector: str) -> dict[str, str]:
        """Pods of ``selector`` that are Ready and not terminating: name -> pod IP."""
        pods = self.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
        ready = {}
        for p in pods:
            conds = {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
            if conds.get("Ready") == "True" and not p["metadata"].get("deletionTimestamp"):
                ready[p["metadata"]["name"]] = p["status"].get("podIP", "")
        return ready

    def etcd(self, path: str, body: dict[str, Any]) -> Any:
        """A call to etcd's JSON gateway, from inside the control-plane namespace (its loopback)."""
        def call() -> Any:
            req = urllib.request.Request(f"http://127.0.0.1:2379{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        return self.cp.call(call)

    def restart_apiserver(self) -> None:
        assert self.controlplane is not None
        before = self.log("controlplane").count("kube-apiserver restarted")
        self.controlplane.send_signal(signal.SIGHUP)
        eventually(lambda: self.log("controlplane").count("kube-apiserver restarted") > before, timeout=90,
                   interval=0.2, what="kube-apiserver restarted")

    @contextlib.contextmanager
    def route(self, ns: Netns, dst: str, via: str) -> Iterator[None]:
        """A route for the duration of a block (e.g. a LoadBalancer IP, for the client)."""
        ip(ns, "route", "add", dst, "via", via)
        try:
            yield
        finally:
            subprocess.run(["ip", "-n", ns.name, "route", "del", dst, "via", via], capture_output=True)

    # -- observation -----------------------------------------------------------------------------

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self, node: Node) -> dict[str, float]:
        answer = node.ns.call(_http_get, "127.0.0.1", 10249, "/metrics", 2.0)
        if isinstance(answer, str):
            return {}
        values = {}
        for line in answer[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def who(self, ns: Netns, host: str, port: int) -> str:
        answer = ns.call(_http_get, host, port, "/", 2.0)
        if isinstance(answer, str):
            return answer
        return answer[1].split()[2] if answer[1].startswith("hello from ") else answer[1]

    def listening(self, node: Node) -> set[tuple[str, int]]:
        out = subprocess.run(["ip", "netns", "exec", node.ns.name, "ss", "-Hlnt"], capture_output=True,
                             text=True).stdout
        found = set()
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 4:
                addr, _, port = cols[3].rpartition(":")
                found.add((addr.strip("[]"), int(port)))
        return found

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for name in ["controlplane", *(f"svcproxy-{n.name}" for n in self.nodes),
                     *(f"kubelet-{n.name}" for n in self.nodes)]:
            tail = self.log(name).splitlines()[-lines:]
            parts.append(f"--- {name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def dead(self) -> list[str]:
        dead = [f"svcproxy-{n.name}" for n in self.nodes if n.proxy is not None and n.proxy.poll() is not None]
        dead += [f"kubelet-{n.name}" for n in self.nodes if n.kubelet is not None and n.kubelet.poll() is not None]
        if self.controlplane is not None and self.controlplane.poll() is not None:
            dead.append("controlplane")
        return dead
