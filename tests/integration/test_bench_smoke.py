"""The data-plane benchmark's --smoke mode: wrk through svcproxy and straight at a backend.

Runs `python -m benchmarks.dataplane --smoke` (2 s per target, keep-alive only) in a network
namespace the harness creates and deletes, and checks the report it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.targets import TARGETS, export_revision, find_svcproxy

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def _table_rows(markdown: str, workload: str) -> dict[str, list[str]]:
    """Rows of the `## <workload>: ...` table, keyed by the target label."""
    rows: dict[str, list[str]] = {}
    section = False
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line.startswith(f"## {workload}:")
        elif section and line.startswith("| ") and not line.startswith("| target"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_bench_smoke(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the benchmark creates its own network namespace")
    for tool, package in (("wrk", "wrk"), ("nginx", "nginx"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    command, why = find_svcproxy(REPO, None)
    if command is None:
        pytest.skip(why)

    out = tmp_path / "smoke.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.dataplane", "--smoke", "--no-install", "--no-chart", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, log

    data = json.loads(out.with_suffix(".json").read_text())
    rows = _table_rows(out.read_text(), "keepalive")
    for target in ("svcproxy", "direct"):
        assert data["targets"][target]["status"] == "ok", data["targets"][target]
        runs = [r for r in data["runs"] if r["target"] == target]
        assert runs, log
        for run in runs:
            assert run["requests"] > 0, run
            errors = {k: run[k] for k in ("connect", "read", "write", "timeout", "status")}
            assert not any(errors.values()), f"{target}: {errors}"
        row = rows[TARGETS[target].label]
        req_s, errors_cell = float(row[1].replace(",", "")), row[5]
        assert req_s > 0, row
        assert errors_cell == "0", row
    # svcproxy is a real process: its CPU was measured.
    assert all(r["proxy_cpu_s"] is not None for r in data["runs"] if r["target"] == "svcproxy")


def test_a_base_revision_runs_beside_the_working_tree(tmp_path: Path) -> None:
    """--svcproxy-base REV: that revision's proxy package, started with this Python."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    argv, env, short = export_revision(REPO, "HEAD", tmp_path / "base")
    assert (tmp_path / "base/proxy/__main__.py").is_file()
    assert short and len(short) >= 7
    done = subprocess.run([*argv, "--help"], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # It ran the exported copy, not the working tree's package.
    probe = subprocess.run([argv[0], "-c", "import proxy; print(proxy.__file__)"], cwd=tmp_path,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(tmp_path / "base/proxy/__init__.py")
