"""Transparent source addresses: endpoints see the client's own address, as with kube-proxy.

A dial that keeps the client's address (``Target.keeps_client_address``) binds its socket to that
address, and to the client's port where it is free, with IP_TRANSPARENT before connecting, as
HAProxy's ``usesrc client`` does. The endpoint's replies are addressed to the client, not to this
node, so two kernel pieces bring them back to svcproxy's socket:

* an nftables table (``inet svcproxy-tproxy``) marks every packet that belongs to a local
  transparent socket (``socket transparent 1``, a socket lookup in prerouting; fragments are
  reassembled first, as only a whole datagram shows its ports), and
* a policy-routing rule sends marked packets to a routing table whose only route is ``local``
  for every address, so they are delivered here instead of forwarded to the client.

A reply between two pods on one of the node's bridges is bridged, never routed, so it meets
neither piece. Where br_netfilter passes bridged traffic through the IP hooks
(net.bridge.bridge-nf-call-iptables=1, which kube-proxy's own iptables mode needs as well), the
inet table marks it there; a table of the bridge family (``bridge svcproxy-tproxy``) then
readdresses marked frames to the bridge itself, so the bridge hands them up to the node's IP
layer and the routing rule above. Without br_netfilter such pairs see the node's address.

The tables and rules are created at start, kept at exit (a restart's successor uses them) and
removed by ``--cleanup``. The node needs CAP_NET_ADMIN (IP_TRANSPARENT, netlink, nft), the nft
tool, and a kernel with the nftables socket expression (nft_socket, Linux 4.18+); without them
svcproxy says why and endpoints see the node's address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import shutil
import socket
from pathlib import Path
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

logger = logging.getLogger(__name__)

MARK = 0x5350
"""The firewall mark on replies to transparent sockets ("SP")."""
ROUTE_TABLE = 5350
RULE_PRIORITY = 5350
"""Before the main table's rule (32766), so a reply is never forwarded to the real client."""
NFT_TABLE = "svcproxy-tproxy"
DEFRAG_ONLY = 0x5351
IPV6_TRANSPARENT = 75  # linux/in6.h; Python's socket module lacks it
_FAMILIES = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))
_SCOPE_HOST = 254  # a local route must have it (IPv4 refuses the default, universe, with EINVAL)
_BRIDGE_NETFILTER = {4: Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
                     6: Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables")}
"""Per network namespace: whether bridged IPv4 and IPv6 pass through the IP hooks (br_netfilter)."""


class Bridge(NamedTuple):
    """One of the node's bridges: its name, its own MAC address, and the subnets on it."""

    name: str
    mac: str
    networks: tuple[str, ...]


def ruleset() -> str:
    """The nft script that (re)creates the table in one transaction."""
    return f"""add table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto {{ tcp, udp }} socket transparent 1 meta mark set {MARK:#x} accept
    # Never matches (no packet carries this mark); a tproxy expression makes the kernel reassemble
    # fragments before this chain, and only a whole datagram shows the ports the socket lookup needs.
    meta mark {DEFRAG_ONLY:#x} meta l4proto udp tproxy to :1
  }}
}}
"""


def bridge_ruleset(bridges: tuple[Bridge, ...]) -> str:
    """The nft script that (re)creates the bridge table for ``bridges`` (or removes it for none)."""
    script = f"add table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"
    if not bridges:
        return script
    rules = "\n".join(
        f"    meta mark {MARK:#x} {'ip6' if ':' in net else 'ip'} daddr {net} "
        f"ether daddr set {bridge.mac} meta pkttype set host"
        for bridge in bridges for net in bridge.networks)
    return script + f"""table bridge {NFT_TABLE} {{
  chain prerouting {{
    # After br_netfilter (priority 0): its pass through the IP hooks is where replies get the mark.
    type filter hook prerouting priority 1; policy accept;
{rules}
  }}
}}
"""


def bind_transparent(sock: socket.socket, source_ip: str, source_port: int = 0) -> bool:
    """Make ``sock`` (not yet connected) leave from ``source_ip``, an address this node does not own,
    and from ``source_port`` (the client's own, as kube-proxy's DNAT keeps it) where that port is
    free; else, or for 0, the kernel picks one at connect, per destination, so one client address
    never runs out of ports. Returns whether the port was kept. A kept port can still meet a
    connection to the same endpoint from it at connect (EADDRNOTAVAIL): dial again with 0 then."""
    if ":" in source_ip:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TRANSPARENT, 1)
    if source_port:
        # Beside other dials from the same client port to other endpoints (the client may reach
        # several services from one port); none of them listens, so the kernel allows it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((source_ip, source_port))
            return True
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source_ip, 0))
    return False


