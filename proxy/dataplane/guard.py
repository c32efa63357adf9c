"""The VIP guard: an nftables table that refuses traffic to svcproxy's VIPs on non-service ports.

Owning VIPs on a local interface makes every host socket bound to 0.0.0.0 reachable at every
VIP (kube-proxy issue #72236, the IPVS trap). The guard keeps a small ``inet svcproxy`` table:
TCP and UDP to a VIP svcproxy added are rejected unless the (address, protocol, port) is a
service port. Only traffic from other hosts and pods is filtered: a local process using a VIP as
its source gets its replies at that VIP on any port, and could reach host services through
loopback anyway. No conntrack is used (it would tax all forwarding). Only VIPs svcproxy added
are guarded: addresses that were already local (node IPs, loopback) keep serving the host.
Each update replaces the table in one nft transaction. Like the VIPs, the table stays when
svcproxy exits (so the host stays guarded); ``--cleanup`` removes it. Without the ``nft`` tool
the guard is off, and svcproxy says so once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Iterable

logger = logging.getLogger(__name__)

TABLE = "svcproxy"
Port = tuple[str, str, int]
"""(address, "tcp" or "udp", port)"""


def ruleset(vips: Iterable[str], ports: Iterable[Port]) -> str:
    """The whole table, as an nft script that atomically replaces the previous one."""
    v4: list[str] = []
    v6: list[str] = []
    for ip in sorted(vips):
        (v6 if ipaddress.ip_address(ip).version == 6 else v4).append(ip)
    p4: list[str] = []
    p6: list[str] = []
    for ip, proto, port in sorted(ports):
        (p6 if ipaddress.ip_address(ip).version == 6 else p4).append(f"{ip} . {proto} . {port}")

    def elements(items: list[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    return f"""add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  set vips4 {{ type ipv4_addr;{elements(v4)} }}
  set vips6 {{ type ipv6_addr;{elements(v6)} }}
  set ports4 {{ type ipv4_addr . inet_proto . inet_service;{elements(p4)} }}
  set ports6 {{ type ipv6_addr . inet_proto . inet_service;{elements(p6)} }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    fib saddr type local accept
    meta l4proto tcp ip daddr @vips4 ip daddr . meta l4proto . th dport != @ports4 reject with tcp reset
    meta l4proto udp ip daddr @vips4 ip daddr . meta l4proto . th dport != @ports4 reject
    meta l4proto tcp ip6 daddr @vips6 ip6 daddr . meta l4proto . th dport != @ports6 reject with tcp reset
    meta l4proto udp ip6 daddr @vips6 ip6 daddr . meta l4proto . th dport != @ports6 reject
  }}
}}
"""


class VipGuard:
    def __init__(self, nft: str | None = None) -> None:
        self._nft = nft or shutil.which("nft")
        # Nothing to guard until svcproxy owns a VIP (the demo, unprivileged, never touches nft).
        self._applied: tuple[frozenset[str], frozenset[Port]] | None = (frozenset(), frozenset())
        self._warned = False

    @property
    def available(self) -> bool:
        return self._nft is not None

    async def sync(self, vips: Iterable[str], ports: Iterable[Port]) -> None:
        vip_set = frozenset(vips)
        wanted = (vip_set, frozenset(p for p in ports if p[0] in vip_set))
        if wanted == self._applied:
            return
        if self._nft is None:
            if vip_set and not self._warned:
                self._warned = True
                logger.warning("nft not found: host services bound to 0.0.0.0 are reachable at every "
                               "service address svcproxy adds (install nftables to guard them)")
            return
        if await self._run(ruleset(*wanted)):
            self._applied = wanted

    async def remove(self) -> None:
        if self._nft is not None:
            await self._run(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
            self._applied = None

    async def _run(self, script: str) -> bool:
        assert self._nft is not None
        proc = await asyncio.create_subprocess_exec(
            self._nft, "-f", "-", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL)
        _, err = await proc.communicate(script.encode())
        if proc.returncode:
            logger.error("VIP guard: nft failed: %s", err.decode().strip())
            return False
        return True
