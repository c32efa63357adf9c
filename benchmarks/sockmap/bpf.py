"""Minimal ctypes loader for a SOCKHASH + sk_skb verdict program (experiment only).

Nothing here is used by svcproxy itself; it backs the opt-in experiment in
``benchmarks/sockmap`` (see benchmarks/results/2026-12-01-sockmap.md).

Design
------
A proxied connection is a pair of TCP sockets held by the relay:

    A = accepted socket   (local = relay listen addr, remote = client)
    D = dialled socket    (local = relay ephemeral,   remote = backend)

Bytes that arrive on A must leave on D and vice versa.  An sk_skb verdict
program runs for every skb received on a socket that is in the map, with the
*receiving* socket's 4-tuple readable from ``struct __sk_buff``
(remote_ip4, local_ip4, remote_port, local_port).  The program therefore
builds a 16-byte key from exactly those four u32 fields, copied verbatim:

    key = remote_ip4 | local_ip4 | remote_port | local_port      (4 x u32)

and calls ``bpf_sk_redirect_hash(skb, map, &key, 0)`` (flags 0 = redirect to
the found socket's *egress*, i.e. transmit it).  Userspace inserts each
socket **under its peer's key**:

    map[key(A)] = D        map[key(D)] = A

so a lookup with the receiving socket's own tuple yields the peer.  Both
sockets are in the map, so both get the verdict program (bidirectional).
The 4-tuple is unique per TCP connection even on loopback (the relay side of
A shares its local port with every accepted socket, but remote port differs),
so many pairs can share one map.  A plain SOCKMAP (slot 2k <-> 2k+1) would
need a second map to get from the skb to a slot index, hence SOCKHASH.

Byte encoding of the key as the program sees it (x86_64, little endian), which
``tuple_key()`` reproduces in userspace:

* remote_ip4 / local_ip4: network byte order -> the 4 raw address bytes.
* remote_port: the kernel loads the 16-bit big-endian ``skc_dport`` and, on
  little-endian hosts, shifts it left by 16, so the in-memory u32 is
  ``00 00 hi lo`` == ``struct.pack('!I', port)``.
* local_port: host byte order u32 -> ``struct.pack('=I', port)``.

Constants and ``union bpf_attr`` offsets were taken from
/usr/include/linux/bpf.h (checked with offsetof()); see the results file.

``on_miss``: when the peer key is absent (peer removed from the map) the
helper returns SK_DROP and the skb would be silently discarded.  With
``on_miss="pass"`` the program returns SK_PASS regardless; no redirect is
recorded, so the kernel queues the data on the *receiving* socket, where
userspace can ``recv()`` it.  ``on_miss="drop"`` returns the helper's value.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import socket
import struct

# --- syscall / uapi constants (linux/bpf.h) -----------------------------------
_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}

BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9

BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_SKB_VERDICT = 38

BPF_ANY = 0
BPF_PSEUDO_MAP_FD = 1
BPF_FUNC_sk_redirect_hash = 72
SK_DROP, SK_PASS = 0, 1

ATTR_SIZE = 144  # sizeof(union bpf_attr) in the installed header

# __sk_buff field offsets readable by sk_skb programs
SKB_REMOTE_IP4 = 92
SKB_LOCAL_IP4 = 96
SKB_REMOTE_PORT = 132
SKB_LOCAL_PORT = 136

# --- instruction encoding -----------------------------------------------------
# class / size / mode / op bits
_LD, _LDX, _ST, _STX, _ALU, _JMP, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
_W, _DW = 0x00, 0x18
_IMM, _MEM = 0x00, 0x60
_K, _X = 0x00, 0x08
_ADD, _MOV = 0x00, 0xB0
_CALL, _EXIT = 0x80, 0x90

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One 8-byte eBPF instruction: u8 code, u8 (src<<4|dst), s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_reg(dst, src):
    return insn(_ALU64 | _MOV | _X, dst, src)


def mov64_imm(dst, imm):
    return insn(_ALU64 | _MOV | _K, dst, 0, 0, imm)


def add64_imm(dst, imm):
    return insn(_ALU64 | _ADD | _K, dst, 0, 0, imm)


def ldx_w(dst, src, off):
    return insn(_LDX | _MEM | _W, dst, src, off)


def stx_w(dst, src, off):
    return insn(_STX | _MEM | _W, dst, src, off)


def ld_map_fd(dst, fd):
    """16-byte BPF_LD_IMM64 with src=BPF_PSEUDO_MAP_FD (second half carries imm hi=0)."""
    return insn(_LD | _DW | _IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd) + insn(0, 0, 0, 0, 0)


def call(fn):
    return insn(_JMP | _CALL, 0, 0, 0, fn)


def exit_():
    return insn(_JMP | _EXIT)


def verdict_program(map_fd: int, on_miss: str = "pass") -> bytes:
    """sk_skb verdict: redirect to egress of map[own 4-tuple]."""
    if on_miss not in ("pass", "drop"):
        raise ValueError(on_miss)
    p = [
        mov64_reg(R6, R1),
        ldx_w(R2, R6, SKB_REMOTE_IP4), stx_w(R10, R2, -16),
        ldx_w(R2, R6, SKB_LOCAL_IP4), stx_w(R10, R2, -12),
        ldx_w(R2, R6, SKB_REMOTE_PORT), stx_w(R10, R2, -8),
        ldx_w(R2, R6, SKB_LOCAL_PORT), stx_w(R10, R2, -4),
        mov64_reg(R1, R6),
        ld_map_fd(R2, map_fd),
        mov64_reg(R3, R10), add64_imm(R3, -16),
        mov64_imm(R4, 0),  # flags 0: egress of the peer socket
        call(BPF_FUNC_sk_redirect_hash),
    ]
    if on_miss == "pass":
        p.append(mov64_imm(R0, SK_PASS))
    p.append(exit_())
    return b"".join(p)


# --- syscall plumbing ---------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BPFError(OSError):
    pass


def _nr() -> int:
    m = platform.machine()
    if m not in _SYSCALL_NR:
        raise BPFError(f"unsupported arch {m}")
    return _SYSCALL_NR[m]


def bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        e = ctypes.get_errno()
        raise BPFError(e, f"bpf(cmd={cmd}): {os.strerror(e)}")
    return ret


def _attr() -> ctypes.Array:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _addr(buf) -> int:
    return ctypes.addressof(buf)


def map_create(map_type: int = BPF_MAP_TYPE_SOCKHASH, key_size: int = 16,
               value_size: int = 4, max_entries: int = 4096, name: bytes = b"svcp_sockhash") -> int:
    a = _attr()
    struct.pack_into("<IIIII", a, 0, map_type, key_size, value_size, max_entries, 0)
    struct.pack_into("16s", a, 28, name[:15])
    return bpf(BPF_MAP_CREATE, a)


def prog_load(code: bytes, prog_type: int = BPF_PROG_TYPE_SK_SKB,
              name: bytes = b"svcp_verdict", log_size: int = 1 << 20) -> int:
    if len(code) % 8:
        raise ValueError("program length not a multiple of 8")
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    a = _attr()
    struct.pack_into("<IIQQ", a, 0, prog_type, len(code) // 8, _addr(insns), _addr(lic))
    struct.pack_into("16s", a, 48, name[:15])
    try:
        return bpf(BPF_PROG_LOAD, a)
    except BPFError as first:
        log = ctypes.create_string_buffer(log_size)
        struct.pack_into("<IIQ", a, 24, 1, log_size, _addr(log))  # log_level, log_size, log_buf
        try:
            return bpf(BPF_PROG_LOAD, a)  # should fail again, now with a log
        except BPFError as e:
            raise BPFError(e.errno, f"BPF_PROG_LOAD failed ({first}); verifier log:\n"
                           + log.value.decode(errors="replace")) from None


def prog_attach(prog_fd: int, map_fd: int, attach_type: int = BPF_SK_SKB_STREAM_VERDICT) -> None:
    a = _attr()
    struct.pack_into("<IIII", a, 0, map_fd, prog_fd, attach_type, 0)
    bpf(BPF_PROG_ATTACH, a)


def prog_detach(prog_fd: int, map_fd: int, attach_type: int = BPF_SK_SKB_STREAM_VERDICT) -> None:
    a = _attr()
    struct.pack_into("<IIII", a, 0, map_fd, prog_fd, attach_type, 0)
    bpf(BPF_PROG_DETACH, a)


def map_update(map_fd: int, key: bytes, value_fd: int, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(struct.pack("<I", value_fd), 4)
    a = _attr()
    struct.pack_into("<IIQQQ", a, 0, map_fd, 0, _addr(k), _addr(v), flags)
    bpf(BPF_MAP_UPDATE_ELEM, a)


def map_delete(map_fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    a = _attr()
    struct.pack_into("<IIQ", a, 0, map_fd, 0, _addr(k))
    bpf(BPF_MAP_DELETE_ELEM, a)


# --- key helpers --------------------------------------------------------------
def tuple_key(sock: socket.socket) -> bytes:
    """Key the verdict program computes for skbs *received on* ``sock``."""
    lip, lport = sock.getsockname()[:2]
    rip, rport = sock.getpeername()[:2]
    return (socket.inet_aton(rip) + socket.inet_aton(lip)
            + struct.pack("!I", rport) + struct.pack("=I", lport))


class SockHashSplicer:
    """Owns one SOCKHASH + attached verdict program; pairs sockets for splicing."""

    def __init__(self, max_entries: int = 4096, on_miss: str = "pass",
                 attach_type: int = BPF_SK_SKB_STREAM_VERDICT, kick: bool = True):
        self.attach_type = attach_type
        self.kick = kick
        self.map_fd = map_create(BPF_MAP_TYPE_SOCKHASH, 16, 4, max_entries)
        try:
            self.prog_fd = prog_load(verdict_program(self.map_fd, on_miss))
            prog_attach(self.prog_fd, self.map_fd, attach_type)
        except BaseException:
            os.close(self.map_fd)
            raise

    def pair(self, a: socket.socket, d: socket.socket) -> tuple[bytes, bytes]:
        ka, kd = tuple_key(a), tuple_key(d)
        map_update(self.map_fd, ka, d.fileno())  # data received on a -> d
        map_update(self.map_fd, kd, a.fileno())  # data received on d -> a
        if self.kick:
            # Bytes that arrived before insertion sit in the receive queue and
            # are only handed to the verdict program on the next data_ready.
            # If the client already filled the window, that never comes
            # (deadlock, measured).  Setting SO_RCVLOWAT makes tcp_set_rcvlowat()
            # call tcp_data_ready(), which runs the (now psock) data_ready.
            for s in (a, d):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return ka, kd

    def remove(self, key: bytes) -> bool:
        if self.map_fd < 0:
            return False
        try:
            map_delete(self.map_fd, key)
            return True
        except BPFError:
            return False

    def close(self) -> None:
        for fd in (getattr(self, "prog_fd", -1), self.map_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.map_fd = self.prog_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
