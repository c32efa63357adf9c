"""``python -m testbed.fakeapi --port N [--load objects.yaml ...]``: the fake API server on its own.

Objects can be created, replaced and deleted through the usual REST paths (POST/PUT/DELETE), and
``POST /fake/<compact|bookmark|expire|close|drop|stall|unstall>[?kind=Service]`` drives the test controls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
from typing import Any

import yaml

from testbed.fakeapi.server import FakeApiServer


def _documents(path: pathlib.Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind", "").endswith("List") and "items" in doc:
            docs.extend(doc["items"])
        elif isinstance(doc, dict):
            docs.append(doc)
    return docs


async def _serve(args: argparse.Namespace) -> None:
    server = FakeApiServer(host=args.host, port=args.port, bookmark_interval=args.bookmark_interval or None,
                           max_history=args.max_history or None)
    for path in args.load:
        for obj in _documents(pathlib.Path(path)):
            server.upsert(obj)
    async with server:
        print(f"fake API server on {server.url} (resourceVersion {server.resource_version})", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m testbed.fakeapi", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--bookmark-interval", type=float, default=60.0, help="seconds; 0 = on demand only")
    p.add_argument("--max-history", type=int, default=0, help="events kept for watches; 0 = unlimited")
    p.add_argument("--load", action="append", default=[], help="YAML/JSON file of objects to create")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
