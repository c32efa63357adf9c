"""A fake Kubernetes API server that speaks the real list/watch wire protocol, on aiohttp.

What it does like kube-apiserver (the parts a list+watch client depends on):

* one global resourceVersion counter shared by every kind, like etcd's revision;
* LIST returns ``<Kind>List`` with ``metadata.resourceVersion``; items carry no kind/apiVersion;
* WATCH (``watch=true|1``) is a chunked stream of ``{"type", "object"}`` JSON lines: with no
  resourceVersion (or "0") synthetic ADDED events for the current state, otherwise the history after
  it, then live events; BOOKMARKs when ``allowWatchBookmarks`` is set; ``timeoutSeconds`` ends the
  stream cleanly; a resourceVersion older than the compaction point gets ``ERROR`` 410 Expired;
* label selectors (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``) and
  field selectors on ``metadata.name`` / ``metadata.namespace``, on LIST and WATCH. On a watch, an
  object that stops matching arrives as DELETED (with its previous content) and one that starts
  matching as ADDED, as the apiserver's watch cache does.

Test controls are plain methods (``upsert``, ``delete``, ``compact``, ``expire_watches``, ...); the
request log (``requests``) lets a test assert what the client asked for. Run it standalone with
``python -m testbed.fakeapi --port N``; POST/PUT/DELETE on object paths and ``POST /fake/<control>``
drive it from outside.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

Obj = dict[str, Any]


# -- kinds ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def group_version(self) -> str:
        return self.api_version


DEFAULT_KINDS = (
    Kind("Service", "v1", "services", namespaced=True),
    Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", namespaced=True),
    Kind("Node", "v1", "nodes", namespaced=False),
)


# -- selectors --------------------------------------------------------------------------------


class SelectorError(ValueError):
    """A selector the real apiserver would reject with 400 BadRequest."""


_LABEL_PART = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
_SET_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One term of a label selector. ``op`` is one of exists, !exists, =, !=, in, notin."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        # != and notin also match objects without the label (apimachinery semantics).
        return not present or labels[self.key] not in self.values


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [t.strip() for t in terms]


def _check_key(key: str, text: str) -> str:
    if not _LABEL_PART.match(key):
        raise SelectorError(f"invalid label key {key!r} in selector {text!r}")
    return key


def _check_value(value: str, text: str) -> str:
    if value and not _LABEL_PART.match(value):
        raise SelectorError(f"invalid label value {value!r} in selector {text!r}")
    return value


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a label selector; comma means AND. The empty selector matches everything."""
    if not text.strip():
        return ()
    reqs = []
    for term in _split_terms(text):
        if not term:
            raise SelectorError(f"empty term in selector {text!r}")
        if m := _SET_TERM.match(term):
            values = frozenset(_check_value(v.strip(), text) for v in m["values"].split(","))
            reqs.append(Requirement(_check_key(m["key"], text), m["op"], values))
        elif term.startswith("!"):
            reqs.append(Requirement(_check_key(term[1:].strip(), text), "!exists"))
        else:
            for op in ("!=", "==", "="):
                if op in term:
                    key, _, value = term.partition(op)
                    norm = "=" if op == "==" else op
                    reqs.append(Requirement(_check_key(key.strip(), text), norm,
                                            frozenset({_check_value(value.strip(), text)})))
                    break
            else:
                reqs.append(Requirement(_check_key(term, text), "exists"))
    return tuple(reqs)


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    field: str
    """``metadata.name`` or ``metadata.namespace``."""
    value: str
    negate: bool = False

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        actual = meta.get(self.field.removeprefix("metadata.")) or ""
        return (actual == self.value) != self.negate


FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str) -> tuple[FieldRequirement, ...]:
    if not text.strip():
        return ()
    reqs = []
    for term in _split_terms(text):
        for op in ("!=", "==", "="):
            if op in term:
                field, _, value = term.partition(op)
                field = field.strip()
                if field not in FIELDS:
                    raise SelectorError(f'field label not supported: {field}')
                reqs.append(FieldRequirement(field, value.strip(), negate=op == "!="))
                break
        else:
            raise SelectorError(f"invalid field selector: {term!r}")
    return tuple(reqs)


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which objects a LIST or WATCH request sees: namespace (path) + label and field selectors."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(f.matches(obj) for f in self.fields)


# -- store and history ------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One change in the history. DELETED carries the last content with the deletion's RV."""

    rv: int
    kind: str
    type: str
    obj: Obj
    prev: Obj | None
    _line: bytes | None = dataclasses.field(default=None, repr=False)

    def line(self) -> bytes:
        if self._line is None:
            self._line = _line(self.type, self.obj)
        return self._line


