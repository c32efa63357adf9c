"""proxy.sources.kube against the fake API server, through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio.config import ConfigException

from proxy.model import NamespacedName
from proxy.sources import kube
from proxy.tracker import ChangeTracker
from testbed.fakeapi import FakeApiServer

NODE = "node-a"
FAST = kube.WatchSettings(
    watch_timeout_min=300, watch_timeout_max=300, watch_idle_timeout=5.0, connect_timeout=1.0,
    backoff_initial=0.05, backoff_max=0.2,
)
OTHER_PROXY = {"service.kubernetes.io/service-proxy-name": "other"}


def service(name: str, ns: str = "default", ip: str = "10.96.0.10", labels: dict[str, str] | None = None,
            port: int = 80) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}}


def endpoint_slice(name: str, svc: str, ips: tuple[str, ...] = ("10.244.1.5",), ns: str = "default",
                   labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc, **(labels or {})}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips]}


def node(name: str, zone: str = "z1") -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}


def key(name: str, ns: str = "default") -> NamespacedName:
    return NamespacedName(ns, name)


class Recorder:
    """A Handler that keeps every call and the resulting state, plus an awaitable "something changed"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.services: dict[NamespacedName, Mapping[str, Any]] = {}
        self.slices: dict[NamespacedName, Mapping[str, Any]] = {}
        self.node: Mapping[str, Any] | None = None
        self.synced: list[str] = []
        self._tick = asyncio.Event()

    def _record(self, call: tuple[str, Any, Any]) -> None:
        self.calls.append(call)
        self._tick.set()
        self._tick = asyncio.Event()

    def on_service(self, k: NamespacedName, obj: Mapping[str, Any] | None) -> None:
        _store(self.services, k, obj)
        self._record(("Service", k, obj))

    def on_endpoint_slice(self, k: NamespacedName, obj: Mapping[str, Any] | None) -> None:
        _store(self.slices, k, obj)
        self._record(("EndpointSlice", k, obj))

    def on_synced(self, kind: str) -> None:
        self.synced.append(kind)
        self._record(("synced", kind, None))

    def on_node(self, obj: Mapping[str, Any] | None) -> None:
        self.node = obj
        self._record(("Node", None, obj))

    def calls_of(self, kind: str) -> list[tuple[NamespacedName, Any]]:
        return [(k, obj) for kd, k, obj in self.calls if kd == kind]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._tick.wait()


def _store(d: dict[NamespacedName, Mapping[str, Any]], k: NamespacedName,
           obj: Mapping[str, Any] | None) -> None:
    if obj is None:
        d.pop(k, None)
    else:
        d[k] = obj


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as s:
        s.upsert(service("web"))
        s.upsert(endpoint_slice("web-abc", "web"))
        s.upsert(node(NODE))
        s.upsert(node("node-b"))
        yield s


@dataclasses.dataclass
class Source:
    server: FakeApiServer
    rec: Recorder
    task: asyncio.Task[None]

    async def synced(self) -> None:
        await self.rec.wait_for(lambda: {"Service", "EndpointSlice"} <= set(self.rec.synced))
        for kind in ("Service", "EndpointSlice", "Node"):
            await self.server.wait_for_watchers(kind)



@contextlib.asynccontextmanager
async def running(server: FakeApiServer, settings: kube.WatchSettings = FAST,
                  handler: Any = None) -> AsyncIterator[Source]:
    rec = Recorder()
    task = asyncio.create_task(kube.run(handler or rec, node_name=NODE, on_node=rec.on_node,
                                        master=server.url, settings=settings))
    try:
        yield Source(server, rec, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest_asyncio.fixture
async def src(server: FakeApiServer) -> AsyncIterator[Source]:
    async with running(server) as s:
        await s.synced()
        yield s


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == kube.__name__ and r.levelno == level]


# -- list, then watch ---------------------------------------------------------------------------


