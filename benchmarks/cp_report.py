"""The control-plane benchmark's Markdown report: targets met/missed, then every number behind them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

DISTURBED = 0.10
GOAL_STARTUP_S = 3.0
GOAL_P99_MS = 20.0
GOAL_RSS_MIB = 250.0
GOAL_CONN_BYTES = 8 * 1024
FULL_SCALE = (10_000, 10)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; ``inf`` values (lost changes) count as slowest."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latencies(changes: list[dict[str, Any]], kind: str | None = None) -> list[float]:
    """Milliseconds per change; a change never seen applied is ``inf``; superseded ones are left out."""
    out = []
    for c in changes:
        if (kind is not None and c["kind"] != kind) or c["status"] == "superseded":
            continue
        out.append(c["ms"] if c["status"] == "ok" else math.inf)
    return out


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "lost" if math.isinf(v) else f"{v:.1f}"


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def churn_brief(c: dict[str, Any]) -> str:
    lat = latencies(c["changes"])
    lost = sum(1 for x in lat if math.isinf(x))
    return (f"{c['sent']} changes, p50 {_ms(percentile(lat, 50))} ms, p99 {_ms(percentile(lat, 99))} ms, "
            f"lost {lost}, final check {c['final_check']['ok']}/{c['final_check']['probed']}")


def idle_brief(i: dict[str, Any]) -> str:
    per = i.get("bytes_per_conn")
    return (f"{i['connections']} connections, {i['backend_live']} at the backend, "
            f"{'n/a' if per is None else f'{per / 1024:.2f} KiB'} RSS per connection")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def targets(raw: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, met) rows."""
    rows: list[tuple[str, str, str, bool | None]] = []
    api = raw["startup"].get("api")
    if api:
        t = api["observed_s"]
        complete = api["listeners"] >= api["expected_listeners"] and not api["verify"]["bad"]
        rows.append(("Services + endpoints programmed (API source, start → every listener)",
                     "never" if t is None else f"{t:.2f} s", f"≤ {GOAL_STARTUP_S:g} s",
                     t is not None and complete and t <= GOAL_STARTUP_S))
    churn = raw.get("churn")
    if churn:
        p99 = percentile(latencies(churn["changes"]), 99)
        rows.append((f"Programming latency p99 at {raw['args']['rate']:g} changes/s", f"{_ms(p99)} ms",
                     f"≤ {GOAL_P99_MS:g} ms", p99 is not None and p99 <= GOAL_P99_MS))
    if api:
        rss = [api["rss_kib"], churn["rss_kib"] if churn else None]
        worst = max((r for r in rss if r is not None), default=None)
        rows.append(("RSS at that scale (API source; after start-up and after churn, the larger)",
                     f"{_mib(worst)} MiB", f"≤ {GOAL_RSS_MIB:g} MB",
                     None if worst is None else worst / 1024 <= GOAL_RSS_MIB))
    idle = raw.get("idle")
    if idle:
        per = idle.get("bytes_per_conn")
        rows.append((f"RSS per idle connection ({idle['connections']:,} connections)",
                     "n/a" if per is None else f"{per / 1024:.2f} KiB", "≤ 8 KiB",
                     None if per is None else per <= GOAL_CONN_BYTES and idle["all_reached_backend"]))
    return rows


