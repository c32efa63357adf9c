"""What a listener forwards to, shared by the TCP and UDP dataplanes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from proxy.balancer import Pool
from proxy.dataplane.traffic import ServiceTraffic

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class LocalSources:
    """Which clients count as local traffic for externalTrafficPolicy: Local: this node itself
    (its addresses, loopback) and the cluster's pods (``--cluster-cidr``), as kube-proxy's
    detect-local does. One instance is shared by every Target and updated when node facts change."""

    _NODE, _POD = 1, 2
    _CACHED = 4096
    """Addresses whose kind is remembered: a parse and a walk over the networks cost microseconds,
    and --transparent asks for every connection."""

    def __init__(self) -> None:
        self.node: tuple[Network, ...] = _LOOPBACK
        self.pods: tuple[Network, ...] = ()
        self.links: tuple[Network, ...] = ()
        """The subnets of the node's own links (bridges, LANs) on which two hosts talk without its IP
        layer: all but the bridges --transparent steers (tproxy.py)."""
        self._facts: dict[str, tuple[int, int]] = {}

    def update(self, node_addresses: Iterable[str], cluster_cidrs: Iterable[str],
               interfaces: Iterable[str] = (), steered: Iterable[str] = ()) -> None:
        """``interfaces``: the node's addresses as ``ip/prefix``, for the subnets of its links;
        ``steered``: those subnets whose bridged replies --transparent brings to the IP layer."""
        self.node = (*_LOOPBACK, *(ipaddress.ip_network(a) for a in node_addresses))
        self.pods = tuple(ipaddress.ip_network(c, strict=False) for c in cluster_cidrs)
        skip = {ipaddress.ip_network(n) for n in steered}
        links = (ipaddress.ip_interface(i).network for i in interfaces)
        self.links = tuple(net for net in links if net.num_addresses > 2 and not net.is_loopback and net not in skip)
        self._facts = {}

    def _of(self, ip: str) -> tuple[int, int]:
        """(its kind: _NODE and _POD bits; the index of the node's link it is on, or -1)."""
        facts = self._facts.get(ip)
        if facts is None:
            addr = ipaddress.ip_address(ip)
            kind = (self._NODE if any(addr in net for net in self.node) else 0) | \
                (self._POD if any(addr in net for net in self.pods) else 0)
            link = next((i for i, net in enumerate(self.links) if addr in net), -1)
            if len(self._facts) >= self._CACHED:
                self._facts.clear()
            self._facts[ip] = facts = (kind, link)
        return facts

    def __contains__(self, client_ip: str) -> bool:
        return self._of(client_ip)[0] != 0

    def is_node(self, ip: str) -> bool:
        return self._of(ip)[0] & self._NODE != 0

    def is_pod(self, ip: str) -> bool:
        return self._of(ip)[0] & self._POD != 0

    def same_link(self, a: str, b: str) -> bool:
        """Both on one of the node's links (a bridge): packets between them never reach its IP layer."""
        link = self._of(a)[1]
        return link >= 0 and link == self._of(b)[1]


class Target:
    """What a listener forwards to. Mutated in place on retarget; accepts read it per connection."""

    __slots__ = ("allowed", "external", "local_sources", "local_traffic_pool", "name", "pool", "proxy_protocol",
                 "traffic")

    def __init__(self, traffic: ServiceTraffic, pool: Pool, source_ranges: tuple[str, ...] | None = None, *,
                 local_traffic_pool: Pool | None = None, local_sources: LocalSources | None = None,
                 proxy_protocol: int = 0, external: str = "") -> None:
        self.traffic = traffic
        """The service port's traffic counts, which every frontend of it shares."""
        self.name = str(traffic.name)
        self.pool = pool
        self.local_traffic_pool = local_traffic_pool
        """For externalTrafficPolicy: Local frontends: the Cluster pool local traffic uses."""
        self.local_sources = local_sources or LocalSources()
        self.allowed: tuple[Network, ...] | None = None
        self.set_source_ranges(source_ranges)
        self.proxy_protocol = proxy_protocol
        """PROXY protocol version each endpoint is sent first (proxyproto.py); 0 = none."""
        self.external = external
        """For a frontend outside clients use (nodePort, externalIP, LB IP): its externalTrafficPolicy,
        "Cluster" or "Local"; "" for a clusterIP."""

    def retarget(self, traffic: ServiceTraffic, pool: Pool, source_ranges: tuple[str, ...] | None,
                 local_traffic_pool: Pool | None, proxy_protocol: int, external: str) -> None:
        """Take a changed listener's new settings; connections accepted from now on see them."""
        self.traffic = traffic
        self.name = str(traffic.name)
        self.pool = pool
        self.local_traffic_pool = local_traffic_pool
        self.set_source_ranges(source_ranges)
        self.proxy_protocol = proxy_protocol
        self.external = external

    def set_source_ranges(self, ranges: tuple[str, ...] | None) -> None:
        self.allowed = None if ranges is None else tuple(ipaddress.ip_network(r) for r in ranges)

    @property
    def needs_client_ip(self) -> bool:
        return self.allowed is not None or self.local_traffic_pool is not None or bool(self.pool.affinity_timeout)

    def admits(self, client_ip: str) -> bool:
        if self.allowed is None:
            return True
        addr = ipaddress.ip_address(client_ip)
        return any(addr in net for net in self.allowed)

    def keeps_client_address(self, client_ip: str, endpoint_ip: str) -> bool:
        """Whether the endpoint should see the client's own address rather than the node's, as
        kube-proxy's iptables and nftables modes decide (with the --cluster-cidr local detector):
        never for the node itself, nor for a pod reaching itself (the hairpin); at a clusterIP,
        for pods only (off-cluster clients are masqueraded); at a nodePort, externalIP or LB IP,
        only with externalTrafficPolicy: Local (Cluster masquerades everyone there). Never where
        the endpoint's replies would miss the reply steering: from an endpoint on this node's own
        addresses (hostNetwork: the output path), or to a client on the endpoint's own link (two
        pods on one bridge without br_netfilter: the bridge delivers the reply itself)."""
        sources = self.local_sources
        if client_ip == endpoint_ip or sources.is_node(client_ip) or sources.is_node(endpoint_ip) or \
                sources.same_link(client_ip, endpoint_ip):
            return False
        if self.external:
            return self.external == "Local"
        return self.local_sources.is_pod(client_ip)

    def pool_for(self, client_ip: str | None) -> Pool:
        """The pool a client uses: local traffic to an eTP Local frontend goes to Cluster endpoints."""
        if self.local_traffic_pool is not None and client_ip is not None and client_ip in self.local_sources:
            return self.local_traffic_pool
        return self.pool
