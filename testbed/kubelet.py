"""A kubelet stand-in: a Node, and its Pods as small servers in network namespaces.

``python -m testbed.kubelet --kubeconfig K --node-name node1 --node-ip 10.10.10.1 --zone zone-a
--pod-cidr 10.244.1.0/24 --netns-prefix tb-node1``, run in the node's network namespace with
``nsenter --net=...`` (not ``ip netns exec``, whose private mount namespace would hide the pod
namespaces this creates from everyone else).

What it does, as a kubelet would, through the real API (kubernetes_asyncio):

* registers the Node: hostname and zone labels, ``spec.podCIDR``, InternalIP, capacity, Ready;
* watches the Pods bound to it (``spec.nodeName``); for each new one it makes a pod network
  namespace (a veth on the node's bridge ``cbr0``, the next free address of the pod CIDR, a default
  route via the node), starts ``testbed/podserver.py`` there with the pod's TCP and UDP
  containerPorts, and once that answers patches the Pod's status: Running, podIP, Ready;
* when a Pod gets a deletionTimestamp it sends SIGTERM, waits up to the Pod's grace period
  (podserver lingers ``--linger`` seconds, like a preStop sleep), kills what is left, removes the
  namespace and deletes the Pod object for good (grace 0, this Pod's UID), as the kubelet does.

It renews the Node's Lease every 10 s, so the node lifecycle controller keeps the node healthy
(and lifts the not-ready taint the API server puts on every new Node). Container images are
ignored: every container is podserver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config

from proxy.model import NamespacedName
from proxy.sources.kube import ApiHealth, Reflector, Resource, WatchSettings, watch_forever

logger = logging.getLogger("kubelet")
PODSERVER = Path(__file__).with_name("podserver.py")
BRIDGE = "cbr0"


LEASE_SECONDS = 40


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {err.decode().strip()}")


@dataclass
class PodRuntime:
    """One pod's sandbox: its namespace, address and server process."""

    key: NamespacedName
    uid: str
    netns: str
    veth: str
    ip: str
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    log: list[str] = field(default_factory=list)


