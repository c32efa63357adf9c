"""The ``svcproxy`` command: the daemon (kube-proxy's flag names), ``svcproxy demo`` and
``svcproxy table`` (the running instance's routing table)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from proxy import app, config, logs
from proxy.dataplane.connections import MODES
from proxy.settings import Settings, SettingsError


def _duration(value: str) -> float:
    """kube-proxy style durations: '30s', '1m', '500ms', or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * units[suffix]
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (e.g. 30s, 500ms)") from None


def _durations(value: str) -> tuple[float, ...]:
    return tuple(_duration(v.strip()) for v in value.split(",") if v.strip())


def _cidrs(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="svcproxy",
        description="A userspace kube-proxy: forwards Service traffic to pods. "
        "Run 'svcproxy demo' for a local demonstration, 'svcproxy table' to see what a running one serves.",
    )
    p.add_argument("--config", type=Path,
                   help="a KubeProxyConfiguration file (kube-proxy's), optionally with a SvcproxyConfiguration "
                   "document; only --hostname-override and the logging flags override it")
    p.add_argument("--write-config-to", type=Path,
                   help="write the configuration in force (both documents) to this file and exit")
    p.add_argument("--manifests", type=Path, help="read Services and EndpointSlices from this YAML file or directory")
    p.add_argument("--kubeconfig", help="kubeconfig file for the API server")
    p.add_argument("--master", help="API server address (overrides the kubeconfig)")
    p.add_argument("--hostname-override", default=Settings.hostname_override,
                   help="this node's name (default: the hostname)")
    p.add_argument("--nodeport-addresses", type=_cidrs, default=Settings.nodeport_addresses,
                   help="comma-separated CIDRs of node addresses nodePorts bind on (default: every node address)")
    p.add_argument("--cluster-cidr", type=_cidrs, default=Settings.cluster_cidr,
                   help="comma-separated pod CIDRs: their traffic to externalTrafficPolicy: Local services "
                   "uses all endpoints, as kube-proxy's detect-local")
    p.add_argument("--healthz-bind-address", default=Settings.healthz_bind_address,
                   help="host:port of /healthz and /livez")
    p.add_argument("--metrics-bind-address", default=Settings.metrics_bind_address,
                   help="host:port of /metrics; empty disables it")
    p.add_argument("--vip-interface", default=Settings.vip_interface,
                   help="interface service addresses are added to (a dummy, created if missing; lo as a fallback)")
    p.add_argument("--sync-period", type=_duration, default=Settings.sync_period, help="periodic resync (default 30s)")
    p.add_argument("--min-sync-period", type=_duration, default=Settings.min_sync_period,
                   help="least time between syncs (default 0: apply each change at once)")
    p.add_argument("--udp-idle-timeout", type=_duration, default=Settings.udp_idle_timeout,
                   help="close a UDP flow after this long without a datagram (default 30s)")
    p.add_argument("--drain-timeout", type=_duration, default=Settings.drain_timeout,
                   help="on SIGTERM, how long live connections may finish (default 10s)")
    p.add_argument("--max-connections", type=int, default=Settings.max_connections,
                   help="proxied TCP connections in total, excess reset at once (default: from the open-file "
                   "limit, two descriptors each; 0: no limit)")
    p.add_argument("--workers", type=int, default=Settings.workers,
                   help="processes that forward TCP, sharing every listener (default 1; 0: one per CPU)")
    p.add_argument("--forwarding", choices=MODES, default=Settings.forwarding,
                   help="how TCP bytes are moved: sockets (bare sockets on svcproxy's own epoll; the default), "
                   "splice (sockets, bulk transfers spliced in the kernel) or transports (uvloop's)")
    p.add_argument("--transparent", choices=("on", "auto", "off"), default=Settings.transparent,
                   help="endpoints see the client's own address where kube-proxy keeps it (IP_TRANSPARENT, "
                   "nftables, policy routing; sockets and splice modes): on, auto (the default: where the node "
                   "allows it and --cluster-cidr is set) or off (they see this node's address)")
    p.add_argument("--max-connections-per-service", type=int, default=Settings.max_connections_per_service,
                   help="proxied TCP connections per service port (default 0: no limit)")
    p.add_argument("--tcp-idle-timeout", type=_duration, default=Settings.tcp_idle_timeout,
                   help="close TCP connections idle this long (default 0: never, as kube-proxy)")
    p.add_argument("--tcp-half-closed-timeout", type=_duration, default=Settings.tcp_half_closed_timeout,
                   help="close a half-closed TCP connection quiet this long (default 1h, kube-proxy's "
                   "conntrack CLOSE_WAIT; 0: never)")
    p.add_argument("--tcp-keepalive", type=_duration, default=Settings.tcp_keepalive,
                   help="TCP keepalive on both legs, first probe after this idle time (default 0: off)")
    p.add_argument("--dial-timeouts", type=_durations, default=Settings.dial_timeouts,
                   help="comma-separated connect timeouts, one per retry after a timeout "
                   "(default 250ms,500ms,1s,2s)")
    p.add_argument("--endpoint-drain-timeout", type=_duration, default=Settings.endpoint_drain_timeout,
                   help="reset connections to an endpoint that left (deleted, not ready, terminating) after "
                   "this long (default 0: never, as kube-proxy)")
    p.add_argument("--handover-socket", default=Settings.handover_socket,
                   help="where an old and a new svcproxy meet during a restart, so the old one serves until "
                   "the new one has synced ('@name': abstract Unix socket; '': off; default %(default)s)")
    p.add_argument("--handover-timeout", type=_duration, default=Settings.handover_timeout,
                   help="on SIGTERM, how long to wait for a starting replacement to sync (default 60s)")
    p.add_argument("--ready-file", type=Path,
                   help="created after the first full sync, removed when stopping (for a readiness probe "
                   "that only this instance answers)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove the service addresses, nftables tables and routing rules svcproxy added, then exit "
                        "(they stay on a normal exit)")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=Settings.verbosity,
                   help="log verbosity (klog style; 4+ = debug)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level (overrides -v)")
    p.add_argument("--logging-format", choices=logs.FORMATS, default=Settings.logging_format,
                   help="text, or json: one object per line (ts, level, logger, msg, err)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        manifests=args.manifests,
        kubeconfig=args.kubeconfig,
        master=args.master,
        hostname_override=args.hostname_override,
        nodeport_addresses=args.nodeport_addresses,
        cluster_cidr=args.cluster_cidr,
        healthz_bind_address=args.healthz_bind_address,
        metrics_bind_address=args.metrics_bind_address,
        vip_interface=args.vip_interface,
        sync_period=args.sync_period,
        min_sync_period=args.min_sync_period,
        udp_idle_timeout=args.udp_idle_timeout,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        max_connections_per_service=args.max_connections_per_service,
        workers=args.workers,
        forwarding=args.forwarding,
        transparent=args.transparent,
        tcp_idle_timeout=args.tcp_idle_timeout,
        tcp_half_closed_timeout=args.tcp_half_closed_timeout,
        tcp_keepalive=args.tcp_keepalive,
        dial_timeouts=args.dial_timeouts,
        endpoint_drain_timeout=args.endpoint_drain_timeout,
        handover_socket=args.handover_socket,
        handover_timeout=args.handover_timeout,
        ready_file=args.ready_file,
        logging_format=args.logging_format,
        verbosity=args.verbosity,
    ).validate()