async def test_initial_list_then_synced_for_both_kinds(server: FakeApiServer) -> None:
    async with running(server) as src:
        await src.synced()
    rec = src.rec
    for kind, k in (("Service", key("web")), ("EndpointSlice", key("web-abc"))):
        delivered = next(i for i, c in enumerate(rec.calls) if c[:2] == (kind, k))
        assert delivered < rec.calls.index(("synced", kind, None))
    assert rec.synced.count("Service") == rec.synced.count("EndpointSlice") == 1
    web = rec.services[key("web")]
    assert (web["kind"], web["apiVersion"], web["spec"]["clusterIP"]) == ("Service", "v1", "10.96.0.10")
    assert rec.slices[key("web-abc")]["apiVersion"] == "discovery.k8s.io/v1"
    assert [obj["metadata"]["name"] for _, obj in rec.calls_of("Node")] == [NODE]

    [svc_list] = server.requests_for("Service", "list")
    assert svc_list.query == {"labelSelector": kube.PROXY_SELECTOR, "resourceVersion": "0", "limit": "500"}
    [slice_list] = server.requests_for("EndpointSlice", "list")
    assert slice_list.query["labelSelector"] == kube.PROXY_SELECTOR
    [node_list] = server.requests_for("Node", "list")
    assert node_list.query["fieldSelector"] == f"metadata.name={NODE}"
    [watch] = server.requests_for("Service", "watch")
    assert watch.resource_version == str(server.resource_version)  # the list's resourceVersion
    assert watch.query["allowWatchBookmarks"] == "True"
    assert watch.query["timeoutSeconds"] == "300"
    assert watch.query["labelSelector"] == kube.PROXY_SELECTOR


async def test_add_update_delete_arrive(src: Source) -> None:
    server, rec = src.server, src.rec
    server.upsert(service("api", ns="shop", ip="10.96.0.20"))
    await rec.wait_for(lambda: key("api", "shop") in rec.services)
    server.upsert(service("web", ip="10.96.0.11"))
    await rec.wait_for(lambda: rec.services[key("web")]["spec"]["clusterIP"] == "10.96.0.11")
    server.upsert(endpoint_slice("web-abc", "web", ips=("10.244.1.5", "10.244.2.9")))
    await rec.wait_for(lambda: len(rec.slices[key("web-abc")]["endpoints"]) == 2)
    server.delete("Service", "default", "web")
    await rec.wait_for(lambda: key("web") not in rec.services)
    assert rec.calls_of("Service")[-1] == (key("web"), None)
    server.upsert(node("node-b", zone="z9"))  # not ours: the field selector filters it out
    server.upsert(node(NODE, zone="z2"))
    await rec.wait_for(lambda: rec.node is not None and rec.node["metadata"]["labels"]
                       ["topology.kubernetes.io/zone"] == "z2")
    assert [obj["metadata"]["name"] for _, obj in rec.calls_of("Node")] == [NODE, NODE]


async def test_other_proxies_and_headless_are_filtered_by_the_server(src: Source) -> None:
    server, rec = src.server, src.rec
    server.upsert(service("other", labels=OTHER_PROXY))
    server.upsert(endpoint_slice("other-1", "other", labels=OTHER_PROXY))
    server.upsert(service("headless", labels={"service.kubernetes.io/headless": ""}))
    server.upsert(service("plain"))
    await rec.wait_for(lambda: key("plain") in rec.services)
    assert set(rec.services) == {key("web"), key("plain")}
    assert set(rec.slices) == {key("web-abc")}
    # A Service that starts carrying the label leaves the selection: it arrives as a delete.
    server.upsert(service("web", labels=OTHER_PROXY))
    await rec.wait_for(lambda: key("web") not in rec.services)
    assert rec.calls_of("Service")[-1] == (key("web"), None)


async def test_bookmarks_advance_the_resource_version(src: Source) -> None:
    server = src.server
    [first] = server.requests_for("Service", "watch")
    server.upsert(node("node-c"))  # moves the global resourceVersion; no Service event
    bookmark = server.send_bookmarks()
    assert int(first.resource_version or 0) < bookmark
    server.close_watches("Service")  # queued behind the bookmark: the client reads it first
    await server.wait_for(lambda: len(server.requests_for("Service", "watch")) == 2)
    assert server.requests_for("Service", "watch")[1].resource_version == str(bookmark)
    assert len(server.requests_for("Service", "list")) == 1


