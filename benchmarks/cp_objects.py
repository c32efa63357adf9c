"""The Services and EndpointSlices of the control-plane benchmark, all on loopback addresses.

Service ``i`` (``svc-00042`` in namespace ``ns-<i mod 10>``) has clusterIP ``127.10.0.0 + 1 + i``
and one TCP port 80 (name ``http``, targetPort 8080), and one EndpointSlice. Its endpoints live
in one of two *generations*, so a change can be told apart from the old state by the address a
connection reaches: generation 0 is ``127.20.0.0/14``, generation 1 ``127.24.0.0/14``, endpoint
``j`` of service ``i`` at offset ``i * per_service + j + 1``. Every address is in 127.0.0.0/8,
so all are local already: svcproxy adds no address and nothing can leave the host.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Obj = dict[str, Any]

CLUSTER_BASE = int(ipaddress.IPv4Address("127.10.0.0"))
ENDPOINT_BASES = (int(ipaddress.IPv4Address("127.20.0.0")), int(ipaddress.IPv4Address("127.24.0.0")))
GENERATION_SIZE = 1 << 18  # a /14 per generation
MAX_SERVICES = int(ipaddress.IPv4Address("127.20.0.0")) - CLUSTER_BASE - 2
SERVICE_PORT = 80
TARGET_PORT = 8080
NAMESPACES = 10
NODES = 50


def name(i: int) -> str:
    return f"svc-{i:05d}"


def namespace(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def cluster_ip(i: int) -> str:
    return str(ipaddress.IPv4Address(CLUSTER_BASE + 1 + i))


def endpoint_ip(i: int, j: int, per_service: int, generation: int) -> str:
    return str(ipaddress.IPv4Address(ENDPOINT_BASES[generation] + i * per_service + j + 1))


def generation_of(ip: str) -> int | None:
    """Which generation an endpoint address belongs to (None: not an endpoint address)."""
    value = int(ipaddress.IPv4Address(ip))
    for gen, base in enumerate(ENDPOINT_BASES):
        if base < value <= base + GENERATION_SIZE - 1:
            return gen
    return None


def check_scale(services: int, per_service: int) -> str | None:
    """Why this scale does not fit the address plan, or None."""
    if not 1 <= services <= MAX_SERVICES:
        return f"--services must be in [1, {MAX_SERVICES}]"
    if not 1 <= per_service <= 1000 or services * per_service >= GENERATION_SIZE - 1:
        return f"--endpoints-per-service must be in [1, 1000] with services x endpoints < {GENERATION_SIZE - 1}"
    return None


def service(i: int, *, ip: str | None = None, svc_name: str | None = None, ns: str | None = None) -> Obj:
    ip = ip or cluster_ip(i)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc_name or name(i), "namespace": ns or namespace(i), "labels": {"app": name(i)}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "selector": {"app": svc_name or name(i)},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": TARGET_PORT}],
        },
    }


def endpoint_slice(i: int, ips: list[str], *, port: int = TARGET_PORT, svc_name: str | None = None,
                   ns: str | None = None) -> Obj:
    """The one slice of service ``i``, shaped like the EndpointSlice controller's."""
    svc = svc_name or name(i)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-x7k2q",
            "namespace": ns or namespace(i),
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": port}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{(i + j) % NODES}",
                "targetRef": {"kind": "Pod", "namespace": ns or namespace(i), "name": f"{svc}-{j}"},
            }
            for j, ip in enumerate(ips)
        ],
    }


def endpoints(i: int, per_service: int, generation: int) -> list[str]:
    return [endpoint_ip(i, j, per_service, generation) for j in range(per_service)]


def all_objects(services: int, per_service: int) -> list[Obj]:
    """Every Service, then every EndpointSlice, all in generation 0."""
    objs = [service(i) for i in range(services)]
    objs += [endpoint_slice(i, endpoints(i, per_service, 0)) for i in range(services)]
    return objs
