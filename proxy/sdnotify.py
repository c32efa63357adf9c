"""systemd's readiness protocol (sd_notify): one datagram to $NOTIFY_SOCKET per state change.

Under ``Type=notify`` systemd waits for ``READY=1`` (sent after the first full sync, so
``systemctl start`` returns once Services are served) and learns from ``MAINPID=`` which
process to track when a reload hands the node over to a fresh svcproxy (see README, "Updates
and restarts"). Outside systemd there is no $NOTIFY_SOCKET and this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Send ``states`` (like "READY=1"); False when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as e:
        logger.warning("cannot notify systemd (%s): %s", ", ".join(states), e.strerror or e)
        return False
    return True
