"""deploy/systemd: the unit's syntax (systemd-analyze), its capabilities and hardening, and its
ExecStart parsed by svcproxy's own CLI parser, so the unit cannot drift from the flags."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from proxy import cli
from tests.deploy.conftest import SYSTEMD, run

UNIT = SYSTEMD / "svcproxy.service"
ENV_FILE = SYSTEMD / "svcproxy.env"
CAPS = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}


def unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"a setting outside any section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line}"
        current.setdefault(key, []).append(value)
    return sections


def service(key: str) -> str:
    values = unit()["Service"].get(key)
    assert values and len(values) == 1, f"want exactly one {key}="
    return values[0]


def env_file() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{ENV_FILE.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def exec_start_argv(hostname: str = "node-a") -> list[str]:
    """ExecStart as systemd runs it: %H is the hostname, unbraced $VAR splits at whitespace."""
    words = shlex.split(service("ExecStart"))
    env = env_file()
    argv: list[str] = []
    for word in words:
        word = word.replace("%H", hostname)
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        argv += env.get(m.group(1), "").split() if m else [word]
    return argv


def parsed() -> argparse.Namespace:
    argv = exec_start_argv()
    assert argv[0] == "/usr/local/bin/svcproxy"
    try:
        ns = cli.daemon_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"svcproxy rejects the unit's command line: {argv}")
    cli.settings_from(ns)
    return ns


def test_exec_start_parses() -> None:
    ns = parsed()
    assert ns.kubeconfig == "/etc/svcproxy/kubeconfig"
    assert ns.hostname_override == "node-a"
    assert "$SVCPROXY_ARGS" in shlex.split(service("ExecStart"))
    assert any(e.lstrip("-") == "/etc/svcproxy/svcproxy.env" for e in unit()["Service"]["EnvironmentFile"])


def test_stop_timeout_covers_the_handover_and_the_drain() -> None:
    assert service("KillSignal") == "SIGTERM"
    timeout = cli._duration(service("TimeoutStopSec"))
    assert timeout >= parsed().handover_timeout + parsed().drain_timeout + 5


def test_reload_restarts_in_place() -> None:
    """`systemctl reload` sends SIGUSR2 (a restart that hands over), and systemd accepts the new
    process's MAINPID= from it."""
    assert service("ExecReload") == "/bin/kill -USR2 $MAINPID"
    assert service("NotifyAccess") == "all"
    assert parsed().handover_socket  # the handover is on


def test_capabilities() -> None:
    assert set(service("AmbientCapabilities").split()) == CAPS
    assert set(service("CapabilityBoundingSet").split()) == CAPS
    assert service("User") == "svcproxy"
    assert "DynamicUser" not in unit()["Service"]


def test_restart_and_limits() -> None:
    assert service("Restart") == "always"
    assert service("RestartSec") == "2"
    assert service("LimitNOFILE") == "1048576"
    assert unit()["Unit"]["StartLimitIntervalSec"] == ["0"]


def test_hardening() -> None:
    expected = {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes"}
    for key, value in expected.items():
        assert service(key) == value, key
    assert set(service("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an svcproxy that exists here (verify checks it)."""
    svcproxy = Path(sys.executable).parent / "svcproxy"
    if not svcproxy.exists():
        pytest.skip(f"{svcproxy} missing: pip install -e . first")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/svcproxy", str(svcproxy)))
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    out = run([tool, "verify", "--man=no", "--generators=no", str(_verifiable_copy(tmp_path))])
    assert out.returncode == 0 and not out.stderr.strip(), f"systemd-analyze verify:\n{out.stdout}{out.stderr}"


def test_systemd_analyze_security(tmp_path: Path) -> None:
    """systemd's own exposure score stays low ("OK", <= 3.0 on its 0-10 scale)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    out = run([tool, "security", "--offline=yes", "--threshold=30", "--no-pager", str(_verifiable_copy(tmp_path))])
    if "unrecognized option" in out.stderr:
        pytest.skip(f"this systemd-analyze has no --offline/--threshold (systemd < 250): {out.stderr.strip()}")
    assert out.returncode == 0, f"systemd-analyze security:\n{out.stdout[-3000:]}{out.stderr}"


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers not installed (Debian package systemd)")
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()
    out = run([tool, f"--root={tmp_path}", "-"], input=(SYSTEMD / "svcproxy.sysusers").read_text())
    assert out.returncode == 0, out.stderr
    assert re.search(r"^svcproxy:x:\d+:\d+:", (etc / "passwd").read_text(), re.M)
    assert re.search(r"^svcproxy:x:\d+:", (etc / "group").read_text(), re.M)


def test_modules_load_file() -> None:
    lines = [ln for ln in (SYSTEMD / "svcproxy-modules.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines == ["dummy"]
