"""Every flag the deployment files pass exists in the installed `svcproxy --help`.

test_daemonset.py and test_systemd.py parse the same arguments with the CLI parser in-process;
this runs the real command, as the container's ENTRYPOINT and the unit's ExecStart do.
"""

from __future__ import annotations

import re
import sys
from functools import cache

import pytest

from proxy.sources import kube
from tests.deploy.conftest import BASE, KIND, daemonset_container, find_tool, load_yaml_docs, render, run
from tests.deploy.test_systemd import exec_start_argv

FLAG = re.compile(r"^(--[a-z][a-z0-9-]*)")


@cache
def help_flags() -> frozenset[str]:
    exe = find_tool("svcproxy")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "proxy", "--help"]
    out = run(cmd)
    assert out.returncode == 0, out.stderr
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def flags(args: list[str]) -> list[str]:
    return [m.group(1) for a in args if (m := FLAG.match(a))]


def test_help_lists_the_flags_we_rely_on() -> None:
    assert {"--kubeconfig", "--hostname-override", "--drain-timeout", "--healthz-bind-address"} <= help_flags()


@pytest.mark.parametrize("where", ["base", "kind"])
def test_daemonset_flags_exist(where: str) -> None:
    container = daemonset_container(render(BASE if where == "base" else KIND))
    used = flags(container["args"])
    assert used
    assert set(used) <= help_flags(), sorted(set(used) - help_flags())


def test_systemd_flags_exist() -> None:
    used = flags(exec_start_argv()[1:])
    assert "--kubeconfig" in used and "--hostname-override" in used
    assert set(used) <= help_flags(), sorted(set(used) - help_flags())


def test_config_map_keys_are_all_used() -> None:
    """Every SVCPROXY_* key in the base ConfigMap feeds a flag in args, or svcproxy reads it."""
    keys = {line.partition("=")[0] for line in (BASE / "config.env").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    (ds,) = [d for d in load_yaml_docs(BASE / "daemonset.yaml") if d["kind"] == "DaemonSet"]
    args = " ".join(ds["spec"]["template"]["spec"]["containers"][0]["args"])
    unused = {k for k in keys if f"$({k})" not in args} - {kube.APISERVER_ENV}
    assert not unused, f"ConfigMap keys nothing reads: {sorted(unused)}"
