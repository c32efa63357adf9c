"""Self-checking demonstrations of sockmap-splice semantics (not pytest).

  python -m benchmarks.sockmap.semantics            # all checks
  python -m benchmarks.sockmap.semantics halfclose  # one check

Every check uses loopback only (127.0.0.1 relay, 127.0.0.2 backend), is bounded
in bytes and time, and prints FINDING lines.  The byte stream is a sequence of
big-endian u64 word indexes so loss or reordering is detected exactly.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

from benchmarks.sockmap.relay import Relay, abort, outq

MiB = 1 << 20
WORDS = MiB // 8


def chunk(i: int) -> bytes:
    """i-th MiB of the reference stream."""
    base = i * WORDS
    return struct.pack(f">{WORDS}Q", *range(base, base + WORDS))


def first_mismatch(data: bytes) -> int | None:
    """Offset of the first byte that differs from the reference stream, or None."""
    for i in range(0, len(data), MiB):
        part = data[i:i + MiB]
        ref = chunk(i // MiB)[:len(part)]
        if part != ref:
            for j in range(0, len(part), 8):
                if part[j:j + 8] != ref[j:j + 8]:
                    return i + j
    return None


def sockstat_tcp_mem_pages() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    return -1


class Backend:
    """Accepts one connection; reads when self.reading is set; records bytes."""

    def __init__(self):
        self.srv = socket.create_server(("127.0.0.2", 0))
        self.addr = self.srv.getsockname()
        self.reading = threading.Event()
        self.conn = None
        self.data = bytearray()
        self.eof = threading.Event()
        self.error: str | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.srv.settimeout(10)
        try:
            self.conn, _ = self.srv.accept()
        except OSError as e:
            self.error = repr(e)
            return
        self.accepted.set()
        self.conn.settimeout(0.2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.reading.is_set():
                time.sleep(0.01)
                continue
            try:
                b = self.conn.recv(MiB)
            except TimeoutError:
                continue
            except OSError as e:
                self.error = repr(e)
                break
            if not b:
                self.eof.set()
                break
            self.data += b

    def wait_bytes(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.data) < n and not self.eof.is_set() \
                and self.error is None:
            time.sleep(0.005)
        return len(self.data) >= n


def setup(mode="sockmap", reading=True, **kw):
    be = Backend()
    if reading:
        be.reading.set()
    r = Relay(mode, ("127.0.0.1", 0), be.addr, **kw).start()
    c = socket.create_connection(r.addr, timeout=5)
    be.accepted.wait(5)
    time.sleep(0.05)  # let the relay pair the sockets
    return r, be, c


def push(c: socket.socket, total: int, seconds: float, start: int = 0) -> int:
    """Non-blocking push of the reference stream from byte ``start``; returns bytes accepted."""
    c.setblocking(False)
    sent, end = 0, time.monotonic() + seconds
    idx, off = divmod(start, MiB)
    cur = chunk(idx)
    while sent < total and time.monotonic() < end:
        try:
            n = c.send(memoryview(cur)[off:])
        except BlockingIOError:
            time.sleep(0.002)
            continue
        sent += n
        off += n
        if off == len(cur):
            idx += 1
            cur, off = chunk(idx), 0
    c.setblocking(True)
    return sent


def finding(name: str, ok: bool | None, text: str) -> None:
    tag = {True: "OK  ", False: "FAIL", None: "NOTE"}[ok]
    print(f"[{tag}] {name}: {text}", flush=True)


# ------------------------------------------------------------------------------
def check_basic():
    r, be, c = setup()
    n = 8 * MiB
    sent = push(c, n, 10)
    got = be.wait_bytes(n, 10)
    bad = first_mismatch(bytes(be.data))
    be.conn.sendall(b"pong")
    c.settimeout(2)
    reply = c.recv(10)
    finding("basic", got and bad is None and reply == b"pong",
            f"sent {sent} B client->backend, backend got {len(be.data)} B intact={bad is None}; "
            f"reply {reply!r}; bytes copied by userspace (fallback) = {r.stats['fallback_bytes']}")
    c.close()
    r.stop()


def check_early_data():
    """Client bytes that arrive before the relay inserts the sockets."""
    for label, size, kick in (("<=1 MiB early (one send), then more data", 64 * 1024, False),
                              ("window filled before insertion, no kick", 4 * MiB, False),
                              ("window filled before insertion, SO_RCVLOWAT kick", 4 * MiB, True)):
        be = Backend()
        be.reading.set()
        r = Relay("sockmap", ("127.0.0.1", 0), be.addr, kick=kick)
        c = socket.create_connection(r.addr, timeout=5)
        early = push(c, size, 1)  # lands in A's receive queue before accept+pair
        time.sleep(0.1)
        r.start()
        ok1 = be.wait_bytes(early, 3)
        got1 = len(be.data)
        rest = push(c, 2 * MiB, 3, start=early) if ok1 or size < MiB else 0
        ok2 = be.wait_bytes(early + rest, 3)
        bad = first_mismatch(bytes(be.data))
        finding(f"early-data [{label}]", None,
                f"{early / 1024:.0f} KiB accepted by the kernel before insertion; backend had "
                f"{got1 / 1024:.0f} KiB after 3 s; after more data: {len(be.data) / 1024:.0f} of "
                f"{(early + rest) / 1024:.0f} KiB, in order={bad is None}, stalled={not ok2}")
        c.close()
        r.stop()


def check_halfclose():
    """Client pushes up to 32 MiB while the backend is paused, then SHUT_WR."""
    for label, mode, kw in (("user relay", "user", {}),
                            ("sockmap, no watcher", "sockmap", {"watch": False}),
                            ("sockmap, shutdown at once", "sockmap", {"drain_before_shutdown": False}),
                            ("sockmap, drain then shutdown", "sockmap", {"drain_before_shutdown": True})):
        lost_runs, eof_runs, runs = 0, 0, 3
        detail, rev = "", None
        for _ in range(runs):
            r, be, c = setup(mode=mode, reading=False, **kw)
            sent = push(c, 32 * MiB, 2)
            c.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            be.reading.set()
            be.eof.wait(5)
            time.sleep(0.05)
            eof = be.eof.is_set()
            eof_runs += eof
            if len(be.data) < sent:
                lost_runs += 1
                detail = f" (e.g. backend got {len(be.data) / MiB:.2f} of {sent / MiB:.2f} MiB)"
            if be.conn is not None and eof:  # reverse direction after the half-close
                try:
                    be.conn.sendall(b"after-half-close")
                    be.conn.close()
                    c.settimeout(2)
                    rev = c.recv(100) + b"|" + c.recv(100)
                except OSError as e:
                    rev = repr(e)
            c.close()
            r.stop()
        finding(f"half-close [{label}]", None,
                f"FIN reached backend in {eof_runs}/{runs} runs; bytes missing at backend in "
                f"{lost_runs}/{runs} runs{detail}; backend->client after half-close then close: "
                f"{rev!r}; spurious EPIPE reads {r.stats.get('spurious_epipe')}")


def check_slow_reader():
    cap = 512 * MiB
    for mode in ("user", "sockmap"):
        mem0 = sockstat_tcp_mem_pages()
        r, be, c = setup(mode=mode, reading=False)
        sent = push(c, cap, 4)
        time.sleep(0.3)
        mem1 = sockstat_tcp_mem_pages()
        d = r.conns[0]["d"]
        try:
            dq = outq(d)
        except OSError:
            dq = -1
        cq = outq(c)
        be.reading.set()
        complete = be.wait_bytes(sent, 20)
        bad = first_mismatch(bytes(be.data[:sent]))
        finding(f"slow-reader [{mode}]", None,
                f"backend not reading for 4 s: client pushed {sent / MiB:.1f} MiB "
                f"(cap {cap // MiB} MiB), client SIOCOUTQ {cq / MiB:.1f} MiB, relay->backend "
                f"SIOCOUTQ {dq / MiB:.1f} MiB, TCP mem +{(mem1 - mem0) * 4 / 1024:.1f} MiB; "
                f"after reader resumed: got {len(be.data) / MiB:.1f} MiB complete={complete} "
                f"intact={bad is None}")
        c.close()
        r.stop()


def check_reset():
    for label, kw in (("no-watcher", {"watch": False}), ("watcher", {})):
        r, be, c = setup(**kw)
        push(c, 4 * MiB, 5)
        be.wait_bytes(4 * MiB, 5)
        t0 = time.monotonic()
        abort(c)  # RST towards the relay's accepted socket
        end = t0 + 3
        while time.monotonic() < end and be.error is None and not be.eof.is_set():
            time.sleep(0.002)
        dt = time.monotonic() - t0
        seen = be.error or ("EOF" if be.eof.is_set() else "nothing within 3 s")
        finding(f"reset [{label}]", None,
                f"client RST -> backend saw {seen} after {dt * 1000:.0f} ms "
                f"(resets forwarded by userspace: {r.stats['resets_forwarded']})")
        r.stop()


def check_removal():
    for label, which, on_miss in (("remove both entries", "both", "pass"),
                                  ("remove only backend-socket entry, on_miss=pass", "d", "pass"),
                                  ("remove only backend-socket entry, on_miss=drop", "d", "drop")):
        r, be, c = setup(reading=False, on_miss=on_miss)
        st = r.conns[0]
        sent1 = push(c, 64 * MiB, 2)
        time.sleep(0.2)
        r.unpair(st, which)  # "d": entry key(A) -> D removed, D leaves the map
        sent2 = push(c, 8 * MiB, 3, start=sent1)
        total = sent1 + sent2
        be.reading.set()
        be.wait_bytes(total, 10)
        time.sleep(0.3)
        got = len(be.data)
        bad = first_mismatch(bytes(be.data))
        finding(f"removal [{label}]", None,
                f"{sent1 / MiB:.1f} MiB queued (reader paused) when removed, +{sent2 / MiB:.1f} MiB "
                f"after; backend got {got / MiB:.2f} of {total / MiB:.2f} MiB, "
                f"lost {(total - got) / MiB:.2f} MiB, first corrupt offset "
                f"{bad if bad is None else f'{bad / MiB:.2f} MiB'}; userspace fallback copied "
                f"{r.stats['fallback_bytes'] / MiB:.2f} MiB")
        c.close()
        r.stop()


CHECKS = {"basic": check_basic, "early": check_early_data, "halfclose": check_halfclose,
          "slow": check_slow_reader, "reset": check_reset, "removal": check_removal}


def main(argv):
    names = argv or list(CHECKS)
    for n in names:
        try:
            CHECKS[n]()
        except Exception as e:  # report and continue with the next check
            finding(n, False, f"exception {e!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
