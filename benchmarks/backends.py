"""The two nginx backends every target balances over."""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .procs import Supervisor, wait_tcp

SMALL_BODY = b"hello world\n"  # 12 bytes
BIG_SIZE = 1 << 20  # 1 MiB


@dataclass(frozen=True)
class Backend:
    name: str
    # Same server, three address families of use:
    direct: tuple[str, int]  # wrk direct, HAProxy and nginx stream
    dnat: tuple[str, int]  # only the nft DNAT target (see README: PAWS)
    svc: tuple[str, int]  # svcproxy: one EndpointSlice needs one port for all endpoints


BACKENDS = (
    Backend("b1", ("127.0.0.1", 8081), ("127.0.0.2", 8081), ("127.0.0.3", 8080)),
    Backend("b2", ("127.0.0.1", 8082), ("127.0.0.2", 8082), ("127.0.0.4", 8080)),
)

NGINX_HTTP_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    # wrk's keepalive connections must stay open for the whole run.
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
{listens}
        root {docroot};
        location / {{
            add_header X-Backend {name} always;
        }}
    }}
}}
"""


def write_docroot(workdir: Path) -> Path:
    docroot = workdir / "www"
    docroot.mkdir(exist_ok=True)
    (docroot / "small").write_bytes(SMALL_BODY)
    (docroot / "big").write_bytes(os.urandom(BIG_SIZE))
    # nginx workers run as an unprivileged user: everything on the way must be readable.
    for path in (workdir, docroot, docroot / "small", docroot / "big"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return docroot


def start(sup: Supervisor, workdir: Path) -> None:
    docroot = write_docroot(workdir)
    for b in BACKENDS:
        addrs = (b.direct, b.dnat, b.svc)
        listens = "\n".join(f"        listen {h}:{p} backlog=65535;" for h, p in addrs)
        conf = workdir / f"{b.name}.conf"
        conf.write_text(NGINX_HTTP_CONF.format(dir=workdir, name=b.name, listens=listens, docroot=docroot))
        sup.start(b.name, ["nginx", "-p", str(workdir), "-e", str(workdir / f"{b.name}.error.log"), "-c", str(conf)])
    for b in BACKENDS:
        for host, port in (b.direct, b.dnat, b.svc):
            if not wait_tcp(host, port, 10, partial(sup.alive, b.name)):
                raise RuntimeError(f"backend {b.name} not listening on {host}:{port}:\n" + sup.log_tail(b.name))
        seen = probe(*b.direct, 1)
        if seen != [b.name]:
            raise RuntimeError(f"backend {b.name} answered as {seen}")


def probe(host: str, port: int, connections: int) -> list[str]:
    """GET /small over `connections` fresh connections; return which backend answered each.

    Raises if any answer is not a 200 with the 12-byte body.
    """
    seen = []
    for _ in range(connections):
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", "/small", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200 or body != SMALL_BODY:
            raise RuntimeError(f"{host}:{port}/small -> {resp.status} {body[:40]!r}")
        seen.append(resp.getheader("X-Backend", "?"))
    return seen
