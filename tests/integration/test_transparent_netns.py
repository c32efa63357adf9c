"""--transparent: endpoints see the client's own address where kube-proxy keeps it (needs root).

One node namespace with svcproxy, two pods on routed veths (as Calico and the e2e cluster wire
them: pod-to-pod traffic crosses the node's IP layer) and an outside client. Each pod serves
``GET /peer`` with the client address it sees. kube-proxy's rules (iptables/nftables modes with
the --cluster-cidr local detector): a pod keeps its address at a clusterIP, but reaching itself
(hairpin) it is the node; the node itself is the node; at a nodePort, clients keep their address
with externalTrafficPolicy: Local and are the node with Cluster. ``--cleanup``
removes the nftables tables and the policy-routing rules.

A second node wires both pods to one bridge (the bridge CNI plugin, kubenet): there a pod keeps
its address too where br_netfilter passes bridged traffic through the IP hooks, and is the node
where it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.proxier import NODE_REFRESH
from testbed import routednet
from testbed.routednet import sh
from tests.integration.harness import endpoint_slice, service, write_manifests

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("nft") is None, reason="needs iproute2 and nft"),
]

REPO = Path(__file__).resolve().parents[2]
PODSERVER = REPO / "testbed" / "podserver.py"
# (pod address, the node's end of its veth, the same in IPv6): each pod on its own routed link.
POD_A = (routednet.POD_A.ip4, routednet.POD_A.gateway4, routednet.POD_A.ip6, routednet.POD_A.gateway6)
POD_B = (routednet.POD_B.ip4, routednet.POD_B.gateway4, routednet.POD_B.ip6, routednet.POD_B.gateway6)
NODE_OUT, OUTSIDE = (routednet.OUTSIDE.gateway4, routednet.OUTSIDE.gateway6), (routednet.OUTSIDE.ip4,
                                                                                 routednet.OUTSIDE.ip6)
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"

PROBE = r"""
import json, socket, sys
udp = sys.argv[3].startswith("udp")
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET,
                  socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    if sys.argv[3] == "udp-big":  # fragmented both ways
        s.send(b"x" * 3000)
        print(json.dumps(str(len(s.recv(65536)))))
    elif sys.argv[3] == "udp-port":  # the client port the pod saw, and ours
        s.send(b"peerport?")
        print(json.dumps(f"{s.recv(65536).decode().strip()} / {s.getsockname()[1]}"))
    elif udp:
        s.send(b"peer?")
        print(json.dumps(s.recv(65536).decode().strip()))
    else:
        path = b"/peerport" if sys.argv[3] == "tcp-port" else b"/peer"
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        answer = data.partition(b"\r\n\r\n")[2].decode().strip()
        print(json.dumps(f"{answer} / {s.getsockname()[1]}" if sys.argv[3] == "tcp-port" else answer))
except OSError as e:
    print(json.dumps(type(e).__name__))
