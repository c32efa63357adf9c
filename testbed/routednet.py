"""A one-node network in namespaces, wired as Calico wires pods: a node namespace, two pods on
routed veths (pod-to-pod traffic crosses the node's IP layer) and an outside client. For the
transparent-address test and benchmark; needs root and iproute2. Everything is deleted on exit."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """A namespace's veth to the node: its addresses and the node's end (its gateway)."""

    ip4: str
    gateway4: str
    ip6: str
    gateway6: str
    prefix4: int = 30


POD_A = Link("10.244.1.10", "10.244.1.9", "fd00:244:1:a::2", "fd00:244:1:a::1")
POD_B = Link("10.244.1.14", "10.244.1.13", "fd00:244:1:b::2", "fd00:244:1:b::1")
OUTSIDE = Link("198.51.100.2", "198.51.100.1", "2001:db8:1::2", "2001:db8:1::1", 24)
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/32"
LINKS = {"pa": POD_A, "pb": POD_B, "out": OUTSIDE}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


@contextlib.contextmanager
def routed_node() -> Iterator[dict[str, str]]:
    """Namespace names by role: ``node``, ``pa`` and ``pb`` (pods), ``out`` (the outside client)."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"svcp-{role}-{tag}" for role in ("node", *LINKS)}
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        node = names["node"]
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
           "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        for role, link in LINKS.items():
            ns, near = names[role], f"v{role}{tag}"
            sh("ip", "link", "add", near, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", node, "addr", "add", f"{link.gateway4}/{link.prefix4}", "dev", near)
            sh("ip", "-n", node, "addr", "add", f"{link.gateway6}/64", "dev", near, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"{link.ip4}/{link.prefix4}", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{link.ip6}/64", "dev", "eth0", "nodad")
            for n, dev in ((node, near), (ns, "eth0")):
                sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", link.gateway4)
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", link.gateway6)
        yield names
    finally:
        for ns in names.values():
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
