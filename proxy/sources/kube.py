"""Services, EndpointSlices and the own Node from the Kubernetes API: list, then watch.

Each resource has a :class:`Reflector` (client-go's word): it remembers the last resourceVersion
and which objects it has handed to the handler. One *pass* (:func:`watch_pass`) lists when there is
no resourceVersion yet and then follows one watch stream until the server ends it; the infinite loop
around it (:func:`watch_forever`) stays tiny, as in kopf's ``watching.py``: infinite loops are hard
to test, bounded passes are not.

* A clean end of a watch (the server's ``timeoutSeconds``) re-watches from the last resourceVersion
  at once, without a relist. BOOKMARK events move the resourceVersion on while nothing changes.
* 410 Expired, as an ERROR event or as an HTTP status, relists with a consistent read; the relist is
  diffed against what the handler was told, so objects deleted meanwhile are reported deleted.
* Lists are paginated (``limit``/``continue``, client-go's pager: 500 per page). If a continue token
  expires mid-list, the list starts again without a limit, as client-go's pager falls back.
* Any other failure (connection refused or cut, a stalled stream, 5xx, 403, bad JSON) backs off with
  jitter and resumes from the last resourceVersion. "No bytes for ``watch_idle_timeout``" counts as
  stalled: kube-apiserver sends a BOOKMARK about once a minute to watches that ask for them.

The watch path reads raw JSON lines (``_preload_content=False``), not kubernetes_asyncio's typed
``Watch``: typed decoding costs 7-11x more per event and trips over BOOKMARKs
(shared/reference/kubernetes-client.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config import incluster_config

from proxy.model import NamespacedName
from proxy.sources import Handler, WatchStats
from proxy.sources.liststream import ListDecoder

logger = logging.getLogger(__name__)

PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
"""kube-proxy's label selector for Services and EndpointSlices: skip other proxies' and headless ones."""
APISERVER_ENV = "SVCPROXY_APISERVER"
"""URL of the API server for the in-cluster config (the ``kubernetes`` clusterIP is ours to program)."""

Obj = Mapping[str, Any]
Deliver = Callable[[NamespacedName, Obj | None], None]
ListFn = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchSettings:
    watch_timeout_min: float = 300.0
    watch_timeout_max: float = 600.0
    """Each watch asks the server to end it after a random 5-10 min (client-go's range), so a fleet of
    proxies does not reconnect in lockstep."""
    watch_idle_timeout: float = 130.0
    """No byte for this long means the stream is stalled: reconnect. kube-apiserver sends a BOOKMARK
    about every 60 s; this is twice that, plus slack."""
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    """Retry delays double from ``backoff_initial`` up to this, each stretched by up to 50 % jitter."""
    unreachable_log_interval: float = 60.0
    """While requests keep failing, say so at most this often (the first failure is logged at once)."""
    label_selector: str = PROXY_SELECTOR
    user_agent: str = "svcproxy"
    list_page_size: int = 500
    """Items per LIST page (client-go's pager default); 0 lists in one response."""


class Expired(Exception):
    """The resourceVersion is older than the server's history (410): relist."""


class HandlerError(Exception):
    """The handler raised: a bug, not an API problem, so it is not retried (the watch task fails)."""


class ApiError(Exception):
    """A non-200 answer or an ERROR event other than 410."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


RETRYABLE: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,  # refused, reset, cut mid-stream (ClientPayloadError), read timeouts
    HttpProcessingError,  # e.g. a line longer than the read buffer
    TimeoutError,
    OSError,
    ApiError,
    ValueError,  # malformed JSON or a body of the wrong shape
)


# -- pure state ---------------------------------------------------------------------------------


def object_key(obj: Obj) -> NamespacedName | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    return NamespacedName(str(meta.get("namespace") or ""), meta["name"])


def resource_version(obj: Obj) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""


@dataclasses.dataclass(frozen=True)
class Resource:
    """What to list and watch: a kubernetes_asyncio list method plus selectors."""

    kind: str
    api_version: str
    list_fn: ListFn
    label_selector: str = ""
    field_selector: str = ""

    def selectors(self) -> dict[str, str]:
        sel = {"label_selector": self.label_selector, "field_selector": self.field_selector}
        return {k: v for k, v in sel.items() if v}


class Reflector:
    """One resource's list+watch state, and the only caller of its ``deliver`` callback.

    ``known`` maps each object the handler has been given to its resourceVersion; a relist is
    diffed against it (client-go's Replace), which is how deletes missed while disconnected surface.
    """

    def __init__(self, resource: Resource, deliver: Deliver, on_synced: Callable[[], None],
                 stats: WatchStats | None = None) -> None:
        self.resource = resource
        self.stats = stats or WatchStats()
        self.kind = resource.kind
        self._handler = deliver
        self._on_synced = on_synced
        self.resource_version: str | None = None
        """Where the next watch starts; None means list first."""
        self.known: dict[NamespacedName, str] = {}
        self.synced = False
        self.lines = 0
        """Lines and lists received; lets the retry loop tell progress from a failing reconnect."""

    def _deliver(self, key: NamespacedName, obj: Obj | None) -> None:
        try:
            self._handler(key, obj)
        except Exception as e:
            raise HandlerError(f"{self.kind} handler failed on {key}: {e!r}") from e

    def __repr__(self) -> str:
        return f"<Reflector {self.kind} rv={self.resource_version} objects={len(self.known)}>"

    def replace(self, items: list[Any], list_rv: str) -> None:
        """Take a full list: report new and changed objects, then the ones that are gone."""
        seen: dict[NamespacedName, str] = {}
        self.take_page(items, seen)
        self.finish_list(seen, list_rv)

    def take_page(self, items: list[Any], seen: dict[NamespacedName, str]) -> None:
        """Report the new and changed objects of one page of a list as it arrives, noting each in
        ``seen``. Pages are taken one by one rather than gathered: 10,000 slices held at once as
        JSON are half a million objects for the garbage collector to walk, again and again."""
        for obj in items:
            key = object_key(obj) if isinstance(obj, dict) else None
            if key is None:
                logger.warning("%s list: skipping an item without metadata.name", self.kind)
                continue
            rv = resource_version(obj)
            seen[key] = rv
            if not rv or self.known.get(key) != rv:
                # LIST items come without kind/apiVersion; watch events have them. Hand out one shape.
                obj.setdefault("kind", self.kind)
                obj.setdefault("apiVersion", self.resource.api_version)
                self._deliver(key, obj)

    def finish_list(self, seen: dict[NamespacedName, str], list_rv: str) -> None:
        """The list is complete: report the objects it no longer has; watch from ``list_rv``."""
        for key in sorted(self.known.keys() - seen.keys()):
            self._deliver(key, None)
        self.known = seen
        self.resource_version = list_rv
        self.lines += 1
        self.stats.lists[self.kind] += 1
        if not self.synced:
            self.synced = True
            try:
                self._on_synced()
            except Exception as e:
                raise HandlerError(f"{self.kind} synced handler failed: {e!r}") from e

    def apply(self, event: Any) -> None:
        """Take one watch event. Raises Expired on 410, ApiError on other ERRORs, ValueError if malformed."""
        self.lines += 1
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ValueError(f"malformed {self.kind} watch event: {str(event)[:200]}")
        kind, obj = event.get("type"), event["object"]
        self.stats.events[self.kind, str(kind)] += 1
        if kind == "BOOKMARK":
            self.resource_version = resource_version(obj) or self.resource_version
            return
        if kind == "ERROR":
            raise status_error(obj)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            logger.warning("%s watch: ignoring an event of unknown type %r", self.kind, kind)
            return
        key = object_key(obj)
        if key is None:
            logger.warning("%s watch: ignoring a %s event without metadata.name", self.kind, kind)
            return
        rv = resource_version(obj)
        if kind == "DELETED":
            if self.known.pop(key, None) is not None:
                self._deliver(key, None)
        else:
            self.known[key] = rv
            self._deliver(key, obj)
        self.resource_version = rv or self.resource_version

    def expire(self) -> None:
        """The resourceVersion is gone from the server's history: relist next."""
        self.resource_version = None
        self.stats.expired[self.kind] += 1


def status_error(status: Any) -> Expired | ApiError:
    """The exception for a Status object (from an ERROR event or an error response body)."""
    if not isinstance(status, Mapping):
        return ApiError(0, "Unknown", str(status)[:200])
    code = status.get("code")
    code = code if isinstance(code, int) else 0
    message = str(status.get("message") or "")
    if code == 410:
        return Expired(message)
    return ApiError(code, str(status.get("reason") or "Unknown"), message)


class Backoff:
    """Exponential backoff with jitter: initial, doubling to a cap, each delay stretched up to +50 %."""

    def __init__(self, initial: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.cap = cap
        self._rng = rng
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = self._next * (1 + 0.5 * self._rng())
        self._next = min(self.cap, self._next * 2)
        return delay


class ApiHealth:
    """Logs API failures at a sane rate, across all watches.

    The first failure is a warning; while anything keeps failing, a reminder at most every
    ``interval`` seconds; one info line when every watch has succeeded again.
    """

    def __init__(self, *, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._failing: set[str] = set()
        self._since = 0.0
        self._last_log = 0.0

    @property
    def failing(self) -> bool:
        return bool(self._failing)

    def failed(self, what: str, error: str) -> None:
        now = self._clock()
        if not self._failing:
            self._since = self._last_log = now
            logger.warning("Kubernetes API request failed (%s: %s); retrying with backoff", what, error)
        elif now - self._last_log >= self.interval:
            self._last_log = now
            logger.warning("Kubernetes API still failing after %.0fs (%s: %s)",
                           now - self._since, what, error)
        else:
            logger.debug("Kubernetes API request failed (%s: %s)", what, error)
        self._failing.add(what)

    def succeeded(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            if not self._failing:
                logger.info("Kubernetes API reachable again after %.1fs", self._clock() - self._since)


# -- one pass (I/O) -----------------------------------------------------------------------------


def _timeout(settings: WatchSettings) -> aiohttp.ClientTimeout:
    # sock_read bounds the silence between two reads, so it also catches a stalled watch.
    return aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                 sock_read=settings.watch_idle_timeout)


async def _check(resp: aiohttp.ClientResponse) -> None:
    """kubernetes_asyncio does not check the status with _preload_content=False; do it here."""
    if resp.status == 200:
        return
    body = await resp.read()
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        raise status_error({**status, "code": resp.status})
    if resp.status == 410:
        raise Expired(body[:200].decode(errors="replace"))
    raise ApiError(resp.status, resp.reason or "", body[:200].decode(errors="replace"))


async def _request(reflector: Reflector, settings: WatchSettings, **params: Any) -> aiohttp.ClientResponse:
    resp = await reflector.resource.list_fn(**reflector.resource.selectors(), **params,
                                            _preload_content=False, _request_timeout=_timeout(settings))
    return cast(aiohttp.ClientResponse, resp)


async def _list_page(reflector: Reflector, settings: WatchSettings, on_response: Callable[[], None],
                     seen: dict[NamespacedName, str], **params: Any) -> dict[str, Any]:
    """One LIST response. Its items go to the reflector as they are decoded (see liststream: a
    21 MiB list decoded whole raised RSS by ~90 MiB for good); returns its other fields."""
    resp = await _request(reflector, settings, **params)
    try:
        await _check(resp)
        on_response()
        decoder = ListDecoder()
        try:
            # 64 KiB at a time: uvloop hands over reads of up to ~768 KiB, and strings that size,
            # freed between long-lived allocations, left ~40 MiB of the heap fragmented.
            async for chunk in resp.content.iter_chunked(65536):
                if items := decoder.feed(chunk):
                    reflector.take_page(items, seen)
            reflector.take_page(decoder.close(), seen)
        except ValueError as e:
            raise ValueError(f"{reflector.kind} list: {e}") from e
    finally:
        resp.release()
    reflector.stats.pages[reflector.kind] += 1
    return decoder.fields


async def relist(reflector: Reflector, settings: WatchSettings, on_response: Callable[[], None]) -> None:
    """List in full, page by page, and hand the result to the reflector.

    The first list may be served from the apiserver's watch cache (resourceVersion "0", as client-go;
    the cache may then ignore ``limit``); a relist after 410 asks for a consistent read (no
    resourceVersion). Every page of one list comes from the same snapshot; its resourceVersion is the
    list's.
    """
    params: dict[str, Any] = {} if reflector.synced else {"resource_version": "0"}
    limit = settings.list_page_size
    seen: dict[NamespacedName, str] = {}
    # Items are handed over as they are decoded (objects newer than the watch had are real states
    # all the same); only the deletions wait for the whole list.
    fields = await _list_page(reflector, settings, on_response, seen, **params,
                              **({"limit": limit} if limit else {}))
    while True:
        list_rv = resource_version(fields)
        metadata = fields.get("metadata")
        token = metadata.get("continue") if isinstance(metadata, dict) else None
        if not token:
            break
        try:
            fields = await _list_page(reflector, settings, on_response, seen, limit=limit, _continue=token)
        except Expired:
            # The snapshot behind the token was compacted: start over in one piece (client-go's pager).
            logger.info("%s: list continuation expired after %d items; listing in one piece",
                        reflector.kind, len(seen))
            seen = {}
            fields = await _list_page(reflector, settings, on_response, seen)
    if not list_rv:
        raise ValueError(f"{reflector.kind} list: no metadata.resourceVersion")
    logger.info("%s: listed %d objects at resourceVersion %s", reflector.kind, len(seen), list_rv)
    reflector.finish_list(seen, list_rv)


async def watch_stream(reflector: Reflector, settings: WatchSettings,
                       on_response: Callable[[], None]) -> None:
    """Follow one watch from ``reflector.resource_version`` until the server ends it."""
    timeout = random.randint(int(settings.watch_timeout_min), int(settings.watch_timeout_max))
    resp = await _request(reflector, settings, watch=True, allow_watch_bookmarks=True,
                          resource_version=reflector.resource_version, timeout_seconds=timeout)
    try:
        await _check(resp)
        on_response()
        async for line in resp.content:
            if line.strip():
                reflector.apply(json.loads(line))
    except BaseException:
        resp.close()  # do not hand a half-read stream back to the connection pool
        raise
    resp.release()


async def watch_pass(reflector: Reflector, settings: WatchSettings, on_response: Callable[[], None]) -> None:
    """One bounded step: list if there is no resourceVersion, then one watch stream.

    Returns when the server ends the stream cleanly. Raises Expired (relist), or an error from
    RETRYABLE (retry from the same resourceVersion after a backoff).
    """
    if reflector.resource_version is None:
        await relist(reflector, settings, on_response)
    await watch_stream(reflector, settings, on_response)


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return f"no response or no data within the timeout ({type(err).__name__})"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


async def watch_forever(reflector: Reflector, settings: WatchSettings, health: ApiHealth) -> None:
    """Repeat watch_pass until cancelled; the only infinite loop here, kept trivially small.

    A clean end re-watches at once, and a 410 relists at once, unless that looks like a loop: a
    stream that ended within a second without a single line, or a 410 right after a fresh list (a
    server or proxy must not make us spin). Errors back off; any progress (a list, an event, a
    bookmark) resets the backoff.
    """
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    while True:
        lines, started, listed = reflector.lines, time.monotonic(), reflector.resource_version is None
        try:
            await watch_pass(reflector, settings, lambda: health.succeeded(reflector.kind))
        except Expired as e:
            logger.info("%s: resourceVersion %s expired (%s); relisting", reflector.kind,
                        reflector.resource_version, e)
            reflector.expire()
            if listed:
                await asyncio.sleep(backoff.next())
            continue
        except RETRYABLE as e:
            health.failed(reflector.kind, _describe(e))
        else:
            logger.debug("%s: watch ended at resourceVersion %s", reflector.kind, reflector.resource_version)
            if reflector.lines != lines or time.monotonic() - started >= 1.0:
                backoff.reset()
                continue
        if reflector.lines != lines:
            backoff.reset()
        await asyncio.sleep(backoff.next())


# -- wiring -------------------------------------------------------------------------------------


class _NodeSink:
    """Adapts the Node reflector to ``on_node``; reports None once if the first list has no node."""

    def __init__(self, on_node: Callable[[Obj | None], None]) -> None:
        self._on_node = on_node
        self._present = False

    def deliver(self, key: NamespacedName, obj: Obj | None) -> None:
        self._present = obj is not None
        self._on_node(obj)

    def synced(self) -> None:
        if not self._present:
            self._on_node(None)


def reflectors(api: client.ApiClient, handler: Handler, *, node_name: str,
               on_node: Callable[[Obj | None], None], settings: WatchSettings,
               stats: WatchStats | None = None) -> list[Reflector]:
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    node = _NodeSink(on_node)
    return [
        Reflector(Resource("Service", "v1", core.list_service_for_all_namespaces,
                           label_selector=settings.label_selector),
                  handler.on_service, lambda: handler.on_synced("Service"), stats),
        Reflector(Resource("EndpointSlice", "discovery.k8s.io/v1",
                           discovery.list_endpoint_slice_for_all_namespaces,
                           label_selector=settings.label_selector),
                  handler.on_endpoint_slice, lambda: handler.on_synced("EndpointSlice"), stats),
        Reflector(Resource("Node", "v1", core.list_node, field_selector=f"metadata.name={node_name}"),
                  node.deliver, node.synced, stats),
    ]


async def load_configuration(*, kubeconfig: str | None = None, master: str | None = None,
                             environ: Mapping[str, str] = os.environ,
                             token_file: str = incluster_config.SERVICE_TOKEN_FILENAME,
                             cert_file: str = incluster_config.SERVICE_CERT_FILENAME) -> client.Configuration:
    """kube-proxy's rules: a kubeconfig (``master`` overrides its server), else ``master`` alone
    (no credentials), else the in-cluster service account.

    In-cluster, ``$SVCPROXY_APISERVER`` replaces the ``kubernetes`` Service address from
    ``KUBERNETES_SERVICE_HOST``/``_PORT``: in a DaemonSet that clusterIP is served by svcproxy itself.
    """
    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        if master:
            cfg.host = master.rstrip("/")
        return cfg
    if master:
        cfg.host = master.rstrip("/")
        return cfg
    override = environ.get(APISERVER_ENV, "")
    env = dict(environ)
    if override:
        url = urllib.parse.urlsplit(override)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise config.ConfigException(f"${APISERVER_ENV}: {override!r} is not an http(s) URL")
        env[incluster_config.SERVICE_HOST_ENV_NAME] = url.hostname
        env[incluster_config.SERVICE_PORT_ENV_NAME] = str(url.port or 443)
    loader = incluster_config.InClusterConfigLoader(token_filename=token_file, cert_filename=cert_file,
                                                    environ=env)
    loader.load_and_set(cfg)
    if override:
        cfg.host = override.rstrip("/")
    return cfg


async def watch_all(api: client.ApiClient, handler: Handler, *, node_name: str,
                    on_node: Callable[[Obj | None], None], settings: WatchSettings,
                    stats: WatchStats | None = None) -> None:
    """Run every reflector until cancelled; if one fails unexpectedly, stop the others and raise."""
    health = ApiHealth(interval=settings.unreachable_log_interval)
    tasks = [asyncio.create_task(watch_forever(r, settings, health), name=f"watch {r.kind}")
             for r in reflectors(api, handler, node_name=node_name, on_node=on_node, settings=settings,
                                 stats=stats)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run(handler: Handler, *, node_name: str, on_node: Callable[[Obj | None], None],
              kubeconfig: str | None = None, master: str | None = None,
              configuration: client.Configuration | None = None,
              settings: WatchSettings | None = None, stats: WatchStats | None = None) -> None:
    """List+watch Services and EndpointSlices into ``handler`` and the own Node into ``on_node``.

    Runs until cancelled. ``handler.on_synced(kind)`` follows each kind's first full list.
    ``configuration`` (from :func:`load_configuration`) wins over ``kubeconfig``/``master``.
    """
    settings = settings or WatchSettings()
    cfg = configuration or await load_configuration(kubeconfig=kubeconfig, master=master)
    logger.info("watching the Kubernetes API at %s (node %s)", cfg.host, node_name)
    async with client.ApiClient(cfg) as api:
        api.user_agent = settings.user_agent
        await watch_all(api, handler, node_name=node_name, on_node=on_node, settings=settings, stats=stats)

