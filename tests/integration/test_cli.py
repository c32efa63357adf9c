"""Bad flags fail fast with a message naming the flag; a bind failure exits 1 and says where."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(("args", "message"), [
    (["--nodeport-addresses", "10.0.0.0/33"], "--nodeport-addresses: '10.0.0.0/33' is not a CIDR"),
    (["--healthz-bind-address", "localhost"], "--healthz-bind-address: 'localhost' is not host:port"),
    (["--metrics-bind-address", "example.com:10249"], "--metrics-bind-address: 'example.com' is not an IP address"),
    (["--manifests", "/nonexistent/svc.yaml"], "--manifests: /nonexistent/svc.yaml does not exist"),
    (["--master", "notaurl"], "--master: 'notaurl' is not an http(s) URL (e.g. https://10.0.0.1:6443)"),
    (["--dial-timeouts", "100ms,0s"], "--dial-timeouts must be one or more positive durations"),
    (["--max-connections-per-service", "-3"], "--max-connections-per-service must be 0 (no limit) or more"),
    (["--transparent", "on", "--forwarding", "transports"],
     "--transparent on needs --forwarding sockets or splice (transports cannot dial from another address)"),
])
def test_bad_settings_are_one_clear_line_and_exit_1(tmp_path: Path, args: list[str], message: str) -> None:
    source = [] if args[0] in ("--master", "--kubeconfig") else ["--manifests", str(tmp_path)]
    result = run(*source, *args)
    assert result.returncode == 1
    assert result.stderr.strip() == f"svcproxy: error: {message}"


def test_a_value_of_the_wrong_type_is_a_usage_error(tmp_path: Path) -> None:
    result = run("--manifests", str(tmp_path), "--sync-period", "soon")
    assert result.returncode == 2
    assert "'soon' is not a duration" in result.stderr


@pytest.mark.parametrize(("content", "message"), [
    (None, "svcproxy failed: --kubeconfig: {path} does not exist or is not readable"),
    ("apiVersion: v1\nkind: Config\nclusters: []\n", "svcproxy failed: cannot load the API server configuration"),
], ids=["missing", "no-current-context"])
def test_an_unusable_kubeconfig_fails_before_anything_is_bound(tmp_path: Path, content: str | None,
                                                               message: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run("--kubeconfig", str(kubeconfig), "--healthz-bind-address", f"127.0.0.1:{port}",
                 "--metrics-bind-address", "")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(path=kubeconfig) in lines[0], result.stderr
    assert "serving healthz" not in result.stderr and "Traceback" not in result.stderr


def test_healthz_and_metrics_on_one_address_serve_both(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--manifests", str(tmp_path),
                             "--healthz-bind-address", f"127.0.0.1:{port}", "--metrics-bind-address",
                             f"127.0.0.1:{port}", "--nodeport-addresses", "127.0.0.1/32"],
                            stderr=subprocess.PIPE, text=True)
    try:
        answers = []
        for _ in range(50):
            try:
                for path in ["/metrics", "/healthz", "/metrics", "/livez"] * 5:
                    answers.append((path, _get(port, path)))
                break
            except OSError:
                time.sleep(0.1)
        assert len(answers) == 20
        assert all(status == 200 for _, status in answers), answers
    finally:
        proc.terminate()
        proc.wait(10)


def test_sighup_does_not_stop_it(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--manifests", str(tmp_path),
                             "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", ""],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "initial sync done" in line:
                break
        proc.send_signal(signal.SIGHUP)
        assert "SIGHUP ignored" in proc.stderr.readline()
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return int(s.recv(100).split()[1])


def test_busy_healthz_port_exits_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--manifests", str(tmp_path), "--healthz-bind-address", f"127.0.0.1:{port}",
                     "--metrics-bind-address", "")
    assert result.returncode == 1
    assert f"--healthz-bind-address 127.0.0.1:{port}: Address already in use" in result.stderr


def test_json_logging_is_one_object_per_line(tmp_path: Path) -> None:
    import json

    result = run("--kubeconfig", str(tmp_path / "missing"), "--metrics-bind-address", "",
                 "--healthz-bind-address", "127.0.0.1:0", "--logging-format", "json")
    assert result.returncode == 1
    [line] = [json.loads(raw) for raw in result.stderr.strip().splitlines()]
    assert line["level"] == "error" and line["logger"] == "proxy.app"
    assert line["msg"].startswith("svcproxy failed: --kubeconfig:")
