"""Decode a Kubernetes LIST response while it arrives, one item at a time.

The first LIST is served from the API server's watch cache (resourceVersion "0"), which ignores
``limit``: at 10,000 EndpointSlices that is one 21 MiB JSON document. Decoded in one piece it is
about a million Python objects alive at once, and the allocator keeps that peak: svcproxy's RSS
stayed ~90 MiB higher for good. Decoded item by item, only the items of the latest chunk exist
as JSON objects at any time; each is converted and dropped before the next chunk is read.

The document is ``{"kind": ..., "metadata": {...}, "items": [{...}, ...]}`` (fields in any order).
Top-level fields other than ``items`` are kept whole; each item is decoded with the standard
library's decoder (``raw_decode``) as soon as it is complete. A truncated value is simply retried
when more data has come, and only once the pending text has doubled, so a single huge item (a
50,000-endpoint slice) is not re-parsed from its start on every chunk.
"""

from __future__ import annotations

import codecs
import enum
import json
import re
from typing import Any

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_MIN_RETRY = 16 * 1024
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*[ \t\n\r]*\Z")
"""What may follow a number when the buffer ends in it (a match fails at the first delimiter)."""


def _skip_ws(s: str, i: int) -> int:
    match = _WS.match(s, i)
    return match.end() if match else i  # the pattern matches the empty string: always a match


class _At(enum.Enum):
    START = enum.auto()  # before the opening brace
    FIRST_KEY = enum.auto()  # after it: a key or the closing brace
    KEY = enum.auto()
    VALUE = enum.auto()
    AFTER_VALUE = enum.auto()  # a comma or the closing brace
    FIRST_ITEM = enum.auto()  # after "items": [
    ITEM = enum.auto()
    AFTER_ITEM = enum.auto()  # a comma or the closing bracket
    DONE = enum.auto()


_PUNCTUATION = {
    (_At.START, "{"): _At.FIRST_KEY,
    (_At.FIRST_KEY, "}"): _At.DONE,
    (_At.AFTER_VALUE, "}"): _At.DONE,
    (_At.AFTER_VALUE, ","): _At.KEY,
    (_At.FIRST_ITEM, "]"): _At.AFTER_VALUE,
    (_At.AFTER_ITEM, "]"): _At.AFTER_VALUE,
    (_At.AFTER_ITEM, ","): _At.ITEM,
}
"""The structural characters each place allows, and where each leads."""
_EXPECTED = {_At.START: "a JSON object", _At.AFTER_VALUE: "',' or '}'", _At.AFTER_ITEM: "',' or ']'"}
"""Places where only punctuation may come."""


class ListDecoder:
    """Feed it the body's bytes; each :meth:`feed` returns the items completed so far."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        """The top-level fields other than ``items`` (``metadata`` has the resourceVersion)."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._pending: list[str] = []
        self._pending_len = 0
        self._text = ""
        self._at = _At.START
        self._key = ""
        self._saw_items = False
        self._retry_at = 0
        self._error: json.JSONDecodeError | None = None

    def feed(self, data: bytes) -> list[Any]:
        chunk = self._utf8.decode(data)
        if chunk:
            self._pending.append(chunk)
            self._pending_len += len(chunk)
        if len(self._text) + self._pending_len < self._retry_at:
            return []  # a value is incomplete and not enough has come to be worth another try
        return self._scan()

    def close(self) -> list[Any]:
        """The body has ended: return the last items (those still waiting for a retry), or raise
        ValueError if it was not one whole list. ``fields`` is complete now."""
        self._pending.append(self._utf8.decode(b"", final=True))
        self._retry_at = 0
        last = self._scan()
        if self._at is not _At.DONE:
            where = f": {self._error.msg} at {self._error.pos}" if self._error else ""
            raise ValueError(f"list response ended before the list did{where}")
        if _skip_ws(self._text, 0) != len(self._text):
            raise ValueError("list response: data after the list")
        if not self._saw_items:
            raise ValueError("list response has no items")
        return last

    def _scan(self) -> list[Any]:
        if self._pending:
            self._text += "".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
        s, i, out = self._text, 0, []
        n = len(s)
        while True:
            i = _skip_ws(s, i)
            if i >= n or self._at is _At.DONE:
                break
            c, at = s[i], self._at
            step = _PUNCTUATION.get((at, c))
            if step is not None:
                i += 1
                self._at = step
            elif at in _EXPECTED:
                raise ValueError(f"list response: expected {_EXPECTED[at]} at {i}")
            elif at in (_At.FIRST_KEY, _At.KEY):
                decoded = self._value(s, i)
                if decoded is None:
                    break
                key, j = decoded
                j = _skip_ws(s, j)
                if j >= n:
                    break  # the colon has not come yet: read the key again then
                if not isinstance(key, str) or s[j] != ":":
                    raise ValueError(f"list response: expected a key and ':' at {i}")
                self._key, i = key, j + 1
                self._at = _At.VALUE
            elif at is _At.VALUE:
                if self._key == "items":
                    if c != "[":
                        raise ValueError("list response: items is not a list")
                    self._saw_items = True
                    i += 1
                    self._at = _At.FIRST_ITEM
                    continue
                decoded = self._value(s, i)
                if decoded is None:
                    break
                self.fields[self._key], i = decoded
                self._at = _At.AFTER_VALUE
            else:  # FIRST_ITEM or ITEM: an item
                decoded = self._value(s, i)
                if decoded is None:
                    break
                item, i = decoded
                out.append(item)
                self._at = _At.AFTER_ITEM
        self._text = s[i:]
        return out

    def _value(self, s: str, i: int) -> tuple[Any, int] | None:
        """The JSON value at ``i`` and where it ends, or None when it is not all here yet."""
        try:
            value, end = _DECODER.raw_decode(s, i)
        except json.JSONDecodeError as e:
            self._error = e
            # Measured from i: the text before it is dropped when the scan stops here.
            self._retry_at = len(s) - i + max(_MIN_RETRY, len(s) - i)
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _NUMBER_TAIL.match(s, end):
            # The buffer ends in or right after a number, which may go on in the next chunk:
            # "12" of "123", or "1" of "1.5" (the decoder stops before a lone "." or "e").
            self._retry_at = len(s) - i + 1
            return None
        self._error = None
        return value, end
