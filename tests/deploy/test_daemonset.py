"""The rendered DaemonSet (base and kind overlay): security, node-proxy settings, and its args
parsed by svcproxy's own CLI parser, so the manifests cannot drift from the flags."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from proxy import cli
from proxy.settings import Settings
from tests.deploy.conftest import Obj, config_data, container_env, daemonset_container, expand, only

HEALTHZ_PORT = 10256


def pod_spec(objs: list[Obj]) -> Obj:
    spec: Obj = only(objs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def parsed_args(objs: list[Obj]) -> Settings:
    """The settings svcproxy resolves from the container's args (after the kubelet's $(VAR)
    expansion) and the config.conf the ConfigMap mounts at /etc/svcproxy."""
    container = daemonset_container(objs)
    assert "command" not in container, "the image's ENTRYPOINT [svcproxy] is the command"
    env = container_env(objs, container)
    args = [expand(a, env) for a in container["args"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in pod_spec(objs)["volumes"] if v["name"] == "config"]
    conf = config_data(objs, volume["configMap"]["name"])["config.conf"]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "config.conf")
        local.write_text(conf)
        args = [a.replace(f"{mount['mountPath']}/config.conf", str(local)) for a in args]
        parser = cli.daemon_parser()
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"svcproxy rejects the DaemonSet's args: {args}")
        settings, ignored = cli.resolve(parser, ns)  # the same validation the daemon does at start
    assert not ignored, f"flags ignored beside --config: {ignored}"
    return settings


def test_container_security(rendered: list[Obj]) -> None:
    sc = daemonset_container(rendered)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_BIND_SERVICE"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    spec = pod_spec(rendered)
    assert "securityContext" not in spec or not spec["securityContext"].get("sysctls")
    for forbidden in ("hostPID", "hostIPC", "shareProcessNamespace"):
        assert not spec.get(forbidden), forbidden


def test_no_host_paths(rendered: list[Obj]) -> None:
    """No hostPath at all (not /lib/modules either); the only writable places are the pod's own
    emptyDirs: /tmp, and /run/svcproxy for the ready file."""
    volumes = {v["name"]: v for v in pod_spec(rendered)["volumes"]}
    assert all("hostPath" not in v for v in volumes.values())
    mounts = daemonset_container(rendered)["volumeMounts"]
    assert [(m["mountPath"], "emptyDir" in volumes[m["name"]]) for m in mounts] == [
        ("/tmp", True), ("/run/svcproxy", True), ("/etc/svcproxy", False)]
    assert volumes["config"]["configMap"]["name"].startswith("svcproxy-config")


def test_node_proxy_placement(rendered: list[Obj]) -> None:
    spec = pod_spec(rendered)
    assert spec["hostNetwork"] is True
    # The node's resolver: cluster DNS is a Service that svcproxy itself serves (see daemonset.yaml).
    assert spec["dnsPolicy"] == "Default"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "svcproxy"
    # A restart surges: the new pod starts beside the old one, which stops once the new is Ready.
    strategy = only(rendered, "DaemonSet")["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] == 1
    # and nothing makes two pods on one node impossible: a containerPort is a host port here
    assert "ports" not in daemonset_container(rendered)


def test_probes(rendered: list[Obj]) -> None:
    container = daemonset_container(rendered)
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/livez", HEALTHZ_PORT)
    assert "host" not in live  # the pod IP, which is the node IP with hostNetwork
    # and svcproxy serves it there, on every address
    args = parsed_args(rendered)
    assert args.healthz_bind_address in (f"0.0.0.0:{HEALTHZ_PORT}", f":{HEALTHZ_PORT}")
    # Readiness is this instance's own ready file (port 10256 may be the other instance's).
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["test", "-e"] and command[2] == str(args.ready_file)
    assert str(args.ready_file).startswith("/run/svcproxy/")


def test_termination_grace_covers_the_handover_and_the_drain(rendered: list[Obj]) -> None:
    args = parsed_args(rendered)
    grace = pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert grace >= args.handover_timeout + args.drain_timeout + 5, (grace, args.handover_timeout, args.drain_timeout)


def test_resources_requested(rendered: list[Obj]) -> None:
    requests = daemonset_container(rendered)["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}


def test_args_parse_and_name_the_node(rendered: list[Obj]) -> None:
    container = daemonset_container(rendered)
    assert "--hostname-override=$(NODE_NAME)" in container["args"]
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ns = parsed_args(rendered)
    assert ns.hostname_override == "node-a"
    assert ns.manifests is None and ns.kubeconfig is None and ns.master is None  # in-cluster config


def test_grace_period_covers_the_drain(rendered: list[Obj]) -> None:
    grace = pod_spec(rendered)["terminationGracePeriodSeconds"]
    drain = parsed_args(rendered).drain_timeout
    assert grace >= drain + 5, f"terminationGracePeriodSeconds {grace} leaves too little over --drain-timeout {drain}"


def test_api_server_comes_from_the_config_map(rendered: list[Obj]) -> None:
    """svcproxy reads $SVCPROXY_APISERVER itself (proxy.sources.kube); the ConfigMap provides it."""
    from proxy.sources import kube

    container = daemonset_container(rendered)
    assert kube.APISERVER_ENV in container_env(rendered, container)
