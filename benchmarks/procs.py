"""Child processes the harness starts, and CPU accounting from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Supervisor:
    """Starts daemons in their own process groups and stops every one of them on close()."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.logdir / f"{name}.log").open("wb")
        # A new session: Ctrl-C in the terminal reaches only the harness, which then
        # stops the daemons in order instead of leaving half-dead process trees.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()
        self.procs[name] = proc
        return proc.pid

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str, grace: float = 5.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the whole tree: nginx master + workers
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlive their master would still be in the group.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        for name in list(reversed(self.procs)):
            self.stop(name)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of `root` and every descendant, plus children they already reaped.

    Summing cutime/cstime too keeps the total right when a worker exits mid-run: its time
    moves from its own stat line into its parent's c-fields.
    """
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields:
            # After the ')' split: index 11..14 = utime stime cutime cstime (fields 14..17).
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def netns_cpu_seconds() -> float:
    """CPU of every process in this network namespace (wrk, backends, proxies, harness)."""
    mine = os.readlink("/proc/self/ns/net")
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") != mine:
                continue
        except OSError:  # gone, or not ours to inspect: not in the benchmark either way
            continue
        fields = _stat_fields(int(entry))
        if fields:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


@dataclass(frozen=True)
class MachineCpu:
    """Where the machine's CPU went: to tell a clean run from one disturbed by other work."""

    busy: float  # all non-idle CPU time, all cores (/proc/stat)
    irq: float  # irq + softirq: loopback packet processing charged to no process
    netns: float  # processes in the benchmark's namespace

    @staticmethod
    def read() -> MachineCpu:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
        return MachineCpu(
            busy=(user + nice + system + irq + softirq + steal) / CLK_TCK,
            irq=(irq + softirq) / CLK_TCK,
            netns=netns_cpu_seconds(),
        )

    def since(self, before: MachineCpu) -> dict[str, float]:
        busy = self.busy - before.busy
        other = busy - (self.irq - before.irq) - (self.netns - before.netns)
        # Tick sampling makes `other` jitter around zero on a quiet machine.
        return {"machine_cpu_s": round(busy, 3), "other_cpu_s": round(max(other, 0.0), 3)}


def wait_tcp(host: str, port: int, timeout: float, running: Callable[[], bool] = lambda: True) -> bool:
    """Poll until something accepts on host:port; give up at `timeout` or when not running()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


# Kernel TCP counters (per network namespace) that explain a bad run: SYNs dropped by a full
# accept queue (ListenDrops), SYNs resent after such a drop (TCPSynRetrans: ~1 s latency
# tails), segments rejected by PAWS (timestamps older than a TIME_WAIT's), and TIME_WAIT
# buckets exhausted.
TCP_COUNTERS: dict[str, tuple[str, ...]] = {
    "listen_drops": ("ListenDrops",),
    "syn_retrans": ("TCPSynRetrans",),
    "paws": ("PAWSActive", "PAWSEstab", "PAWSTimewait"),
    "tw_overflow": ("TCPTimeWaitOverflow",),
}


def tcp_counters() -> dict[str, int]:
    values: dict[str, int] = {}
    lines = Path("/proc/self/net/netstat").read_text().splitlines()
    # The file alternates a header line and a value line per protocol ("TcpExt:", "IpExt:").
    for header, row in zip(lines[::2], lines[1::2], strict=False):
        values.update(zip(header.split()[1:], (int(v) for v in row.split()[1:]), strict=False))
    return {name: sum(values.get(k, 0) for k in keys) for name, keys in TCP_COUNTERS.items()}
