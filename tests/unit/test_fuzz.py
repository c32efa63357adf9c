"""Hostile input, property-based: whatever shape an object or a manifest file has, the converters
and the parser give a result or an error naming the object and the field; nothing else escapes.

The example budget is fixed (``FUZZ_EXAMPLES``, default 300 per property) and the run is
derandomized, so CI runs the same cases every time; raise it locally for a deeper search.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import convert
from proxy.sources.manifests import ManifestError, parse
from tests.unit.factories import make_service, make_slice

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Field names the converters look at, so random objects reach deep paths, plus random ones.
KEYS = st.sampled_from([
    "apiVersion", "kind", "metadata", "name", "namespace", "labels", "annotations", "creationTimestamp",
    "deletionTimestamp", "spec", "status", "type", "clusterIP", "clusterIPs", "ports", "port", "targetPort",
    "nodePort", "protocol", "externalIPs", "loadBalancer", "ingress", "ip", "ipMode", "loadBalancerSourceRanges",
    "sessionAffinity", "sessionAffinityConfig", "clientIP", "timeoutSeconds", "externalTrafficPolicy",
    "internalTrafficPolicy", "healthCheckNodePort", "addressType", "endpoints", "addresses", "conditions",
    "ready", "serving", "terminating", "nodeName", "zone", "hints", "forZones", "forNodes", "taints", "key",
    "items", "kubernetes.io/service-name", "topology.kubernetes.io/zone",
]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(["TCP", "UDP", "SCTP", "IPv4", "IPv6", "10.96.0.1", "fd00::1",
                                                     "10.0.0.0/8", "None", "Local", "Cluster", "ClientIP",
                                                     "LoadBalancer", "NodePort", "ExternalName", ""]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
                    max_leaves=40)


def mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid object with some of its fields, at any depth, replaced by random JSON."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(base, ())

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        obj = json.loads(json.dumps(base))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths[1:]))
            target = obj
            try:
                for step in path[:-1]:
                    target = target[step]
                target[path[-1]] = draw(JSON)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier replacement removed this path
        return obj

    return build()


def service_like() -> st.SearchStrategy[Any]:
    svc = make_service(type="LoadBalancer", externalIPs=["203.0.113.5"], externalTrafficPolicy="Local",
                       healthCheckNodePort=31999, ingress=[{"ip": "198.51.100.1"}],
                       loadBalancerSourceRanges=["10.0.0.0/8"], sessionAffinity="ClientIP")
    return mutated(svc) | st.dictionaries(KEYS, JSON, max_size=6)


def slice_like() -> st.SearchStrategy[Any]:
    return mutated(make_slice()) | st.dictionaries(KEYS, JSON, max_size=6)


def node_like() -> st.SearchStrategy[Any]:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {
        "topology.kubernetes.io/zone": "z1"}}, "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}
    return mutated(node) | st.dictionaries(KEYS, JSON, max_size=6)


def _names_a_field(err: convert.InvalidObject) -> None:
    assert err.kind and err.field and err.reason, err
    assert str(err).startswith(f"{err.kind} {err.key}: {err.field}: "), err


@FUZZ
@given(service_like())
def test_any_service_shape_gives_ports_or_a_named_error(obj: dict[str, Any]) -> None:
    try:
        ports = convert.service_state_ports(obj)
    except convert.InvalidObject as e:
        _names_a_field(e)
        return
    for port in ports or ():
        assert 0 < port.port < 65536 and port.protocol in ("TCP", "UDP", "SCTP")


@FUZZ
@given(slice_like())
def test_any_endpoint_slice_shape_gives_a_slice_or_a_named_error(obj: dict[str, Any]) -> None:
    try:
        info = convert.endpoint_slice(obj)
    except convert.InvalidObject as e:
        _names_a_field(e)
        return
    if info is not None:
        assert all(0 < p.port < 65536 or p.port == 0 for p in info.ports), info


@FUZZ
@given(node_like())
def test_any_node_shape_gives_facts_or_a_named_error(obj: dict[str, Any]) -> None:
    try:
        facts = convert.node_facts(obj)
    except convert.InvalidObject as e:
        _names_a_field(e)
        return
    assert isinstance(facts.zone, str) and isinstance(facts.eligible, bool)


DOCS = st.lists(service_like() | slice_like() | node_like() | JSON, max_size=4)


@FUZZ
@given(DOCS, st.sampled_from(["yaml", "json", "cut"]), st.data())
def test_any_manifest_gives_objects_or_an_error_naming_the_file(docs: list[Any], form: str,
                                                               data: st.DataObject) -> None:
    text = json.dumps(docs[0], default=str) if form == "json" and docs else yaml.safe_dump_all(docs)
    if form == "cut":  # a half-saved file: cut anywhere
        text = text[:data.draw(st.integers(0, len(text)))]
    try:
        objects = parse(Path("/m/web.yaml"), text)
    except ManifestError as e:
        assert str(e).startswith("/m/web.yaml"), e
        return
    for (kind, _), obj in objects.items():
        assert obj["kind"] == kind and isinstance(obj["apiVersion"], str)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_gives_objects_or_an_error_naming_the_file(text: str) -> None:
    try:
        parse(Path("/m/x.yaml"), text)
    except ManifestError as e:
        assert str(e).startswith("/m/x.yaml"), e
