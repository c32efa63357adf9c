"""--transparent: endpoints see the client's own address where kube-proxy keeps it (needs root).

One node namespace with svcproxy, two pods on routed veths (as Calico and the e2e cluster wire
them: pod-to-pod traffic crosses the node's IP layer) and an outside client. Each pod serves
``GET /peer`` with the client address it sees. kube-proxy's rules (iptables/nftables modes with
the --cluster-cidr local detector): a pod keeps its address at a clusterIP, but reaching itself
(hairpin) it is the node; the node itself is the node; at a nodePort, clients keep their address
with externalTrafficPolicy: Local and are the node with Cluster. ``--cleanup``
removes the nftables table and the policy-routing rules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import endpoint_slice, service, write_manifests

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("nft") is None, reason="needs iproute2 and nft"),
]

REPO = Path(__file__).resolve().parents[2]
PODSERVER = REPO / "testbed" / "podserver.py"
# (pod address, the node's end of its veth), IPv4 and IPv6; each pod on its own routed link.
POD_A = ("10.244.1.10", "10.244.1.9", "fd00:244:1:a::2", "fd00:244:1:a::1")
POD_B = ("10.244.1.14", "10.244.1.13", "fd00:244:1:b::2", "fd00:244:1:b::1")
NODE_OUT, OUTSIDE = ("198.51.100.1", "2001:db8:1::1"), ("198.51.100.2", "2001:db8:1::2")
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"

PROBE = r"""
import json, socket, sys
udp = sys.argv[3] == "udp"
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET,
                  socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    if udp:
        s.send(b"peer?")
        print(json.dumps(s.recv(65536).decode().strip()))
    else:
        s.sendall(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        print(json.dumps(data.partition(b"\r\n\r\n")[2].decode().strip()))
except OSError as e:
    print(json.dumps(type(e).__name__))
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


def peer(ns: str, host: str, port: int, protocol: str = "tcp") -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, host, str(port), protocol],
                         capture_output=True, text=True, timeout=20)
    return str(json.loads(out.stdout)) if out.returncode == 0 else f"probe failed: {out.stderr[-300:]}"


