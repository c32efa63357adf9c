"""svcproxy's settings, with kube-proxy's names and defaults where kube-proxy has the setting."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import resource
import socket
import urllib.parse
from pathlib import Path

from proxy.dataplane import udp, vip
from proxy.dataplane.connections import MODES


class SettingsError(ValueError):
    """A bad flag or config value; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, grouped by topic; flags (cli.py) and --config (config.py) take their
    defaults from here. Keyword construction only: the order is for reading."""

    # -- where Services and EndpointSlices come from ----------------------------------------
    manifests: Path | None = None
    """Read Services/EndpointSlices from these files instead of the API server."""
    manifest_poll_interval: float = 0.5
    """Seconds between checks of the manifest files for changes."""
    kubeconfig: str | None = None
    """The API server's kubeconfig; none: in-cluster (with $SVCPROXY_APISERVER), as kube-proxy."""
    master: str | None = None
    """The API server's URL; overrides the kubeconfig's server (kube-proxy's --master)."""

    # -- this node ---------------------------------------------------------------------------
    hostname_override: str = ""
    """The node name for local endpoints; default: this host's name (as kube-proxy)."""
    nodeport_addresses: tuple[str, ...] = ()
    """CIDRs of the node addresses nodePorts bind on; empty = every node address."""
    cluster_cidr: tuple[str, ...] = ()
    """The pods' CIDRs: their traffic to an externalTrafficPolicy: Local frontend counts as local
    (uses Cluster endpoints), as kube-proxy's detect-local does. This node's own traffic always does."""
    vip_interface: str = vip.DEFAULT_INTERFACE
    """Where service addresses that are not the node's own go (a dummy link, created if missing)."""

    # -- syncing -----------------------------------------------------------------------------
    sync_period: float = 30.0
    """Periodic resync; the health timeout is twice this (kube-proxy's rule)."""
    min_sync_period: float = 0.0
    """svcproxy syncs incrementally, so by default a change is applied at once (kube-proxy: 1 s)."""

    # -- health, metrics, logs -----------------------------------------------------------------
    healthz_bind_address: str = "0.0.0.0:10256"
    """host:port of /healthz and /livez (kube-proxy's)."""
    metrics_bind_address: str = "127.0.0.1:10249"
    """host:port of /metrics, /configz, /debug/services; empty disables it (kube-proxy's convention)."""
    logging_format: str = "text"
    """text, or json (one object per line)."""
    verbosity: int = 0
    """klog-style -v: 4 and up is debug."""

    # -- connections ---------------------------------------------------------------------------
    max_connections: int = -1
    """Proxied TCP connections in total; -1 = from RLIMIT_NOFILE (two descriptors each, a quarter
    of the limit, between 48 and 512, kept for listeners and the rest); 0 = no limit."""
    max_connections_per_service: int = 0
    """Per service port; 0 = no limit."""
    dial_timeouts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """The connect-timeout ladder (the old userspace proxier's; also connections.Limits' default)."""
    tcp_keepalive: float = 0.0
    """TCP keepalive on both legs of every proxied connection: first probe after this many idle
    seconds; 0 = off (kube-proxy sets none)."""
    tcp_idle_timeout: float = 0.0
    """Close TCP connections with no byte either way for this long; 0 = never (as kube-proxy)."""
    tcp_half_closed_timeout: float = 3600.0
    """Close a TCP connection one side has ended once no byte has moved for this long (kube-proxy's
    conntrack CLOSE_WAIT timeout); 0 = never."""
    udp_idle_timeout: float = udp.DEFAULT_IDLE_TIMEOUT
    """A UDP flow with no datagram either way for this long is closed (conntrack's UDP default)."""
    workers: int = 1
    """Processes that forward TCP (proxy/dataplane/workers.py): 1 = the main process alone; N > 1
    adds N-1 helpers that accept from the same listening sockets; 0 = one per CPU this process may
    use. UDP, health checks and metrics stay in the main process."""
    forwarding: str = "sockets"
    """How TCP bytes are moved (connections.MODES): ``sockets`` (bare sockets on an epoll of
    svcproxy's own, relay.py), ``splice`` (sockets, with bulk transfers spliced in the kernel) or
    ``transports`` (uvloop's, tcp.py; the mode before 2026-12)."""
    transparent: str = "auto"
    """Endpoints see the client's own address where kube-proxy keeps it (proxy/dataplane/tproxy.py):
    ``on`` (refuse to start without the capabilities and kernel pieces), ``auto`` (on where the
    node allows it and --cluster-cidr tells pods apart, else say why) or ``off`` (they see this
    node's address)."""
    endpoint_drain_timeout: float = 0.0
    """Connections to an endpoint that left its pool (deleted, not ready, terminating) are reset
    after this long; 0 = never (kube-proxy leaves established connections alone)."""

    # -- stopping and restarting -------------------------------------------------------------
    drain_timeout: float = 10.0
    """Seconds SIGTERM lets live connections finish before they are closed."""
    handover_socket: str = "@svcproxy"
    """Where a running instance and its replacement meet during a restart (proxy/handover.py):
    ``@name`` is an abstract Unix socket, anything else a path; empty turns the handover off."""
    handover_timeout: float = 60.0
    """On SIGTERM, how long to keep serving while a replacement that has not synced yet is starting."""
    ready_file: Path | None = None
    """Created after the first full sync and removed when stopping: a readiness check that only this
    instance answers (an HTTP probe may reach the other instance of a restart)."""

    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def connection_limit(self) -> int:
        if self.max_connections >= 0:
            return self.max_connections
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 0
        return max(1, (soft - min(512, max(48, soft // 4))) // 2)

    @property
    def node_name(self) -> str:
        return (self.hostname_override or socket.gethostname()).strip().lower()

    def validate(self) -> Settings:
        for flag, value in (("--healthz-bind-address", self.healthz_bind_address),
                            ("--metrics-bind-address", self.metrics_bind_address)):
            if value:
                parse_host_port(value, flag)
        for flag, cidrs in (("--nodeport-addresses", self.nodeport_addresses), ("--cluster-cidr", self.cluster_cidr)):
            for cidr in cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise SettingsError(f"{flag}: {cidr!r} is not a CIDR") from None
        if self.max_connections < -1:
            raise SettingsError("--max-connections must be 0 (no limit) or more")
        if self.max_connections_per_service < 0:
            raise SettingsError("--max-connections-per-service must be 0 (no limit) or more")
        for flag, seconds in (("--tcp-idle-timeout", self.tcp_idle_timeout),
                              ("--tcp-half-closed-timeout", self.tcp_half_closed_timeout)):
            if seconds < 0:
                raise SettingsError(f"{flag} must be 0 (never) or more")
        if self.endpoint_drain_timeout < 0:
            raise SettingsError("--endpoint-drain-timeout must be 0 (off) or more")
        if self.tcp_keepalive < 0:
            raise SettingsError("--tcp-keepalive must be 0 (off) or more")
        if not self.dial_timeouts or any(t <= 0 for t in self.dial_timeouts):
            raise SettingsError("--dial-timeouts must be one or more positive durations")
        if self.logging_format not in ("text", "json"):
            raise SettingsError(f"--logging-format: {self.logging_format!r} is neither text nor json")
        if not 0 <= self.workers <= 64:
            raise SettingsError(f"--workers: {self.workers} is not between 0 (one per CPU) and 64")
        if self.forwarding not in MODES:
            raise SettingsError(f"--forwarding: {self.forwarding!r} is not one of {', '.join(MODES)}")
        if self.transparent not in ("on", "auto", "off"):
            raise SettingsError(f"--transparent: {self.transparent!r} is not one of on, auto, off")
        if self.transparent == "on" and self.forwarding == "transports":
            raise SettingsError("--transparent on needs --forwarding sockets or splice (transports cannot dial "
                                "from another address)")
        if self.udp_idle_timeout <= 0:
            raise SettingsError("--udp-idle-timeout must be positive")
        if self.sync_period <= 0:
            raise SettingsError("--sync-period must be positive")
        if self.min_sync_period < 0 or self.min_sync_period > self.sync_period:
            raise SettingsError("--min-sync-period must be between 0 and --sync-period")
        if self.manifests is not None and not self.manifests.exists():
            raise SettingsError(f"--manifests: {self.manifests} does not exist")
        if self.master:
            url = urllib.parse.urlsplit(self.master)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise SettingsError(f"--master: {self.master!r} is not an http(s) URL (e.g. https://10.0.0.1:6443)")
        return self

    def shared_http_address(self) -> bool:
        """--healthz-bind-address and --metrics-bind-address name the same socket: serve both there."""
        if not self.metrics_bind_address:
            return False
        health = parse_host_port(self.healthz_bind_address, "--healthz-bind-address")
        return health[1] != 0 and parse_host_port(self.metrics_bind_address, "--metrics-bind-address") == health


def parse_host_port(value: str, flag: str) -> tuple[str, int]:
    """'0.0.0.0:10256', '[::]:10256' or ':10256' (all addresses) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{flag}: {value!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SettingsError(f"{flag}: {host!r} is not an IP address") from None
    return host, int(port)