"""


def peer(ns: str, host: str, port: int, protocol: str = "tcp") -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, host, str(port), protocol],
                         capture_output=True, text=True, timeout=20)
    return str(json.loads(out.stdout)) if out.returncode == 0 else f"probe failed: {out.stderr[-300:]}"


# From one client port to two Services with the same endpoint: TCP (two sockets bound to one port)
# or UDP (one socket). Prints [[answer, client port], [answer, client port]].
TWO_FROM_ONE_PORT = r"""
import json, socket, sys
udp = sys.argv[1] == "udp"
targets = [(sys.argv[2], int(sys.argv[3])), (sys.argv[4], int(sys.argv[5]))]
kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
first = socket.socket(socket.AF_INET, kind)
first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
first.bind(("0.0.0.0", 0))
socks = [first] if udp else [first, socket.socket(socket.AF_INET, kind)]
if not udp:
    socks[1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    socks[1].bind(("0.0.0.0", first.getsockname()[1]))
answers = []
for i, target in enumerate(targets):
    s = socks[0 if udp else i]
    s.settimeout(3)
    if udp:
        s.sendto(b"peerport?", target)
        data, source = s.recvfrom(65536)
        assert source[:2] == target, (source, target)  # each reply from the address it was sent to
        answers.append([data.decode().strip(), s.getsockname()[1]])
    else:
        s.connect(target)
        s.sendall(b"GET /peerport HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
        answers.append([data.partition(b"\r\n\r\n")[2].decode().strip(), s.getsockname()[1]])
print(json.dumps(answers))  # the TCP connections stay open until now: both at once
"""


def two_from_one_port(ns: str, protocol: str, *targets: tuple[str, int]) -> list[tuple[str, int]]:
    argv = [str(x) for target in targets for x in target]
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", TWO_FROM_ONE_PORT, protocol, *argv],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr[-500:]
    return [(answer, port) for answer, port in json.loads(out.stdout)]


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
    with routednet.routed_node() as names:
        yield names


def start(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_proxy(node: str, manifests: Path, mode: str, workers: str) -> subprocess.Popen[str]:
    return start(node, "-m", "proxy", "--manifests", str(manifests), "--hostname-override", "node-a",
                 "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:10249",
                 "--drain-timeout", "1s", "--cluster-cidr", routednet.CLUSTER_CIDRS, "--transparent", "on",
                 "--forwarding", mode, "--workers", workers)


def udp_service(name: str, cluster_ip: str, endpoint: str) -> list[dict[str, Any]]:
    """A Service on port 53 and its slice, to ``endpoint``:5300, UDP."""
    svc = service(name, cluster_ip, 53)
    svc["spec"]["ports"][0].update(protocol="UDP", targetPort=5300)
    eps = endpoint_slice(name, 5300, [endpoint])
    eps["ports"][0]["protocol"] = "UDP"
    return [svc, eps]


def stop(proxy: subprocess.Popen[str], pod: subprocess.Popen[str]) -> str:
    """Stop svcproxy (SIGTERM) and the pod's server; svcproxy's output."""
    proxy.send_signal(signal.SIGTERM)
    out, _ = proxy.communicate(timeout=15)
    pod.kill()
    pod.wait()
    return out


def cleanup(node: str) -> None:
    subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "proxy", "--cleanup"], cwd=REPO,
                   check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize(("mode", "workers"), [("sockets", "1"), ("splice", "2")])
def test_who_keeps_the_client_address(cluster: dict[str, str], tmp_path: Path, mode: str, workers: str) -> None:
    node = cluster["node"]
    web = service("web", VIP4, 80, node_port=30080, clusterIPs=[VIP4, VIP6], ipFamilies=["IPv4", "IPv6"],
                  ipFamilyPolicy="RequireDualStack")
    local = service("local", "10.96.0.11", 80, node_port=30081, externalTrafficPolicy="Local")
    objs = [web, endpoint_slice("web", 8080, [POD_A[0]]), endpoint_slice("web", 8080, [POD_A[2]], name="web-6",
                                                                          family="IPv6"),
            local, endpoint_slice("local", 8080, [POD_A[0]]), *udp_service("dns", "10.96.0.12", POD_A[0]),
            *udp_service("dns2", "10.96.0.14", POD_A[0])]  # dns2: a second Service on the same UDP endpoint
    write_manifests(tmp_path / "svc.yaml", objs)
    pod = start(cluster["pa"], str(PODSERVER), "pa", "--addr", POD_A[0], "--addr", POD_A[2], "--tcp=8080", "--udp=5300")
    proxy = start_proxy(node, tmp_path, mode, workers)
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == "ready"
        wait_for(lambda: peer(node, VIP4, 80).startswith("pa peer"))
        # The first IPv6 replies of fresh namespaces can go astray for about a second (their
        # addresses and routes settle): wait for the path to work before asserting on it.
        wait_for(lambda: peer(cluster["pb"], VIP6, 80) == f"pa peer {POD_B[2]}")
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
        # A datagram larger than the MTU: the reply's fragments are reassembled before the steering
        # looks for its socket (only the first fragment carries the ports).
        assert peer(cluster["pb"], "10.96.0.12", 53, "udp-big") == str(3000 + len("pa (10.244.1.10:5300): "))
        # Many connections, in a row: replies keep finding their way back.
        assert {peer(cluster["pb"], VIP4, 80) for _ in range(20)} == {f"pa peer {POD_B[0]}"}
        # The client's port is kept too, as kube-proxy's DNAT keeps it ...
        for host, protocol, ip in ((VIP4, "tcp-port", POD_B[0]), (VIP6, "tcp-port", POD_B[2]),
                                   ("10.96.0.12", "udp-port", POD_B[0])):
            answer, own = peer(cluster["pb"], host, 53 if protocol == "udp-port" else 80, protocol).split(" / ")
            assert answer == f"pa peer {ip} {own}", (protocol, answer, own)
        # ... unless the client reaches the same endpoint through two Services from one port at once:
        # the first keeps it, the second gets another (one 4-tuple cannot carry both).
        for protocol, second in (("tcp", ("10.96.0.11", 80)), ("udp", ("10.96.0.14", 53))):
            first = (VIP4, 80) if protocol == "tcp" else ("10.96.0.12", 53)
            (answer1, port), (answer2, port2) = two_from_one_port(cluster["pb"], protocol, first, second)
            assert port == port2 and answer1 == f"pa peer {POD_B[0]} {port}", (protocol, answer1, port)
            ip2, seen_port2 = answer2.split()[2:]
            assert ip2 == POD_B[0] and seen_port2 != str(port), (protocol, answer2, port)
        # Metrics and the routing table say which connections kept their client's address.
        def kept() -> dict[str, float]:
            return {line.split('service="')[1].split('"')[0]: float(line.split()[-1])
                    for line in fetch(node, "/metrics").splitlines()
                    if line.startswith("svcproxy_service_transparent_connections_total{")}
        # web: the IPv6 wait (its one connection that got through; dials that failed keep nothing)
        # + pb 20 + v4 + v6 + port v4, v6 + one of two; local: pb, outside, the other of two;
        # dns: pb twice + port + one of two; dns2: the other of two.
        expected = {"web": 26.0, "local": 3.0, "dns": 4.0, "dns2": 1.0}
        wait_for(lambda: kept() == expected, timeout=5)  # helpers (--workers) report every second
        table = {(r["address"], r["port"]): r["clientAddress"] for r in json.loads(fetch(node, "/debug/services"))}
        assert table[VIP4, 80] == "pods" and table[NODE_OUT[0], 30081] == "clients"
        assert table[NODE_OUT[0], 30080] == "node"
    finally:
        out = stop(proxy, pod)
    assert "transparent source addresses: endpoints see the client's address" in out, out[-2000:]
    # Left in place at exit (a restart's successor uses them); --cleanup removes them.
    assert "svcproxy-tproxy" in sh("ip", "netns", "exec", node, "nft", "list", "tables")
    assert "0x5350" in sh("ip", "-n", node, "rule")
    cleanup(node)
    assert "svcproxy-tproxy" not in sh("ip", "netns", "exec", node, "nft", "list", "tables")
    assert "0x5350" not in sh("ip", "-n", node, "rule") + sh("ip", "-n", node, "-6", "rule")


def bridge_netfilter(node: str, on: bool) -> None:
    sh("ip", "netns", "exec", node, "sysctl", "-qw", *routednet.bridge_netfilter(on))


@pytest.fixture
def bridged() -> Iterator[dict[str, str]]:
    if not routednet.bridge_netfilter():
        pytest.skip("the kernel has no br_netfilter")
    with routednet.bridged_node() as names:
        yield names


@pytest.mark.parametrize(("mode", "workers"), [("sockets", "1"), ("splice", "2")])
def test_pods_on_one_bridge_keep_their_address_with_br_netfilter(bridged: dict[str, str], tmp_path: Path,
                                                                 mode: str, workers: str) -> None:
    node, (a4, a6), (b4, b6) = bridged["node"], routednet.BRIDGED_PODS["pa"], routednet.BRIDGED_PODS["pb"]
    gateway4 = routednet.BRIDGE_GATEWAY[0]
    web = service("web", VIP4, 80, clusterIPs=[VIP4, VIP6], ipFamilies=["IPv4", "IPv6"],
                  ipFamilyPolicy="RequireDualStack")
    objs = [web, endpoint_slice("web", 8080, [a4]), endpoint_slice("web", 8080, [a6], name="web-6", family="IPv6"),
            *udp_service("dns", "10.96.0.12", a4)]
    write_manifests(tmp_path / "svc.yaml", objs)
    bridge_netfilter(node, False)
    pod = start(bridged["pa"], str(PODSERVER), "pa", "--addr", a4, "--addr", a6, "--tcp=8080", "--udp=5300")
    proxy = start_proxy(node, tmp_path, mode, workers)
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == "ready"
        # Without br_netfilter the reply is bridged straight to the client, past any steering:
        # the endpoint sees the node (its address on the bridge), and svcproxy says why.
        wait_for(lambda: peer(bridged["pb"], VIP4, 80) == f"pa peer {gateway4}")
        assert peer(bridged["pb"], "10.96.0.12", 53, "udp") == f"pa peer {gateway4}"
        # br_netfilter turned on (as kube-proxy needs it too): from the next read of the node's
        # links (at most every NODE_REFRESH seconds, at a sync), the pod keeps its address.
        bridge_netfilter(node, True)
        time.sleep(NODE_REFRESH)
        write_manifests(tmp_path / "other.yaml", [service("other", "10.96.0.13", 80)])
        wait_for(lambda: peer(bridged["pb"], VIP4, 80) == f"pa peer {b4}")
        assert peer(bridged["pb"], VIP6, 80) == f"pa peer {b6}"
        assert peer(bridged["pb"], "10.96.0.12", 53, "udp") == f"pa peer {b4}"
        assert peer(bridged["pb"], "10.96.0.12", 53, "udp-big") == str(3000 + len(f"pa ({a4}:5300): "))
        assert {peer(bridged["pb"], VIP4, 80) for _ in range(20)} == {f"pa peer {b4}"}
        # Pods talking directly are still bridged, untouched.
        assert peer(bridged["pb"], a4, 8080) == f"pa peer {b4}"
        # The hairpin and the node itself: the node.
        assert peer(bridged["pa"], VIP4, 80) == f"pa peer {gateway4}"
        assert peer(node, VIP4, 80) == f"pa peer {gateway4}"
    finally:
        out = stop(proxy, pod)
    assert "pods on bridge cbr0 (IPv4), cbr0 (IPv6) see the node's address" in out, out[-2000:]
    assert "table bridge svcproxy-tproxy" in sh("ip", "netns", "exec", node, "nft", "list", "tables")
    cleanup(node)
    assert "svcproxy-tproxy" not in sh("ip", "netns", "exec", node, "nft", "list", "tables")


def test_a_retry_after_a_lost_reply_leaves_from_another_port(cluster: dict[str, str], tmp_path: Path) -> None:
    """The endpoint's first SYN-ACK is lost, so svcproxy's first dial (from the client's address and
    port) times out while the endpoint still holds it half-open. The retry must not reuse that
    four-tuple, which the endpoint still holds half-open (what a stack makes of a new SYN on it
    varies: an answer for the old one, or a reset): it leaves from a port the kernel picks,
    connects at once, and the lost reply counts once, as a timeout."""
    node = cluster["node"]
    write_manifests(tmp_path / "svc.yaml", [service("web", VIP4, 80), endpoint_slice("web", 8080, [POD_A[0]])])
    pod = start(cluster["pa"], str(PODSERVER), "pa", "--addr", POD_A[0], "--tcp=8080")
    proxy = start_proxy(node, tmp_path, "sockets", "1")
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == "ready"
        wait_for(lambda: peer(node, VIP4, 80).startswith("pa peer"))
        # The endpoint drops its next SYN-ACK, once.
        # (A quota of 100 bytes: the first SYN-ACK, 60, stays under it; the next goes over.)
        subprocess.run(["ip", "netns", "exec", cluster["pa"], "nft", "-f", "-"], check=True, text=True, input=(
            "table inet lose {\n chain out {\n  type filter hook output priority 0;\n"
            "  tcp sport 8080 tcp flags & (syn | ack) == syn | ack quota until 100 bytes drop\n }\n}\n"))
        started = time.monotonic()
        answer, own = peer(cluster["pb"], VIP4, 80, "tcp-port").split(" / ")
        elapsed = time.monotonic() - started
        ip, port = answer.split()[2:]
        assert ip == POD_B[0] and port != own, (answer, own)  # the client's address, another port
        assert elapsed < 0.9, elapsed  # the first dial's 250 ms, then at once (not the SYN-ACK's 1 s resend)
        errors = {line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
                  for line in fetch(node, "/metrics").splitlines()
                  if line.startswith("svcproxy_endpoint_connect_errors_total{")}
        assert errors == {"timeout": 1.0}, errors  # the lost reply's dial, and nothing after it
    finally:
        stop(proxy, pod)
        cleanup(node)
