"""Choosing the forwarding mode (``--forwarding``): one constructor per mode behind the seam."""

from __future__ import annotations

import asyncio

from proxy.dataplane import relay, tcp
from proxy.dataplane.connections import MODES, Connections, Forwarder
from proxy.dataplane.listeners import BACKLOG


def forwarder(mode: str, loop: asyncio.AbstractEventLoop, connections: Connections, *, shared: bool = False
              ) -> Forwarder:
    """``shared``: other processes accept from the same listeners (--workers), so each takes one
    connection per wake-up and they share the queue."""
    if mode == "transports":
        return tcp.TransportForwarder(loop, connections, BACKLOG)
    if mode in MODES:
        return relay.SocketForwarder(loop, connections, splice=mode == "splice", accept_batch=1 if shared else 32)
    raise ValueError(f"unknown forwarding mode {mode!r} (one of {', '.join(MODES)})")
