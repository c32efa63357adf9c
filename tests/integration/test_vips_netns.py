"""VIPs on the VIP interface, inside a network namespace this test creates (needs root).

A non-local clusterIP is added to the VIP interface (``lo`` here: no dummy driver) with
svcproxy's address marker, nodePorts bind on the node's own addresses only, VIPs go away with
their Service, stay over a restart (the next svcproxy adopts them without ever counting them as
node addresses), and ``--cleanup`` removes them.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import endpoint_slice, service, write_manifests

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip)"),
]

VIP = "10.96.0.10"          # not local in the namespace until svcproxy adds it
NODE_IP = "198.51.100.1"    # the node's address on its veth
CLIENT_IP = "198.51.100.2"  # an outside client, in a second namespace

PROBE = r"""
import json, socket, sys
from pyroute2 import IPRoute
what = sys.argv[1]
if what == "connect":
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect((sys.argv[2], int(sys.argv[3])))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        print(json.dumps(data.partition(b"\r\n\r\n")[2].decode()))
    except ConnectionRefusedError:
        print(json.dumps("refused"))
else:
    with IPRoute() as ipr:
        print(json.dumps([[a.get_attr("IFA_ADDRESS"), a.get_attr("IFA_PROTO")] for a in ipr.get_addr()]))
"""


def ns_run(ns: str, *args: str) -> object:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, *args],
                         capture_output=True, text=True, timeout=20)
    if out.returncode:
        raise AssertionError(f"probe {args} in {ns} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A node namespace and a client namespace joined by a veth pair; deleted afterwards."""
    tag = uuid.uuid4().hex[:6]
    node, client = f"svcp-node-{tag}", f"svcp-cli-{tag}"
    try:
        for ns in (node, client):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"vn{tag}", "netns", node, "type", "veth", "peer", "name", f"vc{tag}",
           "netns", client)
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", f"vn{tag}")
        sh("ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", f"vc{tag}")
        sh("ip", "-n", node, "link", "set", f"vn{tag}", "up")
        sh("ip", "-n", client, "link", "set", f"vc{tag}", "up")
        yield node, client
    finally:
        for ns in (node, client):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


def wait_for(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.1)


def addresses(ns: str) -> dict[str, int | None]:
    return {addr: proto for addr, proto in ns_run(ns, "addrs")}  # type: ignore[union-attr, misc]


