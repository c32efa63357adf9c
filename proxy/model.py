"""Immutable values the proxy works with, converted from Service and EndpointSlice objects.

Only the fields a service proxy needs are kept, so comparing two snapshots is cheap and a sync
can tell "nothing changed" from "something changed" with ``==``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple


class NamespacedName(NamedTuple):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ServicePortName(NamedTuple):
    """kube-proxy's key for one port of one Service: (namespace, name, port name, protocol)."""

    namespace: str
    name: str
    port: str
    protocol: str

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}/{self.protocol}"


class Family(enum.IntEnum):
    """Address family; endpoints are never used across families."""

    V4 = 4
    V6 = 6


class Policy(enum.Enum):
    """Which endpoints a traffic class may use (kube-proxy's cluster/local endpoint sets)."""

    CLUSTER = "Cluster"
    LOCAL = "Local"


DEFAULT_AFFINITY_TIMEOUT = 10800
"""Seconds a ClientIP affinity lasts when the Service does not say (kube-proxy's default)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    ip: str
    ip_mode: str = "VIP"
    """``VIP`` means this node captures the address; ``Proxy`` means the LB sends to the node."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with every frontend address that leads to it."""

    name: ServicePortName
    port: int
    protocol: str
    cluster_ips: tuple[str, ...]
    node_port: int = 0
    """0 when the Service has none."""
    external_ips: tuple[str, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    """Seconds of ClientIP affinity; 0 means no affinity."""
    internal_policy: Policy = Policy.CLUSTER
    external_policy: Policy = Policy.CLUSTER
    health_check_node_port: int = 0
    proxy_protocol: int = 0
    """PROXY protocol version written to endpoints before the client's bytes (TCP ports of Services
    annotated ``svcproxy.io/proxy-protocol: v1|v2``); 0 = none."""
    least_connections: bool = False
    """New connections go to the endpoint with the fewest open ones (Services annotated
    ``svcproxy.io/load-balancing: least-connections``); else round robin."""

    @property
    def captured_lb_ips(self) -> tuple[str, ...]:
        """LB ingress IPs this node must answer on (``ipMode: Proxy`` ones are not captured)."""
        return tuple(i.ip for i in self.load_balancer_ingress if i.ip_mode != "Proxy")


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a service port: the first address of an EndpointSlice endpoint."""

    ip: str
    port: int
    family: Family
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] | None = None
    node_hints: frozenset[str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """What the proxy keeps of one EndpointSlice."""

    namespace: str
    name: str
    service: str
    """The owning Service (label ``kubernetes.io/service-name``)."""
    family: Family
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]

    @property
    def service_key(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.service)


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceState:
    """Everything a sync needs to know about one Service: its ports and their endpoints."""

    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[tuple[ServicePortName, tuple[Endpoint, ...]], ...] = ()
    created: str = ""
    """metadata.creationTimestamp (RFC 3339, so it sorts as text): the older Service wins a conflict."""

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        for key, eps in self.endpoints:
            if key == name:
                return eps
        return ()
