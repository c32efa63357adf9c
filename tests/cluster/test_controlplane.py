"""scripts/controlplane as a user runs it: pinned binaries that report their release, and `up`/`down`
in a network namespace that has nothing but lo."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import controlplane
from tests.cluster.harness import REPO
from tests.e2e.cluster import eventually, sh


@pytest.fixture
def bare_netns() -> Iterator[str]:
    name = f"spk-cp-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_the_binaries_report_the_pinned_release() -> None:
    binaries = controlplane.built_binaries()
    assert binaries is not None
    version = controlplane.kubernetes_version()
    assert version == "v1.37.2"
    assert sh(str(binaries / "kube-apiserver"), "--version").split() == ["Kubernetes", version]
    assert sh(str(binaries / "kube-controller-manager"), "--version").split() == ["Kubernetes", version]
    client = json.loads(sh(str(binaries / "kubectl"), "version", "--client", "-o", "json"))
    assert client["clientVersion"]["gitVersion"] == version
    assert f"etcd Version: {controlplane.etcd_version().lstrip('v')}" in sh(str(binaries / "etcd"), "--version")
    # A second build with the same pins is a no-op that needs no network.
    again = subprocess.run([str(REPO / "scripts" / "controlplane"), "build"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "GOPROXY": "off"})
    assert again.returncode == 0 and "already built" in again.stderr, again.stderr[-2000:]


def test_up_and_down_in_a_namespace_with_only_lo(bare_netns: str, tmp_path: Path) -> None:
    state = tmp_path / "cp"
    up = subprocess.Popen(["ip", "netns", "exec", bare_netns, str(REPO / "scripts" / "controlplane"), "up",
                           "--dir", str(state)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    try:
        assert up.stdout is not None
        kubeconfig = up.stdout.readline().strip()  # the only line on stdout, once /readyz passed
        assert kubeconfig == str(state / "admin.kubeconfig")
        binaries = controlplane.built_binaries()
        assert binaries is not None
        kubectl = ["ip", "netns", "exec", bare_netns, str(binaries / "kubectl"), "--kubeconfig", kubeconfig]
        server = json.loads(sh(*kubectl, "version", "-o", "json"))["serverVersion"]["gitVersion"]
        assert server == controlplane.kubernetes_version()
        # the API server advertises its own address on lo, which `kubernetes` points at
        slices = json.loads(sh(*kubectl, "get", "endpointslices", "-n", "default", "-o", "json"))["items"]
        assert [e["addresses"] for s in slices for e in s["endpoints"]] == [["192.0.2.1"]]
        assert sh(*kubectl, "get", "--raw", "/readyz").strip() == "ok"
        down = subprocess.run(["ip", "netns", "exec", bare_netns, str(REPO / "scripts" / "controlplane"), "down",
                               "--dir", str(state)], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(30) == 0
        # everything it started is gone, and so is the address it added
        eventually(lambda: not subprocess.run(["ip", "netns", "pids", bare_netns], capture_output=True,
                                              text=True).stdout.split(), timeout=10, what="no process left")
        assert "192.0.2.1" not in sh("ip", "-n", bare_netns, "addr", "show", "dev", "lo")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
