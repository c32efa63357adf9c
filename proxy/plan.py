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


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerSpec:
    key: ListenerKey
    pool: PoolKey
    source_ranges: tuple[str, ...] | None = None
    """Allowed client CIDRs (LoadBalancer IPs with loadBalancerSourceRanges); None = anyone."""


@dataclasses.dataclass(frozen=True, slots=True)
class PoolSpec:
    endpoints: tuple[Endpoint, ...]
    affinity_timeout: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """What the plan needs to know about this node."""

    name: str
    nodeport_addresses: tuple[str, ...]
    """The addresses nodePorts are bound on, each individually."""


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

    def __bool__(self) -> bool:
        return any((self.pools, self.open, self.retarget, self.close, self.drop_pools,
                    self.add_vips, self.remove_vips))


def family_of(ip: str) -> Family:
    return Family.V6 if ":" in ip else Family.V4


def usable_endpoints(
    endpoints: Iterable[Endpoint], family: Family, policy: Policy, node: str
) -> tuple[Endpoint, ...]:
    """kube-proxy's endpoint choice: ready ones; if none, serving+terminating ones (per policy)."""
    candidates = [e for e in endpoints if e.family == family and (policy is Policy.CLUSTER or e.node_name == node)]
    ready = tuple(e for e in candidates if e.ready)
    if ready:
        return ready
    return tuple(e for e in candidates if e.serving and e.terminating)


def service_vips(ports: Iterable[ServicePort]) -> set[str]:
    """Addresses that must be local for a Service to answer: clusterIPs, externalIPs, LB IPs."""
    vips: set[str] = set()
    for sp in ports:
        vips.update(sp.cluster_ips, sp.external_ips, sp.captured_lb_ips)
    return vips


def desired(state: ServiceState, node: Node) -> tuple[dict[ListenerKey, ListenerSpec], dict[PoolKey, PoolSpec]]:
    """Listeners and non-empty pools for one Service. No usable endpoints means no listener."""
    listeners: dict[ListenerKey, ListenerSpec] = {}
    pools: dict[PoolKey, PoolSpec] = {}
    for sp in state.ports:
        eps = state.endpoints_of(sp.name)

        def add(ip: str, port: int, policy: Policy, ranges: tuple[str, ...] = (), *, sp: ServicePort = sp,
                eps: tuple[Endpoint, ...] = eps) -> None:
            family = family_of(ip)
            pool = PoolKey(sp.name, family, policy)
            if pool not in pools:
                pools[pool] = PoolSpec(usable_endpoints(eps, family, policy, node.name), sp.affinity_timeout)
            if pools[pool].endpoints:
                key = ListenerKey(ip, port, sp.protocol)
                allowed = tuple(r for r in ranges if family_of(r) == family) if ranges else None
                listeners[key] = ListenerSpec(key, pool, allowed)

        for ip in sp.cluster_ips:
            add(ip, sp.port, sp.internal_policy)
        for ip in sp.external_ips:
            add(ip, sp.port, sp.external_policy)
        for ip in sp.captured_lb_ips:
            # Ranges of the other family only leave an empty allow-list: nobody of this one.
            add(ip, sp.port, sp.external_policy, sp.load_balancer_source_ranges)
        if sp.node_port:
            for ip in node.nodeport_addresses:
                add(ip, sp.node_port, sp.external_policy)
    return listeners, {k: v for k, v in pools.items() if v.endpoints}


class Table:
    """What has been planned so far, so each sync plans only the Services that changed.

    Listener keys are claimed by the first Service that asks; a second Service asking for the same
    address and port is logged and not served there (a conflict kube-proxy would also report).
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.services: dict[NamespacedName, ServiceState] = {}
        self.listeners: dict[ListenerKey, ListenerSpec] = {}
        self.owner: dict[ListenerKey, NamespacedName] = {}
        self.pools: dict[PoolKey, PoolSpec] = {}
        self._vip_refs: dict[str, int] = {}
        self._svc_listeners: dict[NamespacedName, set[ListenerKey]] = {}
        self._svc_pools: dict[NamespacedName, set[PoolKey]] = {}

    @property
    def vips(self) -> set[str]:
        return set(self._vip_refs)

    def update(self, changes: Mapping[NamespacedName, ServiceState], *, force: bool = False) -> Plan:
        plan = Plan()
        for key, state in changes.items():
            old = self.services.get(key, ServiceState())
            if state == old and not force:
                continue
            self._update_service(key, old, state, plan)
        # A key opened and closed in one plan (moved between Services) is a retarget.
        reopened = {s.key for s in plan.open} & set(plan.close)
        if reopened:
            plan.close = [k for k in plan.close if k not in reopened]
            plan.retarget += [s for s in plan.open if s.key in reopened]
            plan.open = [s for s in plan.open if s.key not in reopened]
        plan.add_vips, plan.remove_vips = plan.add_vips - plan.remove_vips, plan.remove_vips - plan.add_vips
        dropped = set(plan.drop_pools) - set(plan.pools)
        plan.drop_pools = [p for p in plan.drop_pools if p in dropped]
        return plan

    def set_node(self, node: Node) -> Plan:
        """Replan every Service for new node facts (the nodePort addresses changed)."""
        self.node = node
        return self.update(dict(self.services), force=True)

    def _update_service(self, key: NamespacedName, old: ServiceState, new: ServiceState, plan: Plan) -> None:
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

        owned = self._svc_listeners.get(key, set())
        for lkey in owned - set(new_listeners):
            del self.listeners[lkey]
            del self.owner[lkey]
            plan.close.append(lkey)
        claimed = set()
        for lkey, spec in new_listeners.items():
            holder = self.owner.get(lkey)
            if holder is not None and holder != key:
                logger.error("%s wants %s, which %s already uses; not serving it there", key, lkey, holder)
                continue
            claimed.add(lkey)
            if holder is None:
                plan.open.append(spec)
            elif self.listeners[lkey] != spec:
                plan.retarget.append(spec)
            self.listeners[lkey] = spec
            self.owner[lkey] = key

        if new.ports:
            self.services[key] = new
            self._svc_listeners[key] = claimed
            self._svc_pools[key] = set(new_pools)
        else:
            self.services.pop(key, None)
            self._svc_listeners.pop(key, None)
            self._svc_pools.pop(key, None)
