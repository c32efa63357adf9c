"""Where Services and EndpointSlices come from. Sources only report; they never touch sockets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from proxy.model import NamespacedName


class Handler(Protocol):
    """What a source calls. ``obj`` is the object in the API server's JSON shape; None = deleted."""

    def on_service(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None: ...

    def on_endpoint_slice(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None: ...

    def on_synced(self, kind: str) -> None:
        """The first full list of ``kind`` ("Service" or "EndpointSlice") has been delivered."""
