"""ChangeTracker: what a source's events turn into at the next sync."""

from __future__ import annotations

import logging

import pytest

from proxy.model import NamespacedName, ServicePortName, ServiceState
from proxy.tracker import ENDPOINT_SLICES, SERVICES, ChangeTracker
from tests.unit.factories import endpoint, key, make_service, make_slice, service_port


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Tracked:
    """A tracker with a fake clock, counting how often it asked for a sync."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.requests = 0
        self.tracker = ChangeTracker(clock=self.clock, on_change=self._request)

    def _request(self) -> None:
        self.requests += 1


@pytest.fixture
def t() -> Tracked:
    return Tracked()


WEB = NamespacedName("default", "web")
API = NamespacedName("default", "api")
HTTP = ServicePortName("default", "web", "http", "TCP")


def ips(state: ServiceState, name: ServicePortName = HTTP) -> set[str]:
    return {e.ip for e in state.endpoints_of(name)}


def test_new_service_marks_it_dirty_and_requests_a_sync(t: Tracked) -> None:
    assert not t.tracker.dirty
    t.tracker.on_service(WEB, make_service())
    assert t.tracker.dirty
    assert t.requests == 1
    changes = t.tracker.checkout()
    assert list(changes) == [WEB]
    assert [p.name for p in changes[WEB].ports] == [HTTP]


def test_checkout_returns_endpoints_and_clears_pending(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_endpoint_slice(NamespacedName("default", "web-abc12"), make_slice())
    changes = t.tracker.checkout()
    assert ips(changes[WEB]) == {"10.244.1.5"}
    assert not t.tracker.dirty
    assert (t.tracker.service_changes_pending, t.tracker.endpoint_changes_pending) == (0, 0)
    assert t.tracker.oldest_pending is None
    assert t.tracker.checkout() == {}


def test_only_changed_services_are_checked_out(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))
    t.tracker.checkout()
    t.tracker.on_endpoint_slice(NamespacedName("default", "api-1"), make_slice(name="api-1", service="api"))
    assert set(t.tracker.checkout()) == {API}


def test_update_equal_to_current_object_is_not_a_change(t: Tracked) -> None:
    svc, sl = make_service(), make_slice()
    t.tracker.on_service(WEB, svc)
    t.tracker.on_endpoint_slice(key(sl), sl)
    t.tracker.checkout()
    requests = t.requests
    # A resync (or a metadata-only update) delivers the same content again.
    again, sl_again = make_service(), make_slice()
    again["metadata"]["annotations"] = {"note": "only metadata changed"}
    again["metadata"]["resourceVersion"] = sl_again["metadata"]["resourceVersion"] = "2"
    t.tracker.on_service(WEB, again)
    t.tracker.on_endpoint_slice(key(sl_again), sl_again)
    assert not t.tracker.dirty
    assert t.requests == requests
    assert (t.tracker.service_changes_total, t.tracker.endpoint_changes_total) == (1, 1)


def test_deleted_service_checks_out_empty(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_endpoint_slice(NamespacedName("default", "web-abc12"), make_slice())
    t.tracker.checkout()
    t.tracker.on_service(WEB, None)
    assert t.tracker.checkout() == {WEB: ServiceState()}
    assert t.tracker.service_names() == []


def test_service_that_becomes_unproxied_checks_out_empty(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.checkout()
    t.tracker.on_service(WEB, make_service(type="ExternalName", externalName="db.example.com", clusterIP=""))
    assert t.tracker.checkout() == {WEB: ServiceState()}


def test_unproxied_service_is_not_a_change(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service(clusterIP="None"))
    assert not t.tracker.dirty
    assert t.requests == 0


def test_slices_outlive_their_service(t: Tracked) -> None:
    # Service deleted and re-created (kubectl replace --force): its slices still count.
    t.tracker.on_endpoint_slice(NamespacedName("default", "web-abc12"), make_slice())
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_service(WEB, None)
    t.tracker.checkout()
    t.tracker.on_service(WEB, make_service())
    assert ips(t.tracker.checkout()[WEB]) == {"10.244.1.5"}


def test_deleted_slice_removes_its_endpoints(t: Tracked) -> None:
    a = make_slice(name="web-a", endpoints=[endpoint("10.244.1.5")])
    b = make_slice(name="web-b", endpoints=[endpoint("10.244.2.7")])
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_endpoint_slice(key(a), a)
    t.tracker.on_endpoint_slice(key(b), b)
    assert ips(t.tracker.checkout()[WEB]) == {"10.244.1.5", "10.244.2.7"}
    t.tracker.on_endpoint_slice(key(a), None)
    assert ips(t.tracker.checkout()[WEB]) == {"10.244.2.7"}


def test_slice_moving_between_services_updates_both(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))
    sl = make_slice(name="shared-1", service="web")
    t.tracker.on_endpoint_slice(key(sl), sl)
    t.tracker.checkout()
    moved = make_slice(name="shared-1", service="api")
    t.tracker.on_endpoint_slice(key(moved), moved)
    changes = t.tracker.checkout()
    assert set(changes) == {WEB, API}
    assert ips(changes[WEB]) == set()
    assert ips(changes[API], ServicePortName("default", "api", "http", "TCP")) == {"10.244.1.5"}


def test_slice_that_becomes_unproxied_drops_its_endpoints(t: Tracked) -> None:
    sl = make_slice()
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_endpoint_slice(key(sl), sl)
    t.tracker.checkout()
    headless = make_slice(labels={"service.kubernetes.io/headless": ""})
    t.tracker.on_endpoint_slice(key(headless), headless)
    assert ips(t.tracker.checkout()[WEB]) == set()


def test_malformed_service_keeps_last_good_state_and_logs_once(t: Tracked, caplog: pytest.LogCaptureFixture) -> None:
    t.tracker.on_service(WEB, make_service(ports=[service_port("http", 80)]))
    t.tracker.checkout()
    requests = t.requests
    bad = make_service(ports=[service_port("http", 0)])
    with caplog.at_level(logging.ERROR, logger="proxy.tracker"):
        t.tracker.on_service(WEB, bad)
        t.tracker.on_service(WEB, bad)  # a watch resends it
    assert not t.tracker.dirty
    assert t.requests == requests
    assert [p.port for p in t.tracker.state(WEB).ports] == [80]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "default/web" in errors[0].getMessage()
    assert "spec.ports[0].port" in errors[0].getMessage()


def test_malformed_slice_keeps_last_good_endpoints_and_logs_once(
    t: Tracked, caplog: pytest.LogCaptureFixture
) -> None:
    sl = make_slice()
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_endpoint_slice(key(sl), sl)
    t.tracker.checkout()
    bad = make_slice(address_type="IPv6")  # IPv4 addresses in an IPv6 slice
    with caplog.at_level(logging.ERROR, logger="proxy.tracker"):
        t.tracker.on_endpoint_slice(key(bad), bad)
        t.tracker.on_endpoint_slice(key(bad), bad)
    assert not t.tracker.dirty
    assert ips(t.tracker.state(WEB)) == {"10.244.1.5"}
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_new_problem_after_a_good_update_is_logged_again(t: Tracked, caplog: pytest.LogCaptureFixture) -> None:
    bad = make_service(ports=[service_port("http", 0)])
    with caplog.at_level(logging.ERROR, logger="proxy.tracker"):
        t.tracker.on_service(WEB, bad)
        t.tracker.on_service(WEB, make_service())
        t.tracker.on_service(WEB, bad)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert [p.port for p in t.tracker.state(WEB).ports] == [80]


def test_synced_only_after_both_kinds(t: Tracked) -> None:
    assert not t.tracker.synced
    t.tracker.on_synced(SERVICES)
    assert not t.tracker.synced
    t.tracker.on_synced(SERVICES)
    assert not t.tracker.synced
    t.tracker.on_synced(ENDPOINT_SLICES)
    assert t.tracker.synced
    assert t.requests == 2  # each kind's first sync asks for a run, once


def test_pending_and_total_counters(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))  # no change
    sl = make_slice()
    t.tracker.on_endpoint_slice(key(sl), sl)
    assert (t.tracker.service_changes_pending, t.tracker.endpoint_changes_pending) == (2, 1)
    t.tracker.checkout()
    t.tracker.on_endpoint_slice(key(sl), None)
    assert (t.tracker.service_changes_pending, t.tracker.endpoint_changes_pending) == (0, 1)
    assert (t.tracker.service_changes_total, t.tracker.endpoint_changes_total) == (2, 2)


def test_oldest_pending_is_the_first_change(t: Tracked) -> None:
    t.clock.now = 100.0
    t.tracker.on_service(WEB, make_service())
    t.clock.now = 105.0
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))
    assert (t.tracker.oldest_pending, t.tracker.last_queued) == (100.0, 105.0)
    t.tracker.checkout()
    assert t.tracker.oldest_pending is None
    t.clock.now = 110.0
    t.tracker.on_service(WEB, None)
    assert t.tracker.oldest_pending == 110.0


def test_mark_all_recomputes_every_service(t: Tracked) -> None:
    t.tracker.on_service(WEB, make_service())
    t.tracker.on_service(API, make_service(name="api", clusterIP="10.96.0.11"))
    t.tracker.checkout()
    t.tracker.mark_all()
    assert set(t.tracker.checkout()) == {WEB, API}
