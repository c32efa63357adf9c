"""From Service states to what the dataplane must do: the listeners, pools and VIPs to change.

No I/O here. :class:`Table` remembers what was last planned and turns the new state of the
changed Services into a :class:`Plan`; the proxier applies it. A Service that ends where it
started plans nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from proxy.model import Endpoint, Family, NamespacedName, Policy, ServicePort, ServicePortName, ServiceState

logger = logging.getLogger(__name__)


class ListenerKey(NamedTuple):
    """One socket: the address, port and protocol it is bound to."""

    ip: str
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


class PoolKey(NamedTuple):
    """The endpoints one kind of frontend of a service port may use."""

    name: ServicePortName
    family: Family
    policy: Policy


def pool_keys(name: ServicePortName) -> tuple[PoolKey, ...]:
    """Every pool a service port can have (one per family and policy): looked up, not searched for."""
    return tuple(PoolKey(name, family, policy) for family in Family for policy in Policy)


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerSpec:
    key: ListenerKey
    pool: PoolKey
    source_ranges: tuple[str, ...] | None = None
    """Allowed client CIDRs (LoadBalancer IPs with loadBalancerSourceRanges); None = anyone."""
    local_traffic_pool: PoolKey | None = None
    """externalTrafficPolicy: Local frontends: the Cluster pool that traffic from this node or its
    cluster's pods uses instead (kube-proxy sends it "out to the LB and back" that way)."""
    kind: str = "ClusterIP"
    """Which frontend of the Service this is: ClusterIP, ExternalIP, LoadBalancer or NodePort."""
    proxy_protocol: int = 0
    """PROXY protocol version written to each endpoint first; 0 = none."""

    @property
    def external(self) -> str:
        """For a frontend outside clients use: its externalTrafficPolicy; "" for a clusterIP."""
        return "" if self.kind == "ClusterIP" else self.pool.policy.value


@dataclasses.dataclass(frozen=True, slots=True)
class PoolSpec:
    endpoints: tuple[Endpoint, ...]
    affinity_timeout: int = 0
    least_connections: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """What the plan needs to know about this node."""

    name: str
    nodeport_addresses: tuple[str, ...]
    """The addresses nodePorts are bound on, each individually."""
    zone: str = ""
    """The Node's ``topology.kubernetes.io/zone`` label, for zone hints."""


@dataclasses.dataclass(slots=True)
class Plan:
    pools: dict[PoolKey, PoolSpec] = dataclasses.field(default_factory=dict)
    """Pools to create or update; applied before listeners open."""
    open: list[ListenerSpec] = dataclasses.field(default_factory=list)
    retarget: list[ListenerSpec] = dataclasses.field(default_factory=list)
    close: list[ListenerKey] = dataclasses.field(default_factory=list)
    drop_pools: list[PoolKey] = dataclasses.field(default_factory=list)
    """Pools no listener uses any more; dropped after listeners close."""
    add_vips: set[str] = dataclasses.field(default_factory=set)
    remove_vips: set[str] = dataclasses.field(default_factory=set)
    health_open: list[tuple[ListenerKey, NamespacedName]] = dataclasses.field(default_factory=list)
    health_close: list[ListenerKey] = dataclasses.field(default_factory=list)
    local_endpoints: dict[NamespacedName, int] = dataclasses.field(default_factory=dict)
    """New local-endpoint counts for health checks."""

    def __bool__(self) -> bool:
        return any((self.pools, self.open, self.retarget, self.close, self.drop_pools,
                    self.add_vips, self.remove_vips, self.health_open, self.health_close,
                    self.local_endpoints))


def family_of(ip: str) -> Family:
    return Family.V6 if ":" in ip else Family.V4


