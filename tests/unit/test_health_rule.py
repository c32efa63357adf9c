"""ProxierHealth: kube-proxy's stale-sync rule and the /healthz and /livez bodies."""

from __future__ import annotations

import datetime

from proxy.health import ProxierHealth

WALL = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC).timestamp()


class Clocks:
    """A monotonic clock, a wall clock and the tracker's oldest pending change, all by hand."""

    def __init__(self) -> None:
        self.mono = 500.0
        self.wall = WALL
        self.queued: float | None = None

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def health(self, timeout: float = 60.0) -> ProxierHealth:
        return ProxierHealth(timeout=timeout, queued_since=lambda: self.queued,
                             clock=lambda: self.mono, wall=lambda: self.wall)


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_healthy_with_nothing_pending() -> None:
    c = Clocks()
    h = c.health()
    assert h.healthy()  # also at startup, before any sync
    c.advance(3600)
    assert h.healthy()


def test_unhealthy_once_a_change_waited_longer_than_timeout() -> None:
    c = Clocks()
    h = c.health(timeout=60)
    c.queued = c.mono
    c.advance(59.9)
    assert h.healthy()
    c.advance(0.1)
    assert not h.healthy()


def test_healthy_again_once_the_change_is_applied() -> None:
    c = Clocks()
    h = c.health(timeout=60)
    c.queued = c.mono
    c.advance(120)
    assert not h.healthy()
    c.queued = None  # the sync checked it out
    h.updated()
    assert h.healthy()


def test_recent_change_after_long_idle_is_healthy() -> None:
    c = Clocks()
    h = c.health(timeout=60)
    c.advance(3600)
    c.queued = c.mono - 1
    assert h.healthy()


def test_last_updated_is_current_time_while_healthy() -> None:
    c = Clocks()
    h = c.health()
    h.updated()
    c.advance(30)
    for with_node in (True, False):
        body = h.body(with_node=with_node)
        assert body["lastUpdated"] == body["currentTime"] == rfc3339(c.wall)


def test_last_updated_is_last_sync_while_unhealthy() -> None:
    c = Clocks()
    h = c.health(timeout=60)
    h.updated()
    synced_at = c.wall
    c.advance(10)
    c.queued = c.mono
    c.advance(61)
    body = h.body(with_node=False)
    assert body == {"lastUpdated": rfc3339(synced_at), "currentTime": rfc3339(c.wall)}


def test_node_not_eligible() -> None:
    c = Clocks()
    h = c.health()
    h.updated()
    synced_at = c.wall
    c.advance(5)
    h.node_eligible = False
    healthz = h.body(with_node=True)
    assert healthz["nodeEligible"] is False
    assert healthz["lastUpdated"] == rfc3339(synced_at)  # /healthz is unhealthy: no "recent" lastUpdated
    # /livez ignores node deletion: still healthy, no nodeEligible field.
    assert h.healthy()
    assert h.body(with_node=False) == {"lastUpdated": rfc3339(c.wall), "currentTime": rfc3339(c.wall)}


def test_node_eligible_by_default() -> None:
    assert Clocks().health().body(with_node=True)["nodeEligible"] is True
