"""sync(): tracker changes → plan → dataplane. The only place that binds, closes or adds addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from proxy import metrics
from proxy.balancer import Pool, Rotation, rotation
from proxy.dataplane import drain, forwarding, tproxy, udp
from proxy.dataplane.connections import Connections, Limits
from proxy.dataplane.guard import VipGuard
from proxy.dataplane.healthcheck import ServiceHealthServers
from proxy.dataplane.listeners import Listeners
from proxy.dataplane.target import LocalSources, Target
from proxy.dataplane.traffic import Address, Live, Traffic
from proxy.dataplane.vip import Vips
from proxy.dataplane.workers import Worker, Workers
from proxy.health import ProxierHealth
from proxy.model import Endpoint, ServicePortName
from proxy.outliers import Outliers
from proxy.plan import ListenerKey, ListenerSpec, Node, Plan, PoolKey, Table, pool_keys
from proxy.tracker import ChangeTracker

logger = logging.getLogger(__name__)

NODE_REFRESH = 5.0
"""Seconds between reads of the node's addresses (for nodePorts and local-traffic detection)."""
POOLS_PER_MESSAGE = 500
"""Pools per message to the worker processes (a slice the data loop pickles between pauses)."""
AFFINITY_SWEEP = 10.0
"""Seconds between sweeps of expired ClientIP affinities (lookups check expiry themselves)."""

T = TypeVar("T")


OnData = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]
"""Runs a coroutine on the data loop and returns its result (see proxy.control)."""


