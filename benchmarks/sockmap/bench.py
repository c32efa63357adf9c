"""Bulk-throughput / CPU benchmark: direct vs user vs splice vs sockmap relays.

  python -m benchmarks.sockmap.bench --seconds 4 --reps 5 [--json out.json]

Loopback only: client (this process) -> relay subprocess on 127.0.0.1 ->
sink subprocess on 127.0.0.2.  Each trial: one TCP connection, the client
sendall()s 1 MiB messages for --seconds, then SHUT_WR and waits for the EOF
that comes back once the sink has read everything and closed (so bytes still
queued inside the kernel - sockmap has no backpressure - are counted in the
elapsed time).  Throughput = bytes / (EOF time - start).

CPU per GiB is reported three ways:
  relay   utime+stime of the relay process (/proc/<pid>/stat)
  kwork   utime+stime summed over kworker threads (sockmap egress redirects
          are transmitted from a workqueue, i.e. outside the relay process)
  system  busy jiffies from /proc/stat (whole 2-CPU machine, shared; noisy)
Order of modes rotates every repetition.  Every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

MiB = 1 << 20
GiB = 1 << 30
TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("direct", "user", "splice", "sockmap")


# ---- /proc helpers ------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TCK  # utime, stime


def kworker_cpu() -> float:
    tot = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        if comm.startswith("kworker"):
            parts = s.rsplit(")", 1)[1].split()
            tot += int(parts[11]) + int(parts[12])
    return tot / TCK


def system_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TCK


# ---- sink (subprocess role) ---------------------------------------------------
def run_sink(listen: str, max_seconds: float) -> None:
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)), backlog=64)
    print(f"ready {srv.getsockname()[1]}", flush=True)
    srv.settimeout(0.5)
    deadline = time.monotonic() + max_seconds

    def drain(c):
        buf = bytearray(MiB)
        try:
            while c.recv_into(buf):
                pass
        except OSError:
            pass
        c.close()

    while time.monotonic() < deadline:
        try:
            c, _ = srv.accept()
        except (TimeoutError, OSError):
            continue
        c.settimeout(None)
        threading.Thread(target=drain, args=(c,), daemon=True).start()


# ---- orchestration --------------------------------------------------------------
def spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, env=env, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError(f"{args}: {line!r}")
    return p, line.split()[1]


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def client(addr: tuple[str, int], seconds: float) -> tuple[int, float]:
    msg = os.urandom(MiB)
    c = socket.create_connection(addr, timeout=30)
    sent = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        c.sendall(msg)
        sent += MiB
    c.shutdown(socket.SHUT_WR)
    c.settimeout(60)
    c.recv(1)  # EOF once the sink has consumed everything and closed
    el = time.monotonic() - t0
    c.close()
    return sent, el


def trial(mode: str, sink_port: int, seconds: float, sink_pid: int) -> dict:
    relay = None
    if mode == "direct":
        addr, rpid = ("127.0.0.2", sink_port), None
    else:
        relay, hp = spawn(["-m", "benchmarks.sockmap.relay", "--mode", mode,
                           "--listen", "127.0.0.1:0", "--backend", f"127.0.0.2:{sink_port}",
                           "--max-seconds", "120"])
        addr, rpid = ("127.0.0.1", int(hp.rsplit(":", 1)[1])), relay.pid
    time.sleep(0.2)
    r0 = proc_cpu(rpid) if rpid else 0.0
    k0, s0, sk0 = kworker_cpu(), system_busy(), proc_cpu(sink_pid)
    c0 = os.times()
    try:
        sent, el = client(addr, seconds)
    finally:
        c1 = os.times()
        r1 = proc_cpu(rpid) if rpid else 0.0
        k1, s1, sk1 = kworker_cpu(), system_busy(), proc_cpu(sink_pid)
        if relay:
            stop(relay)
    gib = sent / GiB
    return {"mode": mode, "bytes": sent, "elapsed": el, "mibps": sent / MiB / el,
            "relay_cpu_per_gib": (r1 - r0) / gib, "kworker_cpu_per_gib": (k1 - k0) / gib,
            "system_cpu_per_gib": (s1 - s0) / gib, "sink_cpu_per_gib": (sk1 - sk0) / gib,
            "client_cpu_per_gib": ((c1.user - c0.user) + (c1.system - c0.system)) / gib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("bench", "sink"), default="bench")
    ap.add_argument("--listen", default="127.0.0.2:0")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.role == "sink":
        run_sink(a.listen, 900)
        return 0
    modes = a.modes.split(",")
    if a.seconds * a.reps * len(modes) > 480:
        ap.error("run too long for a shared machine")
    sink, port = spawn(["-m", "benchmarks.sockmap.bench", "--role", "sink",
                        "--listen", "127.0.0.2:0"])
    rows = []
    try:
        for rep in range(a.reps):
            order = modes[rep % len(modes):] + modes[:rep % len(modes)]
            for m in order:
                r = trial(m, int(port), a.seconds, sink.pid)
                r["rep"] = rep
                rows.append(r)
                print(f"rep {rep} {m:8s} {r['mibps']:8.1f} MiB/s  relay {r['relay_cpu_per_gib']:.3f}"
                      f"  kworker {r['kworker_cpu_per_gib']:.3f}  system {r['system_cpu_per_gib']:.3f}"
                      f"  sink {r['sink_cpu_per_gib']:.3f}  client {r['client_cpu_per_gib']:.3f} s/GiB",
                      flush=True)
    finally:
        stop(sink)
    print()
    keys = ("mibps", "relay_cpu_per_gib", "kworker_cpu_per_gib", "system_cpu_per_gib")
    print("median  " + "  ".join(f"{k:>20s}" for k in keys))
    for m in modes:
        sel = [r for r in rows if r["mode"] == m]
        print(f"{m:8s}" + "  ".join(f"{statistics.median(r[k] for r in sel):20.3f}" for k in keys))
    print("\nper-rep ratio vs user (MiB/s, system CPU/GiB):")
    for m in modes:
        rat = []
        for rep in range(a.reps):
            u = next(r for r in rows if r["rep"] == rep and r["mode"] == "user")
            x = next(r for r in rows if r["rep"] == rep and r["mode"] == m)
            rat.append(f"{x['mibps'] / u['mibps']:.2f}/{x['system_cpu_per_gib'] / u['system_cpu_per_gib']:.2f}")
        print(f"{m:8s} " + " ".join(rat))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
