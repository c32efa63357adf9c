"""Service and EndpointSlice objects (dicts in the API server's JSON shape) to model values.

Pure functions. Bad input raises :class:`InvalidObject` naming the object and the field, so
callers can log it once and keep the last good state; "not for us" returns ``None``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Endpoint,
    EndpointSliceInfo,
    Family,
    LoadBalancerIngress,
    NamespacedName,
    Policy,
    ServicePort,
    ServicePortName,
    ServiceState,
    SlicePort,
)

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
PROXY_PROTOCOL_ANNOTATION = "svcproxy.io/proxy-protocol"
LOAD_BALANCING_ANNOTATION = "svcproxy.io/load-balancing"
"""``v1`` or ``v2``: svcproxy writes a PROXY protocol header to the endpoint (TCP ports)."""
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")


class InvalidObject(ValueError):
    """An object the proxy cannot use; the message names the object and the field."""

    def __init__(self, kind: str, key: str, field: str, reason: str) -> None:
        super().__init__(f"{kind} {key}: {field}: {reason}")
        self.kind = kind
        self.key = key
        self.field = field
        self.reason = reason


class _Fields:
    """Typed field access that raises InvalidObject with the field path."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key

    def fail(self, field: str, reason: str) -> InvalidObject:
        return InvalidObject(self.kind, self.key, field, reason)

    def mapping(self, obj: Mapping[str, Any], field: str, path: str) -> Mapping[str, Any]:
        value = obj.get(field)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {type(value).__name__}")
        return value

    def seq(self, obj: Mapping[str, Any], field: str, path: str) -> list[Any]:
        value = obj.get(field)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, obj: Mapping[str, Any], field: str, path: str, default: str = "") -> str:
        value = obj.get(field, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {value!r}")
        return value

    def boolean(self, obj: Mapping[str, Any], field: str, path: str, default: bool) -> bool:
        value = obj.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def integer(
        self, obj: Mapping[str, Any], field: str, path: str, lo: int, hi: int, default: int | None = None
    ) -> int:
        value = obj.get(field)
        if value is None:
            if default is None:
                raise self.fail(path, "required")
            return default
        # bool is an int subclass; `port: true` is still wrong.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(path, f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(path, f"{value} is out of range {lo}-{hi}")
        return value

    def ip(self, value: Any, path: str) -> tuple[str, Family]:
        if not isinstance(value, str):
            raise self.fail(path, f"expected an IP address, got {value!r}")
        # inet_pton/ntop validate and normalise in C; ipaddress costs ~20x more and this runs for
        # every endpoint of every slice (100k at 10k Services).
        family = socket.AF_INET6 if ":" in value else socket.AF_INET
        try:
            normal = socket.inet_ntop(family, socket.inet_pton(family, value))
        except (OSError, ValueError):
            raise self.fail(path, f"{value!r} is not an IP address") from None
        if family == socket.AF_INET and normal != value:
            # inet_pton takes exactly dotted quads; anything else (leading zeros...) is refused.
            raise self.fail(path, f"{value!r} is not an IP address")
        return normal, Family.V6 if family == socket.AF_INET6 else Family.V4

    def protocol(self, obj: Mapping[str, Any], path: str) -> str:
        value = self.string(obj, "protocol", path, "TCP")
        if value not in PROTOCOLS:
            raise self.fail(path, f"unknown protocol {value!r}")
        return value


def object_key(obj: Mapping[str, Any]) -> NamespacedName:
    """namespace/name of an object; the namespace defaults to ``default`` as kubectl does."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise InvalidObject(str(obj.get("kind", "object")), "?", "metadata", "required")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidObject(str(obj.get("kind", "object")), "?", "metadata.name", "required")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise InvalidObject(str(obj.get("kind", "object")), name, "metadata.namespace", "expected a string")
    return NamespacedName(namespace, name)


def _labels(f: _Fields, obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return f.mapping(f.mapping(obj, "metadata", "metadata"), "labels", "metadata.labels")


def service_state_ports(obj: Mapping[str, Any]) -> tuple[ServicePort, ...] | None:
    """The ports of a Service, or None when kube-proxy would not proxy it at all."""
    key = object_key(obj)
    f = _Fields("Service", str(key))
    labels = _labels(f, obj)
    if SERVICE_PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels:
        return None
    spec = f.mapping(obj, "spec", "spec")
    if f.string(spec, "type", "spec.type", "ClusterIP") == "ExternalName":
        return None
    cluster_ip = f.string(spec, "clusterIP", "spec.clusterIP")
    if cluster_ip in ("", "None"):
        return None

    primary = f.ip(cluster_ip, "spec.clusterIP")[0]
    raw_ips = f.seq(spec, "clusterIPs", "spec.clusterIPs") or [primary]
    cluster_ips = tuple(f.ip(ip, f"spec.clusterIPs[{i}]")[0] for i, ip in enumerate(raw_ips))
    if primary != cluster_ips[0]:
        raise f.fail("spec.clusterIPs[0]", "must equal spec.clusterIP")
    external_ips = tuple(
        f.ip(ip, f"spec.externalIPs[{i}]")[0]
        for i, ip in enumerate(f.seq(spec, "externalIPs", "spec.externalIPs"))
    )
    status = f.mapping(f.mapping(obj, "status", "status"), "loadBalancer", "status.loadBalancer")
    ingress = []
    for i, item in enumerate(f.seq(status, "ingress", "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        if not isinstance(item, Mapping):
            raise f.fail(path, "expected an object")
        if item.get("ip"):  # hostname-only ingress is for DNS, not for us
            ip, _ = f.ip(item["ip"], f"{path}.ip")
            ingress.append(LoadBalancerIngress(ip, f.string(item, "ipMode", f"{path}.ipMode", "VIP")))
    source_ranges = []
    for i, cidr in enumerate(f.seq(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges")):
        path = f"spec.loadBalancerSourceRanges[{i}]"
        try:
            source_ranges.append(str(ipaddress.ip_network(str(cidr).strip(), strict=False)))
        except ValueError:
            raise f.fail(path, f"{cidr!r} is not a CIDR") from None

    affinity_timeout = 0
    if f.string(spec, "sessionAffinity", "spec.sessionAffinity", "None") == "ClientIP":
        cfg = f.mapping(f.mapping(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig"),
                        "clientIP", "spec.sessionAffinityConfig.clientIP")
        affinity_timeout = f.integer(
            cfg, "timeoutSeconds", "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            0, 86400, DEFAULT_AFFINITY_TIMEOUT,
        ) or DEFAULT_AFFINITY_TIMEOUT

    internal = _policy(f, spec, "internalTrafficPolicy")
    external = _policy(f, spec, "externalTrafficPolicy")
    health_port = f.integer(spec, "healthCheckNodePort", "spec.healthCheckNodePort", 0, 65535, 0)
    proxy_protocol = _proxy_protocol(f, obj)
    least_connections = _least_connections(f, obj)
    # trafficDistribution and the topology-mode annotation need nothing here: they tell the
    # EndpointSlice controller to write hints, and kube-proxy follows the hints alone.

    ports = []
    seen: set[ServicePortName] = set()
    for i, port in enumerate(f.seq(spec, "ports", "spec.ports")):
        path = f"spec.ports[{i}]"
        if not isinstance(port, Mapping):
            raise f.fail(path, "expected an object")
        protocol = f.protocol(port, f"{path}.protocol")
        name = ServicePortName(key.namespace, key.name, f.string(port, "name", f"{path}.name"), protocol)
        if name in seen:
            raise f.fail(f"{path}.name", f"duplicate port {name.port!r}/{protocol}")
        seen.add(name)
        ports.append(ServicePort(
            name=name,
            port=f.integer(port, "port", f"{path}.port", 1, 65535),
            protocol=protocol,
            cluster_ips=cluster_ips,
            node_port=f.integer(port, "nodePort", f"{path}.nodePort", 0, 65535, 0),
            external_ips=external_ips,
            load_balancer_ingress=tuple(ingress),
            load_balancer_source_ranges=tuple(source_ranges),
            affinity_timeout=affinity_timeout,
            internal_policy=internal,
            external_policy=external,
            health_check_node_port=health_port,
            proxy_protocol=proxy_protocol if protocol == "TCP" else 0,
            least_connections=least_connections,
        ))
    return tuple(ports)


def _proxy_protocol(f: _Fields, obj: Mapping[str, Any]) -> int:
    annotations = f.mapping(f.mapping(obj, "metadata", "metadata"), "annotations", "metadata.annotations")
    path = f"metadata.annotations[{PROXY_PROTOCOL_ANNOTATION}]"
    value = f.string(annotations, PROXY_PROTOCOL_ANNOTATION, path).strip()
    if value in ("", "none"):
        return 0
    if value in ("v1", "v2"):
        return int(value[1])
    raise f.fail(path, f"expected v1 or v2, got {value!r}")


def _least_connections(f: _Fields, obj: Mapping[str, Any]) -> bool:
    annotations = f.mapping(f.mapping(obj, "metadata", "metadata"), "annotations", "metadata.annotations")
    path = f"metadata.annotations[{LOAD_BALANCING_ANNOTATION}]"
    value = f.string(annotations, LOAD_BALANCING_ANNOTATION, path).strip()
    if value in ("", "round-robin"):
        return False
    if value == "least-connections":
        return True
    raise f.fail(path, f"expected round-robin or least-connections, got {value!r}")


def _policy(f: _Fields, spec: Mapping[str, Any], field: str) -> Policy:
    value = f.string(spec, field, f"spec.{field}", "Cluster")
    if value == "Local":
        return Policy.LOCAL
    if value == "Cluster":
        return Policy.CLUSTER
    raise f.fail(f"spec.{field}", f"expected Cluster or Local, got {value!r}")


def endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo | None:
    """What the proxy keeps of an EndpointSlice, or None when it is not for us (FQDN, headless)."""
    key = object_key(obj)
    f = _Fields("EndpointSlice", str(key))
    labels = _labels(f, obj)
    if SERVICE_PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels:
        return None
    address_type = f.string(obj, "addressType", "addressType")
    if address_type == "FQDN":
        return None
    if address_type not in ("IPv4", "IPv6"):
        raise f.fail("addressType", f"expected IPv4, IPv6 or FQDN, got {address_type!r}")
    family = Family.V4 if address_type == "IPv4" else Family.V6
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise f.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "required")

    ports = []
    for i, port in enumerate(f.seq(obj, "ports", "ports")):
        path = f"ports[{i}]"
        if not isinstance(port, Mapping):
            raise f.fail(path, "expected an object")
        if port.get("port") is None:  # "all ports" slices carry no number; kube-proxy skips them
            continue
        ports.append(SlicePort(
            name=f.string(port, "name", f"{path}.name"),
            protocol=f.protocol(port, f"{path}.protocol"),
            port=f.integer(port, "port", f"{path}.port", 1, 65535),
        ))

    # With one port (the common case) the slice's endpoints are already what merge_endpoints wants
    # and are shared with it; with several, they are copied per port (0 until then).
    port_number = ports[0].port if len(ports) == 1 else 0
    endpoints = []
    for i, ep in enumerate(f.seq(obj, "endpoints", "endpoints")):
        path = f"endpoints[{i}]"
        if not isinstance(ep, Mapping):
            raise f.fail(path, "expected an object")
        addresses = f.seq(ep, "addresses", f"{path}.addresses")
        if not addresses:
            raise f.fail(f"{path}.addresses", "at least one address is required")
        ip, ip_family = f.ip(addresses[0], f"{path}.addresses[0]")  # kube-proxy uses only the first
        if ip_family != family:
            raise f.fail(f"{path}.addresses[0]", f"{ip} is not an {address_type} address")
        cond = f.mapping(ep, "conditions", f"{path}.conditions")
        hints = f.mapping(ep, "hints", f"{path}.hints")
        endpoints.append(Endpoint(
            ip=ip,
            port=port_number,
            family=family,
            ready=f.boolean(cond, "ready", f"{path}.conditions.ready", True),
            serving=f.boolean(cond, "serving", f"{path}.conditions.serving", True),
            terminating=f.boolean(cond, "terminating", f"{path}.conditions.terminating", False),
            # Interned: 100,000 endpoints name a few hundred nodes and zones.
            node_name=sys.intern(f.string(ep, "nodeName", f"{path}.nodeName")),
            zone=sys.intern(f.string(ep, "zone", f"{path}.zone")),
            zone_hints=_hint_names(f, hints, "forZones", f"{path}.hints.forZones"),
            node_hints=_hint_names(f, hints, "forNodes", f"{path}.hints.forNodes"),
        ))
    return EndpointSliceInfo(key.namespace, key.name, service, family, tuple(ports), tuple(endpoints))


def _hint_names(f: _Fields, hints: Mapping[str, Any], field: str, path: str) -> frozenset[str] | None:
    if field not in hints:
        return None
    names = set()
    for i, item in enumerate(f.seq(hints, field, path)):
        if not isinstance(item, Mapping):
            raise f.fail(f"{path}[{i}]", "expected an object")
        names.add(f.string(item, "name", f"{path}[{i}].name"))
    return frozenset(names)


def merge_endpoints(
    ports: Iterable[ServicePort], slices: Iterable[EndpointSliceInfo]
) -> tuple[tuple[ServicePortName, tuple[Endpoint, ...]], ...]:
    """Endpoints per service port from every slice of the Service, matched by port name + protocol.

    The slice's port number is the resolved targetPort, so a named targetPort may map to different
    numbers on different pods. Duplicates (the same ip:port in two slices) are kept once, preferring
    the one that is ready. Results are sorted so equal inputs give equal outputs.
    """
    by_port: dict[tuple[str, str], dict[tuple[str, int], Endpoint]] = {}
    for sl in slices:
        for sp in sl.ports:
            merged = by_port.setdefault((sp.name, sp.protocol), {})
            for ep in sl.endpoints:
                old = merged.get((ep.ip, sp.port))
                if old is None or (ep.ready and not old.ready):
                    merged[(ep.ip, sp.port)] = ep if ep.port == sp.port else Endpoint(
                        # not dataclasses.replace: 3x slower
                        ep.ip, sp.port, ep.family, ep.ready, ep.serving, ep.terminating,
                        ep.node_name, ep.zone, ep.zone_hints, ep.node_hints)
    result = []
    for port in ports:
        eps = by_port.get((port.name.port, port.protocol), {})
        result.append((port.name, tuple(eps[k] for k in sorted(eps))))
    return tuple(result)


def service_state(ports: tuple[ServicePort, ...], slices: Iterable[EndpointSliceInfo],
                  created: str = "") -> ServiceState:
    return ServiceState(ports, merge_endpoints(ports, slices), created)


ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What svcproxy reads from its own Node."""

    zone: str = ""
    """topology.kubernetes.io/zone, for topology hints."""
    eligible: bool = True
    """False while the node is being deleted or drained by the cluster autoscaler (KEP-3836):
    /healthz then fails, so load balancers move away first."""


def node_facts(obj: Mapping[str, Any]) -> NodeFacts:
    """This node's zone and eligibility; raises InvalidObject on a malformed Node."""
    raw = obj.get("metadata")
    name = raw.get("name") if isinstance(raw, Mapping) else None
    f = _Fields("Node", name if isinstance(name, str) else "?")
    meta = f.mapping(obj, "metadata", "metadata")
    zone = f.string(f.mapping(meta, "labels", "metadata.labels"), ZONE_LABEL, f"metadata.labels[{ZONE_LABEL}]")
    deleting = meta.get("deletionTimestamp") is not None
    tainted = False
    for i, taint in enumerate(f.seq(f.mapping(obj, "spec", "spec"), "taints", "spec.taints")):
        if not isinstance(taint, Mapping):
            raise f.fail(f"spec.taints[{i}]", "expected an object")
        tainted |= taint.get("key") == TO_BE_DELETED_TAINT
    return NodeFacts(zone, not deleting and not tainted)


def creation_timestamp(obj: Mapping[str, Any]) -> str:
    """metadata.creationTimestamp as given (manifests often have none: "")."""
    meta = obj.get("metadata")
    value = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    return str(value) if value else ""


__all__ = [
    "InvalidObject",
    "NamespacedName",
    "endpoint_slice",
    "merge_endpoints",
    "object_key",
    "service_state",
    "service_state_ports",
]
