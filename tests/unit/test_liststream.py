"""proxy.sources.liststream: a LIST body decoded item by item, however it is cut into chunks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sources.liststream import ListDecoder

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def decode(body: bytes, cuts: list[int]) -> tuple[list[Any], dict[str, Any]]:
    decoder = ListDecoder()
    items: list[Any] = []
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        items += decoder.feed(body[start:cut])
        start = max(start, cut)
    items += decoder.feed(body[start:])
    items += decoder.close()
    return items, decoder.fields


@settings(max_examples=300, deadline=None)
@given(items=st.lists(json_values, max_size=6), meta=json_values, cuts=st.lists(st.integers(0, 10_000), max_size=12),
       indent=st.sampled_from([None, 1]), items_first=st.booleans())
def test_any_chunking_gives_what_json_loads_gives(items: list[Any], meta: Any, cuts: list[int], indent: int | None,
                                                  items_first: bool) -> None:
    doc = {"items": items, "kind": "List", "metadata": meta} if items_first else \
        {"kind": "List", "metadata": meta, "items": items}
    body = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    got_items, fields = decode(body, cuts)
    assert got_items == items
    assert fields == {"kind": "List", "metadata": meta}


def test_items_come_out_as_soon_as_they_are_complete() -> None:
    decoder = ListDecoder()
    assert decoder.feed(b'{"metadata": {"resourceVersion": "7"}, "items": [{"a": 1}, {"b"') == [{"a": 1}]
    assert decoder.fields == {"metadata": {"resourceVersion": "7"}}
    # An item cut short is tried again once enough has come (here: the end of the body).
    assert decoder.feed(b": 2}]}") == []
    assert decoder.close() == [{"b": 2}]


def test_a_multibyte_character_split_between_chunks() -> None:
    body = json.dumps({"items": [{"name": "café ☕"}]}, ensure_ascii=False).encode()
    cut = body.index("☕".encode()) + 1
    assert decode(body, [cut])[0] == [{"name": "café ☕"}]


def test_a_huge_item_is_not_reparsed_on_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.sources import liststream

    calls = 0
    real = liststream._DECODER.raw_decode

    def counting(s: str, i: int = 0) -> tuple[Any, int]:
        nonlocal calls
        calls += 1
        return real(s, i)

    monkeypatch.setattr(liststream._DECODER, "raw_decode", counting)
    endpoints = [{"addresses": [f"10.0.{i // 250}.{i % 250}"]} for i in range(50_000)]
    raw = json.dumps({"items": [{"endpoints": endpoints}]}).encode()
    decoder = ListDecoder()
    items = []
    for start in range(0, len(raw), 4096):  # ~600 chunks
        items += decoder.feed(raw[start:start + 4096])
    items += decoder.close()
    assert len(items) == 1 and len(items[0]["endpoints"]) == 50_000
    assert calls < 30  # tries grow geometrically, not one per chunk


@pytest.mark.parametrize("body, message", [
    (b'[{"a": 1}]', "expected a JSON object"),
    (b'{"items": {"a": 1}}', "items is not a list"),
    (b'{"kind": "List"}', "no items"),
    (b'{"items": [{"a": 1}', "ended before the list did"),
    (b'{"items": [{"a": 1}]} x', "data after the list"),
    (b'{"items": [{"a": 1} {"b": 2}]}', "expected ',' or ']'"),
])
def test_bad_bodies_are_errors(body: bytes, message: str) -> None:
    decoder = ListDecoder()
    with pytest.raises(ValueError, match=message):
        decoder.feed(body)
        decoder.close()


@pytest.mark.parametrize("cut", range(1, 40))
def test_numbers_cut_anywhere(cut: int) -> None:
    """The decoder stops before a lone "." or "e": "1." must wait for the rest of "1.5e-3"."""
    body = b'{"items": [1.5e-3, -0.0, 12], "metadata": {"n": 7}}'
    assert decode(body, [cut]) == ([1.5e-3, -0.0, 12], {"metadata": {"n": 7}})