def usable_endpoints(
    endpoints: Iterable[Endpoint], family: Family, policy: Policy, node: str, zone: str = ""
) -> tuple[Endpoint, ...]:
    """kube-proxy's CategorizeEndpoints for one family and one policy.

    Cluster: ready endpoints, narrowed by topology hints when they apply; if none, the
    serving+terminating ones. Local: this node's ready endpoints; if none, its serving+terminating
    ones. Topology never applies to Local (the local policy already is the narrowest).
    """
    candidates = [e for e in endpoints if e.family == family and (policy is Policy.CLUSTER or e.node_name == node)]
    ready = [e for e in candidates if e.ready]
    if ready and policy is Policy.CLUSTER:
        mode = topology_mode(ready, node, zone)
        if mode == PREFER_SAME_NODE:
            ready = [e for e in ready if e.node_hints and node in e.node_hints]
        elif mode == PREFER_SAME_ZONE:
            ready = [e for e in ready if e.zone_hints and zone in e.zone_hints]
    if ready:
        return tuple(ready)
    return tuple(e for e in candidates if e.serving and e.terminating)


PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


def topology_mode(ready: Iterable[Endpoint], node: str, zone: str) -> str:
    """Which hints to follow: node hints if every ready endpoint has one and one names this node;
    else zone hints likewise; else none. A mode is only chosen when it leaves an endpoint, so
    there is no fallback after filtering (kube-proxy's topologyModeFromHints)."""
    all_node = all_zone = True
    for_node = for_zone = False
    for e in ready:
        if not e.node_hints:
            all_node = False
        elif node in e.node_hints:
            for_node = True
        if not e.zone_hints:
            all_zone = False
        elif zone and zone in e.zone_hints:
            for_zone = True
    if all_node and for_node:
        return PREFER_SAME_NODE
    if all_zone and for_zone:
        return PREFER_SAME_ZONE
    return ""


def service_vips(ports: Iterable[ServicePort]) -> set[str]:
    """Addresses that must be local for a Service to answer: clusterIPs, externalIPs, LB IPs."""
    vips: set[str] = set()
    for sp in ports:
        vips.update(sp.cluster_ips, sp.external_ips, sp.captured_lb_ips)
    return vips


def desired(state: ServiceState, node: Node) -> tuple[dict[ListenerKey, ListenerSpec], dict[PoolKey, PoolSpec]]:
    """Listeners and the pools they use for one Service. No usable endpoints means no listener.

    An externalTrafficPolicy: Local frontend also listens when only Cluster endpoints exist, for
    local traffic (see ``ListenerSpec.local_traffic_pool``); other clients are then reset, where
    kube-proxy drops.
    """
    listeners: dict[ListenerKey, ListenerSpec] = {}
    pools: dict[PoolKey, PoolSpec] = {}
    for sp in state.ports:
        eps = state.endpoints_of(sp.name)

        def pool_for(family: Family, policy: Policy, *, sp: ServicePort = sp,
                     eps: tuple[Endpoint, ...] = eps) -> PoolKey:
            key = PoolKey(sp.name, family, policy)
            if key not in pools:
                pools[key] = PoolSpec(usable_endpoints(eps, family, policy, node.name, node.zone),
                                      sp.affinity_timeout, sp.least_connections)
            return key

        def add(ip: str, port: int, policy: Policy, ranges: tuple[str, ...] = (), *, kind: str,
                sp: ServicePort = sp) -> None:
            external = kind != "ClusterIP"
            family = family_of(ip)
            pool = pool_for(family, policy)
            short = pool_for(family, Policy.CLUSTER) if external and policy is Policy.LOCAL else None
            if pools[pool].endpoints or (short is not None and pools[short].endpoints):
                key = ListenerKey(ip, port, sp.protocol)
                # kube-proxy filters the ranges by family; none left means no firewall at all.
                allowed = tuple(r for r in ranges if family_of(r) == family) or None
                listeners[key] = ListenerSpec(key, pool, allowed, short, kind, sp.proxy_protocol)

        for ip in sp.cluster_ips:
            add(ip, sp.port, sp.internal_policy, kind="ClusterIP")
        for ip in sp.external_ips:
            add(ip, sp.port, sp.external_policy, kind="ExternalIP")
        for ip in sp.captured_lb_ips:
            add(ip, sp.port, sp.external_policy, sp.load_balancer_source_ranges, kind="LoadBalancer")
        if sp.node_port:
            for ip in node.nodeport_addresses:
                add(ip, sp.node_port, sp.external_policy, kind="NodePort")
    used = {s.pool for s in listeners.values()} | {s.local_traffic_pool for s in listeners.values()}
    return listeners, {k: v for k, v in pools.items() if k in used}


