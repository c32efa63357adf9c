"""Steering a SO_REUSEPORT group to its newest socket, so a restart hands traffic over cleanly.

Two svcproxy instances on one node (an old one and its replacement during a restart) bind the
same service addresses with SO_REUSEPORT. Left alone, the kernel spreads new connections and
datagrams over both by a hash, and whatever sits in the old one's queues when it closes is lost:
a TCP listener resets its unaccepted connections, a UDP socket drops its unread datagrams.

So every listener attaches a classic BPF program to its group that picks socket index 1. A group
of one has no index 1 and the kernel falls back to its hash, as without a program; in a group of
two, index 1 is the socket that joined last: the new instance's. From the moment the new instance
opens a listener, new connections and datagrams all go to it, and the old instance only finishes
what it holds. When the old socket closes, the kernel moves the new one to index 0, and the group
is a group of one again.
"""

from __future__ import annotations

import ctypes
import logging
import socket

logger = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K: return a constant
NEWEST = 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_PROGRAM = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, NEWEST))
_FPROG = bytes(_SockFprog(1, ctypes.cast(_PROGRAM, ctypes.POINTER(_SockFilter))))  # _PROGRAM lives on: module level
_unsupported_logged = False


def steer_to_newest(sock: socket.socket) -> bool:
    """Attach the program to ``sock``'s reuseport group; False (logged once) where the kernel cannot."""
    global _unsupported_logged
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, _FPROG)
    except OSError as e:
        if not _unsupported_logged:
            _unsupported_logged = True
            logger.warning("cannot steer reuseport groups to the newest socket (%s): a restart may reset "
                           "connections queued at the old instance", e.strerror or e)
        return False
    return True
