"""The bridge table --transparent writes for the node's bridges (tproxy.bridge_ruleset); the
integration tier runs it against real bridges (tests/integration/test_transparent_netns.py)."""

from __future__ import annotations

from proxy.dataplane.tproxy import MARK, NFT_TABLE, Bridge, bridge_ruleset


def test_marked_replies_to_a_bridges_subnets_are_handed_to_the_bridge_itself() -> None:
    script = bridge_ruleset((Bridge("cbr0", "02:00:00:00:00:01", ("10.244.1.0/24", "fd00:244:1::/64")),
                             Bridge("cni0", "02:00:00:00:00:02", ("10.88.0.0/16",))))
    rules = [line.strip() for line in script.splitlines() if line.strip().startswith("meta mark")]
    assert rules == [
        f"meta mark {MARK:#x} ip daddr 10.244.1.0/24 ether daddr set 02:00:00:00:00:01 meta pkttype set host",
        f"meta mark {MARK:#x} ip6 daddr fd00:244:1::/64 ether daddr set 02:00:00:00:00:01 meta pkttype set host",
        f"meta mark {MARK:#x} ip daddr 10.88.0.0/16 ether daddr set 02:00:00:00:00:02 meta pkttype set host"]
    # After br_netfilter's hook (priority 0), which is where the inet table marks bridged replies.
    assert "hook prerouting priority 1;" in script
    # One transaction replaces whatever an earlier write (or an earlier svcproxy) left.
    assert script.startswith(f"add table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n")


def test_no_bridge_leaves_no_table() -> None:
    assert bridge_ruleset(()) == f"add table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"