async def test_clean_end_rewatches_from_the_resource_version_without_relist(server: FakeApiServer) -> None:
    settings = dataclasses.replace(FAST, watch_timeout_min=1, watch_timeout_max=1)
    async with running(server, settings) as src:
        await src.synced()
        await server.wait_for(lambda: len(server.requests_for("Service", "watch")) >= 2, timeout=4)
    first, second = server.requests_for("Service", "watch")[:2]
    assert first.query["timeoutSeconds"] == "1"
    assert second.resource_version == first.resource_version
    assert len(server.requests_for("Service", "list")) == 1


# -- pagination ----------------------------------------------------------------------------------


async def test_relists_are_paginated_and_every_page_is_delivered(server: FakeApiServer) -> None:
    for i in range(6):
        server.upsert(service(f"s{i}", ip=f"10.96.1.{i}"))
    stats = kube.WatchStats()
    settings = dataclasses.replace(FAST, list_page_size=3)
    rec = Recorder()
    task = asyncio.create_task(kube.run(rec, node_name=NODE, on_node=rec.on_node, master=server.url,
                                        settings=settings, stats=stats))
    try:
        await rec.wait_for(lambda: {"Service", "EndpointSlice"} <= set(rec.synced))
        await server.wait_for_watchers("Service")
        # The first list (resourceVersion 0) is answered whole, as kube-apiserver does from its cache.
        [first] = server.requests_for("Service", "list")
        assert first.query["limit"] == "3" and first.query["resourceVersion"] == "0"
        assert stats.pages["Service"] == 1
        # A relist after 410 is a consistent read, paged.
        server.drop_watches("Service")
        server.delete("Service", "default", "s0")
        server.compact()
        await rec.wait_for(lambda: key("s0") not in rec.services)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert set(rec.services) == {key("web"), *(key(f"s{i}") for i in range(1, 6))}
    relist, *rest = server.requests_for("Service", "list")[1:]
    assert relist.query["limit"] == "3" and "resourceVersion" not in relist.query
    assert [r.query.get("continue") for r in rest] == ["1:3"]
    assert all("resourceVersion" not in r.query for r in rest)  # a continuation carries its snapshot
    assert stats.pages["Service"] == 3 and stats.lists["Service"] == 2 and stats.expired["Service"] == 1


async def test_an_expired_continue_token_lists_again_in_one_piece(server: FakeApiServer) -> None:
    for i in range(4):
        server.upsert(service(f"s{i}", ip=f"10.96.1.{i}"))
    async with kube.client.ApiClient(kube.client.Configuration(host=server.url)) as api:
        core = kube.client.CoreV1Api(api)
        pages = 0

        async def list_fn(**params: Any) -> Any:
            nonlocal pages
            pages += 1
            if pages == 2:  # between two pages the snapshot is compacted away
                server.upsert(service("late", ip="10.96.1.99"))
                server.compact()
            return await core.list_service_for_all_namespaces(**params)

        delivered: dict[NamespacedName, Any] = {}
        reflector = kube.Reflector(kube.Resource("Service", "v1", list_fn), delivered.__setitem__, lambda: None)
        reflector.synced = True  # a relist (after a 410): a consistent read, which is paged
        await kube.relist(reflector, dataclasses.replace(FAST, list_page_size=2), lambda: None)
    queries = [r.query for r in server.requests_for("Service", "list")]
    assert [q.get("limit") for q in queries] == ["2", "2", None]
    assert set(delivered) == {key("web"), key("late"), *(key(f"s{i}") for i in range(4))}
    assert reflector.resource_version == str(server.resource_version)


# -- 410: relist ----------------------------------------------------------------------------------


