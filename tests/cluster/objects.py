"""Kubernetes objects for the cluster tier, as a user would write them (the API fills the rest)."""

from __future__ import annotations

from typing import Any

NAMESPACE = "demo"
IMAGE = "testbed/podserver"  # ignored by the kubelet stand-in: every container is testbed/podserver.py


def namespace(name: str = NAMESPACE) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def deployment(name: str, replicas: int, *, version: str = "1", grace: int = 5,
               ports: tuple[int, ...] = (8080,)) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"testbed/version": version}},
                "spec": {"terminationGracePeriodSeconds": grace,
                         "containers": [{"name": "web", "image": IMAGE,
                                         "ports": [{"name": f"p{p}", "containerPort": p} for p in ports]}]},
            },
        },
    }


def service(name: str, *, type: str = "ClusterIP", port: int = 80, target: int | str = "p8080",
            node_port: int = 0, selector: str | None = None, **spec: Any) -> dict[str, Any]:
    port_spec: dict[str, Any] = {"name": "http", "protocol": "TCP", "port": port, "targetPort": target}
    if node_port:
        port_spec["nodePort"] = node_port
    body: dict[str, Any] = {"type": type, "ports": [port_spec], **spec}
    if selector is not None:
        body["selector"] = {"app": selector}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": body}