def fetch(ns: str, path: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:10249{path}').read().decode())"
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", code)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.1)


@pytest.fixture
def cluster() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    names = {role: f"svcp-{role}-{tag}" for role in ("node", "pa", "pb", "out")}
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        node = names["node"]
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        links = [("pa", POD_A[1], POD_A[0], POD_A[3], POD_A[2], 30),
                 ("pb", POD_B[1], POD_B[0], POD_B[3], POD_B[2], 30),
                 ("out", NODE_OUT[0], OUTSIDE[0], NODE_OUT[1], OUTSIDE[1], 24)]
        for role, node4, far4, node6, far6, prefix in links:
            ns, near = names[role], f"v{role}{tag}"
            sh("ip", "link", "add", near, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", node, "addr", "add", f"{node4}/{prefix}", "dev", near)
            sh("ip", "-n", node, "addr", "add", f"{node6}/64", "dev", near, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"{far4}/{prefix}", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{far6}/64", "dev", "eth0", "nodad")
            for n, dev in ((node, near), (ns, "eth0")):
                sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", node4)
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", node6)
        yield names
    finally:
        for ns in names.values():
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("mode", ["sockets", "splice"])
def test_who_keeps_the_client_address(cluster: dict[str, str], tmp_path: Path, mode: str) -> None:
    node = cluster["node"]
    web = service("web", VIP4, 80, node_port=30080, clusterIPs=[VIP4, VIP6], ipFamilies=["IPv4", "IPv6"],
                  ipFamilyPolicy="RequireDualStack")
    local = service("local", "10.96.0.11", 80, node_port=30081, externalTrafficPolicy="Local")
    dns = service("dns", "10.96.0.12", 53)
    dns["spec"]["ports"][0].update(protocol="UDP", targetPort=5300)
    dns_slice = endpoint_slice("dns", 5300, [POD_A[0]])
    dns_slice["ports"][0]["protocol"] = "UDP"
    objs = [web, endpoint_slice("web", 8080, [POD_A[0]]), endpoint_slice("web", 8080, [POD_A[2]], name="web-6",
                                                                          family="IPv6"),
            local, endpoint_slice("local", 8080, [POD_A[0]]), dns, dns_slice]
    write_manifests(tmp_path / "svc.yaml", objs)
    pod = start(cluster["pa"], str(PODSERVER), "pa", "--addr", POD_A[0], "--addr", POD_A[2], "--tcp=8080", "--udp=5300")
    proxy = start(node, "-m", "proxy", "--manifests", str(tmp_path), "--hostname-override", "node-a",
                  "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:10249",
                  "--drain-timeout", "1s",
                  "--cluster-cidr", "10.244.0.0/16,fd00:244::/32", "--transparent", "on", "--forwarding", mode)
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == "ready"
        wait_for(lambda: peer(node, VIP4, 80).startswith("pa peer"))
        # A pod keeps its address, IPv4 and IPv6 ...
        assert peer(cluster["pb"], VIP4, 80) == f"pa peer {POD_B[0]}"
        assert peer(cluster["pb"], VIP6, 80) == f"pa peer {POD_B[2]}"
        # At a nodePort a pod keeps it with externalTrafficPolicy: Local; Cluster masquerades it.
        assert peer(cluster["pb"], NODE_OUT[0], 30081) == f"pa peer {POD_B[0]}"
        assert peer(cluster["pb"], NODE_OUT[0], 30080) == f"pa peer {POD_A[1]}"
        # ... except to itself (the hairpin): then it is the node.
        assert peer(cluster["pa"], VIP4, 80) == f"pa peer {POD_A[1]}"
        # The node itself is the node.
        assert peer(node, VIP4, 80) == f"pa peer {POD_A[1]}"
        # Outside clients: their own address on eTP Local, the node's on eTP Cluster.
        assert peer(cluster["out"], NODE_OUT[0], 30081) == f"pa peer {OUTSIDE[0]}"
        assert peer(cluster["out"], NODE_OUT[0], 30080) == f"pa peer {POD_A[1]}"
        # UDP flows follow the same rules.
        assert peer(cluster["pb"], "10.96.0.12", 53, "udp") == f"pa peer {POD_B[0]}"
        assert peer(cluster["pa"], "10.96.0.12", 53, "udp") == f"pa peer {POD_A[1]}"
        assert peer(node, "10.96.0.12", 53, "udp") == f"pa peer {POD_A[1]}"
        # Many connections, in a row: replies keep finding their way back.
        assert {peer(cluster["pb"], VIP4, 80) for _ in range(20)} == {f"pa peer {POD_B[0]}"}
        # Metrics and the routing table say which connections kept their client's address.
        metrics = fetch(node, "/metrics")
        kept = {line.split('service="')[1].split('"')[0]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("svcproxy_service_transparent_connections_total{")}
        assert kept == {"web": 22.0, "local": 2.0, "dns": 1.0}, kept  # pb: 20 + v4 + v6; pb and outside; pb
        table = {(r["address"], r["port"]): r["clientAddress"] for r in json.loads(fetch(node, "/debug/services"))}
        assert table[VIP4, 80] == "pods" and table[NODE_OUT[0], 30081] == "clients"
        assert table[NODE_OUT[0], 30080] == "node"
    finally:
        proxy.send_signal(signal.SIGTERM)
        out, _ = proxy.communicate(timeout=15)
        pod.kill()
        pod.wait()
    assert "transparent source addresses: endpoints see the client's address" in out, out[-2000:]
    # Left in place at exit (a restart's successor uses them); --cleanup removes them.
    assert "svcproxy-tproxy" in sh("ip", "netns", "exec", node, "nft", "list", "tables")
    assert "0x5350" in sh("ip", "-n", node, "rule")
    subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "proxy", "--cleanup"], cwd=REPO,
                   check=True, capture_output=True, timeout=30)
    assert "svcproxy-tproxy" not in sh("ip", "netns", "exec", node, "nft", "list", "tables")
    assert "0x5350" not in sh("ip", "-n", node, "rule") + sh("ip", "-n", node, "-6", "rule")
