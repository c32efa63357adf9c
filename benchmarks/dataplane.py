"""Data-plane benchmark: wrk through svcproxy vs direct, HAProxy, nginx stream, nft DNAT.

    python -m benchmarks.dataplane [--targets ...] [--workloads ...] [--duration S] [--reps N]
    python -m benchmarks.dataplane --smoke      # svcproxy + direct, keepalive, 2 s, 1 rep

Runs as root. The process you start (the "outer") installs missing tools, creates a network
namespace, and re-runs this module inside it (the "inner", --inner PLAN) to start the backends
and targets and drive wrk. All traffic stays on that namespace's loopback. The outer always
kills what is left in the namespace and deletes it, then writes the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import backends, deps, netns, report
from . import wrk as wrkmod
from .procs import MachineCpu, Supervisor, tcp_counters, tree_cpu_seconds
from .targets import (
    NEEDS,
    TARGETS,
    WORKING_TREE,
    SvcproxyBase,
    Target,
    TargetError,
    check_svcproxy,
    export_revision,
    find_svcproxy,
    make,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
NOFILE = 65536  # c1000 through a proxy needs ~2000 fds per process; 20k is also plenty
SMOKE = {"targets": "svcproxy,direct", "workloads": "keepalive", "duration": 2.0, "reps": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", help=f"comma list of {','.join(TARGETS)} (default: all)")
    p.add_argument("--workloads", help=f"comma list of {','.join(wrkmod.WORKLOADS)} (default: all)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    p.add_argument("--reps", type=int, help="repetitions, targets interleaved (default 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results directory, or a .md file path (default benchmarks/results)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="svcproxy + direct, keepalive only, 2 s, 1 rep (explicit options win)"
    )
    p.add_argument(
        "--pause", type=float, default=1.0, help="seconds of idle between runs, to let closing connections drain"
    )
    p.add_argument("--svcproxy-cmd", help="command that starts svcproxy (default: look for it)")
    p.add_argument("--svcproxy-base", metavar="REV",
                   help="also measure svcproxy as of this git revision (target svcproxy-base), side by side")
    p.add_argument(
        "--no-install",
        action="store_true",
        help="never apt-get/pip install: a missing haproxy/nft skips its target, wrk/nginx is an error",
    )
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (
        SMOKE
        if args.smoke
        else {
            "targets": ",".join(t for t in TARGETS if t != SvcproxyBase.name),
            "workloads": ",".join(wrkmod.WORKLOADS),
            "duration": 10.0,
            "reps": 3,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.target_list = _names(p, args.targets, TARGETS)
    if args.svcproxy_base and SvcproxyBase.name not in args.target_list:
        args.target_list.append(SvcproxyBase.name)
    elif SvcproxyBase.name in args.target_list and not args.svcproxy_base:
        p.error(f"target {SvcproxyBase.name} needs --svcproxy-base REV")
    args.workload_list = _names(p, args.workloads, wrkmod.WORKLOADS)
    if args.duration <= 0 or args.duration > 600 or args.reps < 1 or args.reps > 100:
        p.error("--duration must be in (0, 600] and --reps in [1, 100]")
    return args


def _names(p: argparse.ArgumentParser, csv: str, known: dict[str, Any]) -> list[str]:
    names = [n.strip() for n in csv.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"unknown {bad or 'empty list'}; choose from {','.join(known)}")
    return list(dict.fromkeys(names))


def raise_nofile() -> None:
    # Inherited by everything started below (wrk, nginx, haproxy, svcproxy).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        # No CAP_SYS_RESOURCE (e.g. in a container): the hard limit is as far as we can go.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < NOFILE:
            print(f"[bench] RLIMIT_NOFILE capped at {hard} (wanted {NOFILE})", flush=True)


def _interrupt_on_sigterm() -> None:
    """Make SIGTERM take the same clean-up path as Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _ignore_interrupts() -> None:
    """While cleaning up, a second Ctrl-C must not cut the clean-up short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------- inner (in the namespace)


def inner(plan_path: Path) -> int:
    _interrupt_on_sigterm()
    plan = json.loads(plan_path.read_text())
    if not netns.is_isolated(plan["host_netns"]):
        print("refusing to run: not in a private network namespace with only lo", file=sys.stderr)
        return 2
    workdir = Path(plan["workdir"])
    raw_path = workdir / "raw.json"
    raw: dict[str, Any] = {k: plan[k] for k in ("targets", "target_order", "workloads", "duration", "reps")}
    raw["runs"] = []
    netns.tune_current()
    sup = Supervisor(workdir)
    live: dict[str, Target] = {}
    try:
        print("[bench] starting backends", flush=True)
        backends.start(sup, workdir)
        live = start_targets(plan, raw["targets"], sup, workdir)
        raw_path.write_text(json.dumps(raw, indent=1))  # start-up failures get reported too
        script = wrkmod.write_script(workdir)
        total, done = plan["reps"] * len(plan["workloads"]) * len(live), 0
        # Interleaved: every target once per workload per repetition, so slow drifts of the
        # machine spread over all targets instead of biasing the last one.
        for rep in range(1, plan["reps"] + 1):
            for wname in plan["workloads"]:
                # Reversed on alternate repetitions: a run leaves TIME_WAITs and warm caches
                # behind, and the target after it must not always be the same one.
                order = list(live.items())
                for name, target in order if rep % 2 else order[::-1]:
                    done += 1
                    run = measure(target, wrkmod.WORKLOADS[wname], plan["duration"], script, sup)
                    if isinstance(run, str):
                        raw["targets"][name].update(status="failed", reason=run)
                        print(f"[bench] {name} FAILED: {run}", flush=True)
                        live.pop(name).stop()
                        continue
                    run.update(rep=rep, target=name, workload=wname)
                    raw["runs"].append(run)
                    raw_path.write_text(json.dumps(raw, indent=1))  # partial results survive
                    print(f"[bench] {done}/{total} rep {rep} {wname:9} {name:8} {_brief(run)}", flush=True)
                    time.sleep(plan["pause"])
        return 0
    finally:
        _ignore_interrupts()
        for target in live.values():
            target.stop()
        sup.close()


def start_targets(
    plan: dict[str, Any], info: dict[str, dict[str, str]], sup: Supervisor, workdir: Path
) -> dict[str, Target]:
    """Start every target still marked ok; mark the ones that fail. Returns the running ones."""
    live: dict[str, Target] = {}
    for name in plan["target_order"]:
        if info[name]["status"] != "ok":
            continue
        target = make(name, sup, workdir, plan)
        try:
            target.start()
            # Prove it forwards to both backends before measuring anything.
            target.activate()
            try:
                target.verify()
            finally:
                target.deactivate()
        except (TargetError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            info[name].update(status="failed", reason=f"start/verify: {exc}")
            print(f"[bench] {name} FAILED: {exc}", flush=True)
            target.stop()
            continue
        print(f"[bench] {name} ready on {target.host}:{target.port}", flush=True)
        live[name] = target
    return live


def _brief(run: dict[str, Any]) -> str:
    cpu = run["proxy_cpu_s"]
    return (
        f"{report.derived(run)['rps']:>10,.0f} req/s  p99 {run['p99_us'] / 1000:7.2f} ms  "
        f"errors {report.run_errors(run)}  proxy CPU {'-' if cpu is None else f'{cpu:.2f} s'}"
    )


def measure(target: Target, w: wrkmod.Workload, duration: float, script: Path, sup: Supervisor) -> dict[str, Any] | str:
    """One wrk run; a dict of results, or a string saying why the target is broken."""
    target.activate()
    try:
        cpu0, machine0, tcp0 = target.cpu_seconds(), MachineCpu.read(), tcp_counters()
        wrk0, backends0 = children_cpu_seconds(), backends_cpu_seconds(sup)
        result = wrkmod.run(target.url(w.path), w, duration, script)
        wrk1, backends1 = children_cpu_seconds(), backends_cpu_seconds(sup)
        cpu1, machine1, tcp1 = target.cpu_seconds(), MachineCpu.read(), tcp_counters()
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"{w.name}: {exc}"
    finally:
        target.deactivate()
    if target.name in sup.procs and not sup.alive(target.name):
        return f"{w.name}: process exited:\n{sup.log_tail(target.name)}"
    run = result.to_json()
    run["proxy_cpu_s"] = round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None
    run.update(machine1.since(machine0))
    # Where the rest of the machine's CPU went: a proxy can cost its neighbours (more wake-ups,
    # smaller segments) what it saves itself.
    run["wrk_cpu_s"], run["backends_cpu_s"] = round(wrk1 - wrk0, 3), round(backends1 - backends0, 3)
    run["tcp"] = {k: tcp1[k] - tcp0[k] for k in tcp0}
    return run


def children_cpu_seconds() -> float:
    """CPU of this process's reaped children: across one wrk run, wrk's (the daemons are not reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def backends_cpu_seconds(sup: Supervisor) -> float:
    return sum(tree_cpu_seconds(sup.procs[b.name].pid) for b in backends.BACKENDS if b.name in sup.procs)


# ---------------------------------------------------------------- outer (host namespace)


def machine_facts() -> dict[str, str]:
    facts = {"nproc": str(os.cpu_count()), "kernel": platform.release(), "python": platform.python_version()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            facts["cpu"] = line.split(":", 1)[1].strip()
            break
    probes = {"wrk": ["wrk", "-v"], "haproxy": ["haproxy", "-v"], "nginx": ["nginx", "-v"], "nft": ["nft", "--version"]}
    for name, argv in probes.items():
        if shutil.which(argv[0]):
            out = subprocess.run(argv, capture_output=True, text=True)
            version = re.search(r"\d+(\.\d+)+\S*", out.stdout + out.stderr)
            if version:
                facts[name] = version.group(0)
    return facts


def plan_targets(args: argparse.Namespace) -> tuple[dict[str, dict[str, str]], list[str] | None]:
    """Install/check what each target needs; mark the ones that cannot run as skipped.

    Returns the target table and the svcproxy command (if it is to be measured).
    """
    svcproxy_argv = None
    needed = sorted({"wrk", "nginx", "ip"} | {b for t in args.target_list for b in NEEDS.get(t, [])})
    missing = deps.ensure(needed, "nginx" in args.target_list, install=not args.no_install)
    for core in ("wrk", "nginx", "ip"):
        if core in missing:
            raise SystemExit(f"{core} is missing (install it, or drop --no-install)")
    targets = {}
    for name in args.target_list:
        cls = TARGETS[name]
        info = {"label": cls.label, "status": "ok", "reason": ""}
        lacking = [b for b in NEEDS.get(name, []) if b in missing]
        if name == "nginx" and "libnginx-mod-stream" in missing:
            lacking.append("libnginx-mod-stream")
        if lacking:
            info.update(status="skipped", reason=f"missing {', '.join(lacking)}")
        if name in WORKING_TREE:
            cmd, where = find_svcproxy(REPO, args.svcproxy_cmd)
            problem = check_svcproxy(cmd, REPO) if cmd else None
            if cmd is None:
                info.update(status="skipped", reason=f"svcproxy not available: {where}")
            elif problem:
                info.update(status="failed", reason=problem)
            else:
                svcproxy_argv = cmd
                print(f"[bench] svcproxy command: {shlex.join(cmd)}", flush=True)
        if info["status"] != "ok":
            print(f"[bench] {name} {info['status'].upper()}: {info['reason']}", flush=True)
        targets[name] = info
    return targets, svcproxy_argv


def export_base(args: argparse.Namespace, targets: dict[str, dict[str, str]], workdir: Path) -> dict[str, Any]:
    """``--svcproxy-base REV``: that revision's proxy package, run with this Python."""
    info = targets.get(SvcproxyBase.name)
    if info is None or info["status"] != "ok":
        return {}
    try:
        cmd, env, short = export_revision(REPO, args.svcproxy_base, workdir / "base")
    except (OSError, subprocess.CalledProcessError) as exc:
        info.update(status="failed", reason=f"cannot export {args.svcproxy_base}: {exc}")
        return {}
    info["label"] = f"svcproxy @ {short}"
    print(f"[bench] svcproxy-base: {short} ({args.svcproxy_base})", flush=True)
    return {"cmd": cmd, "env": env}


def output_paths(out: Path, smoke: bool) -> tuple[Path, Path, Path]:
    if out.suffix == ".md":
        md = out
    else:
        stamp = dt.date.today().isoformat() + ("-smoke" if smoke else "")
        md = out / f"{stamp}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    return md, md.with_suffix(".png"), md.with_suffix(".json")


def remove_stale_workdirs() -> None:
    """Work directories of earlier runs that were SIGKILLed (their pid is in the name)."""
    for path in Path(tempfile.gettempdir()).glob(f"{netns.PREFIX}*-*"):
        pid = path.name[len(netns.PREFIX) :].split("-", 1)[0]
        kept = (path / "KEEP").exists()  # --keep-workdir
        if path.is_dir() and pid.isdigit() and not kept and not netns.pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def write_report(raw: dict[str, Any], args: argparse.Namespace, argv: list[str], want_chart: bool) -> None:
    md, png, js = output_paths(args.out, args.smoke)
    chart_name = None
    if want_chart and raw["runs"]:
        report.chart(raw, png)
        chart_name = png.name
    meta = machine_facts()
    meta["date"] = dt.date.today().isoformat()
    meta["command"] = shlex.join(["python", "-m", "benchmarks.dataplane", *argv])
    md.write_text(report.markdown(raw, meta, chart_name))
    js.write_text(json.dumps({"meta": meta, **raw}, indent=1))
    print(f"[bench] wrote {md}" + (f" and {png.name}" if chart_name else ""), flush=True)


def outer(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a network namespace", file=sys.stderr)
        return 2
    targets, svcproxy_argv = plan_targets(args)
    want_chart = not args.no_chart and deps.ensure_matplotlib(install=not args.no_install)
    if not args.no_chart and not want_chart:
        print("[bench] matplotlib missing: no chart", flush=True)
    raise_nofile()
    for stale in netns.cleanup_stale():
        print(f"[bench] removed stale namespace {stale}", flush=True)
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{netns.PREFIX}{os.getpid()}-"))
    plan = {
        "workdir": str(workdir),
        "targets": targets,
        "target_order": args.target_list,
        "workloads": args.workload_list,
        "duration": args.duration,
        "reps": args.reps,
        "pause": args.pause,
        "svcproxy_cmd": svcproxy_argv,
        "svcproxy_base": export_base(args, targets, workdir),
        "host_netns": netns.current_id(),
    }
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    _interrupt_on_sigterm()
    rc = 1
    try:
        with netns.namespace() as ns:
            print(f"[bench] namespace {ns}, workdir {workdir}", flush=True)
            cmd = [*netns.exec_prefix(ns), sys.executable, "-m", "benchmarks.dataplane", "--inner", str(plan_path)]
            child = subprocess.Popen(cmd, cwd=REPO)
            try:
                rc = child.wait()
                _ignore_interrupts()  # from here on only clean-up and the report
            except KeyboardInterrupt:
                # A terminal Ctrl-C reached the inner too, a SIGTERM or `timeout` did not: make
                # sure it stops its daemons (SIGTERM: SIGINT may be ignored in a background job),
                # then (leaving `with`) kill whatever is left.
                _ignore_interrupts()
                if child.poll() is None:
                    child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                raise
        raw_path = workdir / "raw.json"
        if not raw_path.exists():
            print(f"[bench] inner run produced no results (exit {rc})", file=sys.stderr)
            return rc or 1
        raw = json.loads(raw_path.read_text())
        write_report(raw, args, argv, want_chart)
        failed = [t for t, i in raw["targets"].items() if i["status"] == "failed"]
        return rc or (1 if failed else 0)
    except KeyboardInterrupt:
        print("[bench] interrupted; namespace and processes cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep_workdir:
            (workdir / "KEEP").touch()
            print(f"[bench] kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        try:
            return inner(args.inner)
        except KeyboardInterrupt:
            return 130
    return outer(args, argv)


if __name__ == "__main__":
    sys.exit(main())
