"""The daemon: wires sources, tracker, runner, proxier and the HTTP servers, and shuts down cleanly.

The control plane (the source, the tracker, the sync runner) runs on a thread of its own
(proxy.control), so decoding and planning never stall forwarding; if its source or runner ends,
the whole instance stops. The data plane and the HTTP servers keep the main loop. SIGTERM/SIGINT
stop accepting, drain live connections for ``drain_timeout``, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy import config, convert, gcpolicy, health, metrics, sdnotify, table
from proxy.control import ControlThread
from proxy.dataplane import tproxy
from proxy.dataplane.connections import Limits
from proxy.dataplane.guard import VipGuard
from proxy.dataplane.vip import Vips
from proxy.dataplane.watchdog import LoopWatchdog
from proxy.handover import Handover
from proxy.proxier import Proxier
from proxy.runner import Runner
from proxy.settings import Settings, parse_host_port
from proxy.sources import WatchStats, manifests
from proxy.tracker import ChangeTracker

logger = logging.getLogger(__name__)

BIND_RETRY_INTERVAL = 1.0
"""Seconds between attempts to bind a listener whose address is taken."""


class ConfigurationError(Exception):
    """A setting that cannot work (say, an unreadable kubeconfig); the message says which."""


class App:
    """One svcproxy instance. ``start()`` returns once the servers are up; ``stop()`` drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tracker = ChangeTracker(clock=time.monotonic, on_change=self._request_sync)
        self.health = health.ProxierHealth(
            timeout=2 * settings.sync_period, queued_since=lambda: self.tracker.oldest_pending
        )
        self.runner = Runner(self._sync, min_interval=settings.min_sync_period, max_interval=settings.sync_period)
        self.proxier: Proxier | None = None
        self.healthz_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.synced = asyncio.Event()
        """Set after the first sync that followed the first full load."""
        self._initial_sync_done = False
        self.control: ControlThread | None = None
        self.watchdog: LoopWatchdog | None = None
        self._freezer = gcpolicy.FreezeSlowCollections()
        self.handover: Handover | None = None
        self._respawning = False
        self._web: list[web.AppRunner] = []
        self._collectors: list[metrics.Collector] = []
        """Registered with metrics.REGISTRY while running (unregistered at stop: tests run many)."""
        self._node_error = ""
        self._bind_retry: asyncio.TimerHandle | None = None
        self.watch_stats = WatchStats()
        self.api: Any = None
        """The API server's client configuration, loaded before anything is bound."""

    def _request_sync(self) -> None:
        self.runner.request()

    async def _sync(self) -> None:
        """On the control loop: plan there, apply on the data loop."""
        assert self.proxier is not None and self.control is not None
        await self.proxier.sync(self.control.on_data)
        if self.proxier.failed_listeners and (self._bind_retry is None or self._bind_retry.cancelled()):
            # Something holds an address we must serve: try again soon, not only at the next resync.
            def retry() -> None:
                self._bind_retry = None
                self.runner.request()

            self._bind_retry = asyncio.get_running_loop().call_later(BIND_RETRY_INTERVAL, retry)
        if self.tracker.synced and not self._initial_sync_done:
            self._initial_sync_done = True
            await self.control.on_data(self._initial_sync_applied())
            # Start-up garbage collected once, and what is left out of the collector's way
            # (proxy.gcpolicy does the same after any slow full collection).
            gc.collect()
            gc.freeze()
            logger.info("initial sync done: %d services, %d listeners",
                        len(self.proxier.table.services), len(self.proxier.listeners.open))

    async def _initial_sync_applied(self) -> None:
        """On the data loop, once: ready (the ready file, the predecessor of a restart told)."""
        self.synced.set()
        ready = self.settings.ready_file
        if ready is not None:
            try:
                ready.write_text(f"{os.getpid()}\n")
            except OSError as e:
                logger.error("cannot write --ready-file %s: %s", ready, e.strerror or e)
        if self.handover is not None:
            await self.handover.synced()
        listeners = len(self.proxier.listeners.open) if self.proxier is not None else 0
        sdnotify.notify("READY=1", f"STATUS=serving {listeners} listeners")

    async def respawn(self, stop: asyncio.Event) -> None:
        """SIGUSR2 (``systemctl reload``): start a fresh svcproxy with the same arguments (the new
        code, after an upgrade), hand the node over to it once it has synced, then stop."""
        if self.handover is None or not self.handover.owner:
            logger.error("cannot restart in place: it needs --handover-socket, and this instance to own it")
            return
        if self._respawning:
            return
        self._respawning = True
        try:
            child = subprocess.Popen([sys.executable, "-m", "proxy", *sys.argv[1:]])
            logger.info("restarting in place: started svcproxy pid %d; serving until it has synced", child.pid)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.handover_timeout
            while not self.handover.successor_synced:
                if child.poll() is not None:
                    logger.error("restart in place: the new svcproxy exited (%d) before it synced; "
                                 "carrying on", child.returncode)
                    return
                if loop.time() >= deadline:
                    logger.error("restart in place: the new svcproxy did not sync within %.0fs; stopping it "
                                 "and carrying on", self.settings.handover_timeout)
                    child.terminate()
                    return
                await self.handover.changed(1.0)
            sdnotify.notify(f"MAINPID={child.pid}")
            stop.set()
        finally:
            self._respawning = False

    def _unready(self) -> None:
        """Remove the ready file if it is ours (a restart in place shares its path)."""
        ready = self.settings.ready_file
        with contextlib.suppress(OSError):
            if ready is not None and ready.read_text().strip() == str(os.getpid()):
                ready.unlink()

    async def hand_over(self) -> None:
        """Before a stop on SIGTERM: not ready any more, and a replacement still syncing waited for."""
        self._unready()
        if self.handover is not None:
            await self.handover.wait_for_successor(self.settings.handover_timeout)

    async def start(self) -> None:
        s = self.settings
        if self.api is None and s.manifests is None:
            # Before anything is bound: a bad kubeconfig is one clear line and exit code 1.
            from proxy.sources import kube  # the API client is heavy; the embedded mode skips it

            if s.kubeconfig and not os.access(s.kubeconfig, os.R_OK):
                raise ConfigurationError(f"--kubeconfig: {s.kubeconfig} does not exist or is not readable")
            try:
                self.api = await kube.load_configuration(kubeconfig=s.kubeconfig, master=s.master)
            except Exception as e:  # kubernetes_asyncio raises several unrelated types here
                raise ConfigurationError(f"cannot load the API server configuration: {e}") from None
        loop = asyncio.get_running_loop()
        vips = Vips(s.vip_interface)
        await vips.adopt()
        steering = await self._transparent()
        self.proxier = Proxier(
            loop=loop, tracker=self.tracker, vips=vips, health=self.health,
            node_name=s.node_name, nodeport_cidrs=s.nodeport_addresses, cluster_cidrs=s.cluster_cidr,
            udp_idle_timeout=s.udp_idle_timeout, endpoint_drain_timeout=s.endpoint_drain_timeout,
            limits=Limits(max_connections=s.connection_limit(),
                              max_connections_per_service=s.max_connections_per_service,
                              idle_timeout=s.tcp_idle_timeout, half_closed_timeout=s.tcp_half_closed_timeout,
                              dial_timeouts=s.dial_timeouts, keepalive=s.tcp_keepalive,
                              transparent=steering is not None),
            workers=s.worker_count(),
            mode=s.forwarding,
            steering=steering,
        )
        await self.proxier.start_workers()
        proxier = self.proxier
        self._register(metrics.TrackerCollector(self.tracker, self._last_queued_wall),
                       metrics.OutlierCollector(proxier.outliers, proxier.live_connections),
                       metrics.TrafficCollector(proxier.traffic, proxier.live,
                                                proxier.workers.summaries if proxier.workers else tuple),
                       *([metrics.WorkerCollector(proxier.workers, lambda: len(proxier.connections.live))]
                         if proxier.workers else []))
        if s.shared_http_address():
            # One socket for both, as asked: two sockets on one port would split the requests.
            metrics_routes = [r for r in metrics.routes() if r.path != "/healthz"] + self._debug_routes()
            self.healthz_address = self.metrics_address = await self._serve_http(
                s.healthz_bind_address, "--healthz-bind-address", health.routes(self.health) + metrics_routes)
        else:
            self.healthz_address = await self._serve_http(s.healthz_bind_address, "--healthz-bind-address",
                                                          health.routes(self.health))
        if s.metrics_bind_address and not s.shared_http_address():
            self.metrics_address = await self._serve_http(s.metrics_bind_address, "--metrics-bind-address",
                                                          metrics.routes() + self._debug_routes())
        if s.handover_socket:
            self.handover = Handover(s.handover_socket)
            await self.handover.start()
        self.watchdog = LoopWatchdog(loop, metrics.loop_lag.observe)
        self._freezer.install()
        self.watchdog.start()
        self.control = ControlThread(loop)
        self.control.start(self._control_main)

    async def _control_main(self) -> None:
        """The control thread's root: the source and the sync runner, until either ends."""
        tasks = [asyncio.create_task(self.runner.loop()), asyncio.create_task(self._source())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("a root task ended unexpectedly")
        finally:
            if self._bind_retry is not None:
                self._bind_retry.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _debug_routes(self) -> list[web.RouteDef]:
        """The routing table and the configuration in force, on the metrics address."""
        assert self.proxier is not None
        body = config.configz(self.settings)

        async def configz(_: web.Request) -> web.Response:
            return web.json_response(body)

        return [*table.routes(self.proxier), web.get("/configz", configz)]

    def _last_queued_wall(self) -> float | None:
        queued = self.tracker.last_queued
        return None if queued is None else time.time() - (time.monotonic() - queued)

    async def _source(self) -> None:
        s = self.settings
        if s.manifests is not None:
            logger.info("reading Services and EndpointSlices from %s", s.manifests)
            await manifests.run(self.tracker, s.manifests, interval=s.manifest_poll_interval,
                                node_name=s.node_name, on_node=self._on_node)
        else:
            from proxy.sources import kube  # the API client is heavy; the embedded mode skips it

            self._register(metrics.WatchCollector(self.watch_stats))
            await kube.run(self.tracker, node_name=s.node_name, on_node=self._on_node,
                           configuration=self.api, stats=self.watch_stats)

    def _on_node(self, node: Mapping[str, Any] | None) -> None:
        """This node's object: its zone label feeds topology hints, and a node being deleted is
        not eligible for /healthz (KEP-3836)."""
        try:
            facts = convert.node_facts(node) if node is not None else convert.NodeFacts()
        except convert.InvalidObject as e:
            if str(e) != self._node_error:
                self._node_error = str(e)
                logger.error("ignoring invalid Node (keeping its last good state): %s", e)
            return
        self._node_error = ""
        eligible, zone = facts.eligible, facts.zone
        if eligible != self.health.node_eligible:
            logger.info("node %s is %seligible for traffic", self.settings.node_name, "" if eligible else "not ")
        self.health.node_eligible = eligible
        if self.proxier is not None and zone != self.proxier.node_zone:
            logger.info("node %s is in zone %r", self.settings.node_name, zone)
            self.proxier.node_zone = zone
            self.runner.request()

    async def _serve_http(self, address: str, flag: str, routes: list[web.RouteDef]) -> tuple[str, int]:
        host, port = parse_host_port(address, flag)
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._web.append(runner)
        # Bind ourselves so port 0 works (tests) and the bound port is known.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # restarts overlap
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"{flag} {address}: {e.strerror}") from None
        await web.SockSite(runner, sock).start()
        bound = sock.getsockname()[1]
        logger.info("serving %s on %s:%d", flag.removeprefix("--").removesuffix("-bind-address"), host, bound)
        return host, bound

    async def wait(self) -> None:
        """Until the control plane ends (which is a failure: it runs until stopped)."""
        assert self.control is not None
        await self.control.done
        raise RuntimeError("the control plane ended unexpectedly")

    async def _transparent(self) -> tproxy.Steering | None:
        """The reply steering, installed, if svcproxy dials from clients' own addresses (--transparent
        and what the node allows; None if not). The steering stays when svcproxy exits (a restart's
        successor uses it); --cleanup removes it."""
        wanted = self.settings.transparent
        if wanted == "off":
            return None
        if wanted == "auto" and not self.settings.cluster_cidr:
            logger.info("transparent source addresses are off: --cluster-cidr is not set, so pods cannot be "
                        "told from other clients (--transparent on turns them on regardless)")
            return None
        problem = tproxy.unavailable()
        if not problem and self.settings.forwarding == "transports":
            problem = "--forwarding transports cannot dial from another address"
        steering = tproxy.Steering()
        if not problem:
            problem = await steering.install()
        if problem:
            if wanted == "on":
                raise ConfigurationError(f"--transparent on: {problem}")
            logger.info("transparent source addresses are off (%s): endpoints see this node's address", problem)
            return None
        logger.info("transparent source addresses: endpoints see the client's address where kube-proxy keeps it")
        return steering

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        self._freezer.remove()
        if self.handover is not None:
            await self.handover.close()
        self._unready()
        if self.proxier is not None:
            await self.proxier.shutdown(drain_seconds=self.settings.drain_timeout)
        for runner in self._web:
            await runner.cleanup()
        for collector in self._collectors:
            metrics.REGISTRY.unregister(collector)
        self._collectors.clear()

    def _register(self, *collectors: metrics.Collector) -> None:
        for collector in collectors:
            metrics.REGISTRY.register(collector)
            self._collectors.append(collector)


