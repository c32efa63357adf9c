"""PROXY protocol headers (HAProxy's spec, versions 1 and 2): what a backend behind
``svcproxy.io/proxy-protocol`` reads before the client's first byte, to learn who the client was
and which service address it reached."""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""Version 2's 12-byte signature."""
_V2_PROXY = 0x21  # version 2, command PROXY
_TCP4, _TCP6 = 0x11, 0x21  # address family and transport: TCP over IPv4, TCP over IPv6

Address = tuple[str, int]


def header(version: int, client: Address, server: Address) -> bytes:
    """The header for a TCP connection from ``client`` to ``server`` (the address it connected to)."""
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    if src.version != dst.version:
        raise ValueError(f"mixed address families: {client[0]} to {server[0]}")
    if version == 1:
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {client[1]} {server[1]}\r\n".encode()
    if version == 2:
        addresses = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
        family_byte = _TCP4 if src.version == 4 else _TCP6
        return SIGNATURE + struct.pack("!BBH", _V2_PROXY, family_byte, len(addresses)) + addresses
    raise ValueError(f"PROXY protocol version {version} does not exist (1 or 2)")