def test_vips_nodeports_and_restart(netns: tuple[str, str], tmp_path: Path) -> None:
    node, client = netns
    objs = [service("web", VIP, 80, node_port=31852), endpoint_slice("web", 8080, ["127.0.0.11", "127.0.0.12"])]
    write_manifests(tmp_path / "svc.yaml", objs)
    backends = start(node, "-m", "proxy.demo_backend", "b1=127.0.0.11:8080", "b2=127.0.0.12:8080")
    proxy_args = ("-m", "proxy", "--manifests", str(tmp_path), "--hostname-override", "node-a",
                  "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "",
                  "--drain-timeout", "1s")
    proxy = start(node, *proxy_args)
    try:
        assert backends.stdout is not None and backends.stdout.readline().strip() == "ready"
        wait_for(lambda: addresses(node).get(VIP) == 0xD5)
        wait_for(lambda: "hello from" in str(ns_run(node, "connect", VIP, "80")))
        answers = {str(ns_run(node, "connect", VIP, "80")) for _ in range(4)}
        assert answers == {"hello from b1 (127.0.0.11:8080)\n", "hello from b2 (127.0.0.12:8080)\n"}
        # nodePort answers on the node's addresses, from inside and from the outside client...
        assert "hello from" in str(ns_run(node, "connect", "127.0.0.1", "31852"))
        assert "hello from" in str(ns_run(client, "connect", NODE_IP, "31852"))
        # ...but never on the VIP, which svcproxy added itself.
        assert ns_run(node, "connect", VIP, "31852") == "refused"

        # A crash leaves the VIP behind; the next svcproxy adopts it and still does not take it
        # for a node address (it sits on lo beside the real ones).
        proxy.kill()
        proxy.wait()
        assert addresses(node).get(VIP) == 0xD5
        proxy = start(node, *proxy_args)
        wait_for(lambda: "hello from" in str(ns_run(node, "connect", VIP, "80")))
        assert ns_run(node, "connect", VIP, "31852") == "refused"
        assert "hello from" in str(ns_run(client, "connect", NODE_IP, "31852"))

        # Removing the Service removes its VIP and its nodePort.
        (tmp_path / "svc.yaml").unlink()  # an emptied file would keep its objects (a save in progress)
        wait_for(lambda: VIP not in addresses(node))
        assert ns_run(node, "connect", "127.0.0.1", "31852") == "refused"

        # A clean exit keeps the VIPs (as kube-proxy keeps its rules): refused, not routed away.
        write_manifests(tmp_path / "svc.yaml", objs)
        wait_for(lambda: addresses(node).get(VIP) == 0xD5)
        stop(proxy)
        assert addresses(node).get(VIP) == 0xD5
        assert ns_run(node, "connect", VIP, "80") == "refused"
        # --cleanup removes what svcproxy added, and nothing else.
        cleanup = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "proxy", "--cleanup"],
                                 capture_output=True, text=True, timeout=20)
        assert cleanup.returncode == 0, cleanup.stderr
        assert VIP not in addresses(node)
        assert NODE_IP in addresses(node) and "127.0.0.1" in addresses(node)
    finally:
        if proxy.poll() is None:
            stop(proxy)
        backends.terminate()
        backends.wait(5)


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (nft)")
def test_vip_guard_hides_host_services_on_vips(netns: tuple[str, str], tmp_path: Path) -> None:
    """A host service on 0.0.0.0 must not answer at a VIP svcproxy added (kube-proxy #72236)."""
    node, client = netns
    sh("ip", "-n", client, "route", "add", f"{VIP}/32", "via", NODE_IP)  # clients routed to this node
    objs = [service("web", VIP, 80), endpoint_slice("web", 8080, ["127.0.0.11"])]
    write_manifests(tmp_path / "svc.yaml", objs)
    backends = start(node, "-m", "proxy.demo_backend", "b1=127.0.0.11:8080", "host=0.0.0.0:9000")
    proxy = start(node, "-m", "proxy", "--manifests", str(tmp_path), "--hostname-override", "node-a",
                  "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "")
    try:
        assert backends.stdout is not None and backends.stdout.readline().strip() == "ready"
        wait_for(lambda: "hello from b1" in str(ns_run(client, "connect", VIP, "80")))
        assert "hello from host" in str(ns_run(client, "connect", NODE_IP, "9000"))  # the host's own
        assert ns_run(client, "connect", VIP, "9000") == "refused"  # ...but not at the VIP
        stop(proxy)
        assert ns_run(client, "connect", VIP, "9000") == "refused"  # still guarded while it is down
        cleanup = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "proxy", "--cleanup"],
                                 capture_output=True, text=True, timeout=20)
        assert cleanup.returncode == 0, cleanup.stderr
        tables = subprocess.run(["ip", "netns", "exec", node, "nft", "list", "tables"],
                                capture_output=True, text=True, timeout=20).stdout
        assert "svcproxy" not in tables
    finally:
        if proxy.poll() is None:
            stop(proxy)
        backends.terminate()
        backends.wait(5)


def test_a_vip_removed_from_under_it_is_restored(netns: tuple[str, str], tmp_path: Path) -> None:
    node, _ = netns
    objs = [service("web", VIP, 80), endpoint_slice("web", 8080, ["127.0.0.11"])]
    write_manifests(tmp_path / "svc.yaml", objs)
    backends = start(node, "-m", "proxy.demo_backend", "b1=127.0.0.11:8080")
    proxy = start(node, "-m", "proxy", "--manifests", str(tmp_path), "--hostname-override", "node-a",
                  "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "", "--drain-timeout", "1s",
                  "--sync-period", "2s")
    try:
        assert backends.stdout is not None and backends.stdout.readline().strip() == "ready"
        wait_for(lambda: "hello from" in str(ns_run(node, "connect", VIP, "80")))
        where = next(line.split()[1].rstrip(":") for line in subprocess.run(
            ["ip", "-n", node, "-o", "addr", "show", "to", VIP], capture_output=True, text=True).stdout.splitlines())
        sh("ip", "-n", node, "addr", "del", f"{VIP}/32", "dev", where)  # an admin's slip, a network manager
        assert VIP not in addresses(node)
        # Restored at the next periodic sync (--sync-period 2s; node addresses are re-read every 5 s).
        wait_for(lambda: addresses(node).get(VIP) == 0xD5, timeout=15)
        wait_for(lambda: "hello from" in str(ns_run(node, "connect", VIP, "80")))
        out = stop(proxy)
        assert "service addresses removed from under svcproxy" in out and VIP in out
    finally:
        for proc in (proxy, backends):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
