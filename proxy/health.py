"""kube-proxy's health rule and its /healthz and /livez endpoints.

Healthy unless a change has been queued for longer than ``2 * syncPeriod`` without being
applied (a stale sync). ``/healthz`` also requires the node to be eligible (not being deleted);
``/livez`` does not. Bodies and headers match kube-proxy so existing probes and LB checks work.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

from aiohttp import web

from proxy import metrics


class ProxierHealth:
    """The pure rule; the clock is injected. ``queued_since`` reads the tracker's oldest change."""

    def __init__(
        self,
        *,
        timeout: float,
        queued_since: Callable[[], float | None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self._queued_since = queued_since
        self._clock = clock
        self._wall = wall
        self.last_updated: float | None = None
        """Wall-clock time of the last successful sync."""
        self.node_eligible = True

    def updated(self) -> None:
        self.last_updated = self._wall()

    def healthy(self) -> bool:
        queued = self._queued_since()
        return queued is None or self._clock() - queued < self.timeout

    def body(self, *, with_node: bool) -> dict[str, object]:
        now = self._wall()
        healthy = self.healthy() and (self.node_eligible or not with_node)
        # kube-proxy reports lastUpdated as the current time while healthy (for compatibility).
        last = now if healthy else self.last_updated
        body: dict[str, object] = {"lastUpdated": _rfc3339(last), "currentTime": _rfc3339(now)}
        if with_node:
            body["nodeEligible"] = self.node_eligible
        return body


def _rfc3339(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


def routes(health: ProxierHealth) -> list[web.RouteDef]:
    """Handlers for /healthz and /livez, counted in kubeproxy_proxy_{healthz,livez}_total."""

    async def healthz(_: web.Request) -> web.Response:
        ok = health.healthy() and health.node_eligible
        return _reply(health.body(with_node=True), ok, metrics.healthz_total)

    async def livez(_: web.Request) -> web.Response:
        return _reply(health.body(with_node=False), health.healthy(), metrics.livez_total)

    return [web.get("/healthz", healthz), web.get("/livez", livez)]


def _reply(body: dict[str, object], ok: bool, counter: metrics.Counter) -> web.Response:
    code = 200 if ok else 503
    counter.labels(code=str(code)).inc()
    return web.json_response(body, status=code, headers={"X-Content-Type-Options": "nosniff"})
