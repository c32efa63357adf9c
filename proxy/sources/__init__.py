"""Where Services and EndpointSlices come from. Sources only report; they never touch sockets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

from proxy.model import NamespacedName


class Handler(Protocol):
    """What a source calls. ``obj`` is the object in the API server's JSON shape; None = deleted."""

    def on_service(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None: ...

    def on_endpoint_slice(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None: ...

    def on_synced(self, kind: str) -> None:
        """The first full list of ``kind`` ("Service" or "EndpointSlice") has been delivered."""


class WatchStats:
    """Counts kept by the API source, read by the metrics collector at scrape time."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        """(kind, event type) -> watch events received, BOOKMARK and ERROR included."""
        self.lists: Counter[str] = Counter()
        """kind -> full lists (the first, and each relist after a 410)."""
        self.pages: Counter[str] = Counter()
        """kind -> LIST responses (pages of ``limit`` items)."""
        self.expired: Counter[str] = Counter()
        """kind -> resourceVersions that expired (410), as an ERROR event or an HTTP status."""
