"""Worker processes: TCP forwarding on more cores, one control plane.

With ``--workers N`` the main process forwards as before and starts N-1 helpers. Every TCP
listening socket is bound once, by the main process, and handed to each helper over a Unix socket
(SCM_RIGHTS): all processes accept from the same queue, and the one that is free takes the next
connection (libuv accepts one connection per wake-up, ``UV_TCP_SINGLE_ACCEPT``). One socket per
address also keeps a restart's steering to the new instance (reuseport.py) as it is.

Only the main process watches the API server and plans; each helper gets what its data plane
needs (endpoint pools, listeners, node addresses) as pickled messages, and keeps its own round
robin, outlier record, limits and endpoint drain. UDP, health check nodePorts, VIPs and the
metrics server stay in the main process. Each helper sends its traffic counts every second; the
main process adds them to its own at scrape time. A helper that dies is started again and given
the current state; ``svcproxy_worker_restarts_total`` counts it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import uvloop

from proxy import logs
from proxy.balancer import Pool
from proxy.dataplane import drain, forwarding
from proxy.dataplane.connections import Connections, Limits
from proxy.dataplane.target import LocalSources, Target
from proxy.dataplane.traffic import Summaries, Traffic, summarize
from proxy.outliers import Outliers
from proxy.plan import ListenerKey, ListenerSpec, PoolKey, pool_keys

logger = logging.getLogger(__name__)

STATS_INTERVAL = 1.0
"""Seconds between a helper's reports of its traffic counts."""
_MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors per message
_HEADER = 4


