"""Medians per target x workload -> Markdown table + PNG bar chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .wrk import WORKLOADS

Run = dict[str, Any]


@dataclass
class Summary:
    runs: int
    rps: float
    mib_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # summed over repetitions: any error matters
    proxy_cpu_s: float | None
    req_per_proxy_cpu: float | None
    req_per_machine_cpu: float | None


def _med(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def run_errors(r: Run) -> int:
    return int(r["connect"] + r["read"] + r["write"] + r["timeout"] + r["status"])


def derived(r: Run) -> dict[str, float | None]:
    secs = r["duration_us"] / 1e6
    cpu, machine = r.get("proxy_cpu_s"), r.get("machine_cpu_s")
    return {
        "rps": r["requests"] / secs,
        "mib_s": r["bytes"] / secs / (1 << 20),
        # Under ~2 clock ticks the quotient is noise, not a measurement.
        "req_per_proxy_cpu": r["requests"] / cpu if cpu and cpu >= 0.02 else None,
        "req_per_machine_cpu": r["requests"] / machine if machine else None,
    }


def summarize(runs: list[Run]) -> dict[tuple[str, str], Summary]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["workload"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        d = [derived(r) for r in rs]
        out[key] = Summary(
            runs=len(rs),
            rps=_med([x["rps"] for x in d]) or 0.0,
            mib_s=_med([x["mib_s"] for x in d]) or 0.0,
            p50_ms=(_med([r["p50_us"] for r in rs]) or 0.0) / 1000,
            p99_ms=(_med([r["p99_us"] for r in rs]) or 0.0) / 1000,
            errors=sum(run_errors(r) for r in rs),
            proxy_cpu_s=_med([r.get("proxy_cpu_s") for r in rs]),
            req_per_proxy_cpu=_med([x["req_per_proxy_cpu"] for x in d]),
            req_per_machine_cpu=_med([x["req_per_machine_cpu"] for x in d]),
        )
    return out


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _tcp(counters: dict[str, int]) -> str:
    """Only the non-zero kernel counters; an empty cell means a clean run."""
    return " ".join(f"{k} {v}" for k, v in counters.items() if v)


DISTURBED = 0.10  # share of the machine used outside the benchmark that makes a run suspect


def _disturbance(runs: list[Run], nproc: int) -> list[str]:
    shares = [r.get("other_cpu_s", 0.0) / (r["duration_us"] / 1e6 * nproc) for r in runs]
    bad = [s for s in shares if s > DISTURBED]
    if not bad:
        return []
    return [
        f"**Disturbed:** in {len(bad)} of {len(runs)} runs, processes outside the benchmark used more "
        f"than {DISTURBED:.0%} of the machine (worst {max(bad):.0%}; column *other CPU s* below). "
        "Those numbers are low and noisy: rerun on a quiet machine.",
        "",
    ]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _paired(runs: list[Run], wname: str) -> list[float]:
    """req/s of svcproxy over svcproxy-base in each repetition (run back to back, so paired)."""
    by = {(r["rep"], r["target"]): derived(r)["rps"] for r in runs if r["workload"] == wname}
    out = []
    for rep in sorted({rep for rep, _ in by}):
        new, base = by.get((rep, "svcproxy")), by.get((rep, "svcproxy-base"))
        if new is not None and base:
            out.append(new / base)
    return out


def markdown(raw: dict[str, Any], meta: dict[str, str], chart: str | None) -> str:
    runs: list[Run] = raw["runs"]
    sums = summarize(runs)
    targets = [t for t in raw["target_order"] if raw["targets"][t]["status"] == "ok"]
    labels = {t: raw["targets"][t]["label"] for t in raw["target_order"]}
    lines = [
        f"# svcproxy data-plane benchmark — {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Machine: " + ", ".join(f"{k} {meta[k]}" for k in ("nproc", "kernel", "cpu") if k in meta),
        "",
        "Tools: " + ", ".join(f"{k} {meta[k]}" for k in ("python", "wrk", "haproxy", "nginx", "nft") if k in meta),
        "",
        f"Setup: a private network namespace, loopback only. Two nginx backends "
        f"(1 worker each) serve a 12 B `/small` and a 1 MiB `/big`; every target but `direct` "
        f"round-robins over both. `wrk -t1`, {raw['duration']:g} s per run, {raw['reps']} "
        f"repetition(s), targets interleaved (order reversed on alternate repetitions); numbers "
        f"are medians over repetitions (errors are summed).",
        "",
    ]
    lines += _disturbance(runs, int(meta.get("nproc", "1")))
    problems = [t for t in raw["target_order"] if raw["targets"][t]["status"] != "ok"]
    if problems:
        lines += ["Not measured:", ""]
        for t in problems:
            info = raw["targets"][t]
            reason = " / ".join(line.strip() for line in info["reason"].splitlines() if line.strip())
            lines.append(f"- **{t}** {info['status']}: {reason}")
        lines.append("")
    for wname in raw["workloads"]:
        w = WORKLOADS[wname]
        lines += [
            f"## {wname}: {w.title}",
            "",
            "| target | req/s | MiB/s | p50 ms | p99 ms | errors | proxy CPU s "
            "| req / proxy CPU-s | req / machine CPU-s | req/s vs direct | req/s vs HAProxy "
            "| CPU eff. vs HAProxy |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        direct, hap = sums.get(("direct", wname)), sums.get(("haproxy", wname))
        for t in targets:
            s = sums.get((t, wname))
            if s is None:
                continue
            lines.append(
                f"| {labels[t]} | {s.rps:,.0f} | {s.mib_s:,.1f} | {s.p50_ms:.2f} | "
                f"{s.p99_ms:.2f} | {s.errors} | {_num(s.proxy_cpu_s, '.2f')} | "
                f"{_num(s.req_per_proxy_cpu)} | {_num(s.req_per_machine_cpu)} | "
                f"{_ratio(s.rps, direct.rps if direct else None)} | "
                f"{_ratio(s.rps, hap.rps if hap else None)} | "
                f"{_ratio(s.req_per_proxy_cpu, hap.req_per_proxy_cpu if hap else None)} |"
            )
        new, base = sums.get(("svcproxy", wname)), sums.get(("svcproxy-base", wname))
        if new is not None and base is not None:
            pairs = _paired(runs, wname)
            lines += ["", f"svcproxy vs {labels['svcproxy-base']}: req/s {_ratio(new.rps, base.rps)} (medians), "
                      f"{_ratio(new.req_per_proxy_cpu, base.req_per_proxy_cpu)} per proxy CPU-s; "
                      f"per repetition {', '.join(f'{r:.2f}x' for r in pairs)}"]
        lines.append("")
    if chart:
        lines += [f"![req/s and req per proxy CPU-second]({chart})", ""]
    lines += [
        "Columns:",
        "",
        "- **proxy CPU s**: utime+stime of the proxy's whole process tree (nginx master and "
        "worker included) from `/proc/PID/stat`, over the wrk run. `direct` has no proxy; "
        "`dnat` runs in the kernel (softirq, charged to no process): compare it by "
        "**req / machine CPU-s**, which counts all non-idle CPU of the machine (wrk, "
        "backends and proxy together, plus anything else running).",
        "- **errors**: wrk connect + read + write + timeout errors + non-2xx/3xx responses.",
        "- **kernel TCP** (all runs): non-zero deltas of the namespace's TCP counters over the run: "
        "`listen_drops` (SYNs dropped, accept queue full), `syn_retrans` (SYNs resent: about 1 s "
        "added to a connection), `paws` (segments rejected as older than a TIME_WAIT), "
        "`tw_overflow` (TIME_WAIT table full).",
        "- **other CPU s** (all runs): CPU used during the run by processes outside the benchmark's "
        "namespace (machine CPU minus the namespace's processes minus irq/softirq).",
        "- **wrk CPU s**, **backends CPU s** (all runs): the load generator's and the two nginx "
        "backends' CPU over the run: what a proxy's way of moving bytes costs its neighbours.",
        "- `direct` hits one backend (one nginx worker); every other target spreads the load over "
        "both, so kernel DNAT can beat `direct` when the single backend worker is the bottleneck.",
        f"- Every process shares {meta.get('nproc', '?')} cores: wrk, the backends and the proxy "
        "compete, so absolute numbers are lower than on a dedicated machine; ratios are the "
        "point.",
        "",
        "## All runs",
        "",
        "| rep | workload | target | req/s | MiB/s | p50 ms | p99 ms "
        "| errors c/r/w/t/status | proxy CPU s | wrk CPU s | backends CPU s | machine CPU s | other CPU s "
        "| kernel TCP |",
        "|--:|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in runs:
        d = derived(r)
        errs = "/".join(str(r[k]) for k in ("connect", "read", "write", "timeout", "status"))
        lines.append(
            f"| {r['rep']} | {r['workload']} | {r['target']} | {d['rps']:,.0f} | "
            f"{d['mib_s']:,.1f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | {errs} | "
            f"{_num(r.get('proxy_cpu_s'), '.2f')} | {_num(r.get('wrk_cpu_s'), '.2f')} | "
            f"{_num(r.get('backends_cpu_s'), '.2f')} | {_num(r.get('machine_cpu_s'), '.2f')} | "
            f"{_num(r.get('other_cpu_s'), '.2f')} | {_tcp(r.get('tcp', {}))} |"
        )
    return "\n".join(lines) + "\n"


def chart(raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    sums = summarize(raw["runs"])
    targets = [t for t in raw["target_order"] if raw["targets"][t]["status"] == "ok"]
    workloads = raw["workloads"]
    colors = {t: f"C{i}" for i, t in enumerate(raw["target_order"])}
    fig, axes = plt.subplots(2, len(workloads), figsize=(3.6 * len(workloads) + 1, 7), squeeze=False)
    for col, wname in enumerate(workloads):
        bulk = WORKLOADS[wname].path == "/big"
        rows = [
            ("MiB/s" if bulk else "req/s", "mib_s" if bulk else "rps"),
            ("req per proxy CPU-second", "req_per_proxy_cpu"),
        ]
        for row, (ylabel, metric) in enumerate(rows):
            ax = axes[row][col]
            names, vals = [], []
            for t in targets:
                s = sums.get((t, wname))
                v = getattr(s, metric) if s else None
                names.append(t)
                vals.append(v or 0.0)
                if v is None:
                    ax.text(len(names) - 1, 0, "n/a", ha="center", va="bottom", fontsize=8)
            ax.bar(names, vals, color=[colors[t] for t in names])
            ax.set_title(f"{wname}" if row == 0 else "", fontsize=10)
            ax.set_ylabel(ylabel if col == 0 or row == 0 else "", fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"svcproxy data plane — {raw['duration']:g} s x {raw['reps']} reps, medians")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
