"""Restarts that lose nothing: the old instance keeps serving until its replacement has synced.

Both instances bind every service address with SO_REUSEPORT, and the newest socket of each group
takes the new traffic (dataplane/reuseport.py). What remains is timing: the old instance must not
stop accepting before the new one has applied its first full sync, or a restart refuses
connections meanwhile. They agree on it over an abstract Unix socket (``--handover-socket``,
``@svcproxy`` by default; pods with ``hostNetwork: true`` share the node's abstract namespace, as
processes of one host do):

* the running instance owns the name and accepts successors on it;
* a new instance that finds the name taken connects as a successor, says ``hello`` at once and
  ``synced`` after its first full sync, and then keeps trying to take the name over, so that it
  can hand over in turn;
* on SIGTERM, an owner whose successor is connected but not yet synced waits for it (up to
  ``--handover-timeout``) before it closes its listeners; with no successor it stops at once.

If the old instance dies mid-handover (SIGKILL), the new one simply carries on: it syncs, serves,
and takes the name. Nothing here is needed for correctness otherwise; a failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

logger = logging.getLogger(__name__)

RETRY = 1.0
"""Seconds between a successor's attempts to take the name over."""


def _address(name: str) -> str:
    """``@name`` is abstract (no file, gone with its owner); anything else is a filesystem path."""
    return "\0" + name[1:] if name.startswith("@") else name


class Handover:
    def __init__(self, name: str) -> None:
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._predecessor: asyncio.StreamWriter | None = None
        self._successors: dict[asyncio.StreamWriter, bool] = {}
        self._changed = asyncio.Event()
        self._synced = False
        self._claim: asyncio.Task[None] | None = None

    @property
    def owner(self) -> bool:
        return self._server is not None

    @property
    def successor_synced(self) -> bool:
        return any(self._successors.values())

    async def changed(self, timeout: float) -> None:
        """Until a successor comes, goes or syncs, or ``timeout`` passes."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def start(self) -> None:
        """Own the name, or, if another instance does, register with it as its successor."""
        if await self._try_own():
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(_address(self.name))
            sock.setblocking(False)
            _, writer = await asyncio.open_unix_connection(sock=sock)
            writer.write(f"hello {os.getpid()}\n".encode())
            await writer.drain()
            self._predecessor = writer
            logger.info("handover: another svcproxy serves this node; it keeps serving until this one has synced")
        except OSError as e:
            logger.warning("handover: %s is taken but does not answer (%s); carrying on", self.name, e.strerror or e)
        self._claim = asyncio.get_running_loop().create_task(self._keep_claiming())

    async def _try_own(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_address(self.name))
        except OSError:
            sock.close()
            return False
        sock.listen(8)
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._successor, sock=sock)
        return True

    async def _keep_claiming(self) -> None:
        while not await self._try_own():
            await asyncio.sleep(RETRY)
        logger.debug("handover: took over %s", self.name)

    async def _successor(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._successors[writer] = False
        self._changed.set()
        try:
            while line := await reader.readline():
                words = line.decode(errors="replace").split()
                if words[:1] == ["hello"]:
                    logger.info("handover: a new svcproxy (pid %s) is starting", " ".join(words[1:2]) or "?")
                elif words[:1] == ["synced"]:
                    logger.info("handover: the new svcproxy has synced; this one may stop")
                    self._successors[writer] = True
                    self._changed.set()
        except OSError:
            pass
        finally:
            self._successors.pop(writer, None)
            self._changed.set()
            writer.close()

    async def synced(self) -> None:
        """This instance applied its first full sync: tell the predecessor it may stop."""
        if self._predecessor is None:
            return
        # Held open afterwards until the predecessor goes: closing it would read as "gave up".
        with contextlib.suppress(OSError):
            self._predecessor.write(b"synced\n")
            await self._predecessor.drain()

    async def wait_for_successor(self, timeout: float) -> str:
        """Before stopping: while a successor is connected and not synced, wait (up to ``timeout``).

        Returns what happened: "none" (no successor), "synced", "gone" (it disconnected) or "timeout".
        """
        if not self._successors:
            return "none"
        if any(self._successors.values()):
            return "synced"
        logger.info("handover: waiting up to %.0fs for the new svcproxy to sync before stopping", timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(self._successors.values()):
            if not self._successors:
                logger.warning("handover: the new svcproxy went away before it synced; stopping anyway")
                return "gone"
            left = deadline - loop.time()
            if left <= 0:
                logger.warning("handover: the new svcproxy did not sync within %.0fs; stopping anyway", timeout)
                return "timeout"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return "synced"

    async def close(self) -> None:
        if self._claim is not None:
            self._claim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._claim
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in [*self._successors, *([self._predecessor] if self._predecessor else [])]:
            writer.close()