async def cleanup(settings: Settings) -> int:
    """``--cleanup``: remove every address svcproxy added and its VIP guard (kube-proxy --cleanup)."""
    vips = Vips(settings.vip_interface)
    try:
        await vips.adopt()
        removed = sorted(vips.owned)
        await vips.remove_all()
    finally:
        await vips.close()
    await VipGuard().remove()
    await tproxy.Steering().remove()
    logger.info("removed %d service addresses: %s", len(removed), " ".join(removed) or "none")
    return 0


async def main(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # There is nothing to reload; a stray SIGHUP (a closed terminal) must not kill the proxy
    # without a drain. SIGUSR2 restarts it in place (`systemctl reload`), handing over.
    loop.add_signal_handler(signal.SIGHUP, lambda: logger.warning(
        "SIGHUP ignored: svcproxy has no configuration to reload (SIGTERM stops it, with a drain; "
        "SIGUSR2 restarts it in place)"))
    app = App(settings)
    respawns: set[asyncio.Task[None]] = set()

    def respawn() -> None:
        task = loop.create_task(app.respawn(stop))
        respawns.add(task)
        task.add_done_callback(respawns.discard)

    loop.add_signal_handler(signal.SIGUSR2, respawn)
    code = 0
    try:
        await app.start()
        waiter = loop.create_task(app.wait())
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            waiter.result()
        waiter.cancel()
        stopper.cancel()
        logger.info("shutting down")
        sdnotify.notify("STOPPING=1")
        await app.hand_over()
    except (OSError, ConfigurationError) as e:  # a bind failure, a bad kubeconfig: what and where, no traceback
        logger.error("svcproxy failed: %s", e)
        code = 1
    except Exception:
        logger.exception("svcproxy failed")
        code = 1
    finally:
        await app.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    return code