async def test_delete_while_disconnected_arrives_after_410_relist(src: Source) -> None:
    server, rec = src.server, src.rec
    lists = len(server.requests_for("Service", "list"))
    server.drop_watches()
    # Before the client can reconnect (it backs off first), change things and forget the history.
    server.delete("Service", "default", "web")
    server.delete("EndpointSlice", "default", "web-abc")
    server.upsert(service("new"))
    server.compact()
    await rec.wait_for(lambda: key("new") in rec.services and key("web") not in rec.services
                       and key("web-abc") not in rec.slices)
    assert (key("web"), None) in rec.calls_of("Service")
    assert (key("web-abc"), None) in rec.calls_of("EndpointSlice")
    [relist] = server.requests_for("Service", "list")[lists:]
    assert "resourceVersion" not in relist.query  # a consistent read, as client-go after a 410
    expired = server.requests_for("Service", "watch")[1]
    assert expired.status == 200  # the 410 came as an ERROR event on a 200 stream
    # The Node did not change: the relist does not report it again.
    await server.wait_for_watchers("Node")
    assert len(rec.calls_of("Node")) == 1


async def test_http_410_relists(src: Source) -> None:
    server, rec = src.server, src.rec
    server.expired_as_http = True
    server.drop_watches("Service")
    server.delete("Service", "default", "web")
    server.compact()
    await rec.wait_for(lambda: key("web") not in rec.services)
    assert [r.status for r in server.requests_for("Service", "watch")][:2] == [200, 410]
    assert len(server.requests_for("Service", "list")) == 2

    # An injected HTTP 410 on a fresh watch relists too, and reports nothing that did not change.
    calls = len(rec.calls)
    server.inject_error("EndpointSlice", 410)
    server.close_watches("EndpointSlice")
    await server.wait_for(lambda: len(server.requests_for("EndpointSlice", "list")) == 2)
    await server.wait_for_watchers("EndpointSlice")
    assert len(rec.calls) == calls


async def test_repeated_410_right_after_a_list_backs_off(server: FakeApiServer) -> None:
    server.inject_error("Service", 410, count=4)
    started = time.monotonic()
    async with running(server) as src:
        await src.synced()
        await server.wait_for_watchers("Service")
    # Each relist is followed by another 410: back off 0.05, 0.1, 0.2, 0.2 s instead of spinning.
    assert time.monotonic() - started >= 0.5
    assert [r.status for r in server.requests_for("Service", "watch")][:5] == [410] * 4 + [200]
    assert len(server.requests_for("Service", "list")) == 5


# -- outages ----------------------------------------------------------------------------------------


async def test_api_server_down_then_updates_resume(src: Source, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=kube.__name__)
    server, rec = src.server, src.rec
    lists = len([r for r in server.requests if r.verb == "list"])
    await server.set_down(True)
    server.upsert(service("during-outage"))
    server.delete("EndpointSlice", "default", "web-abc")
    await asyncio.sleep(1.5)
    await server.set_down(False)
    await rec.wait_for(lambda: key("during-outage") in rec.services and key("web-abc") not in rec.slices)
    await wait_until(lambda: bool(messages(caplog, logging.INFO)))
    # Resumed from the last resourceVersion: no relist.
    assert len([r for r in server.requests if r.verb == "list"]) == lists
    # Many failed attempts (three watches, backoff capped at 0.2 s), but one warning and one recovery line.
    assert len(messages(caplog, logging.DEBUG)) >= 6
    [warning] = messages(caplog, logging.WARNING)
    assert "Kubernetes API request failed" in warning
    [back] = messages(caplog, logging.INFO)
    assert "reachable again" in back


async def test_api_errors_back_off_and_log_once(server: FakeApiServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=kube.__name__)
    server.inject_error("Service", 403, verb="list", count=4, message="services is forbidden")
    started = time.monotonic()
    async with running(server) as src:
        await src.synced()
    # 4 failures back off 0.05, 0.1, 0.2, 0.2 s (+ up to 50 % jitter) before the list succeeds.
    assert time.monotonic() - started >= 0.5
    assert [r.status for r in server.requests_for("Service", "list")] == [403] * 4 + [200]
    [warning] = messages(caplog, logging.WARNING)
    assert "403 Forbidden: services is forbidden" in warning
    assert any("reachable again" in m for m in messages(caplog, logging.INFO))


