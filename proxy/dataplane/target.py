"""What a listener forwards to, shared by the TCP and UDP dataplanes."""

from __future__ import annotations

import ipaddress

from proxy.balancer import Pool


class Target:
    """What a listener forwards to. Mutated in place on retarget; accepts read it per connection."""

    __slots__ = ("allowed", "name", "pool")

    def __init__(self, name: str, pool: Pool, source_ranges: tuple[str, ...] | None = None) -> None:
        self.name = name
        self.pool = pool
        self.allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
        self.set_source_ranges(source_ranges)

    def set_source_ranges(self, ranges: tuple[str, ...] | None) -> None:
        self.allowed = None if ranges is None else tuple(ipaddress.ip_network(r) for r in ranges)

    def admits(self, client_ip: str) -> bool:
        if self.allowed is None:
            return True
        addr = ipaddress.ip_address(client_ip)
        return any(addr in net for net in self.allowed)
