"""The fake API server's own protocol behaviour, checked through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from testbed.fakeapi import FakeApiServer, SelectorError, parse_field_selector, parse_label_selector

Server = FakeApiServer
Api = client.ApiClient
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


def service(name: str, ns: str = "default", labels: dict[str, str] | None = None,
            ip: str = "10.0.0.1") -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(name: str, svc: str, ns: str = "default") -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}}]}


def node(name: str) -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "labels": {}}}


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as s:
        yield s


@pytest_asyncio.fixture
async def api(server: FakeApiServer) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(client.Configuration(host=server.url)) as a:
        yield a


async def raw_watch(fn: Any, **kw: Any) -> aiohttp.ClientResponse:
    resp = await fn(watch=True, _preload_content=False, **kw)
    assert isinstance(resp, aiohttp.ClientResponse)
    return resp


async def read_events(resp: aiohttp.ClientResponse, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(events) < n:
            line = await resp.content.readline()
            assert line, f"stream ended after {events}"
            events.append(json.loads(line))
    return events


# -- LIST / GET ---------------------------------------------------------------------------------


async def test_list_has_kind_api_version_and_resource_version(server: Server, api: Api) -> None:
    server.upsert(service("a", "ns1"))
    server.upsert(endpoint_slice("a-1", "a", "ns1"))
    server.upsert(node("n1"))
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)

    typed = await core.list_service_for_all_namespaces()
    assert [s.metadata.name for s in typed.items] == ["a"]
    assert typed.items[0].spec.cluster_ip == "10.0.0.1"
    slices = await disc.list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.1.0.1"]
    assert (await core.list_node()).items[0].metadata.name == "n1"

    for fn, kind, version in ((core.list_service_for_all_namespaces, "ServiceList", "v1"),
                              (disc.list_endpoint_slice_for_all_namespaces, "EndpointSliceList",
                               "discovery.k8s.io/v1"),
                              (core.list_node, "NodeList", "v1")):
        resp: Any = await fn(_preload_content=False)
        body = json.loads(await resp.read())
        assert (body["kind"], body["apiVersion"]) == (kind, version)
        assert body["metadata"]["resourceVersion"] == str(server.resource_version)
        assert "kind" not in body["items"][0] and "apiVersion" not in body["items"][0]


async def test_namespaced_list_and_get(server: Server, api: Api) -> None:
    server.upsert(service("a", "ns1"))
    server.upsert(service("b", "ns2"))
    server.upsert(endpoint_slice("b-1", "b", "ns2"))
    server.upsert(node("n1"))
    core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    assert [s.metadata.name for s in (await core.list_namespaced_service("ns2")).items] == ["b"]
    assert [s.metadata.name for s in (await disc.list_namespaced_endpoint_slice("ns2")).items] == ["b-1"]
    assert (await disc.list_namespaced_endpoint_slice("ns1")).items == []
    got = await core.read_namespaced_service("a", "ns1")
    assert got.metadata.namespace == "ns1" and got.kind == "Service"
    assert (await core.read_node("n1")).metadata.name == "n1"
    with pytest.raises(ApiException) as e:
        await core.read_namespaced_service("a", "ns2")
    assert e.value.status == 404 and e.value.body is not None
    assert json.loads(e.value.body)["reason"] == "NotFound"


async def test_resource_version_is_global_and_metadata_is_kept(server: FakeApiServer) -> None:
    a = server.upsert(service("a"))
    n = server.upsert(node("n1"))
    s = server.upsert(endpoint_slice("a-1", "a"))
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, n, s)]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    a2 = server.upsert(service("a", ip="10.0.0.2"))
    assert int(a2["metadata"]["resourceVersion"]) > rvs[-1]
    assert a2["metadata"]["uid"] == a["metadata"]["uid"]
    assert a2["metadata"]["creationTimestamp"] == a["metadata"]["creationTimestamp"]
    assert "namespace" not in n["metadata"]
    gone = server.delete("Service", "default", "a")
    assert gone is not None and int(gone["metadata"]["resourceVersion"]) == server.resource_version
    assert server.delete("Service", "default", "a") is None


# -- selectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "expected"), [
    ("", {"plain", "other-proxy", "headless", "app-web", "app-db"}),
    (PROXY_SELECTOR, {"plain", "app-web", "app-db"}),
    ("app", {"app-web", "app-db"}),
    ("!app", {"plain", "other-proxy", "headless"}),
    ("app=web", {"app-web"}),
    ("app==web", {"app-web"}),
    ("app!=web", {"plain", "other-proxy", "headless", "app-db"}),
    ("app=web,tier=front", {"app-web"}),
    ("app in (web, db)", {"app-web", "app-db"}),
    ("app notin (web),!service.kubernetes.io/headless", {"plain", "other-proxy", "app-db"}),
])
async def test_label_selectors(server: Server, api: Api, selector: str,
                               expected: set[str]) -> None:
    server.upsert(service("plain"))
    server.upsert(service("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    server.upsert(service("headless", labels={"service.kubernetes.io/headless": ""}))
    server.upsert(service("app-web", labels={"app": "web", "tier": "front"}))
    server.upsert(service("app-db", labels={"app": "db"}))
    got = await client.CoreV1Api(api).list_service_for_all_namespaces(label_selector=selector)
    assert {s.metadata.name for s in got.items} == expected


def test_selector_parsing() -> None:
    reqs = parse_label_selector("a, !b ,c=1,d!=2,e in (x,y)")
    assert [(r.key, r.op, sorted(r.values)) for r in reqs] == [
        ("a", "exists", []), ("b", "!exists", []), ("c", "=", ["1"]), ("d", "!=", ["2"]),
        ("e", "in", ["x", "y"])]
    for bad in ("a,,b", "=x", "a b", "!"):
        with pytest.raises(SelectorError):
            parse_label_selector(bad)
    assert parse_field_selector("metadata.name=n1,metadata.namespace!=kube-system")[1].negate
    with pytest.raises(SelectorError):
        parse_field_selector("spec.nodeName=x")


async def test_bad_selector_is_400(server: Server, api: Api) -> None:
    with pytest.raises(ApiException) as e:
        await client.CoreV1Api(api).list_service_for_all_namespaces(label_selector="a b")
    assert e.value.status == 400
    with pytest.raises(ApiException) as e:
        await client.CoreV1Api(api).list_node(field_selector="spec.unschedulable=true")
    assert e.value.status == 400


async def test_field_selector_on_list_and_watch(server: Server, api: Api) -> None:
    server.upsert(node("n1"))
    server.upsert(node("n2"))
    core = client.CoreV1Api(api)
    got = await core.list_node(field_selector="metadata.name=n2")
    assert [n.metadata.name for n in got.items] == ["n2"]
    resp = await raw_watch(core.list_node, field_selector="metadata.name=n2",
                           resource_version=got.metadata.resource_version)
    server.upsert(node("n1"))
    server.upsert({**node("n2"), "spec": {"unschedulable": True}})
    [ev] = await read_events(resp, 1)
    assert (ev["type"], ev["object"]["metadata"]["name"]) == ("MODIFIED", "n2")
    resp.close()
    ns = await core.list_service_for_all_namespaces(field_selector="metadata.namespace=default")
    assert ns.items == []


# -- WATCH ----------------------------------------------------------------------------------------


async def test_watch_replays_history_then_goes_live(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    server.upsert(service("a"))
    start = server.resource_version
    server.upsert(service("b"))
    server.upsert(service("a", ip="10.0.0.9"))
    server.upsert(node("ignored"))

    async def live() -> None:
        await server.wait_for_watchers("Service")
        server.delete("Service", "default", "b")

    task = asyncio.create_task(live())
    seen = []
    async with watch.Watch() as w:
        async for ev in w.stream(core.list_service_for_all_namespaces, resource_version=str(start),
                                 timeout_seconds=1):
            seen.append((ev["type"], ev["object"].metadata.name, ev["object"].spec.cluster_ip))
            assert ev["raw_object"]["kind"] == "Service" and ev["raw_object"]["apiVersion"] == "v1"
            if len(seen) == 3:
                break
    await task
    assert seen == [("ADDED", "b", "10.0.0.1"), ("MODIFIED", "a", "10.0.0.9"), ("DELETED", "b", "10.0.0.1")]


async def test_watch_without_resource_version_starts_with_synthetic_added(
        server: Server, api: Api) -> None:
    server.upsert(service("a"))
    server.upsert(service("b"))
    server.upsert(service("a", ip="10.0.0.3"))
    resp = await raw_watch(client.CoreV1Api(api).list_service_for_all_namespaces)
    events = await read_events(resp, 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b"), ("ADDED", "a")]
    resp.close()


async def test_watch_selector_transitions_are_added_and_deleted(server: Server, api: Api) -> None:
    first = server.upsert(service("a"))
    first_rv = first["metadata"]["resourceVersion"]
    resp = await raw_watch(client.CoreV1Api(api).list_service_for_all_namespaces,
                           label_selector=PROXY_SELECTOR, resource_version=first_rv)
    server.upsert(service("a", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    server.upsert(service("a", labels={"service.kubernetes.io/service-proxy-name": "other"}, ip="10.0.0.5"))
    server.upsert(service("a", ip="10.0.0.6"))
    events = await read_events(resp, 2)
    resp.close()
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]
    # DELETED carries the last matching content, at the resourceVersion of the change.
    assert events[0]["object"]["metadata"].get("labels") == {}
    assert events[0]["object"]["spec"]["clusterIP"] == "10.0.0.1"
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) == int(first_rv) + 1
    assert events[1]["object"]["spec"]["clusterIP"] == "10.0.0.6"


async def test_bookmarks_on_demand_and_only_when_allowed(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    rv = str(server.resource_version)
    with_bm = await raw_watch(core.list_service_for_all_namespaces, resource_version=rv,
                              allow_watch_bookmarks=True)
    without = await raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    await server.wait_for_watchers("Service", 2)
    server.upsert(node("n1"))  # moves the global resourceVersion; not a Service event
    bm_rv = server.send_bookmarks()
    server.upsert(service("a"))
    [bm, added] = await read_events(with_bm, 2)
    assert bm == {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                                                 "metadata": {"resourceVersion": str(bm_rv)}}}
    assert added["type"] == "ADDED"
    [only] = await read_events(without, 1)
    assert only["type"] == "ADDED"
    with_bm.close()
    without.close()


async def test_periodic_bookmarks(api: client.ApiClient, server: FakeApiServer) -> None:
    server.bookmark_interval = 0.05
    resp = await raw_watch(client.CoreV1Api(api).list_node, resource_version=str(server.resource_version),
                           allow_watch_bookmarks=True)
    events = await read_events(resp, 3, timeout=2)
    assert {e["type"] for e in events} == {"BOOKMARK"}
    assert events[0]["object"]["kind"] == "Node"
    resp.close()


async def test_compacted_resource_version_gets_error_410_event(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    old = server.upsert(service("a"))["metadata"]["resourceVersion"]
    server.upsert(service("b"))
    compacted = server.compact()
    resp = await raw_watch(core.list_service_for_all_namespaces, resource_version=old)
    assert resp.status == 200
    [err] = await read_events(resp, 1)
    assert err == {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {old} ({compacted})", "reason": "Expired", "code": 410}}
    assert await resp.content.read() == b""  # and the stream ends
    resp.close()
    # The current resourceVersion still works after a compaction.
    ok = await raw_watch(core.list_service_for_all_namespaces, resource_version=str(compacted))
    server.upsert(service("c"))
    assert (await read_events(ok, 1))[0]["type"] == "ADDED"
    ok.close()
    # The typed Watch turns it into ApiException(410).
    with pytest.raises(ApiException) as e:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_service_for_all_namespaces, resource_version=old,
                                    timeout_seconds=5):
                pass
    assert e.value.status == 410


async def test_expired_as_http_status_and_injected_errors(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    old = server.upsert(service("a"))["metadata"]["resourceVersion"]
    server.upsert(service("a"))
    server.compact()
    server.expired_as_http = True
    resp = await raw_watch(core.list_service_for_all_namespaces, resource_version=old)
    assert resp.status == 410
    body = json.loads(await resp.read())
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "Expired", 410)
    server.expired_as_http = False

    server.inject_error("Service", 410)
    with pytest.raises(ApiException) as e:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_service_for_all_namespaces,
                                    resource_version=str(server.resource_version), timeout_seconds=5):
                pass
    assert e.value.status == 410
    server.inject_error("Service", 503, verb="list", count=2)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            await core.list_service_for_all_namespaces()
        assert e.value.status == 503
    assert len((await core.list_service_for_all_namespaces()).items) == 1


async def test_timeout_seconds_ends_the_stream_cleanly(server: Server, api: Api) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await raw_watch(client.CoreV1Api(api).list_service_for_all_namespaces,
                           resource_version=str(server.resource_version), timeout_seconds=1)
    assert await resp.content.read() == b""
    assert 0.9 <= loop.time() - started < 2.5
    resp.close()


async def test_expire_close_and_drop_watches(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    rv = str(server.resource_version)
    expired = await raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    nodes = await raw_watch(core.list_node, resource_version=rv)
    await server.wait_for_watchers("Service")
    await server.wait_for_watchers("Node")
    server.expire_watches("Service")
    [err] = await read_events(expired, 1)
    assert (err["type"], err["object"]["code"], err["object"]["reason"]) == ("ERROR", 410, "Expired")
    assert await expired.content.read() == b""
    assert server.watchers("Node") == 1  # only the Service watch was expired
    server.close_watches("Node")
    assert await nodes.content.read() == b""

    dropped = await raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    await server.wait_for_watchers("Service")
    server.drop_watches()
    with pytest.raises(aiohttp.ClientPayloadError):
        await dropped.content.read()
    dropped.close()
    await server.wait_for(lambda: server.watchers() == 0)


async def test_stalled_watch_sends_nothing_until_unstalled(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    server.bookmark_interval = 0.05
    stalled = await raw_watch(core.list_service_for_all_namespaces,
                              resource_version=str(server.resource_version),
                              allow_watch_bookmarks=True, timeout_seconds=1,
                              _request_timeout=aiohttp.ClientTimeout(sock_read=0.3))
    await server.wait_for_watchers("Service")
    server.stall_watches()
    await asyncio.sleep(0.06)  # one bookmark may already be on the wire; drain it
    with pytest.raises(TimeoutError):
        while True:
            line = await stalled.content.readline()
            assert json.loads(line)["type"] == "BOOKMARK"
    stalled.close()
    # A watch opened later is not stalled; unstalling releases the held ones.
    now = str(server.resource_version)
    fresh = await raw_watch(core.list_service_for_all_namespaces, resource_version=now)
    held = await raw_watch(core.list_node, resource_version=str(server.resource_version))
    await server.wait_for_watchers("Node")
    server.stall_watches("Node")
    server.upsert(service("a"))
    server.upsert(node("n1"))
    assert (await read_events(fresh, 1))[0]["type"] == "ADDED"
    with pytest.raises(TimeoutError):
        await read_events(held, 1, timeout=0.2)
    server.unstall_watches()
    assert (await read_events(held, 1))[0]["object"]["metadata"]["name"] == "n1"
    fresh.close()
    held.close()


async def test_set_down_refuses_then_comes_back_on_the_same_port(server: FakeApiServer,
                                                                 api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    port = server.port
    now = str(server.resource_version)
    resp = await raw_watch(core.list_service_for_all_namespaces, resource_version=now)
    await server.wait_for_watchers("Service")
    await server.set_down(True)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.content.read()
    resp.close()
    with pytest.raises(aiohttp.ClientConnectorError):
        await core.list_service_for_all_namespaces()
    server.upsert(service("while-down"))  # the store (etcd) lives on
    await server.set_down(False)
    assert server.port == port
    assert [s.metadata.name for s in (await core.list_service_for_all_namespaces()).items] == ["while-down"]


async def test_request_log(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    await core.list_service_for_all_namespaces(label_selector="a", resource_version="0")
    resp = await raw_watch(core.list_service_for_all_namespaces, resource_version="7",
                           allow_watch_bookmarks=True, timeout_seconds=1)
    resp.close()
    with pytest.raises(ApiException):
        await core.read_node("missing")
    lst, wt = server.requests_for("Service")
    assert (lst.verb, lst.query, lst.status) == ("list", {"labelSelector": "a", "resourceVersion": "0"}, 200)
    assert (wt.verb, wt.resource_version, wt.query["allowWatchBookmarks"]) == ("watch", "7", "True")
    [get] = server.requests_for("Node", "get")
    assert (get.path, get.status) == ("/api/v1/nodes/missing", 404)


async def test_rest_writes(server: Server, api: Api) -> None:
    core = client.CoreV1Api(api)
    body: Any = service("a", "ns1")
    created = await core.create_namespaced_service("ns1", body)
    assert created.metadata.resource_version == str(server.resource_version)
    with pytest.raises(ApiException) as e:
        await core.create_namespaced_service("ns1", body)
    assert e.value.status == 409
    replacement: Any = service("a", "ns1", ip="10.0.0.7")
    await core.replace_namespaced_service("a", "ns1", replacement)
    assert server.get("Service", "ns1", "a")["spec"]["clusterIP"] == "10.0.0.7"  # type: ignore[index]
    await core.delete_namespaced_service("a", "ns1")
    assert server.get("Service", "ns1", "a") is None
    assert [r.verb for r in server.requests_for("Service")] == ["create", "create", "update", "delete"]


async def test_standalone_process(tmp_path: Any) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text(json.dumps(service("from-file")))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testbed.fakeapi", "--port", "0", "--load", str(objects),
        "--bookmark-interval", "0", stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line
        async with client.ApiClient(client.Configuration(host=url[0])) as api:
            core = client.CoreV1Api(api)
            listed = await core.list_service_for_all_namespaces()
            assert [s.metadata.name for s in listed.items] == ["from-file"]
            async with aiohttp.ClientSession() as session, session.post(f"{url[0]}/fake/compact") as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        await proc.wait()