async def test_stalled_watch_is_detected_and_reopened(server: FakeApiServer) -> None:
    server.bookmark_interval = 0.1
    settings = dataclasses.replace(FAST, watch_idle_timeout=0.5)
    async with running(server, settings) as src:
        await src.synced()
        await asyncio.sleep(0.7)  # bookmarks keep a quiet, healthy watch past the idle timeout
        assert len(server.requests_for("Service", "watch")) == 1
        server.stall_watches("Service")
        server.upsert(service("late"))
        started = time.monotonic()
        await src.rec.wait_for(lambda: key("late") in src.rec.services)
        assert 0.3 < time.monotonic() - started < 2.5
    watches = server.requests_for("Service", "watch")
    assert len(watches) == 2
    assert int(watches[1].resource_version or 0) >= int(watches[0].resource_version or 0)
    assert len(server.requests_for("Service", "list")) == 1


# -- the node, the real tracker, handler bugs ---------------------------------------------------------


async def test_node_missing_then_created_then_deleted(server: FakeApiServer) -> None:
    server.delete("Node", None, NODE)
    async with running(server) as src:
        rec = src.rec
        await src.synced()
        await rec.wait_for(lambda: len(rec.calls_of("Node")) == 1)
        assert rec.node is None
        server.upsert(node(NODE))
        await rec.wait_for(lambda: rec.node is not None)
        server.delete("Node", None, NODE)
        await rec.wait_for(lambda: rec.node is None)
    assert [obj is None for _, obj in rec.calls_of("Node")] == [True, False, True]


async def test_feeds_the_change_tracker(server: FakeApiServer) -> None:
    changed = asyncio.Event()
    tracker = ChangeTracker(clock=time.monotonic, on_change=changed.set)
    async with running(server, handler=tracker) as src:
        await wait_until(lambda: tracker.synced)
        state = tracker.checkout()[key("web")]
        [port] = state.ports
        assert (port.port, port.cluster_ips) == (80, ("10.96.0.10",))
        assert [(e.ip, e.port) for e in state.endpoints_of(port.name)] == [("10.244.1.5", 8080)]
        src.server.delete("EndpointSlice", "default", "web-abc")
        await wait_until(lambda: tracker.dirty)
        assert tracker.checkout()[key("web")].endpoints_of(port.name) == ()


async def test_a_failing_handler_stops_the_source(server: FakeApiServer) -> None:
    class Broken(Recorder):
        def on_service(self, k: NamespacedName, obj: Mapping[str, Any] | None) -> None:
            raise RuntimeError("bug")

    with pytest.raises(kube.HandlerError, match="bug"):
        async with running(server, handler=Broken()) as src:
            await asyncio.wait_for(src.task, 5)


# -- pure parts -----------------------------------------------------------------------------------


class _Deliveries:
    def __init__(self) -> None:
        self.calls: list[tuple[NamespacedName, Any]] = []
        self.synced = 0

    def deliver(self, k: NamespacedName, obj: Mapping[str, Any] | None) -> None:
        self.calls.append((k, obj))

    def on_synced(self) -> None:
        self.synced += 1


def _reflector() -> tuple[kube.Reflector, _Deliveries]:
    d = _Deliveries()

    async def unused(**kw: Any) -> None:
        raise AssertionError

    return kube.Reflector(kube.Resource("Service", "v1", unused), d.deliver, d.on_synced), d