class Channel:
    """Length-prefixed pickled messages over a Unix stream socket, each optionally carrying
    descriptors. Writes never block the loop: what the socket does not take waits for it."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Any, list[int]], None], on_closed: Callable[[], None]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = loop
        self._on_message = on_message
        self._on_closed = on_closed
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._in = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: Any, fds: Sequence[int] = ()) -> None:
        """Queue ``message`` with ``fds`` (the receiver gets them with it, in order)."""
        if self._closed:
            return
        data = pickle.dumps((message, len(fds)), protocol=pickle.HIGHEST_PROTOCOL)
        was_idle = not self._out
        # Copies: the caller may close its descriptor (and the number be reused) before we send.
        self._out.append((memoryview(len(data).to_bytes(_HEADER, "big") + data), [os.dup(fd) for fd in fds]))
        if was_idle:
            self._writable()

    def _writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    sent = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    _close_all(fds)  # they went with the first byte
                else:
                    sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._writable)
                return
            except OSError:
                self.close()
                return
            if sent < len(data):
                self._out[0] = (data[sent:], fds)
            else:
                self._out.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self.close()
            return
        self._in += data
        while len(self._in) >= _HEADER:
            size = int.from_bytes(self._in[:_HEADER], "big")
            if len(self._in) < _HEADER + size:
                break
            message, wanted = pickle.loads(self._in[_HEADER:_HEADER + size])
            del self._in[:_HEADER + size]
            self._on_message(message, [self._fds.popleft() for _ in range(wanted)])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        _close_all(self._fds)
        for _, fds in self._out:
            _close_all(fds)
        self._out.clear()
        self._on_closed()


def _close_all(fds: list[int] | collections.deque[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


# ---------------------------------------------------------------- the helper process


class Helper:
    """A helper's data plane: the TCP listeners it was handed and the pools behind them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits, drain_timeout: float,
                 mode: str = "sockets") -> None:
        self.loop = loop
        self.outliers = Outliers(clock=loop.time)
        self.connections = Connections(limits)
        # The same backlog: listen() on the shared socket sets it for every process.
        self.forwarder = forwarding.forwarder(mode, loop, self.connections, shared=True)
        self.traffic = Traffic()
        self.local_sources = LocalSources()
        self.drained = 0
        self.drain = drain.EndpointDrain(self.connections, drain_timeout, loop=loop, on_drained=self._drained)
        self.pools: dict[PoolKey, Pool] = {}
        self.listeners: dict[ListenerKey, tuple[Target, Callable[[], None]]] = {}
        self.stopping: asyncio.Future[float] = loop.create_future()
        self._queue: asyncio.Queue[tuple[Any, list[int]]] = asyncio.Queue()

    def _drained(self, count: int) -> None:
        self.drained += count

    def receive(self, message: Any, fds: list[int]) -> None:
        self._queue.put_nowait((message, fds))

    async def run(self) -> None:
        """Apply the messages in order (opening a listener awaits the loop)."""
        while True:
            (kind, *args), fds = await self._queue.get()
            try:
                await self._apply(kind, args, fds)
            except Exception:  # a bad message must not take the helper down with its connections
                logger.exception("worker %d: cannot apply %s", os.getpid(), kind)

    async def _apply(self, kind: str, args: list[Any], fds: list[int]) -> None:
        if kind == "pools":
            for key, (endpoints, affinity, least_connections) in args[0].items():
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = Pool(endpoints, affinity_timeout=affinity, clock=self.loop.time,
                                                  outliers=self.outliers)
                else:
                    pool.update(endpoints, affinity)
                pool.load = self.traffic.load(key.name) if least_connections else None
        elif kind == "drop_pools":
            for key in args[0]:
                gone = self.pools.pop(key, None)
                if gone is not None and self.drain.timeout > 0:
                    drain.retire(gone)
        elif kind == "open":
            await self._open(args[0], socket.socket(fileno=fds[0]))
        elif kind == "retarget":
            spec: ListenerSpec = args[0]
            self.listeners[spec.key][0].retarget(self.traffic.service(spec.pool.name), self.pools[spec.pool],
                                                 spec.source_ranges, self._local_pool(spec), spec.proxy_protocol,
                                                 spec.external)
        elif kind == "close":
            entry = self.listeners.pop(args[0], None)
            if entry is not None:
                entry[1]()
        elif kind == "local":
            self.local_sources.update(*args)
        elif kind == "synced":
            self.drain.check()
            for name in args[0]:
                if name in self.traffic.services:
                    pools = [pool for key in pool_keys(name) if (pool := self.pools.get(key)) is not None]
                    self.traffic.prune(name, {(e.ip, e.port) for pool in pools for e in pool.endpoints}
                                       if pools else None)
        elif kind == "stop" and not self.stopping.done():
            self.stopping.set_result(args[0])

    async def _open(self, spec: ListenerSpec, sock: socket.socket) -> None:
        target = Target(self.traffic.service(spec.pool.name), self.pools[spec.pool], spec.source_ranges,
                        local_traffic_pool=self._local_pool(spec), local_sources=self.local_sources,
                        proxy_protocol=spec.proxy_protocol, external=spec.external)
        old = self.listeners.pop(spec.key, None)
        if old is not None:
            old[1]()
        try:
            close = await self.forwarder.serve(sock, target)
        except BaseException:
            sock.close()
            raise
        self.listeners[spec.key] = (target, close)

    def _local_pool(self, spec: ListenerSpec) -> Pool | None:
        return None if spec.local_traffic_pool is None else self.pools[spec.local_traffic_pool]

    def report(self) -> tuple[str, Summaries, int, int]:
        live = ((c.traffic, c.endpoint_traffic, *c.moved, 0, 0) for c in self.connections.live
                if c.traffic is not None)
        return "stats", summarize(self.traffic, live), len(self.connections.live), self.drained

    async def stop(self, drain_seconds: float) -> None:
        for _, close in self.listeners.values():
            close()
        self.listeners.clear()
        self.drain.close()
        if self.connections.live:
            try:
                await asyncio.wait_for(self.connections.wait_idle(), drain_seconds)
            except TimeoutError:
                self.connections.abort_all()


async def _helper_main(fd: int, limits: Limits, drain_timeout: float, mode: str) -> None:
    loop = asyncio.get_running_loop()
    helper = Helper(loop, limits, drain_timeout, mode)
    lost: asyncio.Future[None] = loop.create_future()

    def on_lost() -> None:  # the parent is gone: nobody will say stop
        if not lost.done():
            lost.set_result(None)

    channel = Channel(socket.socket(fileno=fd), loop, helper.receive, on_lost)
    # The parent decides when to stop (it drains on SIGTERM); a terminal's Ctrl-C reaches the
    # whole process group, and the helper must not drop its connections before the parent says.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    runner = loop.create_task(helper.run())

    async def reports() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            channel.send(helper.report())

    reporter = loop.create_task(reports())
    waits: list[asyncio.Future[Any]] = [helper.stopping, lost]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    drain_seconds = helper.stopping.result() if helper.stopping.done() else 0.0
    await helper.stop(drain_seconds)
    channel.send(helper.report())
    reporter.cancel()
    runner.cancel()
    channel.close()


