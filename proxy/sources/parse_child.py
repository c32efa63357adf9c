"""Parse a large manifest file in a child process, so libyaml never holds this one's GIL for long.

PyYAML's C loader builds a whole document's node graph without releasing the GIL: about 1.3 s
per megabyte, during which no other thread of the process runs, forwarding included. A child
process parses instead (``python -m proxy.sources.parse_child PATH`` with the file's bytes on
stdin) and sends the objects back as length-prefixed pickle frames, each list of more than
``CHUNK`` items (a slice's endpoints, a Service's ports) in frames of its own, so that no single
decode here holds the GIL for more than a few milliseconds. The child also bounds the time a
parse may take, and whatever memory a huge file needs is returned when it exits.

Pickle is safe here: the frames come from our own child, which runs our own code.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1000
"""Items per frame of a long list (1,000 endpoints decode in about 2 ms)."""
TIMEOUT = 120.0
"""Seconds a child may parse one file (a 32 MiB file takes about 45 s on a slow core)."""
_LENGTH = struct.Struct("!I")

Path_ = tuple[str, ...]
Header = tuple[Any, dict[str, Any], list[tuple[Path_, int]]]
"""(object key, the object with its long lists emptied, [(where a list was, frames it fills)])."""


class ChildError(Exception):
    """The child refused the file (the message names it and the reason) or failed."""


# ---------------------------------------------------------------- child side


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


OK = _frame(("ok", None))
"""The first frame of a child that parsed its file; an ("error", message) frame otherwise."""


def _split(obj: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Path_, list[Any]]]]:
    """The object with its lists of more than CHUNK items emptied (directly in it, or one level
    down: spec.ports), and those lists. Copies, not edits: YAML aliases may share a list."""
    skeleton = dict(obj)
    lists: list[tuple[Path_, list[Any]]] = []
    for key, value in obj.items():
        if isinstance(value, list) and len(value) > CHUNK:
            skeleton[key] = []
            lists.append(((key,), value))
        elif isinstance(value, dict):
            inner = dict(value)
            for key2, value2 in value.items():
                if isinstance(value2, list) and len(value2) > CHUNK:
                    inner[key2] = []
                    lists.append(((key, key2), value2))
            skeleton[key] = inner
    return skeleton, lists


def encode(objects: dict[Any, dict[str, Any]]) -> Iterator[bytes]:
    """Frames for ``objects``: a count, then per object a header and its long lists' chunks."""
    yield _frame(len(objects))
    for key, obj in objects.items():
        skeleton, lists = _split(obj)
        yield _frame((key, skeleton, [(path, -(-len(items) // CHUNK)) for path, items in lists]))
        for _, items in lists:
            for i in range(0, len(items), CHUNK):
                yield _frame(items[i:i + CHUNK])


def main(argv: list[str]) -> int:
    from proxy.sources import manifests  # the parser; imported here, as manifests imports this module

    path = Path(argv[0])
    out = sys.stdout.buffer
    try:
        objects = manifests.parse(path, manifests.decode(path, sys.stdin.buffer.read()))
    except manifests.ManifestError as e:
        out.write(_frame(("error", str(e))))
        return 1
    out.write(OK)
    for frame in encode(objects):
        out.write(frame)
    return 0


# ---------------------------------------------------------------- parent side


def _frames(data: bytes) -> Iterator[Any]:
    view = memoryview(data)
    at = 0
    while at < len(view):
        (size,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        yield pickle.loads(view[at:at + size])
        at += size


def decode(data: bytes) -> dict[Any, dict[str, Any]]:
    """The objects from a child's output; raises ChildError if it refused the file."""
    frames = _frames(data)
    status, message = next(frames)
    if status != "ok":
        raise ChildError(message)
    objects: dict[Any, dict[str, Any]] = {}
    for _ in range(next(frames)):
        key, obj, lists = next(frames)
        for path, count in lists:
            parent = obj
            for name in path[:-1]:
                parent = parent[name]
            items: list[Any] = parent[path[-1]]
            for _ in range(count):
                items.extend(next(frames))
        objects[key] = obj
    return objects


def parse(path: Path, data: bytes, *, timeout: float = TIMEOUT) -> dict[Any, dict[str, Any]]:
    """Parse ``data`` (the bytes of ``path``) in a child process; raises ChildError."""
    try:
        done = subprocess.run([sys.executable, "-m", "proxy.sources.parse_child", str(path)], input=data,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ChildError(f"{path}: parsing took more than {timeout:.0f} s; refused") from None
    if not done.stdout:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ChildError(f"{path}: the parser failed: {reason[0]}")
    return decode(done.stdout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