class Table:
    """What has been planned so far, so each sync plans only the Services that changed.

    Several Services may want the same address and port (two Services given one nodePort, say,
    which only manifests can do). As kube-proxy orders Services, the older one gets it
    (``metadata.creationTimestamp``), then the one first by namespace/name; the others are
    reported, and when the holder lets go the next in that order takes over. The choice never
    depends on the order changes arrived in.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.services: dict[NamespacedName, ServiceState] = {}
        self.listeners: dict[ListenerKey, ListenerSpec] = {}
        """The listener each key serves: the spec of the first Service that wants it."""
        self.pools: dict[PoolKey, PoolSpec] = {}
        self.health: dict[ListenerKey, NamespacedName] = {}
        """healthCheckNodePort servers (externalTrafficPolicy: Local) and the Service each reports."""
        self.local_endpoints: dict[NamespacedName, int] = {}
        """Local ready endpoints per Service with a health server: what its health check reports."""
        self._wants: dict[ListenerKey, dict[NamespacedName, ListenerSpec]] = {}
        self._vip_refs: dict[str, int] = {}
        self._svc_listeners: dict[NamespacedName, set[ListenerKey]] = {}
        self._svc_pools: dict[NamespacedName, set[PoolKey]] = {}
        self._svc_health: dict[NamespacedName, set[ListenerKey]] = {}
        self._health_wants: dict[ListenerKey, dict[NamespacedName, None]] = {}
        self._contested: set[tuple[bool, ListenerKey]] = set()
        """(is a health check port, key) wanted by more than one Service: kept as keys settle, so
        the metric does not walk 10,000 Services at every sync."""

    @property
    def vips(self) -> set[str]:
        return set(self._vip_refs)

    def frontend_ports(self) -> set[tuple[str, str, int]]:
        """(address, protocol, port) of every service port on a service address, served or not."""
        return {(ip, sp.protocol.lower(), sp.port)
                for state in self.services.values() for sp in state.ports
                for ip in (*sp.cluster_ips, *sp.external_ips, *sp.captured_lb_ips)}

    @property
    def owner(self) -> dict[ListenerKey, NamespacedName]:
        """Which Service each listener serves."""
        return {k: spec.pool.name.service for k, spec in self.listeners.items()}

    def update(self, changes: Mapping[NamespacedName, ServiceState], *, force: bool = False) -> Plan:
        plan = Plan()
        touched: set[ListenerKey] = set()
        touched_health: set[ListenerKey] = set()
        for key, state in changes.items():
            old = self.services.get(key, ServiceState())
            if state == old and not force:
                continue
            touched |= self._update_service(key, old, state, plan)
            touched_health |= self._update_health(key, state, plan)
        for lkey in sorted(touched):
            self._settle(lkey, plan)
        for hkey in sorted(touched_health):
            self._settle_health(hkey, plan)
        plan.add_vips, plan.remove_vips = plan.add_vips - plan.remove_vips, plan.remove_vips - plan.add_vips
        dropped = set(plan.drop_pools) - set(plan.pools)
        plan.drop_pools = [p for p in plan.drop_pools if p in dropped]
        return plan

    def set_node(self, node: Node) -> Plan:
        """Replan every Service for new node facts (nodePort addresses or zone changed)."""
        self.node = node
        return self.update(dict(self.services), force=True)

    def _rank(self, key: NamespacedName) -> tuple[str, NamespacedName]:
        return self.services[key].created if key in self.services else "", key

    @property
    def conflicts(self) -> int:
        """Listener and health check keys wanted by more than one Service."""
        return len(self._contested)

    def _settle(self, lkey: ListenerKey, plan: Plan) -> None:
        """Give a listener key to the Service first in order that wants it; plan the difference."""
        wants = self._wants.get(lkey, {})
        order = sorted(wants, key=self._rank)
        new = wants[order[0]] if order else None
        old = self.listeners.get(lkey)
        self._mark_contested(False, lkey, len(order) > 1)
        if len(order) > 1:
            logger.error("%s %s:%d is wanted by %s; %s has it (the oldest Service, then by name)", lkey.protocol,
                         lkey.ip, lkey.port, ", ".join(map(str, order[1:])), order[0])
        if new == old:
            return
        if new is None:
            del self.listeners[lkey]
            plan.close.append(lkey)
            return
        self.listeners[lkey] = new
        (plan.open if old is None else plan.retarget).append(new)

    def _update_service(
        self, key: NamespacedName, old: ServiceState, new: ServiceState, plan: Plan
    ) -> set[ListenerKey]:
        new_listeners, new_pools = desired(new, self.node)

        for vip in service_vips(new.ports) - service_vips(old.ports):
            self._vip_refs[vip] = self._vip_refs.get(vip, 0) + 1
            if self._vip_refs[vip] == 1:
                plan.add_vips.add(vip)
        for vip in service_vips(old.ports) - service_vips(new.ports):
            self._vip_refs[vip] -= 1
            if not self._vip_refs[vip]:
                del self._vip_refs[vip]
                plan.remove_vips.add(vip)

        for pool, eps in new_pools.items():
            if self.pools.get(pool) != eps:
                self.pools[pool] = eps
                plan.pools[pool] = eps
        for pool in self._svc_pools.get(key, set()) - set(new_pools):
            del self.pools[pool]
            plan.drop_pools.append(pool)

        touched = set()
        for lkey in self._svc_listeners.get(key, set()) - set(new_listeners):
            wants = self._wants[lkey]
            del wants[key]
            if not wants:
                del self._wants[lkey]
            touched.add(lkey)
        for lkey, spec in new_listeners.items():
            wants = self._wants.setdefault(lkey, {})
            if wants.get(key) != spec:
                wants[key] = spec  # an update keeps the Service's place in line
                touched.add(lkey)

        if new.ports:
            self.services[key] = new
            self._svc_listeners[key] = set(new_listeners)
            self._svc_pools[key] = set(new_pools)
        else:
            self.services.pop(key, None)
            self._svc_listeners.pop(key, None)
            self._svc_pools.pop(key, None)
        return touched

    def _update_health(self, key: NamespacedName, state: ServiceState, plan: Plan) -> set[ListenerKey]:
        """Join or leave the queues for healthCheckNodePort servers (externalTrafficPolicy: Local);
        returns the keys touched. As for listeners, the first Service in line is served."""
        port = next((sp.health_check_node_port for sp in state.ports
                     if sp.external_policy is Policy.LOCAL and sp.health_check_node_port), 0)
        wanted = {ListenerKey(ip, port, "TCP") for ip in self.node.nodeport_addresses} if port else set()
        had = self._svc_health.pop(key, set())
        for hkey in had - wanted:
            queue = self._health_wants[hkey]
            del queue[key]
            if not queue:
                del self._health_wants[hkey]
        for hkey in wanted - had:
            self._health_wants.setdefault(hkey, {})[key] = None
        if wanted:
            self._svc_health[key] = wanted
            count = local_ready_endpoints(state, self.node.name)
            if self.local_endpoints.get(key) != count:
                self.local_endpoints[key] = count
                plan.local_endpoints[key] = count
        else:
            self.local_endpoints.pop(key, None)
        return had ^ wanted

    def _mark_contested(self, health: bool, key: ListenerKey, contested: bool) -> None:
        if contested:
            self._contested.add((health, key))
        else:
            self._contested.discard((health, key))

    def _settle_health(self, hkey: ListenerKey, plan: Plan) -> None:
        queue = sorted(self._health_wants.get(hkey, {}), key=self._rank)
        new = queue[0] if queue else None
        old = self.health.get(hkey)
        self._mark_contested(True, hkey, len(queue) > 1)
        if len(queue) > 1:
            logger.error("health check port %s:%d is wanted by %s; %s has it (the oldest Service, then by name)",
                         hkey.ip, hkey.port, ", ".join(map(str, queue[1:])), queue[0])
        if new == old:
            return
        if old is not None:
            plan.health_close.append(hkey)
            del self.health[hkey]
        if new is not None:
            self.health[hkey] = new
            plan.health_open.append((hkey, new))


def local_ready_endpoints(state: ServiceState, node: str) -> int:
    """What a health check reports: this node's ready endpoints, summed over the Service's ports as
    kube-proxy does (ready only, so a node with only terminating pods says 503 while it still
    forwards to them)."""
    return sum(1 for _, eps in state.endpoints for e in eps if e.ready and e.node_name == node)
