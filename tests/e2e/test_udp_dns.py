"""UDP Services: an echo, and real DNS over UDP and TCP (dnsmasq behind the Service, dig in front)."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from tests.e2e.cluster import UDP_PORT, Cluster, endpoint_slice, eventually, port, service
from tests.e2e.conftest import Apply


def test_udp_echo_round_robin(cluster: Cluster, manifests: Apply) -> None:
    """Each new UDP flow goes to the next pod; replies come from the clusterIP."""
    vip = "10.96.0.100"
    manifests([service("echo", [vip], [port(5300, UDP_PORT, name="echo", protocol="UDP")]),
               endpoint_slice("echo", cluster.pods, ports=[("echo", "UDP", UDP_PORT)])])
    pod = cluster.pod("n1b").ns
    eventually(lambda: cluster.udp(pod, vip, 5300, b"hi", timeout=0.5).endswith(": hi"))
    answers = [cluster.udp(pod, vip, 5300, b"x" * 3000) for _ in range(6)]
    assert all(a.endswith(": " + "x" * 3000) for a in answers), answers
    assert Counter(a.split()[0] for a in answers) == {p.name: 1 for p in cluster.pods}


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (Debian: dnsmasq-base)")
@pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (Debian: bind9-dnsutils)")
def test_dns_over_udp_and_tcp(cluster: Cluster, manifests: Apply) -> None:
    """dig, in a pod on node 1, asks dnsmasq, in a pod on node 3, through a DNS Service with a
    UDP and a TCP port 53: both answer."""
    vip = "10.96.0.53"
    server = cluster.pod("n3a")
    dnsmasq = cluster.start(server.ns, "dnsmasq", "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                            "--no-resolv", "--no-hosts", "--address=/svc.test/10.1.2.3",
                            f"--listen-address={server.ip4}", "--bind-interfaces", "-p", "53",
                            "--user=root", "--pid-file=")
    try:
        manifests([service("dns", [vip], [port(53, 53, name="dns", protocol="UDP"),
                                          port(53, 53, name="dns-tcp", protocol="TCP")]),
                   endpoint_slice("dns", [server], ports=[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)])])
        client = cluster.pod("n1a").ns

        def dig(*args: str) -> str:
            out = cluster.run(client, "dig", "+short", "+time=1", "+tries=1", f"@{vip}", *args, "svc.test")
            return out.stdout.strip()

        eventually(lambda: dig() == "10.1.2.3", timeout=10)
        assert dig("+tcp") == "10.1.2.3"
        assert dig("+notcp") == "10.1.2.3"
    finally:
        cluster.stop(dnsmasq)
