"""--config: a KubeProxyConfiguration as kubeadm writes it is taken as it is; svcproxy's own
settings in a second document; strict decoding with errors naming the field; round trip through
--write-config-to; and the precedence of flags over the file, as in kube-proxy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from proxy import cli, config, logs
from proxy.settings import Settings

# kube-proxy's ConfigMap as kubeadm (v1.3x) writes it, zero values and all.
KUBEADM = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.conf"
    path.write_text(text)
    return path


def test_kubeadms_file_is_taken_as_it_is(tmp_path: Path) -> None:
    settings = config.apply(Settings(), config.load(write(tmp_path, KUBEADM))).validate()
    assert settings.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert settings.cluster_cidr == ("10.244.0.0/16", "fd00:10:244::/56")
    # every zero value means "the default", as kube-proxy's defaulting does
    default = Settings()
    assert (settings.sync_period, settings.healthz_bind_address, settings.metrics_bind_address,
            settings.udp_idle_timeout, settings.tcp_idle_timeout) == (
        default.sync_period, default.healthz_bind_address, default.metrics_bind_address,
        default.udp_idle_timeout, default.tcp_idle_timeout)


def test_the_fields_that_apply_map_to_svcproxys_settings(tmp_path: Path) -> None:
    text = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: node-7
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 0.0.0.0:10259
nodePortAddresses: [192.0.2.0/24]
iptables: {syncPeriod: 1m0s, minSyncPeriod: 2s}
conntrack: {tcpEstablishedTimeout: 24h0m0s, tcpCloseWaitTimeout: 1h0m0s, udpTimeout: 45s}
logging: {format: json, verbosity: 4}
---
apiVersion: svcproxy.io/v1alpha1
kind: SvcproxyConfiguration
drainTimeout: 20s
maxConnections: 0
dialTimeouts: [100ms, 1s]
handoverSocket: "@svcproxy-x"
forwarding: splice
"""
    s = config.apply(Settings(), config.load(write(tmp_path, text))).validate()
    assert (s.hostname_override, s.healthz_bind_address, s.metrics_bind_address) == (
        "node-7", "0.0.0.0:10266", "0.0.0.0:10259")
    assert s.nodeport_addresses == ("192.0.2.0/24",)
    assert (s.sync_period, s.min_sync_period) == (60.0, 2.0)
    assert (s.tcp_idle_timeout, s.tcp_half_closed_timeout, s.udp_idle_timeout) == (86400.0, 3600.0, 45.0)
    assert (s.logging_format, s.verbosity) == ("json", 4)
    assert (s.drain_timeout, s.max_connections, s.dial_timeouts, s.handover_socket) == (
        20.0, 0, (0.1, 1.0), "@svcproxy-x")  # 0 is "no limit" here, not "the default"
    assert s.forwarding == "splice"


@pytest.mark.parametrize(("text", "message"), [
    ("iptables: {syncPeriodd: 1s}", r"config.conf: iptables.syncPeriodd: unknown field$"),
    ("proxyPort: 8080", r"config.conf: proxyPort: unknown field$"),
    ("hostnameOverride: 5", r"config.conf: hostnameOverride: expected a string, got int$"),
    ("conntrack: {udpTimeout: soon}", r"config.conf: conntrack.udpTimeout: 'soon' is not a duration"),
    ("conntrack: 5", r"config.conf: conntrack: expected an object, got int$"),
    ("nodePortAddresses: 10.0.0.0/8", r"config.conf: nodePortAddresses: expected a list of strings$"),
    ("healthzBindAddress: nowhere", r"--healthz-bind-address"),
], ids=["nested-unknown", "unknown", "type", "duration", "section", "list", "validation"])
def test_a_bad_field_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + text)
    with pytest.raises(config.SettingsError, match=message):
        config.apply(Settings(), config.load(path)).validate()


def test_an_unknown_forwarding_mode_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n---\n"
                 "apiVersion: svcproxy.io/v1alpha1\nkind: SvcproxyConfiguration\nforwarding: sockmap\n")
    with pytest.raises(config.SettingsError, match=r"--forwarding: 'sockmap' is not one of sockets, splice"):
        config.apply(Settings(), config.load(path)).validate()


@pytest.mark.parametrize(("text", "message"), [
    ("apiVersion: v1\nkind: ConfigMap\n", "neither kubeproxy.config.k8s.io/v1alpha1/KubeProxyConfiguration"),
    ("apiVersion: svcproxy.io/v1alpha1\nkind: SvcproxyConfiguration\n", "no kubeproxy.config.k8s.io/v1alpha1"),
    ("apiVersion: svcproxy.io/v1alpha1\nkind: SvcproxyConfiguration\nbogus: 1\n", "bogus: unknown field"),
    ("- a list\n", "document 1: expected an object"),
    ("key: [unclosed\n", "is not valid YAML"),
], ids=["kind", "missing", "extension-unknown", "not-an-object", "yaml"])
def test_a_bad_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, text))


def test_the_effective_configuration_reads_back_the_same(tmp_path: Path) -> None:
    original = Settings(hostname_override="node-3", cluster_cidr=("10.244.0.0/16",), sync_period=45.0,
                        min_sync_period=0.5, tcp_idle_timeout=7200.0, drain_timeout=15.0, max_connections=1000,
                        dial_timeouts=(0.25, 2.0), logging_format="json", verbosity=2, forwarding="transports",
                        manifests=tmp_path, ready_file=Path("/run/svcproxy/ready")).validate()
    path = write(tmp_path, config.dump(config.effective(original)))
    assert config.apply(Settings(), config.load(path)).validate() == original


def run_cli(tmp_path: Path, *argv: str) -> tuple[Settings, list[str]]:
    parser = cli.daemon_parser()
    return cli.resolve(parser, parser.parse_args(list(argv)))


def test_flags_beside_config_follow_kube_proxy(tmp_path: Path) -> None:
    path = write(tmp_path, KUBEADM)
    settings, ignored = run_cli(tmp_path, "--config", str(path), "--hostname-override", "node-9", "-v", "4",
                                "--sync-period", "5s", "--drain-timeout", "1s")
    assert settings.hostname_override == "node-9" and settings.verbosity == 4  # override the file
    assert settings.sync_period == Settings().sync_period  # ignored, as kube-proxy ignores it
    assert sorted(ignored) == ["--drain-timeout", "--sync-period"]


def test_write_config_to_and_the_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "written.conf"
    try:
        with caplog.at_level(logging.WARNING):
            assert cli.main(["--config", str(write(tmp_path, KUBEADM)), "--sync-period", "5s",
                             "--write-config-to", str(out)]) == 0
    finally:
        logs.remove()
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [config.KUBE_PROXY, config.SVCPROXY]
    assert docs[0]["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert "ignoring --sync-period: --config is given" in caplog.text


def test_a_bad_config_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                           "iptables: {syncPeriodd: 1s}\n")
    assert cli.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"svcproxy: error: {path}: iptables.syncPeriodd: unknown field"]
