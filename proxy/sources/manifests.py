"""Services and EndpointSlices from local YAML (or JSON) files: the embedded, API-server-free mode.

``--manifests PATH`` names a file or a directory (read recursively, hidden entries skipped, so a
mounted ConfigMap's ``..data`` links are not read twice). Files are multi-document and may hold
``Service``, ``EndpointSlice`` and ``List`` objects, and this node's ``Node`` (its zone label and
deletion state matter, as from the API). Files are polled for changes.

A half-saved edit never takes a service down (editors often save in place: truncate, then write):

* a file that fails to parse is reported with its line and keeps the objects it last had;
* so does a file with a document that has no ``kind`` or ``apiVersion`` (a file cut short
  inside a document), which kubectl would refuse too;
* a file that became empty keeps its objects, with a warning: delete the file to remove them;
* a file that changed while it was read is read again at the next poll.

Sizes are bounded: a file over ``MAX_FILE_BYTES`` is refused without being read, and so is one
whose YAML aliases expand to more than ``MAX_EXPANDED_NODES`` values (a "billion laughs" file of a
few hundred bytes would otherwise hold the proxy for minutes when compared or converted).

Files run on a worker thread of the control loop; one over ``INLINE_BYTES`` is parsed in a child
process (proxy.sources.parse_child), as libyaml would hold the GIL for the whole parse.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.model import NamespacedName
from proxy.sources import Handler, parse_child
from proxy.tracker import ENDPOINT_SLICES, SERVICES

logger = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
NODES = "Node"
KINDS = (SERVICES, ENDPOINT_SLICES, NODES)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_FILE_BYTES = 32 * 1024 * 1024
"""Larger manifest files are refused (10,000 Services with 10 endpoints each take about 25 MB)."""
MAX_EXPANDED_NODES = 2_000_000
"""Values a file may hold once its aliases are expanded (10x what that 25 MB file holds)."""
INLINE_BYTES = 32 * 1024
"""Larger files are parsed in a child process (libyaml holds the GIL ~40 ms for this much)."""

ObjKey = tuple[str, NamespacedName]


class ManifestError(ValueError):
    """A file that cannot be used; the message names the file, the line and the reason."""


@dataclass
class _File:
    signature: tuple[int, int, int]
    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)


def decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


def load(path: Path, raw: bytes) -> dict[ObjKey, dict[str, Any]]:
    """``parse`` for a file's bytes: here if small, in a child process if not."""
    if len(raw) <= INLINE_BYTES:
        return parse(path, decode(path, raw))
    try:
        return parse_child.parse(path, raw)
    except parse_child.ChildError as e:
        raise ManifestError(str(e)) from None


