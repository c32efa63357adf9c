"""Transparent source addresses: endpoints see the client's own address, as with kube-proxy.

A dial that keeps the client's address (``Target.keeps_client_address``) binds its socket to that
address with IP_TRANSPARENT before connecting, as HAProxy's ``usesrc clientip`` does. The
endpoint's replies are addressed to the client, not to this node, so two kernel pieces bring them
back to svcproxy's socket:

* an nftables table (``inet svcproxy-tproxy``) marks every packet that belongs to a local
  transparent socket (``socket transparent 1``, a socket lookup in prerouting; fragments are
  reassembled first, as only a whole datagram shows its ports), and
* a policy-routing rule sends marked packets to a routing table whose only route is ``local``
  for every address, so they are delivered here instead of forwarded to the client.

Both are created at start and removed at exit and by ``--cleanup``. The node needs CAP_NET_ADMIN
(IP_TRANSPARENT, netlink, nft), the nft tool, and a kernel with the nftables socket expression
(nft_socket, Linux 4.18+); without them svcproxy says why and endpoints see the node's address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import shutil
import socket

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


def bind_transparent(sock: socket.socket, source_ip: str) -> None:
    """Make ``sock`` (not yet connected) leave from ``source_ip``, an address this node does not own.
    The port is chosen at connect, per destination, so one client address never runs out of ports."""
    if ":" in source_ip:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TRANSPARENT, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source_ip, 0))


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

    async def remove(self) -> None:
        """Take everything away (absent pieces are fine); a failure is logged, not raised."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, _routes, "del")
        except (NetlinkError, OSError) as e:
            logger.warning("cannot remove the transparent-address routing rules: %s", e)
        if shutil.which("nft") is not None:
            problem = await self._nft(f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
            if problem:
                logger.warning("cannot remove the nftables table %s: %s", NFT_TABLE, problem)

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
