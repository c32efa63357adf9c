"""Builders for Service and EndpointSlice objects in the exact JSON shape the API server serves.

Keyword tweaks use the API's own (camelCase) field names, so a test reads like the YAML it stands
for: ``make_service("ns", "web", type="NodePort", externalIPs=["203.0.113.5"])``. Every builder
returns a fresh dict, so tests may mutate the result to make it malformed.
"""

from __future__ import annotations

import uuid
from typing import Any

from proxy import convert
from proxy.model import NamespacedName, ServiceState


def _meta(
    kind: str, ns: str, name: str, labels: dict[str, str] | None, annotations: dict[str, str] | None
) -> dict[str, Any]:
    # Deterministic, so building the same object twice gives equal dicts (as a resync would).
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{ns}/{name}")),
        "resourceVersion": "1",
        "creationTimestamp": "2024-05-01T12:00:00Z",
    }
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def service_port(
    name: str = "http", port: int = 80, protocol: str = "TCP", *, target_port: int | str | None = None,
    node_port: int | None = None,
) -> dict[str, Any]:
    """One entry of ``spec.ports``."""
    p: dict[str, Any] = {"name": name, "protocol": protocol, "port": port,
                         "targetPort": port if target_port is None else target_port}
    if node_port is not None:
        p["nodePort"] = node_port
    return p


def make_service(
    ns: str = "default",
    name: str = "web",
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ingress: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A v1 Service. ``spec`` keys override the defaults (a ClusterIP service on 10.96.0.10:80).

    ``clusterIP=`` alone also sets ``clusterIPs`` (and ``ipFamilies``) as the API server does,
    unless ``clusterIPs=`` is given too. ``ingress=`` fills ``status.loadBalancer.ingress``.
    """
    body: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "ports": [service_port()],
        "selector": {"app": name},
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
        "ipFamilyPolicy": "SingleStack",
    }
    body.update(spec)
    cluster_ip = body["clusterIP"]
    if "clusterIPs" not in spec and cluster_ip not in ("", "None", None):
        body["clusterIPs"] = [cluster_ip]
    if "clusterIPs" in body and "ipFamilies" not in spec:
        body["ipFamilies"] = ["IPv6" if ":" in str(ip) else "IPv4" for ip in body["clusterIPs"]]
    if body["type"] in ("NodePort", "LoadBalancer") and "externalTrafficPolicy" not in spec:
        body["externalTrafficPolicy"] = "Cluster"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta("Service", ns, name, labels, annotations),
        "spec": body,
        "status": {"loadBalancer": {"ingress": list(ingress)} if ingress else {}},
    }


def endpoint(
    *addresses: str,
    ready: bool | None = True,
    serving: bool | None = True,
    terminating: bool | None = False,
    node: str | None = "node-a",
    zone: str | None = None,
    zone_hints: list[str] | None = None,
    node_hints: list[str] | None = None,
) -> dict[str, Any]:
    """One entry of an EndpointSlice's ``endpoints``. A condition passed as None is left out."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    ep: dict[str, Any] = {
        "addresses": list(addresses),
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "namespace": "default", "name": f"pod-{addresses[0] if addresses else ''}"},
    }
    if node is not None:
        ep["nodeName"] = node
    if zone is not None:
        ep["zone"] = zone
    hints = {}
    if zone_hints is not None:
        hints["forZones"] = [{"name": z} for z in zone_hints]
    if node_hints is not None:
        hints["forNodes"] = [{"name": n} for n in node_hints]
    if hints:
        ep["hints"] = hints
    return ep


def slice_port(name: str = "http", port: int = 8080, protocol: str = "TCP") -> dict[str, Any]:
    """One entry of an EndpointSlice's ``ports`` (the port is the resolved targetPort)."""
    return {"name": name, "protocol": protocol, "port": port}


def make_slice(
    ns: str = "default",
    name: str = "web-abc12",
    service: str | None = "web",
    *,
    endpoints: list[dict[str, Any]] | None = None,
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice owned by ``service`` (None: no service-name label)."""
    all_labels = {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    if service is not None:
        all_labels[convert.SERVICE_NAME_LABEL] = service
    all_labels.update(labels or {})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta("EndpointSlice", ns, name, all_labels, None),
        "addressType": address_type,
        "endpoints": [endpoint("10.244.1.5")] if endpoints is None else endpoints,
        "ports": [slice_port()] if ports is None else ports,
    }


def key(obj: dict[str, Any]) -> NamespacedName:
    return NamespacedName(obj["metadata"]["namespace"], obj["metadata"]["name"])


def state_of(svc: dict[str, Any], *slices: dict[str, Any]) -> ServiceState:
    """The ServiceState a sync would see for this Service and its slices."""
    ports = convert.service_state_ports(svc)
    assert ports is not None, "state_of() needs a Service that is proxied"
    infos = [convert.endpoint_slice(s) for s in slices]
    return convert.service_state(ports, [i for i in infos if i is not None], convert.creation_timestamp(svc))
