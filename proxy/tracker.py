"""Change tracking: sources record Service and EndpointSlice changes here; a sync checks them out.

Handlers do no dataplane work (kube-proxy's pattern): they convert the object, remember it, mark
its Service dirty and ask for a sync. ``checkout()`` hands the sync the new state of every dirty
Service. A malformed object is logged once and ignored, so the last good state keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from proxy import convert
from proxy.model import EndpointSliceInfo, NamespacedName, ServicePort, ServiceState

logger = logging.getLogger(__name__)

SERVICES = "Service"
ENDPOINT_SLICES = "EndpointSlice"


class ChangeTracker:
    """Holds the converted objects of every source and which Services changed since the last sync.

    Implements the handler protocol that sources call (``proxy.sources.Handler``).
    """

    def __init__(self, *, clock: Callable[[], float], on_change: Callable[[], None]) -> None:
        self._clock = clock
        self._on_change = on_change
        self._ports: dict[NamespacedName, tuple[ServicePort, ...]] = {}
        self._created: dict[NamespacedName, str] = {}
        # Slices per Service, then per slice name: a Service's endpoints span many slices.
        self._slices: dict[NamespacedName, dict[str, EndpointSliceInfo]] = {}
        self._slice_owner: dict[NamespacedName, NamespacedName] = {}
        self._dirty: set[NamespacedName] = set()
        self._errors: dict[tuple[str, NamespacedName], str] = {}
        self._synced: set[str] = set()
        self.oldest_pending: float | None = None
        """When the oldest change not yet checked out arrived (monotonic clock); None if none."""
        self.last_queued: float | None = None
        """When the latest change arrived (monotonic clock)."""
        self.service_changes_pending = 0
        self.endpoint_changes_pending = 0
        self.service_changes_total = 0
        self.endpoint_changes_total = 0

    # -- handler protocol -------------------------------------------------------------------

    def on_service(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None:
        """A Service was added or updated (obj) or deleted (None)."""
        ports: tuple[ServicePort, ...] | None = None
        if obj is not None:
            try:
                ports = convert.service_state_ports(obj)
            except convert.InvalidObject as e:
                self._invalid(SERVICES, key, e)
                return
        self._errors.pop((SERVICES, key), None)
        old = self._ports.get(key)
        if ports is None:
            self._ports.pop(key, None)
            self._created.pop(key, None)
        else:
            self._ports[key] = ports
            self._created[key] = convert.creation_timestamp(obj or {})
        if old != ports:
            self.service_changes_pending += 1
            self.service_changes_total += 1
            self._mark(key)

    def on_endpoint_slice(self, key: NamespacedName, obj: Mapping[str, Any] | None) -> None:
        """An EndpointSlice was added or updated (obj) or deleted (None)."""
        info: EndpointSliceInfo | None = None
        if obj is not None:
            try:
                info = convert.endpoint_slice(obj)
            except convert.InvalidObject as e:
                self._invalid(ENDPOINT_SLICES, key, e)
                return
        self._errors.pop((ENDPOINT_SLICES, key), None)
        changed: set[NamespacedName] = set()
        # A slice may have moved to another Service (label changed): drop it from the old one.
        owner = self._slice_owner.pop(key, None)
        if owner is not None and (info is None or info.service_key != owner):
            old_slices = self._slices.get(owner, {})
            if old_slices.pop(key.name, None) is not None:
                changed.add(owner)
            if not old_slices:
                self._slices.pop(owner, None)
        if info is not None:
            svc = info.service_key
            slices = self._slices.setdefault(svc, {})
            if slices.get(key.name) != info:
                slices[key.name] = info
                changed.add(svc)
            self._slice_owner[key] = svc
        if changed:
            self.endpoint_changes_pending += 1
            self.endpoint_changes_total += 1
            for svc in changed:
                self._mark(svc)

    def on_synced(self, kind: str) -> None:
        """A source finished its first full list of ``kind`` (Service or EndpointSlice)."""
        if kind not in self._synced:
            self._synced.add(kind)
            self._on_change()

    # -- sync side --------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once Services and EndpointSlices have both been listed in full."""
        return {SERVICES, ENDPOINT_SLICES} <= self._synced

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def service_names(self) -> list[NamespacedName]:
        return list(self._ports)

    def checkout(self) -> dict[NamespacedName, ServiceState]:
        """The current state of every Service changed since the last checkout (empty if gone)."""
        changes = {key: self.state(key) for key in self._dirty}
        self._dirty.clear()
        self.oldest_pending = None
        self.service_changes_pending = 0
        self.endpoint_changes_pending = 0
        return changes

    def state(self, key: NamespacedName) -> ServiceState:
        ports = self._ports.get(key)
        if not ports:
            return ServiceState()
        return convert.service_state(ports, self._slices.get(key, {}).values(), self._created.get(key, ""))

    def mark_all(self) -> None:
        """Recompute every Service at the next sync (node addresses changed, say)."""
        for key in self._ports:
            self._mark(key)

    def _mark(self, key: NamespacedName) -> None:
        self.last_queued = self._clock()
        if self.oldest_pending is None:
            self.oldest_pending = self.last_queued
        self._dirty.add(key)
        self._on_change()

    def _invalid(self, kind: str, key: NamespacedName, err: convert.InvalidObject) -> None:
        # Log each distinct problem once; a watch may resend the same bad object many times.
        if self._errors.get((kind, key)) != str(err):
            self._errors[(kind, key)] = str(err)
            logger.error("ignoring invalid %s (keeping its last good state): %s", kind, err)
