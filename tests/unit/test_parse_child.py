"""Large manifests are parsed in a child process: the same objects as parsing here, the same
errors, long lists sent in bounded frames, and a parse that takes too long refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.model import NamespacedName
from proxy.sources import parse_child
from proxy.sources.manifests import INLINE_BYTES, ManifestError, load, parse
from tests.unit.factories import make_service, make_slice


def big_slice(count: int, name: str = "web-abc12") -> dict[str, Any]:
    obj = make_slice(name=name)
    obj["endpoints"] = [{"addresses": [f"10.1.{i >> 8}.{i & 255}"], "conditions": {"ready": True}}
                        for i in range(count)]
    return obj


def many_ports(count: int) -> dict[str, Any]:
    svc = make_service()
    svc["spec"]["ports"] = [{"name": f"p{i}", "port": 1000 + i, "protocol": "TCP"} for i in range(count)]
    return svc


def framed(objects: dict[Any, dict[str, Any]]) -> bytes:
    return parse_child.OK + b"".join(parse_child.encode(objects))


def test_a_large_file_parsed_in_a_child_gives_the_same_objects(tmp_path: Path) -> None:
    text = yaml.safe_dump_all([many_ports(2500), big_slice(5001),
                               {"apiVersion": "v1", "kind": "List", "items": [big_slice(3, name="other")]}])
    raw = text.encode()
    assert len(raw) > INLINE_BYTES
    objects = load(tmp_path / "big.yaml", raw)
    assert objects == parse(tmp_path / "big.yaml", text)
    assert len(objects["EndpointSlice", NamespacedName("default", "web-abc12")]["endpoints"]) == 5001


def test_long_lists_travel_in_bounded_frames() -> None:
    objects = {("EndpointSlice", "a"): big_slice(2 * parse_child.CHUNK + 5)}
    frames = list(parse_child.encode(copy.deepcopy(objects)))
    assert len(frames) == 1 + 1 + 3  # the count, the header, three chunks of endpoints
    assert max(len(f) for f in frames) < 100_000
    assert parse_child.decode(framed(objects)) == objects


def test_a_list_shared_by_two_objects_through_an_alias_reaches_both_whole(tmp_path: Path) -> None:
    endpoints = big_slice(parse_child.CHUNK + 1)["endpoints"]
    first, second = make_slice(name="a"), make_slice(name="b")
    first["endpoints"] = second["endpoints"] = endpoints  # as YAML anchors load
    objects = parse_child.decode(framed({"a": first, "b": second}))
    assert objects["a"]["endpoints"] == objects["b"]["endpoints"] == endpoints


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.dictionaries(st.text(max_size=3), JSON | st.lists(st.integers(), min_size=1000, max_size=2100)
                       | st.dictionaries(st.text(max_size=2), st.lists(st.none(), max_size=2100), max_size=2),
                       max_size=4))
def test_any_object_survives_the_frames(obj: dict[str, Any]) -> None:
    assert parse_child.decode(framed({"k": obj})) == {"k": obj}


@pytest.mark.parametrize(("tail", "message"), [
    ("kind: [unclosed\n", r"^big.yaml:\d+: "),
    ("- not\n- an object\n", r"^big.yaml: document \d+: expected an object"),
])
def test_a_child_names_the_file_as_parsing_here_does(tail: str, message: str) -> None:
    text = yaml.safe_dump_all([big_slice(1500)]) + "---\n" + tail
    with pytest.raises(ManifestError, match=message) as child:
        load(Path("big.yaml"), text.encode())
    with pytest.raises(ManifestError) as here:
        parse(Path("big.yaml"), text)
    assert str(child.value) == str(here.value)


def test_a_large_file_that_is_not_utf8_is_named() -> None:
    raw = yaml.safe_dump(big_slice(1500)).encode() + b"\xff\xfe"
    with pytest.raises(ManifestError, match=r"^big.yaml: not UTF-8"):
        load(Path("big.yaml"), raw)


def test_a_parse_that_takes_too_long_is_refused() -> None:
    with pytest.raises(parse_child.ChildError, match=r"^big.yaml: parsing took more than"):
        parse_child.parse(Path("big.yaml"), json.dumps(big_slice(20_000)).encode(), timeout=0.05)
