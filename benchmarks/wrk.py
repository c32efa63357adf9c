"""Workload definitions and one wrk run, parsed from a Lua `done` hook."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MARK = "SVCBENCH_RESULT "

# wrk calls done() once at the end; print one JSON line so no human-formatted
# "1.23ms"/"4.56k" strings need parsing. %.0f, not %d: byte counts exceed 2^31.
DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%.0f,"bytes":%.0f,"duration_us":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f}\\n',
    "MARK", summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
""".replace("MARK", MARK)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    connections: int
    path: str
    headers: tuple[str, ...] = ()


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("keepalive", "keep-alive, 12 B, 50 conns", 50, "/small"),
        Workload("close", "conn per request, 12 B, 50 conns", 50, "/small", ("Connection: close",)),
        Workload("bulk", "bulk 1 MiB, 8 conns", 8, "/big"),
        Workload("c1000", "keep-alive, 12 B, 1000 conns", 1000, "/small"),
    )
}


LATENCY_FIELDS = frozenset({"p50_us", "p90_us", "p99_us", "max_us", "mean_us"})


@dataclass
class WrkResult:
    """wrk's own numbers for one run (rates and sums are derived in report.py)."""

    requests: int
    bytes: int
    duration_us: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def write_script(workdir: Path) -> Path:
    script = workdir / "done.lua"
    script.write_text(DONE_LUA)
    return script


def command(url: str, w: Workload, duration: float, script: Path) -> list[str]:
    argv = ["wrk", "-t1", f"-c{w.connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(script)]
    for h in w.headers:
        argv += ["-H", h]
    return [*argv, url]


def parse(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            values: dict[str, Any] = {k: float(v) if k in LATENCY_FIELDS else int(v) for k, v in data.items()}
            return WrkResult(**values)
    raise ValueError(f"no {MARK.strip()} line in wrk output:\n{stdout[-2000:]}")


def run(url: str, w: Workload, duration: float, script: Path) -> WrkResult:
    argv = command(url, w, duration, script)
    # Hard bound: wrk itself stops at `duration`; the margin covers connect/teardown.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse(done.stdout)
