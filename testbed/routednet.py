"""One-node networks in namespaces, for the transparent-address test and benchmark: a node
namespace and two pods, wired as Calico wires them (routed veths: pod-to-pod traffic crosses the
node's IP layer) with an outside client, or as the bridge CNI plugin and kubenet do (both pods
on the bridge ``cbr0``). Needs root and iproute2; everything is deleted on exit."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


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
BRIDGE = "cbr0"
BRIDGE_GATEWAY = ("10.244.1.1", "fd00:244:1::1")
BRIDGED_PODS = {"pa": ("10.244.1.10", "fd00:244:1::10"), "pb": ("10.244.1.11", "fd00:244:1::11")}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


def bridge_netfilter(on: bool = True) -> list[str]:
    """The sysctls that make a node namespace pass bridged traffic through the IP hooks, as a
    Kubernetes node does (kubeadm requires it); [] if the kernel has no br_netfilter."""
    if not Path("/proc/sys/net/bridge").exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    if not Path("/proc/sys/net/bridge").exists():
        return []
    return [f"net.bridge.bridge-nf-call-iptables={int(on)}", f"net.bridge.bridge-nf-call-ip6tables={int(on)}"]


@contextlib.contextmanager
def routed_node() -> Iterator[dict[str, str]]:
    """Namespace names by role: ``node``, ``pa`` and ``pb`` (pods), ``out`` (the outside client)."""
    with _namespaces(("node", *LINKS)) as names:
        node = names["node"]
        tag = node.rsplit("-", 1)[1]
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


@contextlib.contextmanager
def bridged_node() -> Iterator[dict[str, str]]:
    """Namespace names by role: ``node`` and the pods ``pa`` and ``pb``, both on the node's bridge
    (BRIDGED_PODS; the node is BRIDGE_GATEWAY): between them, frames are bridged, not routed."""
    with _namespaces(("node", *BRIDGED_PODS)) as names:
        node = names["node"]
        sh("ip", "-n", node, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{BRIDGE_GATEWAY[0]}/24", "dev", BRIDGE)
        sh("ip", "-n", node, "addr", "add", f"{BRIDGE_GATEWAY[1]}/64", "dev", BRIDGE, "nodad")
        sh("ip", "-n", node, "link", "set", BRIDGE, "up")
        for role, (ip4, ip6) in BRIDGED_PODS.items():
            ns, port = names[role], f"v{role}"
            sh("ip", "link", "add", port, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", node, "link", "set", port, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", BRIDGE_GATEWAY[0])
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", BRIDGE_GATEWAY[1])
        yield names


@contextlib.contextmanager
def _namespaces(roles: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """A namespace per role (``node`` is the one that forwards), deleted with its processes on exit."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"svcp-{role}-{tag}" for role in roles}
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            # Before any interface exists, so each one inherits it: no duplicate address detection,
            # whose second of tentative link-local addresses lost the first IPv6 replies.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
               "net.ipv6.conf.all.accept_dad=0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", names["node"], "sysctl", "-qw", "net.ipv4.ip_forward=1",
           "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        yield names
    finally:
        for ns in names.values():
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
