"""``--config``: kube-proxy's own configuration file, and svcproxy's settings beside it.

The file holds a ``KubeProxyConfiguration`` (kubeproxy.config.k8s.io/v1alpha1), as kube-proxy
reads it, so a kubeadm cluster's ``kube-proxy`` ConfigMap can be reused as it is, and optionally,
as a second YAML document, a ``SvcproxyConfiguration`` (svcproxy.io/v1alpha1) with svcproxy's own
settings. Decoding is strict, as kube-proxy's: an unknown field, or a value of the wrong type, is
an error naming the field. Fields of kube-proxy's that mean nothing to a userspace proxy (the
iptables/ipvs/nftables tuning, ``mode``, ``oomScoreAdj``, ...) are accepted and left alone.

Precedence follows kube-proxy: with ``--config``, the file decides, except for
``--hostname-override`` and the logging flags, which override it; other flags given beside it are
ignored, with a warning naming them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.settings import Settings, SettingsError

KUBE_PROXY = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
SVCPROXY = ("svcproxy.io/v1alpha1", "SvcproxyConfiguration")

_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class ConfigError(SettingsError):
    """A configuration file that cannot be used; the message names the file and the field."""


def go_duration(value: Any) -> float:
    """A metav1.Duration ("30s", "1m0s", "24h0m0s", "250ms") in seconds."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a duration such as 30s or 1m0s")
    text, sign = (value[1:], -1.0) if value.startswith("-") else (value, 1.0)
    parts = _GO_DURATION.findall(text)
    if text == "0":
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 1m0s, 250ms)")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def _format_duration(seconds: float) -> str:
    if seconds != int(seconds):
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _comma_list(value: Any) -> tuple[str, ...]:
    return tuple(v.strip() for v in _string(value).split(",") if v.strip())


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of durations")
    return tuple(go_duration(v) for v in value)


def _any(value: Any) -> Any:
    return value


# A field: the Settings attribute it sets (None: accepted, no meaning here) and its decoder; or a
# nested section (a dict of fields). None/absent values keep the default, as in kube-proxy.
Field = tuple[str | None, Callable[[Any], Any]]
Section = dict[str, "Field | Section"]

_IGNORED: Field = (None, _any)
_SYNC: Section = {"syncPeriod": ("sync_period", go_duration), "minSyncPeriod": ("min_sync_period", go_duration),
                  "masqueradeBit": _IGNORED, "masqueradeAll": _IGNORED, "localhostNodePorts": _IGNORED,
                  "scheduler": _IGNORED, "excludeCIDRs": _IGNORED, "strictARP": _IGNORED, "tcpTimeout": _IGNORED,
                  "tcpFinTimeout": _IGNORED, "udpTimeout": _IGNORED}

KUBE_PROXY_FIELDS: Section = {
    "clientConnection": {"kubeconfig": ("kubeconfig", _string), "acceptContentTypes": _IGNORED,
                         "contentType": _IGNORED, "qps": _IGNORED, "burst": _IGNORED},
    "hostnameOverride": ("hostname_override", _string),
    "bindAddress": _IGNORED,  # kube-proxy's "node IP" override: binds nothing
    "healthzBindAddress": ("healthz_bind_address", _string),
    "metricsBindAddress": ("metrics_bind_address", _string),
    "bindAddressHardFail": _IGNORED,  # svcproxy always fails when they cannot be bound
    "enableProfiling": _IGNORED,
    "showHiddenMetricsForVersion": _IGNORED,
    "mode": _IGNORED,
    "iptables": _SYNC, "ipvs": _SYNC, "nftables": _SYNC,
    "winkernel": {"networkName": _IGNORED, "sourceVip": _IGNORED, "enableDSR": _IGNORED,
                  "rootHnsEndpointName": _IGNORED, "forwardHealthCheckVip": _IGNORED},
    "syncPeriod": ("sync_period", go_duration),
    "minSyncPeriod": ("min_sync_period", go_duration),
    "detectLocalMode": _IGNORED,
    "detectLocal": {"bridgeInterface": _IGNORED, "interfaceNamePrefix": _IGNORED},
    "clusterCIDR": ("cluster_cidr", _comma_list),
    "nodePortAddresses": ("nodeport_addresses", _strings),
    "oomScoreAdj": _IGNORED,
    "conntrack": {"maxPerCore": _IGNORED, "min": _IGNORED,
                  # conntrack forgets an idle established flow after this: as svcproxy's idle timeout
                  "tcpEstablishedTimeout": ("tcp_idle_timeout", go_duration),
                  "tcpCloseWaitTimeout": ("tcp_half_closed_timeout", go_duration),
                  "tcpBeLiberal": _IGNORED,
                  "udpTimeout": ("udp_idle_timeout", go_duration), "udpStreamTimeout": _IGNORED},
    "configSyncPeriod": _IGNORED,  # informer resyncs: svcproxy's watches need none
    "portRange": _IGNORED,
    "featureGates": _IGNORED,
    "logging": {"format": ("logging_format", _string), "verbosity": ("verbosity", _integer),
                "flushFrequency": _IGNORED, "options": _IGNORED, "vmodule": _IGNORED},
    "windowsRunAsService": _IGNORED,
}

