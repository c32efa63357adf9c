"""Optional py-spy profiles of svcproxy during a benchmark phase (``--profile``), summarised as text.

py-spy pauses the process for each sample, so a profiled run is slower: its numbers are for
finding where time goes, not for the targets.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

RATE = 250  # samples per second


def find_pyspy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Recording:
    """``py-spy record --format raw`` attached to ``pid`` until stop()."""

    def __init__(self, pyspy: str, pid: int, out: Path) -> None:
        self.out = out
        self.started = time.monotonic()
        self.seconds = 0.0
        argv = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--gil", "--rate", str(RATE),
                "--output", str(out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str | None:
        """Stop sampling and write the file; an error message if py-spy failed."""
        self.seconds = time.monotonic() - self.started
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            return (err or b"").decode(errors="replace").strip()[-300:] or "py-spy wrote nothing"
        return None


def attach(pyspy: str, pid: int, out: Path, tries: int = 20) -> Recording | None:
    """Attach as soon as the interpreter is up (py-spy fails on a process still starting)."""
    for _ in range(tries):
        rec = Recording(pyspy, pid, out)
        time.sleep(0.1)
        if rec.proc.poll() is None:
            return rec
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.proc.communicate(timeout=1)
    return None


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*)\)$")


def _frame(text: str) -> str:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip()
    return f"{m['fn']} ({m['file'].removeprefix('/work/main/')})"


def summarize(path: Path, seconds: float, top: int = 15) -> str:
    """Markdown: the functions with the most samples, inclusive and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "(no samples)\n"
    possible = max(seconds * RATE, total)
    lines = [
        f"{total} samples over {seconds:.1f} s at {RATE}/s: the process was busy in Python "
        f"for about {total / possible:.0%} of the time.",
        "",
        "| inclusive | self | function |",
        "|--:|--:|---|",
    ]
    for fn, n in inclusive.most_common(top):
        lines.append(f"| {n / total:.0%} | {own[fn] / total:.0%} | `{fn}` |")
    lines += ["", "Top self time:", "", "| self | function |", "|--:|---|"]
    for fn, n in own.most_common(top):
        lines.append(f"| {n / total:.0%} | `{fn}` |")
    return "\n".join(lines) + "\n"