async def _here(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


class Turn:
    """Gives the loop back when a batch of data-plane changes has held it for ``TURN`` seconds.

    Opening 10,000 listeners, or swapping the endpoints of as many pools, takes seconds; done in
    one go, every connection on the node would wait for it.
    """

    TURN = 0.02

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._since = clock()

    async def pause(self) -> None:
        if self._clock() - self._since >= self.TURN:
            await asyncio.sleep(0)
            self._since = self._clock()


class Proxier:
    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        tracker: ChangeTracker,
        vips: Vips,
        health: ProxierHealth,
        node_name: str,
        nodeport_cidrs: Sequence[str] = (),
        cluster_cidrs: Sequence[str] = (),
        udp_idle_timeout: float = udp.DEFAULT_IDLE_TIMEOUT,
        endpoint_drain_timeout: float = 0.0,
        limits: Limits | None = None,
        workers: int = 1,
        mode: str = "sockets",
        steering: tproxy.Steering | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.vips = vips
        self.health = health
        self.node_name = node_name
        self.node_zone = ""
        """This node's topology.kubernetes.io/zone label (from its Node object), for zone hints."""
        self._nodeport_cidrs = [ipaddress.ip_network(c, strict=False) for c in nodeport_cidrs]
        self._clock = clock
        self.outliers = Outliers(clock=clock)
        self.connections = Connections(limits)
        self.traffic = Traffic()
        self.listeners = Listeners(loop, forwarding.forwarder(mode, loop, self.connections, shared=workers > 1),
                                   udp_idle_timeout=udp_idle_timeout, transparent=self.connections.limits.transparent)
        self.drain = drain.EndpointDrain(self.connections, endpoint_drain_timeout, loop=loop,
                                         on_drained=metrics.endpoint_drained.inc)
        self.pools: dict[PoolKey, Pool] = {}
        self.table = Table(Node(node_name, ()))
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._node_addresses: tuple[str, ...] | None = None
        self._node_interfaces: tuple[str, ...] = ()
        """The node's addresses with their links' prefixes (``ip/prefix``)."""
        self._steering = steering
        """--transparent's reply steering, kept up to date with the node's bridges (None: off)."""
        self._steered: tuple[str, ...] = ()
        """The bridges' subnets whose pods keep their address with each other."""
        self._node_read = 0.0
        self._affinity_swept = 0.0
        self.local_sources = LocalSources()
        self.health_servers = ServiceHealthServers(health.healthy)
        self.guard = VipGuard()
        self._failed: dict[ListenerKey, ListenerSpec] = {}
        self.serving: dict[ListenerKey, ListenerSpec] = {}
        """What each open listener serves (data loop side; the routing table view reads it)."""
        self._unsupported_logged: set[str] = set()
        self.workers = None if workers <= 1 else Workers(
            workers, limits=self.connections.limits, mode=mode, drain_timeout=endpoint_drain_timeout,
            replay=self._replay, on_drained=metrics.endpoint_drained.inc)
        """Helper processes that accept from the same TCP listeners (--workers)."""

    async def start_workers(self) -> None:
        if self.workers is not None:
            await self.workers.start()

    def _post(self, *message: Any, fds: Sequence[int] = ()) -> None:
        if self.workers is not None:
            self.workers.post(message, fds)

    def _replay(self, worker: Worker) -> None:
        """A helper that (re)started gets everything its data plane needs, as it is now."""
        send = worker.channel.send
        send(("local", self._node_addresses or (), self._cluster_cidrs, self._node_interfaces, self._steered))
        send(("pools", {key: (pool.endpoints, pool.affinity_timeout, pool.load is not None)
                        for key, pool in self.pools.items()}))
        for key, spec in self.serving.items():
            listener = self.listeners.open.get(key)
            if key.protocol == "TCP" and listener is not None:
                send(("open", spec), [listener.fileno])

    async def nodeport_addresses(self) -> tuple[str, ...]:
        """Local addresses nodePorts bind on: every node address, or those in --nodeport-addresses.

        Node addresses are read again at most every NODE_REFRESH seconds: a netlink dump per sync
        would cost every endpoint change a thread round trip."""
        now = self._clock()
        if self._node_addresses is None or now - self._node_read >= NODE_REFRESH:
            self._node_read = now
            interfaces = tuple(await self.vips.node_addresses())
            addrs = tuple(sorted({a.partition("/")[0] for a in interfaces}))
            steered = await self._steering.steer_bridges() if self._steering is not None else ()
        else:
            interfaces, addrs, steered = self._node_interfaces, self._node_addresses, self._steered
        if addrs != self._node_addresses or interfaces != self._node_interfaces or steered != self._steered:
            self._node_addresses, self._node_interfaces, self._steered = addrs, interfaces, steered
            self.local_sources.update(addrs, self._cluster_cidrs, interfaces, steered)
            self._post("local", addrs, self._cluster_cidrs, interfaces, steered)
        if self._nodeport_cidrs:
            addrs = tuple(a for a in addrs if any(ipaddress.ip_address(a) in n for n in self._nodeport_cidrs))
        return addrs

    async def sync(self, on_data: OnData | None = None) -> None:
        """Apply every pending change. Called by the runner; never before the first full list.

        The tracker and the table belong to the caller's (control) loop; everything that touches
        sockets, pools or addresses runs through ``on_data`` on the data loop (by default: here).
        """
        if not self.tracker.synced:
            return
        run = on_data or _here
        start = self._clock()
        plans = []
        node = Node(self.node_name, await run(self.nodeport_addresses()), self.node_zone)
        if node != self.table.node:
            plans.append(self.table.set_node(node))
        plans.append(self.table.update(self.tracker.checkout()))
        await run(self._apply_all(plans, self._rotations(plans), start))
        elapsed = self._clock() - start
        self.health.updated()
        metrics.sync_duration.observe(elapsed)
        metrics.sync_last_timestamp.set_to_current_time()
        metrics.conflicts.set(self.table.conflicts)
        opened, closed = sum(len(p.open) for p in plans), sum(len(p.close) for p in plans)
        pools = sum(len(p.pools) for p in plans)
        if opened or closed or pools:
            logger.info("sync: %d listeners opened, %d closed, %d endpoint sets changed, in %.1f ms (%d listening)",
                        opened, closed, pools, elapsed * 1000, len(self.listeners.open))
        else:
            logger.debug("sync done in %.1f ms", elapsed * 1000)

    def _rotations(self, plans: list[Plan]) -> dict[PoolKey, Rotation | None]:
        """On the caller's loop: each changed pool's endpoints hashed and shuffled, None where
        the members are the same. The pools are only replaced while the caller awaits the apply."""
        prepared: dict[PoolKey, Rotation | None] = {}
        for plan in plans:
            for key, spec in plan.pools.items():
                pool = self.pools.get(key)
                same = pool is not None and frozenset(spec.endpoints) == pool.members
                prepared[key] = None if same else rotation(spec.endpoints)
        return prepared

    async def _apply_all(self, plans: list[Plan], prepared: dict[PoolKey, Rotation | None], start: float) -> None:
        """On the data loop: the plans, failed binds again, and the data plane's own upkeep."""
        turn = Turn(self._clock)
        for plan in plans:
            await self._apply(plan, prepared, turn)
        await self._retry_failed()
        if start - self._affinity_swept >= AFFINITY_SWEEP:  # O(pools): not on every sync
            self._affinity_swept = start
            for pool in self.pools.values():
                pool.expire_affinity()
                await turn.pause()
        metrics.listeners_failed.set(len(self._failed))
        self.drain.check()
        if self.outliers.ejections:  # forget endpoints that left every pool
            current = {(ep.ip, ep.port) for pool in self.pools.values() for ep in pool.endpoints}
            self.outliers.forget(current.__contains__)
        # Traffic counts of the service ports these plans changed: drop what left.
        changed = {key.name for plan in plans for key in (*plan.pools, *plan.drop_pools)}
        for name in changed:
            if name in self.traffic.services:
                self.traffic.prune(name, self._endpoints_of(name))
        self._post("synced", changed)

    def _endpoints_of(self, name: ServicePortName) -> set[Address] | None:
        """Every endpoint in any pool of the service port; None when it has no pool left."""
        pools = [pool for key in pool_keys(name) if (pool := self.pools.get(key)) is not None]
        if not pools:
            return None
        return {(ep.ip, ep.port) for pool in pools for ep in pool.endpoints}

    def live_connections(self) -> int:
        """Proxied TCP connections open now, in this process and its helpers."""
        return len(self.connections.live) + (self.workers.connections() if self.workers else 0)

    def live(self) -> Iterator[Live]:
        """What open TCP connections and UDP flows have counted so far (for the traffic metrics)."""
        for conn in self.connections.live:
            if conn.traffic is not None:
                yield conn.traffic, conn.endpoint_traffic, *conn.moved, 0, 0
        for listener in self.listeners.open.values():
            if listener.udp is not None:
                for flow in listener.udp.flows.values():
                    yield (flow.traffic, flow.endpoint_traffic, flow.bytes_in, flow.bytes_out, flow.datagrams_in,
                           flow.datagrams_out)

    async def _apply(self, plan: Plan, prepared: dict[PoolKey, Rotation | None], turn: Turn) -> None:
        if not plan:
            return
        if plan.add_vips:
            await self.vips.sync(self.table.vips)
        # Helpers get the pools in slices: pickling 10,000 at once held this loop for 300 ms.
        batch: dict[PoolKey, tuple[tuple[Endpoint, ...], int, bool]] = {}
        for pool_key, pool_spec in plan.pools.items():
            pool = self.pools.get(pool_key)
            rot = prepared.get(pool_key)
            if pool is None:
                self.pools[pool_key] = Pool(
                    pool_spec.endpoints, affinity_timeout=pool_spec.affinity_timeout, clock=self._clock,
                    outliers=self.outliers, prepared=rot,
                )
            else:
                pool.install(rot, pool_spec.affinity_timeout)
            self.pools[pool_key].load = self.traffic.load(pool_key.name) if pool_spec.least_connections else None
            if self.workers is not None:
                batch[pool_key] = (pool_spec.endpoints, pool_spec.affinity_timeout, pool_spec.least_connections)
                if len(batch) >= POOLS_PER_MESSAGE:
                    self._post("pools", batch)
                    batch = {}
            await turn.pause()
        if batch:
            self._post("pools", batch)
        for spec in plan.retarget:
            listener = self.listeners.open.get(spec.key)
            if listener is None:
                await self._open(spec)
                continue
            listener.target.retarget(self.traffic.service(spec.pool.name), self.pools[spec.pool], spec.source_ranges,
                                     self._local_traffic_pool(spec), spec.proxy_protocol, spec.external)
            self.serving[spec.key] = spec
            if spec.key.protocol == "TCP":
                self._post("retarget", spec)
            await turn.pause()
        for spec in plan.open:
            await self._open(spec)
            await turn.pause()
        for key in plan.close:
            self._failed.pop(key, None)
            self.serving.pop(key, None)
            self.listeners.close(key)
            if key.protocol == "TCP":
                self._post("close", key)
            await turn.pause()
        self.health_servers.local_endpoints.update(plan.local_endpoints)
        for hkey in plan.health_close:
            await self.health_servers.close(hkey)
        for hkey, service in plan.health_open:
            try:
                await self.health_servers.open(hkey, service)
            except OSError as e:
                logger.error("%s: cannot serve its health check on %s: %s", service, hkey, e.strerror or e)
        for dropped in plan.drop_pools:
            gone = self.pools.pop(dropped, None)
            if gone is not None and self.drain.timeout > 0:
                drain.retire(gone)
        if plan.drop_pools:
            self._post("drop_pools", list(plan.drop_pools))
        if plan.remove_vips:
            await self.vips.sync(self.table.vips)
        if plan.add_vips or plan.remove_vips or plan.open or plan.close:
            owned = self.vips.owned
            # frontend_ports() walks every Service: only worth it when a VIP needs guarding.
            await self.guard.sync(owned, self.table.frontend_ports() if owned else ())

    async def _open(self, spec: ListenerSpec) -> None:
        key = spec.key
        if key.protocol not in ("TCP", "UDP"):
            if key.protocol not in self._unsupported_logged:
                self._unsupported_logged.add(key.protocol)
                logger.warning("%s service ports are not supported; not serving %s", key.protocol, key)
            return
        target = Target(self.traffic.service(spec.pool.name), self.pools[spec.pool], spec.source_ranges,
                        local_traffic_pool=self._local_traffic_pool(spec), local_sources=self.local_sources,
                        proxy_protocol=spec.proxy_protocol, external=spec.external)
        try:
            await self.listeners.open_listener(key, target)
        except OSError as e:
            if key not in self._failed:
                logger.error("%s: cannot listen on %s: %s (will retry)", spec.pool.name, key, e.strerror or e)
            self._failed[key] = spec
            return
        self._failed.pop(key, None)
        self.serving[key] = spec
        if key.protocol == "TCP":
            self._post("open", spec, fds=[self.listeners.open[key].fileno])
        logger.debug("%s: listening on %s", spec.pool.name, key)

    def _local_traffic_pool(self, spec: ListenerSpec) -> Pool | None:
        return None if spec.local_traffic_pool is None else self.pools[spec.local_traffic_pool]

    @property
    def failed_listeners(self) -> int:
        """Listeners that could not be bound (the address taken, say); each sync retries them."""
        return len(self._failed)

    async def _retry_failed(self) -> None:
        for key, spec in list(self._failed.items()):
            if self.table.listeners.get(key) == spec:
                await self._open(spec)
            else:
                self._failed.pop(key, None)

    async def shutdown(self, *, drain_seconds: float, remove_vips: bool = False) -> None:
        """Stop accepting, let live connections finish for up to ``drain_seconds``, then cut them.

        VIPs stay by default, as kube-proxy leaves its rules on exit: clients get a quick refusal
        instead of packets routed off the node, and the next svcproxy adopts them without a flap.
        """
        self.listeners.close_all()
        self.serving.clear()
        self.drain.close()
        helpers = None if self.workers is None else asyncio.ensure_future(self.workers.stop(drain_seconds))
        await self.health_servers.close_all()
        if self.connections.live:
            logger.info("draining %d connections for up to %.0fs", len(self.connections.live), drain_seconds)
            try:
                await asyncio.wait_for(self.connections.wait_idle(), drain_seconds)
            except TimeoutError:
                logger.info("drain deadline passed; closing %d connections", len(self.connections.live))
                self.connections.abort_all()
        if helpers is not None:
            await helpers
        if remove_vips:
            await self.vips.remove_all()
        await self.vips.close()