def markdown(raw: dict[str, Any], meta: dict[str, str]) -> str:
    a = raw["args"]
    scale = (a["services"], a["endpoints_per_service"])
    lines = [
        f"# svcproxy control-plane benchmark — {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Machine: " + ", ".join(f"{k} {meta[k]}" for k in ("nproc", "cpu", "memory", "kernel", "python") if k in meta)
        + f"; RLIMIT_NOFILE {meta.get('nofile', '?')}",
        "",
        f"svcproxy: git {meta.get('svcproxy', '?')}",
        "",
        f"Scale: {a['services']:,} Services x {a['endpoints_per_service']} endpoints "
        f"({a['services'] * a['endpoints_per_service']:,} endpoints, one EndpointSlice per Service); "
        f"{a['rate']:g} EndpointSlice changes/s for {a['duration']:g} s; {a['idle_conns']:,} idle connections "
        "wanted.",
        "",
    ]
    if scale != FULL_SCALE:
        lines += [f"**Not the target scale** ({FULL_SCALE[0]:,} x {FULL_SCALE[1]}): the verdicts below are "
                  "indicative only.", ""]
    if a.get("profile"):
        lines += ["**Profiled run** (py-spy pauses svcproxy for every sample): the timings are inflated; use "
                  "this run for the profiles, not for the targets.", ""]
    for err in raw.get("errors", []):
        lines += [f"**Failed:** {err}", ""]
    lines += ["## Targets", "", "| target | measured | goal | result |", "|---|--:|--:|---|"]
    for name, measured, goal, ok in targets(raw):
        lines.append(f"| {name} | {measured} | {goal} | {_verdict(ok)} |")
    nproc = int(meta.get("nproc", "1"))
    lines += ["", *disturbance(raw, nproc), *_startup(raw, nproc), *_churn(raw, nproc), *_idle(raw), *_method(raw),
              *_profiles(raw)]
    return "\n".join(lines) + "\n"


def _share(r: dict[str, Any], nproc: int) -> str:
    """CPU used outside the benchmark's namespace during a phase, as a share of the machine."""
    if r.get("other_cpu_s") is None or not r.get("wall_s"):
        return "n/a"
    return f"{r['other_cpu_s'] / (r['wall_s'] * nproc):.0%}"


def disturbance(raw: dict[str, Any], nproc: int) -> list[str]:
    phases = [(f"start-up ({k})", r) for k, r in raw["startup"].items()]
    phases += [("churn", raw["churn"])] if raw.get("churn") else []
    bad = [(name, _share(r, nproc)) for name, r in phases
           if r.get("other_cpu_s") is not None and r.get("wall_s")
           and r["other_cpu_s"] / (r["wall_s"] * nproc) > DISTURBED]
    if not bad:
        return []
    return ["**Disturbed:** processes outside the benchmark used more than "
            f"{DISTURBED:.0%} of the machine during " + ", ".join(f"{n} ({v})" for n, v in bad)
            + ". Those timings are pessimistic: rerun on a quiet machine.", ""]