def parse(path: Path, text: str) -> dict[ObjKey, dict[str, Any]]:
    """The Services and EndpointSlices in one file; raises ManifestError on a bad file."""
    try:
        docs = list(yaml.load_all(text, Loader=Loader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"{where}: {reason}") from None
    _check_expansion(path, docs)
    objects: dict[ObjKey, dict[str, Any]] = {}
    for i, doc in enumerate(docs, 1):
        if doc is None:
            continue
        for obj in _flatten(path, i, doc):
            kind = obj.get("kind")
            for required in ("apiVersion", "kind"):
                if not isinstance(obj.get(required), str) or not obj[required]:
                    raise ManifestError(f"{path}: document {i}: no {required} (a file cut short?)")
            if kind not in KINDS:
                logger.debug("%s: document %d: skipping kind %r", path, i, kind)
                continue
            meta = obj.get("metadata")
            name = meta.get("name") if isinstance(meta, Mapping) else None
            if not isinstance(name, str) or not name:
                raise ManifestError(f"{path}: document {i}: {kind} has no metadata.name")
            namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
            if kind == NODES:
                namespace = ""  # cluster-scoped
            elif not (isinstance(namespace, str) and namespace):
                namespace = "default"
            key = NamespacedName(str(namespace or ""), name)
            objects[(kind, key)] = obj
    return objects


def _check_expansion(path: Path, docs: list[Any]) -> None:
    """Refuse a file whose aliases expand beyond MAX_EXPANDED_NODES values.

    YAML aliases share one object, so loading is cheap, but everything that walks the result
    (comparing, converting) pays for the expansion. Sizes are memoised per shared object, so this
    check costs one visit per distinct value however deep the sharing goes.
    """
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a self-referencing alias counts once, no endless loop
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                break
        sizes[id(node)] = total
        return total

    total = 0
    for doc in docs:
        total += size(doc)
        if total > MAX_EXPANDED_NODES:
            raise ManifestError(f"{path}: expands to more than {MAX_EXPANDED_NODES:,} values "
                                "(YAML aliases nested too deep?); refused")


def _flatten(path: Path, index: int, doc: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: document {index}: expected an object, got {type(doc).__name__}")
    if str(doc.get("kind", "")).endswith("List") and "items" in doc:
        items = doc.get("items")
        if not isinstance(items, list):
            raise ManifestError(f"{path}: document {index}: List items must be a list")
        for item in items:
            yield from _flatten(path, index, item)
    else:
        yield doc


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ManifestSet:
    """The objects of every file under a path, re-read when a file changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[Path, _File] = {}
        self._list_failed = False
        self.objects: dict[ObjKey, dict[str, Any]] = {}

    def _paths(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        if not self.root.is_dir():
            return []
        found = []

        def fail(err: OSError) -> None:
            raise err  # os.walk would skip what it cannot list, and its files would look deleted

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=fail, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(SUFFIXES) and not f.startswith(".")]
        return found

    def scan(self) -> tuple[dict[ObjKey, dict[str, Any]], list[ObjKey]]:
        """Re-read changed files; return (objects added or changed, keys deleted) since last scan."""
        try:
            paths = self._paths()
        except OSError as e:
            # Out of descriptors, say: not knowing which files exist is not the same as none.
            if not self._list_failed:
                logger.error("cannot list %s (%s); keeping every object until it can be read", self.root, e)
            self._list_failed = True
            return {}, []
        if self._list_failed:
            logger.info("%s can be listed again", self.root)
            self._list_failed = False
        if not paths and not self.root.exists():
            logger.error("manifests path %s does not exist", self.root)
        for gone in set(self._files) - set(paths):
            del self._files[gone]
        for path in paths:
            signature = _signature(path)
            if signature is None:
                continue  # vanished between listing and stat: the next scan sees it gone
            known = self._files.get(path)
            if known is not None and known.signature == signature:
                continue
            entry = known or _File(signature)
            try:
                if signature[1] > MAX_FILE_BYTES:
                    raise ManifestError(f"{path}: {signature[1]:,} bytes is more than the "
                                        f"{MAX_FILE_BYTES:,} a manifest file may have; refused")
                raw = path.read_bytes()
                if _signature(path) != signature:
                    continue  # written while we read: take it whole at the next poll
                objects = load(path, raw)
            except (ManifestError, OSError) as e:
                logger.error("cannot load %s (keeping its last good objects)", e)
            else:
                if not raw.strip() and entry.objects:
                    logger.warning("%s is empty now: keeping its %d objects (a save in progress?); "
                                   "delete the file to remove them", path, len(entry.objects))
                else:
                    entry.objects = objects
            entry.signature = signature
            self._files[path] = entry
        merged: dict[ObjKey, dict[str, Any]] = {}
        for path in sorted(self._files):
            for key, obj in self._files[path].objects.items():
                if key in merged:
                    logger.warning("%s %s is defined twice; %s wins", key[0], key[1], path)
                merged[key] = obj
        changed = {k: v for k, v in merged.items() if self.objects.get(k) != v}
        deleted = [k for k in self.objects if k not in merged]
        self.objects = merged
        return changed, deleted


OnNode = Callable[[Mapping[str, Any] | None], None]


def deliver(handler: Handler, changed: Mapping[ObjKey, Mapping[str, Any]], deleted: list[ObjKey], *,
            node_name: str = "", on_node: OnNode | None = None) -> None:
    for (kind, key) in deleted:
        _route(handler, kind, key, None, node_name, on_node)
    for (kind, key), obj in changed.items():
        _route(handler, kind, key, obj, node_name, on_node)


def _route(handler: Handler, kind: str, key: NamespacedName, obj: Mapping[str, Any] | None,
           node_name: str, on_node: OnNode | None) -> None:
    if kind == SERVICES:
        handler.on_service(key, obj)
    elif kind == ENDPOINT_SLICES:
        handler.on_endpoint_slice(key, obj)
    elif on_node is not None and key.name == node_name:
        on_node(obj)


async def run(handler: Handler, root: Path, *, interval: float = 0.5, node_name: str = "",
              on_node: OnNode | None = None) -> None:
    """Feed ``handler`` (and ``on_node``, for the Node named ``node_name``) from the files under
    ``root`` until cancelled."""
    manifests = ManifestSet(root)
    deliver(handler, *manifests.scan(), node_name=node_name, on_node=on_node)
    handler.on_synced(SERVICES)
    handler.on_synced(ENDPOINT_SLICES)
    while True:
        await asyncio.sleep(interval)
        # Reading, parsing and comparing run on a worker thread (parsing large files in a child
        # process), so this loop keeps taking watch events and the data plane never waits.
        changed, deleted = await asyncio.to_thread(manifests.scan)
        if changed or deleted:
            logger.info("manifests changed: %d objects added or updated, %d removed", len(changed), len(deleted))
            deliver(handler, changed, deleted, node_name=node_name, on_node=on_node)
