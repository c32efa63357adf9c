"""svcproxy.io/proxy-protocol: real consumers (nginx with ``listen ... proxy_protocol``, HAProxy with
``accept-proxy``) behind a Service read the client's address and the service address it reached
from the header svcproxy writes, in each version and each forwarding mode."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import endpoint_slice, eventually, running_proxy, service, stop_process

pytestmark = pytest.mark.usefixtures("each_forwarding")

VIP = "127.0.0.180"
BACKEND = "127.0.0.181"
CLIENT = "127.0.0.182"
PORT = 18180

NGINX = """\
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    server {{
        listen {ip}:{port} proxy_protocol;
        set $client "$proxy_protocol_addr $proxy_protocol_port";
        location / {{ return 200 "$client $proxy_protocol_server_addr $proxy_protocol_server_port"; }}
    }}
}}
"""
HAPROXY = """\
global
    log stderr format raw local0 err
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend fe
    bind {ip}:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port]"
"""


@contextlib.contextmanager
def consumer(kind: str, directory: Path) -> Iterator[None]:
    if shutil.which(kind) is None:
        pytest.skip(f"{kind} is not installed (./scripts/test installs it as root)")
    conf = directory / f"{kind}.conf"
    if kind == "nginx":
        conf.write_text(NGINX.format(dir=directory, ip=BACKEND, port=PORT))
        argv = ["nginx", "-p", str(directory), "-e", str(directory / "nginx.error.log"), "-c", str(conf)]
    else:
        conf.write_text(HAPROXY.format(ip=BACKEND, port=PORT))
        argv = ["haproxy", "-db", "-f", str(conf)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        stop_process(proc, 5)


async def get(ip: str, port: int) -> tuple[str, int, str]:
    """An HTTP/1.0 request from CLIENT: (the body, our own port, the status line)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port, local_addr=(CLIENT, 0)), 5)
    own_port = writer.get_extra_info("sockname")[1]
    writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    response = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return body.strip(), own_port, head.splitlines()[0] if head else ""


async def answers(ip: str, port: int) -> bool:
    return (await get(ip, port))[2].startswith("HTTP/")


def annotated(version: str) -> dict[str, Any]:
    svc = service("pp", VIP, 8180, node_port=30180)
    svc["metadata"]["annotations"] = {"svcproxy.io/proxy-protocol": version}
    return svc


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_backend_reads_the_client_and_service_address(tmp_path: Path, kind: str, version: str) -> None:
    objs = [annotated(version), endpoint_slice("pp", PORT, [BACKEND])]
    with consumer(kind, tmp_path):
        async with running_proxy(tmp_path, objs):
            await eventually(lambda: answers(VIP, 8180), timeout=5)  # the consumer is up
            body, own_port, status = await get(VIP, 8180)
            assert status.endswith("200 OK"), status
            assert body == f"{CLIENT} {own_port} {VIP} 8180"
            body, own_port, _ = await get("127.0.0.1", 30180)  # the nodePort: its own address and port
            assert body == f"{CLIENT} {own_port} 127.0.0.1 30180"


async def test_without_the_annotation_the_consumer_gets_no_header(tmp_path: Path) -> None:
    """The control: a PROXY-protocol listener refuses a connection that starts without one."""
    objs = [service("pp", VIP, 8180), endpoint_slice("pp", PORT, [BACKEND])]
    with consumer("haproxy", tmp_path):
        async with running_proxy(tmp_path, objs):
            await eventually(lambda: subprocess.run(["ss", "-Htln", f"src {BACKEND}:{PORT}"], capture_output=True,
                                                    text=True).stdout.strip(), timeout=5)
            try:
                body, _, status = await get(VIP, 8180)
            except ConnectionResetError:  # HAProxy resets it
                body, status = "", "reset"
            assert "200" not in status and CLIENT not in body, (status, body)