FILE_OVERRIDES = ("hostname_override", "verbosity", "logging_format", "log_level")
"""Flags that override --config, as in kube-proxy; the others are ignored beside it."""
NOT_SETTINGS = ("config", "write_config_to", "cleanup")


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Settings, list[str]]:
    """The settings from the flags, or from --config and the flags that override it; and the
    flags ignored because --config was given. Raises SettingsError."""
    flags = settings_from(args)
    if args.config is None:
        return flags, []
    given = [dest for dest, value in vars(args).items()
             if dest not in NOT_SETTINGS and value != parser.get_default(dest)]
    from_file = config.apply(Settings(), config.load(args.config))
    overrides = {k: getattr(flags, k) for k in given if k in FILE_OVERRIDES and k != "log_level"}
    ignored = ["--" + k.replace("_", "-") for k in given if k not in FILE_OVERRIDES]
    return config.apply(from_file, overrides).validate(), ignored


def setup_logging(verbosity: int, level: str | None, fmt: str = "text") -> None:
    lvl = getattr(logging, level.upper()) if level else (logging.DEBUG if verbosity >= 4 else logging.INFO)
    logs.setup(lvl, fmt)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from proxy import demo  # only the demo needs it

        return demo.main(argv[1:])
    if argv[:1] == ["table"]:
        from proxy import table

        return table.main(argv[1:])
    parser = daemon_parser()
    args = parser.parse_args(argv)
    try:
        settings, ignored = resolve(parser, args)
    except SettingsError as e:
        # One line and exit code 1, as kube-proxy; argparse's own errors (an unknown flag, a value
        # of the wrong type) print the usage and exit 2.
        print(f"svcproxy: error: {e}", file=sys.stderr)
        return 1
    setup_logging(settings.verbosity, args.log_level, settings.logging_format)
    if ignored:
        logging.getLogger("proxy.cli").warning(
            "ignoring %s: --config is given, and only --hostname-override and the logging flags override it "
            "(as in kube-proxy)", ", ".join(ignored))
    if args.write_config_to is not None:
        try:
            args.write_config_to.write_text(config.dump(config.effective(settings)))
        except OSError as e:
            print(f"svcproxy: error: --write-config-to: {e.strerror or e}", file=sys.stderr)
            return 1
        return 0
    if settings.worker_count() > 1:
        # libuv reads it once, at the first listen: each process then accepts one connection per
        # wake-up, so the processes sharing a listener share its connections too.
        os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")
    return uvloop.run(app.cleanup(settings) if args.cleanup else app.main(settings))


if __name__ == "__main__":
    sys.exit(main())
