"""The capabilities the deployment grants are enough, and needed: svcproxy runs with exactly the
DaemonSet's set (uid 0, every other capability dropped, no privilege escalation) and with the
systemd unit's (a non-root user with ambient capabilities), in a network namespace this test
creates, and serves a clusterIP that is not local (NET_ADMIN adds it) on port 80
(NET_BIND_SERVICE). Without those two it cannot. Needs root, iproute2 and setpriv (util-linux).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy import demo
from tests.deploy.conftest import daemonset_container, render
from tests.deploy.test_systemd import service

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

VIP = "10.96.0.10"  # not local in the namespace until svcproxy adds it
HEALTHZ = "127.0.0.1:10256"
NOBODY = "65534"


def daemonset_caps() -> list[str]:
    sc = daemonset_container(render(Path(__file__).resolve().parents[2] / "deploy" / "base"))["securityContext"]
    return [c.lower() for c in sc["capabilities"]["add"]]


def unit_caps() -> list[str]:
    return [c.lower().removeprefix("cap_") for c in service("AmbientCapabilities").split()]


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"svcp-caps-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=20)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=20)
        yield ns
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def manifests() -> Iterator[Path]:
    """A NodePort-less Service on VIP:80 -> 127.0.0.1:8080, readable by any user."""
    directory = Path(tempfile.mkdtemp(prefix="svcp-caps-"))
    try:
        directory.chmod(0o755)
        docs = demo.manifests(VIP, 80, 30080, ["127.0.0.1"])
        path = directory / "svc.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        path.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(directory)


def setpriv(caps: list[str], *, user: str | None) -> list[str]:
    keep = ",".join(["-all", *(f"+{c}" for c in caps)])
    cmd = ["setpriv", f"--bounding-set={keep}", f"--inh-caps={keep}", "--no-new-privs"]
    if user is not None:
        cmd += [f"--reuid={user}", f"--regid={user}", "--clear-groups", f"--ambient-caps={keep}"]
    return cmd


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def get(url: str, ns: str) -> str:
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=3).status)"
    out = subprocess.run(in_ns(ns, sys.executable, "-c", code), capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def run_svcproxy(ns: str, manifests: Path, caps: list[str], user: str | None) -> tuple[str, str, str]:
    """(GET via the clusterIP, effective capabilities of the running process, its log)."""
    backend = subprocess.Popen(in_ns(ns, sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proxy = subprocess.Popen(
        in_ns(ns, *setpriv(caps, user=user), sys.executable, "-m", "proxy", f"--manifests={manifests}",
              "--hostname-override=demo-node", f"--healthz-bind-address={HEALTHZ}", "--metrics-bind-address=",
              "--drain-timeout=1s"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 15
        while get(f"http://{HEALTHZ}/healthz", ns) != "200":
            assert proxy.poll() is None, f"svcproxy exited: {proxy.communicate()[0]}"
            assert time.monotonic() < deadline, "svcproxy's /healthz did not come up"
            time.sleep(0.2)
        time.sleep(0.5)  # the first sync
        status = Path(f"/proc/{proxy.pid}/status").read_text()
        # ip netns exec execs the command, so proxy.pid is svcproxy's own process
        fields = {k: v.split() for k, _, v in (line.partition(":") for line in status.splitlines())}
        effective = fields["CapEff"][0]
        assert fields["Uid"][1] == (user or "0"), f"effective uid {fields['Uid'][1]}, want {user or 0}"
        assert fields["NoNewPrivs"] == ["1"]
        result = get(f"http://{VIP}:80/", ns)
        proxy.send_signal(signal.SIGTERM)
        log, _ = proxy.communicate(timeout=15)
        assert proxy.returncode == 0, log
        return result, effective, log
    finally:
        for p in (proxy, backend):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


CAP_BITS = {"net_bind_service": 10, "net_admin": 12}


def mask(caps: list[str]) -> str:
    return f"{sum(1 << CAP_BITS[c] for c in caps):016x}"


def test_daemonset_capabilities_suffice(netns: str, manifests: Path) -> None:
    caps = daemonset_caps()
    result, effective, log = run_svcproxy(netns, manifests, caps, user=None)
    assert effective == mask(caps), "the process ran with other capabilities than the DaemonSet's"
    assert result == "200", f"clusterIP {VIP}:80 -> {result}\n{log}"


def test_systemd_capabilities_suffice_for_a_non_root_user(netns: str, manifests: Path) -> None:
    caps = unit_caps()
    probe = subprocess.run([*setpriv(caps, user=NOBODY), sys.executable, "-c", "import proxy.cli"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        pytest.skip(f"this Python cannot run as uid {NOBODY} here ({sys.executable}): "
                    f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    result, effective, log = run_svcproxy(netns, manifests, caps, user=NOBODY)
    assert effective == mask(caps)
    assert result == "200", f"clusterIP {VIP}:80 -> {result}\n{log}"


@pytest.mark.parametrize("missing", ["net_admin", "net_bind_service"])
def test_each_capability_is_needed(netns: str, manifests: Path, missing: str) -> None:
    """Without NET_ADMIN the VIP is not added; without NET_BIND_SERVICE port 80 is not bound."""
    caps = [c for c in daemonset_caps() if c != missing]
    assert len(caps) == len(daemonset_caps()) - 1
    result, effective, log = run_svcproxy(netns, manifests, caps, user=None)
    assert effective == mask(caps)
    assert result != "200", f"served without {missing}:\n{log}"
    assert "Permission denied" in log or "Operation not permitted" in log, log