def _item(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


def test_reflector_replace_reports_changes_and_vanished_objects() -> None:
    r, d = _reflector()
    r.replace([_item("a", "1"), _item("b", "2")], "2")
    assert [k.name for k, _ in d.calls] == ["a", "b"] and d.synced == 1
    assert d.calls[0][1]["kind"] == "Service" and d.calls[0][1]["apiVersion"] == "v1"
    d.calls.clear()
    r.replace([_item("a", "1"), _item("c", "5"), {"metadata": {}}], "6")
    assert d.calls[0][0].name == "c" and d.calls[1] == (NamespacedName("ns", "b"), None)
    assert len(d.calls) == 2 and d.synced == 1
    assert r.resource_version == "6"
    assert set(r.known) == {NamespacedName("ns", "a"), NamespacedName("ns", "c")}


def test_reflector_apply_events() -> None:
    r, d = _reflector()
    r.replace([], "1")
    r.apply({"type": "ADDED", "object": _item("a", "2")})
    r.apply({"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": "9"}}})
    assert r.resource_version == "9" and len(d.calls) == 1
    r.apply({"type": "DELETED", "object": _item("zz", "10")})  # never seen: nothing to report
    r.apply({"type": "SOMETHING", "object": _item("a", "11")})  # unknown types are skipped
    r.apply({"type": "DELETED", "object": _item("a", "12")})
    assert d.calls[-1] == (NamespacedName("ns", "a"), None) and len(d.calls) == 2
    assert r.resource_version == "12"
    with pytest.raises(kube.Expired):
        r.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}})
    with pytest.raises(kube.ApiError) as e:
        r.apply({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}})
    assert e.value.status == 500
    with pytest.raises(ValueError):
        r.apply({"type": "ADDED", "object": "nope"})


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    low = kube.Backoff(0.5, 30, rng=lambda: 0.0)
    assert [low.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    low.reset()
    assert low.next() == 0.5
    high = kube.Backoff(0.5, 30, rng=lambda: 1.0)
    assert high.next() == 0.75


def test_api_health_logs_at_a_sane_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=kube.__name__)
    now = [100.0]
    health = kube.ApiHealth(interval=60, clock=lambda: now[0])
    for t in range(0, 59, 3):
        now[0] = 100.0 + t
        health.failed("Service", "refused")
        health.failed("Node", "refused")
    now[0] = 161.0
    health.failed("Service", "refused")
    now[0] = 170.0
    health.succeeded("Service")
    health.failed("Service", "refused")  # still in the same outage: the Node never recovered
    health.succeeded("Node")
    health.succeeded("Service")
    assert messages(caplog, logging.WARNING) == [
        "Kubernetes API request failed (Service: refused); retrying with backoff",
        "Kubernetes API still failing after 61s (Service: refused)",
    ]
    assert messages(caplog, logging.INFO) == ["Kubernetes API reachable again after 70.0s"]


# -- configuration -------------------------------------------------------------------------------


@pytest.fixture
def service_account(tmp_path: Path) -> Iterator[tuple[str, str]]:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n(not parsed here)\n-----END CERTIFICATE-----\n")
    yield str(token), str(ca)


async def test_configuration_sources(tmp_path: Path, service_account: tuple[str, str]) -> None:
    token, ca = service_account
    plain = await kube.load_configuration(master="http://127.0.0.1:1/", environ={})
    assert plain.host == "http://127.0.0.1:1" and not plain.api_key

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:2'}}]\n"
        "users: [{name: u, user: {token: kc-token}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    from_file = await kube.load_configuration(kubeconfig=str(kubeconfig))
    assert from_file.host == "http://127.0.0.1:2"
    assert from_file.api_key["BearerToken"] == "Bearer kc-token"
    overridden = await kube.load_configuration(kubeconfig=str(kubeconfig), master="http://127.0.0.1:3")
    assert overridden.host == "http://127.0.0.1:3"

    in_cluster_env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = await kube.load_configuration(environ=in_cluster_env, token_file=token, cert_file=ca)
    assert cfg.host == "https://10.96.0.1:443" and cfg.ssl_ca_cert == ca
    assert cfg.api_key["BearerToken"] == "Bearer sa-token"
    # In a DaemonSet the kubernetes clusterIP is ours to program: take the API address from elsewhere.
    for env in ({**in_cluster_env, kube.APISERVER_ENV: "https://192.168.0.10:6443/"},
                {kube.APISERVER_ENV: "https://192.168.0.10:6443"}):
        cfg = await kube.load_configuration(environ=env, token_file=token, cert_file=ca)
        assert cfg.host == "https://192.168.0.10:6443"
        assert cfg.api_key["BearerToken"] == "Bearer sa-token"
    with pytest.raises(ConfigException):
        await kube.load_configuration(environ={kube.APISERVER_ENV: "192.168.0.10"}, token_file=token,
                                      cert_file=ca)
    with pytest.raises(ConfigException):
        await kube.load_configuration(environ={}, token_file=token, cert_file=ca)

