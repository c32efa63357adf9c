"""The start-up benchmark against the real API server (benchmarks/apiserver.py), at 200 Services."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster.harness import REPO


def test_apiserver_benchmark_smoke(tmp_path: Path) -> None:
    report = tmp_path / "smoke.md"
    out = subprocess.run([sys.executable, "-m", "benchmarks.apiserver", "--smoke", "--out", str(report)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    raw = json.loads(report.with_suffix(".json").read_text())
    for run in ("real", "fake"):
        assert raw[run]["listeners"] == raw[run]["expected_listeners"] == 200, raw[run]
        assert raw[run]["start_to_all_listeners_s"] is not None and raw[run]["rss_mib"] > 0, raw[run]
    assert raw["real"]["list_pages"]["Service"] >= 1
    assert "| start -> every listener (s) |" in report.read_text()