SVCPROXY_FIELDS: Section = {
    "manifests": ("manifests", lambda v: Path(_string(v))),
    "master": ("master", _string),
    "vipInterface": ("vip_interface", _string),
    "manifestPollInterval": ("manifest_poll_interval", go_duration),
    "drainTimeout": ("drain_timeout", go_duration),
    "maxConnections": ("max_connections", _integer),
    "maxConnectionsPerService": ("max_connections_per_service", _integer),
    "workers": ("workers", _integer),
    "forwarding": ("forwarding", _string),
    "transparent": ("transparent", _string),
    "tcpIdleTimeout": ("tcp_idle_timeout", go_duration),
    "tcpHalfClosedTimeout": ("tcp_half_closed_timeout", go_duration),
    "tcpKeepalive": ("tcp_keepalive", go_duration),
    "dialTimeouts": ("dial_timeouts", _durations),
    "udpIdleTimeout": ("udp_idle_timeout", go_duration),
    "endpointDrainTimeout": ("endpoint_drain_timeout", go_duration),
    "handoverSocket": ("handover_socket", _string),
    "handoverTimeout": ("handover_timeout", go_duration),
    "readyFile": ("ready_file", lambda v: Path(_string(v))),
}

def _decode(path: Path, where: str, section: Section, doc: Mapping[str, Any], out: dict[str, Any], *,
            zero_is_default: bool) -> None:
    for key, value in doc.items():
        name = f"{where}.{key}" if where else str(key)
        spec = section.get(key) if isinstance(key, str) else None
        if spec is None:
            raise ConfigError(f"{path}: {name}: unknown field")
        if isinstance(spec, dict):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: {name}: expected an object, got {type(value).__name__}")
            _decode(path, name, spec, value, out, zero_is_default=zero_is_default)
            continue
        attr, decoder = spec
        if attr is None or value is None or value == "":
            continue  # accepted but without meaning here, or left at its default
        try:
            decoded = decoder(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {name}: {e}") from None
        if zero_is_default and not decoded:
            continue  # kube-proxy's defaulting: a zero value ("0s", 0, []) means the default
        out[attr] = decoded


def load(path: Path) -> dict[str, Any]:
    """The settings ``path`` sets, by Settings field name; raises ConfigError."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    out: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{path}: document {i}: expected an object")
        kind = (doc.get("apiVersion"), doc.get("kind"))
        if kind not in (KUBE_PROXY, SVCPROXY):
            raise ConfigError(f"{path}: document {i}: apiVersion/kind {kind[0]}/{kind[1]} is neither "
                              f"{'/'.join(KUBE_PROXY)} nor {'/'.join(SVCPROXY)}")
        if kind in seen:
            raise ConfigError(f"{path}: document {i}: a second {kind[1]}")
        seen.add(kind)
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        if kind == KUBE_PROXY:
            _decode(path, "", KUBE_PROXY_FIELDS, body, out, zero_is_default=True)
        else:
            _decode(path, "", SVCPROXY_FIELDS, body, out, zero_is_default=False)
    if KUBE_PROXY not in seen:
        raise ConfigError(f"{path}: no {'/'.join(KUBE_PROXY)} document")
    return out


def effective(settings: Settings) -> list[dict[str, Any]]:
    """The configuration in force, as the two documents ``--config`` reads (for
    ``--write-config-to`` and ``/configz``)."""
    s = settings
    kube_proxy = {
        "apiVersion": KUBE_PROXY[0], "kind": KUBE_PROXY[1],
        "clientConnection": {"kubeconfig": s.kubeconfig or ""},
        "hostnameOverride": s.hostname_override,
        "healthzBindAddress": s.healthz_bind_address,
        "metricsBindAddress": s.metrics_bind_address,
        "mode": "",
        "syncPeriod": _format_duration(s.sync_period),
        "minSyncPeriod": _format_duration(s.min_sync_period),
        "clusterCIDR": ",".join(s.cluster_cidr),
        "nodePortAddresses": list(s.nodeport_addresses),
        "conntrack": {"tcpEstablishedTimeout": _format_duration(s.tcp_idle_timeout),
                      "tcpCloseWaitTimeout": _format_duration(s.tcp_half_closed_timeout),
                      "udpTimeout": _format_duration(s.udp_idle_timeout)},
        "logging": {"format": s.logging_format, "verbosity": s.verbosity},
    }
    ext = {
        "apiVersion": SVCPROXY[0], "kind": SVCPROXY[1],
        "manifests": str(s.manifests) if s.manifests else "",
        "master": s.master or "",
        "vipInterface": s.vip_interface,
        "manifestPollInterval": _format_duration(s.manifest_poll_interval),
        "drainTimeout": _format_duration(s.drain_timeout),
        "maxConnections": s.max_connections,
        "maxConnectionsPerService": s.max_connections_per_service,
        "workers": s.workers,
        "forwarding": s.forwarding,
        "transparent": s.transparent,
        "tcpKeepalive": _format_duration(s.tcp_keepalive),
        "endpointDrainTimeout": _format_duration(s.endpoint_drain_timeout),
        "dialTimeouts": [_format_duration(t) for t in s.dial_timeouts],
        "handoverSocket": s.handover_socket,
        "handoverTimeout": _format_duration(s.handover_timeout),
        "readyFile": str(s.ready_file) if s.ready_file else "",
    }
    return [kube_proxy, ext]


def configz(settings: Settings) -> dict[str, Any]:
    """``/configz``'s body: each document under its API group, as kube-proxy's /configz."""
    kube_proxy, ext = effective(settings)
    return {"kubeproxy.config.k8s.io": kube_proxy, "svcproxy.io": ext}


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def apply(settings: Settings, overrides: Mapping[str, Any]) -> Settings:
    return dataclasses.replace(settings, **overrides)
