"""The control-plane benchmark's --smoke mode: 200 Services, 5 s of endpoint changes, 500 idle connections.

Runs `python -m benchmarks.controlplane --smoke` (in a network namespace the harness creates and
deletes) and checks that svcproxy programmed every Service, applied every change, carried every
idle connection, and that the report has a number and a verdict for each target. Whether the
targets are met depends on the machine, so that is not asserted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.targets import find_svcproxy

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def _target_rows(markdown: str) -> list[list[str]]:
    rows, section = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line == "## Targets"
        elif section and line.startswith("| ") and not line.startswith("| target"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_controlplane_smoke(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the benchmark creates its own network namespace")
    if shutil.which("ip") is None:
        pytest.skip("ip is not installed (apt-get install iproute2)")
    command, why = find_svcproxy(REPO, None)
    if command is None:
        pytest.skip(why)

    out = tmp_path / "cp.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.controlplane", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    log = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, log
    data = json.loads(out.with_suffix(".json").read_text())
    assert not data["errors"], log

    # Every Service programmed, from the API and from manifest files, and reachable end to end.
    for source in ("api", "manifests"):
        start = data["startup"][source]
        assert start["listeners"] == start["expected_listeners"] == 200, start
        assert start["observed_s"] is not None and start["observed_s"] > 0, start
        assert start["verify"]["bad"] == 0 and start["verify"]["ok"] > 0, start
        assert start["rss_kib"] > 0 and start["fds"] >= 200, start

    # Every change applied, none misrouted, and the final state right.
    churn = data["churn"]
    statuses = {c["status"] for c in churn["changes"]}
    assert statuses == {"ok"}, statuses
    assert len(churn["changes"]) == churn["sent"] >= 400, churn["sent"]
    assert {c["kind"] for c in churn["changes"]} == {"rollout", "scale-down", "scale-up"}
    assert sum(c["unexpected"] for c in churn["changes"]) == 0
    assert churn["final_check"]["bad"] == 0 and churn["final_check"]["ok"] > 0, churn["final_check"]

    # Every idle connection carried through to the backend.
    idle = data["idle"]
    assert idle["connections"] == idle["backend_live"] == 500, idle
    assert idle["connect_errors"] == 0 and idle["all_reached_backend"], idle
    assert idle["bytes_per_conn"] > 0, idle

    # The report: a number and a verdict for each of the four targets.
    rows = _target_rows(out.read_text())
    assert len(rows) == 4, rows
    for _name, measured, _goal, verdict in rows:
        assert re.match(r"^\d[\d,.]* (s|ms|MiB|KiB)$", measured), measured
        assert verdict in ("**met**", "**missed**"), verdict