def helper_entry(argv: Sequence[str]) -> int:
    """``python -m proxy.dataplane.workers FD LIMITS DRAIN MODE INDEX LEVEL FORMAT``: what each helper runs."""
    logs.setup(int(argv[5]), argv[6], worker=int(argv[4]))
    limits = pickle.loads(bytes.fromhex(argv[1]))
    uvloop.run(_helper_main(int(argv[0]), limits, float(argv[2]), argv[3]))
    return 0


# ---------------------------------------------------------------- the parent's side


class Worker:
    """One helper process as the parent sees it."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, channel: Channel) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.summaries: Summaries = {}
        self.connections = 0
        self.drained = 0
        self.quick_deaths = 0
        """Deaths in a row, each within 10 s of its start."""


class Workers:
    """The helpers of this process: started, fed, watched and restarted."""

    def __init__(self, count: int, *, limits: Limits, drain_timeout: float, mode: str = "sockets",
                 replay: Callable[[Worker], None], on_drained: Callable[[int], None] = lambda n: None) -> None:
        self.count = count
        self._on_drained = on_drained
        self._limits = limits
        self._mode = mode
        self._drain_timeout = drain_timeout
        self._replay = replay
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for index in range(1, self.count):
            await self._spawn(index)

    async def _spawn(self, index: int, quick_deaths: int = 0) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.dataplane.workers", str(child.fileno()),
                pickle.dumps(self._limits).hex(), repr(self._drain_timeout), self._mode, str(index),
                *map(str, logs.current()),
                pass_fds=(child.fileno(),),
                env={**os.environ, "UV_TCP_SINGLE_ACCEPT": "1"})
        finally:
            child.close()
        worker: Worker

        def on_message(message: Any, fds: list[int]) -> None:
            kind, *args = message
            if kind == "stats":
                worker.summaries, worker.connections, drained = args
                if drained > worker.drained:
                    self._on_drained(drained - worker.drained)
                worker.drained = drained

        channel = Channel(parent, loop, on_message, lambda: None)
        worker = Worker(index, process, channel)
        worker.quick_deaths = quick_deaths
        self.workers[index] = worker
        logger.info("worker %d started (pid %d)", index, process.pid)
        self._replay(worker)
        task = loop.create_task(self._watch(worker))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        code = await worker.process.wait()
        worker.channel.close()
        if self._stopping or self.workers.get(worker.index) is not worker:
            return
        self.restarts += 1
        del self.workers[worker.index]
        # One that dies young is started again after a growing pause, not in a tight loop.
        worker.quick_deaths = worker.quick_deaths + 1 if loop.time() - started < 10 else 0
        delay = min(30.0, 0.5 * 2 ** worker.quick_deaths) if worker.quick_deaths else 0.0
        logger.error("worker %d (pid %d) exited with %s; starting it again%s", worker.index, worker.process.pid,
                     code if code >= 0 else signal.Signals(-code).name, f" in {delay:g}s" if delay else "")
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker.index, worker.quick_deaths)

    def post(self, message: tuple[Any, ...], fds: Iterable[int] = ()) -> None:
        """Send to every helper (``fds`` are duplicated into each)."""
        fds = list(fds)
        for worker in self.workers.values():
            worker.channel.send(message, fds)

    def running(self) -> int:
        return len(self.workers)

    def summaries(self) -> list[Summaries]:
        return [w.summaries for w in self.workers.values()]

    def connections(self) -> int:
        return sum(w.connections for w in self.workers.values())

    def connections_each(self) -> dict[int, int]:
        return {index: w.connections for index, w in self.workers.items()}

    async def stop(self, drain_seconds: float) -> None:
        """Tell every helper to stop accepting and drain, and wait for them to exit."""
        self._stopping = True
        self.post(("stop", drain_seconds))
        for worker in list(self.workers.values()):
            try:
                await asyncio.wait_for(worker.process.wait(), drain_seconds + 5)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
            worker.channel.close()
        self.workers.clear()


if __name__ == "__main__":
    sys.exit(helper_entry(sys.argv[1:]))
