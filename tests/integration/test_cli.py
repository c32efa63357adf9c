"""Bad flags fail fast with a message naming the flag; a bind failure exits 1 and says where."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(("args", "message"), [
    (["--nodeport-addresses", "10.0.0.0/33"], "--nodeport-addresses: '10.0.0.0/33' is not a CIDR"),
    (["--healthz-bind-address", "localhost"], "--healthz-bind-address: 'localhost' is not host:port"),
    (["--metrics-bind-address", "example.com:10249"], "--metrics-bind-address: 'example.com' is not an IP"),
    (["--sync-period", "soon"], "'soon' is not a duration"),
    (["--manifests", "/nonexistent/svc.yaml"], "--manifests: /nonexistent/svc.yaml does not exist"),
])
def test_bad_flags_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("--manifests", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_busy_healthz_port_exits_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--manifests", str(tmp_path), "--healthz-bind-address", f"127.0.0.1:{port}",
                     "--metrics-bind-address", "")
    assert result.returncode == 1
    assert f"--healthz-bind-address 127.0.0.1:{port}: Address already in use" in result.stderr
