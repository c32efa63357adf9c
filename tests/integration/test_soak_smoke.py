"""The soak (benchmarks/soak.py) for 15 s, both sources: it runs, checks every response, reports,
and nothing fails while endpoints churn and backends stop and start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


@pytest.mark.parametrize("source", ["api", "manifests"])
def test_soak_smoke(tmp_path: Path, source: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the soak creates its own network namespace")
    if shutil.which("nft") is None:
        pytest.skip("needs nft (the soak stops backends with an nftables rule)")
    report = tmp_path / "soak.md"
    out = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--duration", "15", "--sample-every", "3",
                          "--source", source, "--out", str(report)], cwd=REPO, capture_output=True, text=True,
                         timeout=180)
    raw = json.loads(report.with_suffix(".json").read_text()) if report.with_suffix(".json").exists() else {}
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert raw["failures"] == {}, raw["examples"]
    assert raw["requests"] >= 20_000
    assert raw["events"]["endpoint rewrites"] >= 100 and raw["events"].get("backends stopped", 0) >= 5
    assert len(raw["samples"]) >= 4 and all(s["rss_kib"] for s in raw["samples"])
    assert "| failed | 0 | 0 (met) |" in report.read_text()
