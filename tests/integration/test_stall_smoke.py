"""The stall benchmark (benchmarks/stall.py), small: it runs both sources, every probe request is
answered, and the report carries svcproxy's own loop-lag figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def test_stall_smoke(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the benchmark creates its own network namespace")
    report = tmp_path / "stall.md"
    out = subprocess.run([sys.executable, "-m", "benchmarks.stall", "--services", "300", "--endpoints", "5000",
                          "--every", "1", "--out", str(report)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    raw = json.loads(report.with_suffix(".json").read_text())
    assert [p["source"] for p in raw["phases"]] == ["manifests", "api"]
    for phase in raw["phases"]:
        assert phase["failures"] == {} and phase["requests"] > 100, phase
        assert phase["loop_lag_buckets"]["+Inf"] > 50  # the watchdog ticked all along (50 ms)
        assert len(phase["marks"]) == 3
    assert "| loop lags > 50 ms |" in report.read_text()