def unavailable() -> str:
    """Why transparent source addresses cannot work on this node ("" when they can)."""
    if shutil.which("nft") is None:
        return "the nft tool is not installed"
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_IP, socket.IP_TRANSPARENT, 1)
    except PermissionError:
        return "IP_TRANSPARENT needs CAP_NET_ADMIN"
    except OSError as e:
        return f"IP_TRANSPARENT: {e.strerror or e}"
    finally:
        probe.close()
    return ""


class Steering:
    """The nftables table, rules and routes that bring replies to transparent sockets home."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tproxy")
        self._bridges: tuple[Bridge, ...] | None = None
        """The bridges the bridge table steers, as last written (None: not written yet)."""
        self._unsteered: tuple[str, ...] = ()

    async def install(self) -> str:
        """Create everything; returns why it failed ("" on success, and then it is all in place)."""
        problem = await self._nft(ruleset())
        if problem:
            return problem
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, _routes, "add")
        except (NetlinkError, OSError) as e:
            await self.remove()
            return f"policy routing: {e}"
        return ""

    async def steer_bridges(self) -> tuple[str, ...]:
        """Bring the bridge table up to date with the node's bridges, and return the subnets whose
        pods keep their address with each other (the bridges' subnets where br_netfilter is on).
        Cheap when nothing changed: a netlink dump and two small reads."""
        loop = asyncio.get_running_loop()
        bridges, families = await loop.run_in_executor(self._thread, _read_bridges)
        steered = tuple(Bridge(b.name, b.mac, nets) for b in bridges
                        if (nets := tuple(n for n in b.networks if _family(n) in families)))
        if steered != self._bridges:
            problem = await self._nft(bridge_ruleset(steered))
            if problem:
                logger.warning("pods on one bridge see the node's address when they call each other through "
                               "a Service: %s", problem)
                steered = ()
            self._bridges = steered
        unsteered = tuple(sorted({f"{b.name} (IPv{_family(n)})" for b in bridges for n in b.networks
                                  if _family(n) not in families}))
        if unsteered != self._unsteered:
            self._unsteered = unsteered
            if unsteered:
                logger.warning("pods on bridge %s see the node's address when they call each other through a "
                               "Service: br_netfilter does not pass bridged traffic through the IP hooks "
                               "(net.bridge.bridge-nf-call-iptables or -ip6tables is not 1)", ", ".join(unsteered))
        return tuple(net for bridge in steered for net in bridge.networks)

    async def remove(self) -> None:
        """Take everything away (absent pieces are fine); a failure is logged, not raised."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, _routes, "del")
        except (NetlinkError, OSError) as e:
            logger.warning("cannot remove the transparent-address routing rules: %s", e)
        if shutil.which("nft") is not None:
            problem = await self._nft(f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
                                      + bridge_ruleset(()))
            if problem:
                logger.warning("cannot remove the nftables tables %s: %s", NFT_TABLE, problem)

    async def _nft(self, script: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "nft", "-f", "-", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL)
        _, err = await proc.communicate(script.encode())
        return f"nft: {err.decode().strip()}" if proc.returncode else ""


def _routes(action: str) -> None:
    """``add`` (idempotent) or ``del`` (quiet when absent) the rule and the local route per family."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, everything in _FAMILIES:
            try:
                ipr.rule(action, family=family, fwmark=MARK, table=ROUTE_TABLE, priority=RULE_PRIORITY)
            except NetlinkError as e:
                if e.code not in (errno.EEXIST, errno.ENOENT, errno.ESRCH):
                    raise
            try:
                ipr.route("replace" if action == "add" else "del", family=family, dst=everything,
                          table=ROUTE_TABLE, type="local", oif=lo, scope=_SCOPE_HOST)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ESRCH):
                    raise


def _family(network: str) -> int:
    return 6 if ":" in network else 4


def _read_bridges() -> tuple[tuple[Bridge, ...], frozenset[int]]:
    """The node's bridges with addresses (their subnets), and the families br_netfilter passes."""
    families = frozenset(family for family, path in _BRIDGE_NETFILTER.items()
                         if path.exists() and path.read_text().strip() == "1")
    bridges = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
                continue
            networks = sorted({str(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network)
                               for a in ipr.get_addr(index=link["index"])
                               if not ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_link_local})
            if networks:
                bridges.append(Bridge(link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS"), tuple(networks)))
    return tuple(sorted(bridges)), families