class Kubelet:
    def __init__(self, api: client.ApiClient, args: argparse.Namespace) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.node = args.node_name
        self.node_ip = args.node_ip
        self.zone = args.zone
        self.cidr = ipaddress.ip_network(args.pod_cidr)
        self.gateway = str(next(self.cidr.hosts()))
        self.prefix = args.netns_prefix
        self.linger = args.linger
        self.log_dir = Path(args.log_dir) if args.log_dir else None
        self.pods: dict[NamespacedName, PodRuntime] = {}
        self._free = [str(a) for a in list(self.cidr.hosts())[9:250]]  # .10 and up, like the e2e pods
        self._slots = iter(range(1, 1 << 20))
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the Node -------------------------------------------------------------------------------

    async def register(self) -> None:
        body: Any = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {
                    "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": self.zone}},
                "spec": {"podCIDR": str(self.cidr), "podCIDRs": [str(self.cidr)]}}
        try:
            await self.core.create_node(body)
        except client.ApiException as e:
            if e.status != 409:
                raise
            await self.core.patch_node(self.node, {"metadata": {"labels": body["metadata"]["labels"]}})
        now = _now()
        resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        status = {"status": {
            "addresses": [{"type": "InternalIP", "address": self.node_ip}, {"type": "Hostname", "address": self.node}],
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "testbed kubelet stand-in is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "testbed", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "testbed://1",
                         "kernelVersion": "", "osImage": "testbed", "machineID": "", "systemUUID": "",
                         "bootID": ""}}}
        await self.core.patch_node_status(self.node, status)
        logger.info("node %s registered (%s, %s, %s)", self.node, self.node_ip, self.zone, self.cidr)

    async def heartbeat(self) -> None:
        """Renew the node Lease (kube-node-lease/NODE) every 10 s, as the kubelet does."""
        coordination = client.CoordinationV1Api(self.api)
        body: Any = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS}}
        created = False
        while True:
            body["spec"]["renewTime"] = _micro_now()
            try:
                if created:
                    await coordination.patch_namespaced_lease(self.node, "kube-node-lease",
                                                              {"spec": {"renewTime": body["spec"]["renewTime"]}})
                else:
                    try:
                        await coordination.create_namespaced_lease("kube-node-lease", body)
                    except client.ApiException as e:
                        if e.status != 409:
                            raise
                    created = True
            except Exception as e:  # the API server may be restarting: keep trying
                logger.warning("lease renewal failed: %r", e)
            await asyncio.sleep(10)

    # -- Pods -----------------------------------------------------------------------------------

    def on_pod(self, key: NamespacedName, obj: Any) -> None:
        """The reflector's callback (synchronous): decide, then do the slow part in a task."""
        rt = self.pods.get(key)
        if obj is None:
            if rt is not None:
                self._spawn(self._stop(rt, grace=0, delete=False))
            return
        meta, spec = obj.get("metadata", {}), obj.get("spec", {})
        if rt is not None and rt.uid != meta.get("uid"):  # same name, new pod: the old one is gone
            self._spawn(self._stop(rt, grace=0, delete=False))
            rt = None
        if meta.get("deletionTimestamp"):
            if rt is not None and not rt.stopping:
                grace = meta.get("deletionGracePeriodSeconds")
                self._spawn(self._stop(rt, grace=30 if grace is None else int(grace), delete=True))
            elif rt is None:  # never started here: nothing to stop, just let it go
                self._spawn(self._delete(key, meta.get("uid", "")))
            return
        if rt is None and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            if not self._free:
                logger.error("pod %s: no free address in %s", key, self.cidr)
                return
            slot = next(self._slots)
            rt = PodRuntime(key, meta.get("uid", ""), f"{self.prefix}-p{slot}", f"vp{slot}", self._free.pop(0))
            self.pods[key] = rt
            rt.task = self._spawn(self._start(rt, spec))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task failed: %r", task.exception())

    async def _start(self, rt: PodRuntime, spec: dict[str, Any]) -> None:
        tcp: list[int] = []
        udp: list[int] = []
        for container in spec.get("containers", []):
            for p in container.get("ports", []) or []:
                (udp if p.get("protocol") == "UDP" else tcp).append(int(p["containerPort"]))
        bits = self.cidr.prefixlen
        await _run("ip", "netns", "add", rt.netns)
        await _run("ip", "link", "add", rt.veth, "type", "veth", "peer", "name", "eth0", "netns", rt.netns)
        await _run("ip", "link", "set", rt.veth, "master", BRIDGE, "up")
        await _run("ip", "-n", rt.netns, "link", "set", "lo", "up")
        await _run("ip", "-n", rt.netns, "addr", "add", f"{rt.ip}/{bits}", "dev", "eth0")
        await _run("ip", "-n", rt.netns, "link", "set", "eth0", "up")
        await _run("ip", "-n", rt.netns, "route", "add", "default", "via", self.gateway)
        name = rt.key.name
        argv = ["ip", "netns", "exec", rt.netns, sys.executable, str(PODSERVER), name, "--addr", rt.ip,
                "--linger", str(self.linger), *(f"--tcp={p}" for p in tcp), *(f"--udp={p}" for p in udp)]
        out = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None  # noqa: SIM115
        try:
            rt.proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                           stderr=out or asyncio.subprocess.DEVNULL,
                                                           start_new_session=True)
        finally:
            if out:
                out.close()
        assert rt.proc.stdout is not None
        line = await asyncio.wait_for(rt.proc.stdout.readline(), 20)
        if line.strip() != b"ready":
            raise RuntimeError(f"pod {rt.key}: podserver did not start ({line!r})")
        self._spawn(self._drain_output(rt))
        now = _now()
        containers = [{"name": c.get("name", "main"), "image": c.get("image", ""), "imageID": "",
                       "containerID": f"testbed://{rt.proc.pid}", "ready": True, "started": True,
                       "restartCount": 0, "state": {"running": {"startedAt": now}}}
                      for c in spec.get("containers", [])]
        conditions = [{"type": t, "status": "True", "lastTransitionTime": now}
                      for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready",
                                "PodScheduled")]
        status = {"status": {"phase": "Running", "podIP": rt.ip, "podIPs": [{"ip": rt.ip}],
                             "hostIP": self.node_ip, "hostIPs": [{"ip": self.node_ip}], "startTime": now,
                             "conditions": conditions, "containerStatuses": containers}}
        await self.core.patch_namespaced_pod_status(rt.key.name, rt.key.namespace, status)
        logger.info("pod %s running at %s (tcp %s, udp %s)", rt.key, rt.ip, tcp, udp)

    async def _drain_output(self, rt: PodRuntime) -> None:
        assert rt.proc is not None and rt.proc.stdout is not None
        while line := await rt.proc.stdout.readline():
            rt.log.append(line.decode(errors="replace").rstrip())

    async def _stop(self, rt: PodRuntime, *, grace: int, delete: bool) -> None:
        rt.stopping = True
        if rt.task is not None and not rt.task.done():
            rt.task.cancel()
            with contextlib.suppress(BaseException):
                await rt.task
        if rt.proc is not None and rt.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                rt.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(rt.proc.wait(), max(grace, 0.1))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    rt.proc.kill()
                await rt.proc.wait()
        with contextlib.suppress(RuntimeError):
            await _run("ip", "netns", "del", rt.netns)
        with contextlib.suppress(RuntimeError):
            await _run("ip", "link", "del", rt.veth)
        if self.pods.get(rt.key) is rt:
            del self.pods[rt.key]
        self._free.append(rt.ip)
        logger.info("pod %s stopped", rt.key)
        if delete:
            await self._delete(rt.key, rt.uid)

    async def _delete(self, key: NamespacedName, uid: str) -> None:
        body: Any = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid} if uid else None}
        try:
            await self.core.delete_namespaced_pod(key.name, key.namespace, body=body)
        except client.ApiException as e:
            if e.status not in (404, 409):
                raise

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._stop(rt, grace=0, delete=False) for rt in list(self.pods.values())),
                             return_exceptions=True)


