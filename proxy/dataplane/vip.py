"""Service addresses (VIPs) on a local interface, through netlink (pyroute2).

A VIP that is already local (127.0.0.0/8, a node address) is used as it is. Others are added as
/32 or /128 to the VIP interface: a dummy ``svcproxy0``, created if missing, or ``lo`` where the
kernel has no dummy driver. Every address svcproxy adds carries its own IFA_PROTO value, so it
is never mistaken for a node address (even on ``lo``, after a restart) and a restarted svcproxy
adopts the VIPs its predecessor left instead of flapping them.

pyroute2's IPRoute runs its own asyncio loop, which cannot nest in ours (and its async flavour
needs AF_NETLINK datagram endpoints that uvloop lacks), so all netlink calls run on one
dedicated thread. They happen only during syncs, never on the forwarding path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

logger = logging.getLogger(__name__)

ADDR_PROTO = 0xD5
"""IFA_PROTO marking svcproxy's addresses (kernel values 0-3 are taken; any other byte is free)."""
RT_TABLE_LOCAL = 255
RTN_LOCAL = 2
DEFAULT_INTERFACE = "svcproxy0"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


class VipError(Exception):
    pass


class Vips:
    """Adds and removes VIPs; reports node addresses (every local address but our VIPs).

    The public methods are coroutines that run the netlink work on the dedicated thread.
    """

    def __init__(self, interface: str = DEFAULT_INTERFACE) -> None:
        self._wanted_interface = interface
        self._ipr: IPRoute | None = None
        self._index: int | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self.owned: set[str] = set()
        """VIPs on the VIP interface that svcproxy added (or adopted from a previous run)."""

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args))

    async def adopt(self) -> None:
        await self._call(self._adopt)

    async def node_addresses(self) -> list[str]:
        """Every node address as ``ip/prefix``: the address and the subnet on its link."""
        return await self._call(self._node_addresses)

    async def sync(self, wanted: Iterable[str]) -> None:
        await self._call(self._sync, set(wanted))

    async def remove_all(self) -> None:
        await self._call(self._remove_all)

    async def close(self) -> None:
        await self._call(self._close)
        self._thread.shutdown(wait=False)

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def _close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _adopt(self) -> None:
        """Take over the VIPs a previous svcproxy left, so a restart does not drop them."""
        for msg in self.ipr.get_addr():
            if msg.get_attr("IFA_PROTO") == ADDR_PROTO:
                self.owned.add(str(ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))))

    def _local_networks(self) -> list[Network]:
        """Destinations the kernel delivers locally, not counting our own VIPs."""
        nets: list[Network] = []
        for msg in self.ipr.get_routes(table=RT_TABLE_LOCAL):
            if msg["type"] != RTN_LOCAL:
                continue
            dst = msg.get_attr("RTA_DST")
            if dst is None:
                continue
            net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
            if net.num_addresses == 1 and str(net.network_address) in self.owned:
                continue
            nets.append(net)
        return nets

    def _node_addresses(self) -> list[str]:
        """Every address on this node's interfaces except svcproxy's VIPs and IPv6 link-local.

        The same dump checks the VIPs: one removed by someone else (or with its interface) is
        added back, re-creating the dummy interface if it went away.
        """
        result = []
        present = set()
        for msg in self.ipr.get_addr():
            if msg.get_attr("IFA_PROTO") == ADDR_PROTO:
                present.add(str(ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))))
                continue
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if addr.is_link_local:
                continue
            result.append(f"{addr}/{msg['prefixlen']}")
        missing = self.owned - present
        if missing:
            logger.warning("service addresses removed from under svcproxy: %s; adding them back",
                           " ".join(sorted(missing)))
            self._index = None  # the interface itself may be gone: look it up (or create it) again
            for ip in sorted(missing):
                self.owned.discard(ip)
                self._add(ip)
        return sorted(set(result))

    def _sync(self, wanted: set[str]) -> None:
        """Make exactly the non-local VIPs in ``wanted`` present; remove ours that are not wanted."""
        local = self._local_networks()
        need = {ip for ip in wanted if not _within(ip, local)}
        for ip in sorted(need - self.owned):
            self._add(ip)
        self._remove_each(self.owned - need)

    def _remove_all(self) -> None:
        self._remove_each(set(self.owned))

    def _ours(self) -> dict[str, list[int]]:
        """Each address svcproxy added -> the interfaces it is on, from one netlink dump."""
        found: dict[str, list[int]] = {}
        for msg in self.ipr.get_addr():
            if msg.get_attr("IFA_PROTO") == ADDR_PROTO:
                found.setdefault(str(ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))), []).append(msg["index"])
        return found

    def _remove_each(self, ips: set[str]) -> None:
        # One dump for the lot: a dump per address made removing 10,000 VIPs take minutes.
        if not ips:
            return
        ours = self._ours()
        for ip in sorted(ips):
            self._remove(ip, ours.get(ip, []))

    def _interface(self) -> int:
        if self._index is not None:
            return self._index
        name = self._wanted_interface
        found = self.ipr.link_lookup(ifname=name)
        if not found and name != "lo":
            try:
                self.ipr.link("add", ifname=name, kind="dummy")
                self.ipr.link("set", ifname=name, state="up")
                found = self.ipr.link_lookup(ifname=name)
            except NetlinkError as e:
                # No dummy driver (common in sandboxes and some minimal kernels): use lo.
                logger.warning("cannot create dummy interface %s (%s); putting VIPs on lo", name, e)
                found = self.ipr.link_lookup(ifname="lo")
        if not found:
            raise VipError(f"VIP interface {name} not found")
        self._index = int(found[0])
        return self._index

    def _add(self, ip: str) -> None:
        addr = ipaddress.ip_address(ip)
        try:
            self.ipr.addr("add", index=self._interface(), address=ip, prefixlen=addr.max_prefixlen,
                          proto=ADDR_PROTO, **({"nodad": True} if addr.version == 6 else {}))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                logger.error("cannot add VIP %s: %s", ip, e)
                return
        self.owned.add(ip)
        logger.debug("added VIP %s", ip)

    def _remove(self, ip: str, interfaces: list[int]) -> None:
        addr = ipaddress.ip_address(ip)
        for index in interfaces:
            try:
                self.ipr.addr("del", index=index, address=ip, prefixlen=addr.max_prefixlen)
            except NetlinkError as e:
                if e.code != errno.EADDRNOTAVAIL:
                    logger.error("cannot remove VIP %s: %s", ip, e)
                    return
        self.owned.discard(ip)
        logger.debug("removed VIP %s", ip)


def _within(ip: str, nets: list[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == net.version and addr in net for net in nets)