def _startup(raw: dict[str, Any], nproc: int) -> list[str]:
    if not raw["startup"]:
        return []
    lines = [
        "## Start-up: time to the first programmed state",
        "",
        "| source | listeners | all listeners seen | proxy's first sync ended | source started "
        "| read + convert | first sync took | syncs | RSS MiB | peak RSS MiB | open fds | probes right "
        "| other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for source, r in raw["startup"].items():
        sync_s, started, end = r.get("sync_duration_s"), r.get("source_started_s"), r["sync_end_s"]
        reading = end - sync_s - started if None not in (sync_s, started, end) else None
        lines.append(
            f"| {source} | {r['listeners']:,}/{r['expected_listeners']:,} | "
            f"{_s(r['observed_s'], 'never')} | {_s(end)} | {_s(started)} | {_s(reading)} | {_s(sync_s)} | "
            f"{_int(r['syncs'])} | {_mib(r['rss_kib'])} | "
            f"{_mib(r['hwm_kib'])} | {_int(r['fds'])} | {r['verify']['ok']}/{r['verify']['probed']} | "
            f"{_share(r, nproc)} |")
    lines += [
        "",
        "Times count from the moment svcproxy's process was started (interpreter start-up and imports "
        "included). *All listeners seen*: polled every 50 ms in the kernel's socket table "
        "(`/proc/net/tcp`, sockets listening on port 80). *Proxy's first sync ended*: its "
        "`kubeproxy_sync_proxy_rules_last_timestamp_seconds`. *First sync took*: "
        "`kubeproxy_sync_proxy_rules_duration_seconds` (when it was the only sync so far). *Source "
        "started*: svcproxy's log line saying it starts watching the API (or reading the files), i.e. "
        "interpreter start, imports and servers up. *Read + convert*: from there to the start of the first "
        "sync (LIST requests and responses, JSON or YAML decoding, conversion). RSS and fds one second "
        "after programming. *Probes right*: connections to a sample of clusterIPs (and the last "
        "Service's) that reached one of that Service's own endpoints. *Other CPU*: CPU used outside the "
        "benchmark's namespace, as a share of the machine (other work running at the same time).",
        "",
    ]
    lists = raw.get("api_lists")
    if lists:
        lines += [
            f"For scale: the fake API server (in the benchmark process, Python) alone takes "
            f"{lists['Service_s']:.2f} s to answer the Service LIST ({lists['Service_mib']:.1f} MiB) and "
            f"{lists['EndpointSlice_s']:.2f} s for the EndpointSlice LIST ({lists['EndpointSlice_mib']:.1f} MiB), "
            "measured alone before svcproxy starts; svcproxy makes both at once, so part of *read + "
            "convert* is the fake server's.",
            "",
        ]
    return lines


def _s(v: float | None, missing: str = "n/a") -> str:
    return missing if v is None else f"{v:.2f} s"


def _counters(tcp: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in tcp.items()) or "n/a"


def _int(v: float | None) -> str:
    return "n/a" if v is None else f"{int(v):,}"


def _churn(raw: dict[str, Any], nproc: int) -> list[str]:
    c = raw.get("churn")
    if not c:
        return []
    changes = c["changes"]
    lines = [
        "## Endpoint changes: network-programming latency",
        "",
        f"{c['sent']:,} EndpointSlice upserts in {c['send_seconds']:.1f} s "
        f"({c['rate_achieved']:.1f}/s achieved; worst send lateness {c['worst_send_lateness_ms']:.1f} ms).",
        "",
        "| change | count | p50 ms | p90 ms | p99 ms | max ms | lost | superseded | wrong answers "
        "| probes/change | stalled probes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for kind in (None, "rollout", "scale-down", "scale-up"):
        sel = [x for x in changes if kind is None or x["kind"] == kind]
        if not sel:
            continue
        lat = latencies(sel)
        lines.append(
            f"| {kind or 'all'} | {len(sel):,} | {_ms(percentile(lat, 50))} | {_ms(percentile(lat, 90))} | "
            f"{_ms(percentile(lat, 99))} | {_ms(max(lat) if lat else None)} | "
            f"{sum(1 for x in sel if x['status'] == 'timeout')} | "
            f"{sum(1 for x in sel if x['status'] == 'superseded')} | {sum(x['unexpected'] for x in sel)} | "
            f"{sum(x['probes'] for x in sel) / len(sel):.1f} | {sum(x.get('stalled', 0) for x in sel)} |")
    resolution = percentile([x["ms"] - x["lower_ms"] for x in changes if x["status"] == "ok"], 50)
    final = c["final_check"]
    mean = c["sync_mean_ms"]
    lines += [
        "",
        f"svcproxy during the churn: {c['proxy_cpu_s']:.1f} CPU s "
        f"({c['proxy_cpu_s'] / max(c['sent'], 1) * 1000:.2f} ms per change), {_int(c['syncs'])} syncs "
        f"(mean {'n/a' if mean is None else f'{mean:.2f}'} ms each), RSS after {_mib(c['rss_kib'])} MiB "
        f"(peak so far {_mib(c['hwm_kib'])} MiB), {_int(c['fds'])} fds; other CPU {_share(c, nproc)} of the "
        "machine. Afterwards every changed Service "
        f"was probed once: {final['ok']:,}/{final['probed']:,} showed their last state. Kernel TCP "
        f"counters over the churn (namespace): {_counters(c.get('tcp', {}))}.",
        "",
        "How a change is observed: every endpoint address is served by one backend in the benchmark "
        "process listening on 0.0.0.0:8080 of the namespace, which writes back the address the "
        "connection was made to (the probe sends a byte first: a connection whose handshake completed "
        "just as a listener closed is then reset at once instead of hanging; the kernel counts those "
        "as `listen_drops`). A *rollout* replaces all of a Service's endpoints with a new set "
        "(a new generation of addresses), so a single connection through the clusterIP tells old from "
        "new; a *scale-down* empties the slice (the listener goes: connections are refused) and a "
        "*scale-up* brings it back. After each upsert the Service is probed back to back (at most one "
        "probe per ms) until a probe shows the new state; the latency is the end of that probe minus "
        "the moment the upsert was handed to the fake API server, an upper bound (median gap to "
        f"the same probe's start: {_ms(resolution)} ms). *Lost*: not seen within "
        "5 s (counted as slowest in the percentiles). *Wrong answers*: probes that reached an address "
        "of neither the old nor the new state, or were refused while both states had endpoints. "
        "*Stalled probes*: connects that got no answer within 100 ms (a dropped SYN, which a client "
        "would resend after 1 s); the probe is abandoned and the Service probed again.",
        "",
    ]
    return lines


def _idle(raw: dict[str, Any]) -> list[str]:
    i = raw.get("idle")
    if not i:
        return []
    b, a = i["before"], i["after"]
    per = i.get("bytes_per_conn")
    lines = [
        "## Idle connections",
        "",
        f"A fresh svcproxy with one Service (clusterIP {i.get('vip', '127.30.0.1')}:80 → one backend that "
        f"accepts and holds connections). {i['connections']:,} client connections opened "
        f"(200 at a time, {i['open_seconds']:.1f} s), {i['connect_errors']} errors; "
        f"{i['backend_live']:,} reached the backend.",
        "",
    ]
    if i["capped_reason"]:
        lines += [f"Fewer than asked: {i['capped_reason']}.", ""]
    lines += [
        "| | RSS KiB | fds |",
        "|---|--:|--:|",
        f"| before (after 100 warm-up connections came and went) | {_int(b['rss_kib'])} | {_int(b['fds'])} |",
        f"| with the connections open and idle for 2 s | {_int(a['rss_kib'])} | {_int(a['fds'])} |",
        f"| per connection | {'n/a' if per is None else f'{per:,.0f} B ({per / 1024:.2f} KiB)'} | "
        f"{i.get('fds_per_conn', 0):.2f} |",
        "",
        "RSS is svcproxy's VmRSS (user memory); kernel socket memory is not in it "
        f"(namespace TCP sockstat at the end: {i['kernel_tcp']}).",
        "",
    ]
    return lines


def _method(raw: dict[str, Any]) -> list[str]:
    return [
        "## Setup",
        "",
        "Everything runs in a private network namespace with only `lo`. Service *i* has clusterIP "
        "127.10.0.0+1+*i*, port 80/TCP, and one EndpointSlice whose endpoints are 127.20.0.0/14 "
        "addresses (127.24.0.0/14 for the other generation), port 8080; all of 127.0.0.0/8 is local, so "
        "svcproxy adds no address. The fake API server (`testbed/fakeapi`, real list/watch protocol) runs "
        "in the benchmark process; svcproxy is a separate process using the real kubernetes_asyncio "
        "client (`--master http://127.0.0.1:6443 --hostname-override node-a --vip-interface lo "
        "--nodeport-addresses 127.0.0.1/32`). The manifest run reads the same objects from 4 YAML "
        "files (`--manifests DIR`).",
        "",
    ]


def _profiles(raw: dict[str, Any]) -> list[str]:
    profiles = raw.get("profiles") or {}
    lines: list[str] = []
    for phase, text in profiles.items():
        lines += [f"## Profile: {phase}", "", text, ""]
    return lines


def save(out: Path, default_name: str, report: str, meta: dict[str, Any], raw: dict[str, Any]) -> Path:
    """Write ``report`` to ``out`` (a .md path, or a folder to put ``default_name`` in) and its data
    beside it as .json; return the .md path."""
    md = out if out.suffix == ".md" else out / default_name
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(report)
    md.with_suffix(".json").write_text(json.dumps({"meta": meta, **raw}, indent=1))
    return md
