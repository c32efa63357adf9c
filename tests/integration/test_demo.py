"""`svcproxy demo` starts, forwards round robin, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def test_demo_starts_serves_and_stops() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--cluster-ip", "127.0.0.130", "--node-port", "30130",
         "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0", "--requests", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "Press Ctrl-C" in out, out
        cluster = re.findall(r"clusterIP 127\.0\.0\.130:8080 +request \d: hello from (backend-\d)", out)
        node = re.findall(r"nodePort +127\.0\.0\.1:30130 +request \d: hello from (backend-\d)", out)
        assert sorted(cluster) == sorted(node) == ["backend-1", "backend-2", "backend-3"], out
        assert "127.0.0.130:30130: refused" in out
        # The user's own curl works while it runs.
        with urllib.request.urlopen("http://127.0.0.130:8080/", timeout=5) as resp:
            assert resp.read().startswith(b"hello from backend-")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        rest = proc.stdout.read()
        assert "Traceback" not in rest, rest
        assert " E proxy" not in out + rest, out + rest  # no error logged along the way
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Nothing left behind: the service address and the backends are gone.
    for addr in [("127.0.0.130", 8080), ("127.0.0.11", 8080)]:
        with socket.socket() as s:
            assert s.connect_ex(addr) != 0