def _line(event_type: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def status_body(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
           409: "AlreadyExists", 410: "Expired", 429: "TooManyRequests", 500: "InternalError",
           503: "ServiceUnavailable", 504: "Timeout"}


@dataclasses.dataclass
class RequestRecord:
    """One request as the server saw it; ``status`` is filled in when the response starts."""

    method: str
    path: str
    query: dict[str, str]
    kind: str | None
    verb: str
    """list, watch, get, create, update, delete or other."""
    status: int | None = None

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")


@dataclasses.dataclass
class _Injection:
    kind: str
    verb: str
    status: int
    count: int
    message: str


# -- watches ----------------------------------------------------------------------------------

_CLOSE = b""
"""Queue item: end the stream cleanly."""


def translate(event: Event, kind: Kind, flt: Filter) -> bytes | None:
    """The line a ``kind`` watcher with ``flt`` sees for ``event`` (the watch cache's convertToWatchEvent)."""
    if event.kind != kind.kind:
        return None
    cur = event.type != "DELETED" and flt.matches(event.obj)
    old = event.prev is not None and flt.matches(event.prev)
    if cur and old:
        return event.line()
    if cur:
        return event.line() if event.type == "ADDED" else _line("ADDED", event.obj)
    if old:
        if event.type == "DELETED":
            return event.line()
        assert event.prev is not None
        gone = dict(event.prev, metadata=dict(event.prev["metadata"], resourceVersion=str(event.rv)))
        return _line("DELETED", gone)
    return None


class _Watch:
    """One open watch stream: a queue of encoded lines fed by the server, drained by the handler."""

    def __init__(self, kind: Kind, flt: Filter, *, bookmarks: bool, request: web.Request) -> None:
        self.kind = kind
        self.filter = flt
        self.bookmarks = bookmarks
        self.request = request
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.running = asyncio.Event()
        self.running.set()

    def offer(self, event: Event) -> None:
        if line := translate(event, self.kind, self.filter):
            self.queue.put_nowait(line)

    def bookmark(self, rv: int) -> None:
        if self.bookmarks:
            obj = {"kind": self.kind.kind, "apiVersion": self.kind.api_version,
                   "metadata": {"resourceVersion": str(rv)}}
            self.queue.put_nowait(_line("BOOKMARK", obj))

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


# -- the server -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


class FakeApiServer:
    """A fake kube-apiserver on 127.0.0.1. Use ``async with FakeApiServer() as api:`` or start()/stop().

    Parameters:
        host, port: where to listen; port 0 picks a free port (kept across set_down/set_up).
        bookmark_interval: seconds between periodic BOOKMARKs on watches that allow them; None = only
            on demand (``send_bookmarks``). kube-apiserver sends them about once a minute.
        expired_as_http: answer a too-old resourceVersion with HTTP 410 instead of a 200 + ERROR event.
        max_history: keep at most this many events; older ones are compacted away (watch cache size).
        default_watch_timeout: seconds a watch without ``timeoutSeconds`` lasts; None = until closed.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float | None = None,
        expired_as_http: bool = False,
        max_history: int | None = None,
        default_watch_timeout: float | None = None,
        kinds: Iterable[Kind] = DEFAULT_KINDS,
    ) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.expired_as_http = expired_as_http
        self.max_history = max_history
        self.default_watch_timeout = default_watch_timeout
        self.kinds = {k.kind: k for k in kinds}
        self._by_path = {(k.group_version, k.plural): k for k in self.kinds.values()}
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in self.kinds}
        self._history: list[Event] = []
        self._rv = 1
        self._compacted = 0
        self._snapshots: dict[int, tuple[int, list[Obj]]] = {}
        """Paginated lists in progress: token id -> (resourceVersion, items), as etcd's snapshot."""
        self._watches: set[_Watch] = set()
        self._injections: list[_Injection] = []
        self._runner: web.AppRunner | None = None
        self._down = False
        self._tick = asyncio.Event()
        self.requests: list[RequestRecord] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a watch handler learns at once that its client went away.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                               shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._down = False

    async def stop(self) -> None:
        for w in list(self._watches):
            w.abort()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def set_down(self, down: bool) -> None:
        """Simulate the API server going away (connections cut, port refusing) and coming back."""
        if down and not self._down:
            await self.stop()
            self._down = True
        elif not down and self._down:
            await self.start()
        self._changed()

    # -- object store controls --------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion handed out (the etcd revision)."""
        return self._rv

    def _kind(self, kind: str) -> Kind:
        try:
            return self.kinds[kind]
        except KeyError:
            raise ValueError(f"unknown kind {kind!r}") from None

    def _key(self, kind: Kind, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "default") if kind.namespaced else "", name)

    def upsert(self, obj: Mapping[str, Any]) -> Obj:
        """Create or replace an object (``kind`` and ``metadata.name`` required); returns the stored copy."""
        kind = self._kind(str(obj.get("kind")))
        new: Obj = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        key = self._key(kind, meta.get("namespace"), name)
        if kind.namespaced:
            meta["namespace"] = key[0]
        else:
            meta.pop("namespace", None)
        store = self._objects[kind.kind]
        old = store.get(key)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"] if old else _now()
        new["kind"], new["apiVersion"] = kind.kind, kind.api_version
        store[key] = new
        self._record(Event(self._rv, kind.kind, "MODIFIED" if old else "ADDED", new, old))
        return copy.deepcopy(new)

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        """Delete an object; returns its last content (with the deletion's RV), None if absent."""
        k = self._kind(kind)
        old = self._objects[kind].pop(self._key(k, namespace, name), None)
        if old is None:
            return None
        self._rv += 1
        gone = dict(old, metadata=dict(old["metadata"], resourceVersion=str(self._rv)))
        self._record(Event(self._rv, kind, "DELETED", gone, old))
        return copy.deepcopy(gone)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        obj = self._objects[kind].get(self._key(self._kind(kind), namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str) -> list[Obj]:
        return [copy.deepcopy(o) for o in self._objects[kind].values()]

    def _record(self, event: Event) -> None:
        self._history.append(event)
        if self.max_history is not None and len(self._history) > self.max_history:
            drop = len(self._history) - self.max_history // 2
            self._compacted = self._history[drop - 1].rv
            del self._history[:drop]
        for w in self._watches:
            w.offer(event)
        self._changed()

    # -- watch controls ---------------------------------------------------------------------

    def compact(self) -> int:
        """Forget the history up to now: a watch from an older resourceVersion gets 410 Expired."""
        self._compacted = self._rv
        self._history.clear()
        return self._compacted

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK at the current resourceVersion on every watch that allows them."""
        for w in self._watches:
            w.bookmark(self._rv)
        return self._rv

    def expire_watches(self, kind: str | None = None) -> None:
        """Send ERROR 410 Expired on open watches, then end them."""
        for w in self._open(kind):
            w.queue.put_nowait(_line("ERROR", self._expired_status(self._compacted)))
            w.queue.put_nowait(_CLOSE)

    def close_watches(self, kind: str | None = None) -> None:
        """End open watches cleanly, as a server-side timeout does."""
        for w in self._open(kind):
            w.queue.put_nowait(_CLOSE)

    def drop_watches(self, kind: str | None = None) -> None:
        """Cut open watch connections abruptly (no terminating chunk)."""
        for w in self._open(kind):
            w.abort()

    def stall_watches(self, kind: str | None = None) -> None:
        """Open watches send nothing (not even bookmarks or their timeout's end) until unstalled.

        Watches opened later are not stalled.
        """
        for w in self._open(kind):
            w.running.clear()

    def unstall_watches(self) -> None:
        for w in self._watches:
            w.running.set()

    def inject_error(self, kind: str, status: int, *, verb: str = "watch", count: int = 1,
                     message: str | None = None) -> None:
        """Answer the next ``count`` ``verb`` (list/watch/get) requests for ``kind`` with HTTP ``status``."""
        self._kind(kind)
        if message is None:
            expired = self._expired_status(self._compacted)["message"]
            message = expired if status == 410 else f"injected {status}"
        self._injections.append(_Injection(kind, verb, status, count, message))

    def watchers(self, kind: str | None = None) -> int:
        return len(self._open(kind))

    def _open(self, kind: str | None) -> list[_Watch]:
        return [w for w in self._watches if kind is None or w.kind.kind == kind]

    async def wait_for_watchers(self, kind: str, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` watches of ``kind`` are open (registered and streaming)."""
        await self.wait_for(lambda: self.watchers(kind) >= n, timeout,
                            what=f"{n} {kind} watcher(s), have {self.watchers(kind)}")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        """Wait until ``predicate()`` holds; re-checked on every request, event and watch change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            tick = self._tick
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {what or predicate}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), remaining)

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    # -- request log helpers ----------------------------------------------------------------

    def requests_for(self, kind: str, verb: str | None = None) -> list[RequestRecord]:
        return [r for r in self.requests if r.kind == kind and (verb is None or r.verb == verb)]

    # -- HTTP -------------------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[Kind, str | None, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            gv, rest = parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if len(rest) not in (1, 2):
            return None
        kind = self._by_path.get((gv, rest[0]))
        if kind is None or (namespace is not None and not kind.namespaced):
            return None
        return kind, namespace, rest[1] if len(rest) == 2 else None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        resolved = self._resolve(request.path)
        kind = resolved[0] if resolved else None
        name = resolved[2] if resolved else None
        verb = _verb(request.method, name is not None, _truthy(query.get("watch")))
        record = RequestRecord(request.method, request.path, query, kind.kind if kind else None, verb)
        self.requests.append(record)
        self._changed()
        try:
            resp = await self._handle(request, record, resolved)
        except SelectorError as e:
            resp = _status(400, str(e))
        except web.HTTPException as e:
            resp = _status(e.status, e.reason)
        if record.status is None:
            record.status = resp.status
            self._changed()
        return resp

    async def _handle(self, request: web.Request, record: RequestRecord,
                      resolved: tuple[Kind, str | None, str | None] | None) -> web.StreamResponse:
        if request.path.startswith("/fake/"):
            return await self._control(request)
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"})
        if request.path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if resolved is None:
            return _status(404, f"the server could not find the requested resource ({request.path})")
        kind, namespace, name = resolved
        for inj in self._injections:
            if inj.kind == kind.kind and inj.verb == record.verb and inj.count > 0:
                inj.count -= 1
                return _status(inj.status, inj.message)
        if record.verb == "watch":
            return await self._watch(request, record, kind, namespace, name)
        if record.verb == "list":
            return self._list(request, kind, namespace)
        if record.verb == "get":
            assert name is not None
            obj = self._objects[kind.kind].get(self._key(kind, namespace, name))
            if obj is None:
                return _status(404, f'{kind.plural} "{name}" not found')
            return _json(obj)
        return await self._write(request, record.verb, kind, namespace, name)

    def _filter(self, request: web.Request, namespace: str | None, name: str | None) -> Filter:
        fields = parse_field_selector(request.query.get("fieldSelector", ""))
        if name is not None:
            fields += (FieldRequirement("metadata.name", name),)
        return Filter(namespace, parse_label_selector(request.query.get("labelSelector", "")), fields)

    def _list(self, request: web.Request, kind: Kind, namespace: str | None) -> web.Response:
        """A LIST; with ``limit``, one page and a ``continue`` token over a fixed snapshot. A token
        whose snapshot is older than the compaction point gets 410 Expired, as from etcd. Like
        kube-apiserver, ``resourceVersion=0`` is answered whole (from its watch cache): no paging."""
        limit = int(request.query.get("limit") or 0)
        if request.query.get("resourceVersion") == "0":
            limit = 0
        token = request.query.get("continue", "")
        if token:
            snap_id, _, offset_text = token.partition(":")
            snap = self._snapshots.get(int(snap_id))
            if snap is None or snap[0] < self._compacted:
                return _status(410, "The provided continue parameter is too old to display a consistent list "
                                    "result. You can start a new list without the continue parameter.")
            rv, items = snap
            offset = int(offset_text)
        else:
            flt = self._filter(request, namespace, None)
            strip = ("kind", "apiVersion")
            items = [{k: v for k, v in o.items() if k not in strip}
                     for o in self._objects[kind.kind].values() if flt.matches(o)]
            rv, offset = self._rv, 0
            snap_id = str(len(self._snapshots) + 1)
            if limit and len(items) > limit:
                self._snapshots[int(snap_id)] = (rv, items)
        page = items[offset:offset + limit] if limit else items
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{snap_id}:{offset + limit}"
        body = {"kind": kind.list_kind, "apiVersion": kind.api_version, "metadata": meta, "items": page}
        return _json(body)

    def _expired_status(self, rv: int | str) -> Obj:
        return status_body(410, "Expired", f"too old resource version: {rv} ({self._compacted})")

    def _initial_lines(self, kind: Kind, flt: Filter, rv_param: str) -> list[bytes] | Obj:
        """The lines a new watch starts with, or the Status of a 410 if ``rv_param`` is too old."""
        if rv_param in ("", "0"):
            objs = sorted((o for o in self._objects[kind.kind].values() if flt.matches(o)),
                          key=lambda o: int(o["metadata"]["resourceVersion"]))
            return [_line("ADDED", o) for o in objs]
        try:
            rv = int(rv_param)
        except ValueError:
            raise SelectorError(f"invalid resourceVersion {rv_param!r}") from None
        if rv < self._compacted:
            return self._expired_status(rv)
        start = bisect.bisect_right(self._history, rv, key=lambda e: e.rv)
        return [line for e in self._history[start:] if (line := translate(e, kind, flt))]

    async def _watch(self, request: web.Request, record: RequestRecord, kind: Kind,
                     namespace: str | None, name: str | None) -> web.StreamResponse:
        flt = self._filter(request, namespace, name)
        initial = self._initial_lines(kind, flt, request.query.get("resourceVersion", ""))
        if isinstance(initial, dict) and self.expired_as_http:
            return _json(initial, status=410)
        timeout = self.default_watch_timeout
        if "timeoutSeconds" in request.query:
            timeout = float(request.query["timeoutSeconds"])
        bookmarks = _truthy(request.query.get("allowWatchBookmarks"))
        watch = _Watch(kind, flt, bookmarks=bookmarks, request=request)
        # Register before the first await, so no event can fall between the replay and the live feed.
        if isinstance(initial, dict):
            watch.queue.put_nowait(_line("ERROR", initial))
            watch.queue.put_nowait(_CLOSE)
        else:
            for line in initial:
                watch.queue.put_nowait(line)
        self._watches.add(watch)
        try:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            record.status = 200
            self._changed()
            try:
                await self._pump(watch, resp, timeout)
                await resp.write_eof()
            except ConnectionError:
                pass  # the client went away (or drop_watches cut it)
            return resp
        finally:
            self._watches.discard(watch)
            self._changed()

    async def _pump(self, watch: _Watch, resp: web.StreamResponse, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        interval = self.bookmark_interval if watch.bookmarks else None
        next_bookmark = None if interval is None else loop.time() + interval
        while True:
            now = loop.time()
            if next_bookmark is not None and interval is not None and now >= next_bookmark:
                watch.bookmark(self._rv)
                next_bookmark = now + interval
            waits = [t - now for t in (deadline, next_bookmark) if t is not None]
            try:
                item = await asyncio.wait_for(watch.queue.get(), min(waits) if waits else None)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    await watch.running.wait()  # a stalled stream does not even end on time
                    return
                continue
            await watch.running.wait()
            batch = [item]
            while item != _CLOSE and not watch.queue.empty() and len(batch) < 1000:
                item = watch.queue.get_nowait()
                batch.append(item)
            await resp.write(b"".join(batch))
            if item == _CLOSE:
                return

    async def _write(self, request: web.Request, verb: str, kind: Kind, namespace: str | None,
                     name: str | None) -> web.Response:
        if verb == "delete" and name is not None:
            gone = self.delete(kind.kind, namespace, name)
            return _json(gone) if gone else _status(404, f'{kind.plural} "{name}" not found')
        if verb not in ("create", "update"):
            return _status(405, f"{request.method} is not supported here")
        try:
            obj = await request.json()
        except ValueError:
            return _status(400, "request body is not JSON")
        if not isinstance(obj, dict):
            return _status(400, "request body is not an object")
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        if namespace is not None:
            meta["namespace"] = namespace
        if name is not None:
            meta["name"] = name
        if verb == "create" and self.get(kind.kind, meta.get("namespace"), meta.get("name", "")):
            return _status(409, f'{kind.plural} "{meta.get("name")}" already exists')
        try:
            stored = self.upsert(obj)
        except ValueError as e:
            return _status(400, str(e))
        return _json(stored, status=201 if verb == "create" else 200)

    async def _control(self, request: web.Request) -> web.Response:
        """``POST /fake/<compact|bookmark|expire|close|drop|stall|unstall>[?kind=K]``, for standalone use."""
        action = request.path.removeprefix("/fake/")
        kind = request.query.get("kind")
        actions: dict[str, Callable[[], object]] = {
            "compact": self.compact,
            "bookmark": self.send_bookmarks,
            "expire": lambda: self.expire_watches(kind),
            "close": lambda: self.close_watches(kind),
            "drop": lambda: self.drop_watches(kind),
            "stall": lambda: self.stall_watches(kind),
            "unstall": self.unstall_watches,
        }
        if request.method != "POST" or action not in actions:
            return _status(404, f"no control {action!r}")
        actions[action]()
        return web.json_response({"resourceVersion": str(self._rv)})


def _verb(method: str, named: bool, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else "get" if named else "list"
    return {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method, "other")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _status(code: int, message: str) -> web.Response:
    return _json(status_body(code, REASONS.get(code, "Unknown"), message), status=code)
