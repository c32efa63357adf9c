"""The routing table as an operator reads it: every frontend, its policies, its endpoints and their
state, as ``ipvsadm -Ln`` shows a kernel's.

Built on the data loop from what is live (open listeners, pools, ejections, connections), not from
the plan, so it shows what svcproxy does rather than what it meant to do. ``/debug/services`` on
the metrics address serves it as JSON; ``svcproxy table`` fetches that and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.balancer import Pool
from proxy.model import Endpoint
from proxy.plan import ListenerKey, ListenerSpec, PoolKey

if TYPE_CHECKING:
    from proxy.proxier import Proxier

Row = dict[str, Any]
Address = tuple[str, int]


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _endpoint(ep: Endpoint, node: str, ejected: Mapping[Address, float], active: Counter[Address]) -> Row:
    return {"address": ep.ip, "port": ep.port, "ready": ep.ready, "serving": ep.serving,
            "terminating": ep.terminating, "local": bool(node) and ep.node_name == node, "zone": ep.zone,
            "ejectedSeconds": round(ejected.get((ep.ip, ep.port), 0.0), 1),
            "activeConnections": active[ep.ip, ep.port]}


def client_address(spec: ListenerSpec, transparent: bool) -> str:
    """Whose address the endpoints see (Target.keeps_client_address): "node" (this node's, for
    every client), "pods" (a pod's own, others the node's) or "clients" (every client's own but
    this node's own traffic and the hairpin)."""
    if not transparent:
        return "node"
    if not spec.external:
        return "pods"
    return "clients" if spec.external == "Local" else "node"


def view(serving: Mapping[ListenerKey, ListenerSpec], pools: Mapping[PoolKey, Pool], *, node: str,
         ejected: Iterable[tuple[str, int, float]] = (), connected: Iterable[Endpoint | None] = (),
         elsewhere: Mapping[Address, int] | None = None, transparent: bool = False) -> list[Row]:
    """One row per open frontend, sorted by Service, type and address. Pure: the caller gathers
    the live state (``ejected``: (ip, port, seconds left); ``connected``: each live connection's
    endpoint, None while it dials; ``elsewhere``: connections per endpoint in worker processes;
    ``transparent``: --transparent is in effect)."""
    out: dict[Address, float] = {(ip, port): left for ip, port, left in ejected}
    active: Counter[Address] = Counter((ep.ip, ep.port) for ep in connected if ep is not None)
    active.update(elsewhere or {})
    rows = []
    for key, spec in serving.items():
        pool = pools.get(spec.pool)
        local_pool = pools.get(spec.local_traffic_pool) if spec.local_traffic_pool is not None else None
        rows.append({
            "address": key.ip, "port": key.port, "protocol": key.protocol, "type": spec.kind,
            "service": str(spec.pool.name), "policy": spec.pool.policy.value,
            "sessionAffinityTimeout": pool.affinity_timeout if pool is not None else 0,
            "loadBalancing": "least-connections" if pool is not None and pool.load is not None else "round-robin",
            "sourceRanges": list(spec.source_ranges) if spec.source_ranges is not None else None,
            "proxyProtocol": f"v{spec.proxy_protocol}" if spec.proxy_protocol else None,
            "clientAddress": client_address(spec, transparent),
            "endpoints": [_endpoint(ep, node, out, active) for ep in sorted(pool.endpoints if pool else (),
                                                                            key=_order)],
            "localTrafficEndpoints": None if local_pool is None else [
                _endpoint(ep, node, out, active) for ep in sorted(local_pool.endpoints, key=_order)],
        })
    rows.sort(key=lambda r: (r["service"], r["type"], r["address"], r["port"]))
    return rows


def _order(ep: Endpoint) -> tuple[int, str, int]:
    return ep.family, ep.ip, ep.port


def _state(ep: Row) -> str:
    words = ["ready" if ep["ready"] else "serving" if ep["serving"] else "not-ready"]
    if ep["terminating"]:
        words.append("terminating")
    if ep["ejectedSeconds"]:
        words.append(f"ejected {ep['ejectedSeconds']:g}s")
    return ",".join(words)


def render(rows: Sequence[Row]) -> str:
    """The rows as text, one block per frontend (``ipvsadm -Ln``'s layout)."""
    lines = ["Prot LocalAddress:Port Type Service Policy [Affinity] [SourceRanges]",
             "  -> RemoteAddress:Port State Local Zone ActiveConn"]
    for r in rows:
        extra = [f"affinity {r['sessionAffinityTimeout']}s"] if r["sessionAffinityTimeout"] else []
        if r["sourceRanges"] is not None:
            extra.append("from " + ",".join(r["sourceRanges"]))
        if r.get("proxyProtocol"):
            extra.append(f"proxy-protocol {r['proxyProtocol']}")
        if r.get("loadBalancing", "round-robin") != "round-robin":
            extra.append(str(r["loadBalancing"]))
        if r.get("clientAddress", "node") != "node":
            extra.append(f"client-address {r['clientAddress']}")
        lines.append(" ".join([f"{r['protocol']:<4}", f"{_host_port(r['address'], r['port']):<21}",
                               f"{r['type']:<12}", r["service"], r["policy"], *extra]))
        groups = [("", r["endpoints"])]
        if r["localTrafficEndpoints"] is not None:
            groups.append(("(node-local traffic) ", r["localTrafficEndpoints"]))
        for label, eps in groups:
            if label:
                lines.append(f"  {label}")
            for ep in eps:
                lines.append(f"  -> {_host_port(ep['address'], ep['port']):<21} {_state(ep):<24} "
                             f"{'local' if ep['local'] else '-':<5} {ep['zone'] or '-':<10} {ep['activeConnections']}")
    return "\n".join(lines) + "\n"


def routes(proxier: Proxier) -> list[web.RouteDef]:
    """``/debug/services``: :func:`view` of the running proxier, as JSON."""
    async def services(_: web.Request) -> web.Response:
        elsewhere: Counter[Address] = Counter()
        for summaries in proxier.workers.summaries() if proxier.workers else ():
            for port in summaries.values():
                elsewhere.update({address: ep.active for address, ep in port.endpoints.items()})
        rows = view(proxier.serving, proxier.pools, node=proxier.node_name,
                    ejected=proxier.outliers.ejected_now(),
                    connected=[conn.endpoint for conn in proxier.connections.live], elsewhere=elsewhere,
                    transparent=proxier.connections.limits.transparent)
        return web.json_response(rows)

    return [web.get("/debug/services", services)]


# ---------------------------------------------------------------- `svcproxy table`


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="svcproxy table",
                                     description="Print the routing table of the svcproxy running on this node.")
    parser.add_argument("--metrics-address", default="127.0.0.1:10249",
                        help="where that svcproxy serves /metrics (its --metrics-bind-address; default %(default)s)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    url = f"http://{args.metrics_address}/debug/services"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            rows = json.load(resp)
    except (OSError, urllib.error.URLError, ValueError) as e:
        print(f"svcproxy table: cannot read {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.output == "json" else render(rows))
    return 0
