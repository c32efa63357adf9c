"""PROXY protocol headers, byte for byte against the spec's layout (real consumers, nginx and
HAProxy, read them in tests/integration/test_proxy_protocol.py)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from proxy.dataplane.proxyproto import SIGNATURE, header


def test_version_1_is_one_text_line() -> None:
    assert header(1, ("192.0.2.7", 51234), ("10.96.0.10", 80)) == b"PROXY TCP4 192.0.2.7 10.96.0.10 51234 80\r\n"
    assert header(1, ("2001:db8::7", 1), ("fd00:96::a", 443)) == b"PROXY TCP6 2001:db8::7 fd00:96::a 1 443\r\n"


@pytest.mark.parametrize(("client", "server", "family", "size"), [
    (("192.0.2.7", 51234), ("10.96.0.10", 80), 0x11, 4),
    (("2001:db8::7", 65535), ("fd00:96::a", 443), 0x21, 16),
])
def test_version_2_is_the_binary_layout(client: tuple[str, int], server: tuple[str, int], family: int,
                                        size: int) -> None:
    data = header(2, client, server)
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a" == SIGNATURE
    version_command, fam, length = struct.unpack("!BBH", data[12:16])
    assert (version_command, fam, length) == (0x21, family, 2 * size + 4) and len(data) == 16 + length
    body = data[16:]
    assert str(ipaddress.ip_address(body[:size])) == client[0]
    assert str(ipaddress.ip_address(body[size:2 * size])) == server[0]
    assert struct.unpack("!HH", body[2 * size:]) == (client[1], server[1])


def test_bad_versions_and_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match="version 3"):
        header(3, ("192.0.2.7", 1), ("10.96.0.10", 80))
    with pytest.raises(ValueError, match="mixed address families"):
        header(1, ("192.0.2.7", 1), ("fd00::1", 80))
