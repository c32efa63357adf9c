"""A throwaway network namespace: only `lo`, so nothing in it can reach another host."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

PREFIX = "svcbench-"

# Per-namespace TCP knobs. The connection-per-request and 1000-connection workloads open
# hundreds of thousands of loopback connections; the defaults (28k ephemeral ports,
# somaxconn 4096) would make the client, not the proxy, the bottleneck.
SYSCTLS: dict[str, str] = {
    "net/ipv4/ip_local_port_range": "1024 65535",
    "net/ipv4/tcp_tw_reuse": "1",
    "net/core/somaxconn": "65535",
    "net/ipv4/tcp_max_syn_backlog": "65535",
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def exec_prefix(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


def pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_all(name: str, grace: float = 3.0) -> None:
    """TERM every process in the namespace, then KILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        victims = pids(name)
        if not victims:
            return
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids(name):
            time.sleep(0.1)


def create(name: str) -> None:
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def delete(name: str) -> None:
    kill_all(name)
    _ip("netns", "del", name, check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete namespaces left by earlier harness runs whose process is gone (e.g. SIGKILLed)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({PREFIX}(\d+))\b", line)
        if m and not pid_alive(int(m.group(2))):
            delete(m.group(1))
            removed.append(m.group(1))
    return removed


@contextmanager
def namespace() -> Iterator[str]:
    """Create `svcbench-<pid>`; always kill its processes and delete it on exit."""
    name = f"{PREFIX}{os.getpid()}"
    create(name)
    try:
        yield name
    finally:
        delete(name)


def current_id() -> str:
    return os.readlink("/proc/self/ns/net")


def is_isolated(host_ns: str) -> bool:
    """True when this process is in another namespace than `host_ns` whose only link is lo.

    With nothing but loopback, traffic to any other address fails with ENETUNREACH.
    """
    links = [line.split(":")[0].strip() for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]]
    return current_id() != host_ns and links == ["lo"]


def tune_current() -> None:
    """Apply SYSCTLS to the namespace this process is in (only call inside the bench netns)."""
    for key, value in SYSCTLS.items():
        set_sysctl(key, value)


def set_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value)


# -- running a module's inner half in a throwaway namespace ----------------------------------


def run_inside(module: str, argv: list[str], workdir: Path, timeout: float) -> int:
    """Run ``python -m module *argv --inner workdir`` in a fresh namespace (deleted afterwards).

    The inner half calls :func:`inner_is_isolated` first: it refuses to run anywhere but there.
    """
    import json
    import sys

    (workdir / "host.json").write_text(json.dumps({"host_ns": current_id()}))
    with namespace() as ns:
        return subprocess.run([*exec_prefix(ns), sys.executable, "-m", module, *argv, "--inner", str(workdir)],
                              cwd=Path(__file__).resolve().parent.parent, timeout=timeout).returncode


def inner_is_isolated(workdir: Path) -> bool:
    """True in the namespace :func:`run_inside` made; otherwise says why not, on stderr."""
    import json
    import sys

    if is_isolated(json.loads((workdir / "host.json").read_text())["host_ns"]):
        return True
    print("refusing to run: not in a private network namespace with only lo", file=sys.stderr)
    return False


def run_and_report(name: str, argv: list[str], *, timeout: float, out: Path,
                   report: Callable[[dict[str, Any], dict[str, str]], str]) -> dict[str, Any] | None:
    """The outer half of ``python -m benchmarks.NAME``: run the inner half in a throwaway namespace
    (:func:`run_inside`), then write ``report(raw, meta)`` and its data under ``out`` as
    ``<date>-NAME.md`` (cp_report.save) and print it. Returns the raw results, None when the inner
    run failed (the tail of its svcproxy log is printed). ``NAME_KEEP=1`` keeps the work directory."""
    import datetime as dt
    import json
    import os
    import shlex
    import shutil
    import sys
    import tempfile

    from . import cp_report

    repo = Path(__file__).resolve().parent.parent
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{name}-"))
    try:
        rc = run_inside(f"benchmarks.{name}", argv, workdir, timeout=timeout)
        if rc or not (workdir / "raw.json").exists():
            logs = sorted(workdir.glob("svcproxy*.log"), key=lambda p: p.stat().st_mtime)
            print(f"[{name}] inner run failed ({rc}); svcproxy log:\n{logs[-1].read_text()[-3000:] if logs else ''}",
                  file=sys.stderr)
            return None
        raw: dict[str, Any] = json.loads((workdir / "raw.json").read_text())
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        meta = {"date": dt.date.today().isoformat(), "svcproxy": head.stdout.strip() or "?",
                "nproc": str(os.cpu_count()), "command": shlex.join(["python", "-m", f"benchmarks.{name}", *argv])}
        text = report(raw, meta)
        md = cp_report.save(out, f"{meta['date']}-{name}.md", text, meta, raw)
        print(text)
        print(f"[{name}] wrote {md}")
        return raw
    finally:
        if os.environ.get(f"{name.upper()}_KEEP"):
            print(f"[{name}] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