async def amain(args: argparse.Namespace) -> None:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg, persist_config=False)
    async with client.ApiClient(cfg) as api:
        kubelet = Kubelet(api, args)
        await kubelet.register()
        pods = Reflector(Resource("Pod", "v1", kubelet.core.list_pod_for_all_namespaces,
                                  field_selector=f"spec.nodeName={kubelet.node}"),
                         kubelet.on_pod, lambda: logger.info("pods listed; %s ready", kubelet.node))
        settings = WatchSettings(backoff_initial=0.2, backoff_max=2.0, user_agent=f"testbed-kubelet/{kubelet.node}")
        watch = asyncio.create_task(watch_forever(pods, settings, ApiHealth(interval=10)))
        heartbeat = asyncio.create_task(kubelet.heartbeat())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.wait([watch, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        for task in (watch, heartbeat):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await kubelet.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testbed.kubelet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--node-ip", required=True)
    parser.add_argument("--zone", default="zone-a")
    parser.add_argument("--pod-cidr", required=True)
    parser.add_argument("--netns-prefix", required=True, help="pod namespaces are PREFIX-p1, PREFIX-p2, ...")
    parser.add_argument("--linger", type=float, default=1.0,
                        help="seconds each pod keeps serving after SIGTERM (a preStop sleep)")
    parser.add_argument("--log-dir", default="", help="where each pod's stderr goes (NAME.log)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s kubelet/{args.node_name} %(message)s")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
