"""Logging: text or JSON lines (``--logging-format``, as kube-proxy's), and repeated warnings and
errors rate-limited, so that a fault that recurs for every connection cannot flood the log.

A message is identified by its logger and its format string (not its arguments): "cannot dial
%s:%d" for a thousand endpoints is one message. Each may be logged ``BURST`` times, then once per
``EVERY`` seconds; the next one that gets through says how many were suppressed meanwhile.
Debug and info messages are never suppressed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

BURST = 5
EVERY = 10.0
FORMATS = ("text", "json")
HANDLER = "svcproxy"


class RateLimit(logging.Filter):
    def __init__(self, *, burst: int = BURST, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.every = every
        self._clock = clock
        self._seen: dict[tuple[str, object], tuple[float, float, int]] = {}
        """(logger, format) -> (tokens, when they were counted, suppressed since the last one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = self._clock()
        tokens, since, suppressed = self._seen.get(key, (float(self.burst), now, 0))
        tokens = min(float(self.burst), tokens + (now - since) / self.every)
        if tokens < 1.0:
            self._seen[key] = (tokens, now, suppressed + 1)
            return False
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
        self._seen[key] = (tokens - 1.0, now, 0)
        if len(self._seen) > 10_000:  # a bound, whatever logs: forget the quiet ones
            self._seen = {k: v for k, v in self._seen.items() if v[0] < self.burst}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (Unix seconds), level, logger, msg, and err with a traceback;
    ``worker`` in a worker process's lines."""

    def __init__(self, worker: int = 0) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {"ts": round(record.created, 6), "level": record.levelname.lower(),
                                   "logger": record.name, "msg": record.getMessage()}
        if self.worker:
            line["worker"] = self.worker
        if record.exc_info:
            line["err"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: int, fmt: str = "text", worker: int = 0) -> None:
    """Configure the root logger: stderr, ``fmt`` (text or json), repeated warnings rate-limited;
    ``worker``: the index of a --workers helper process, named in each line."""
    handler = logging.StreamHandler(sys.stderr)
    where = f" worker {worker}" if worker else ""
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else
                         logging.Formatter(f"%(asctime)s %(levelname).1s{where} %(name)s: %(message)s"))
    handler.addFilter(RateLimit())
    handler.set_name(HANDLER)
    root = logging.getLogger()
    remove()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def current() -> tuple[int, str]:
    """The level and format :func:`setup` configured (what a worker process should use too)."""
    root = logging.getLogger()
    fmt = "text"
    for handler in root.handlers:
        if handler.get_name() == HANDLER and isinstance(handler.formatter, JsonFormatter):
            fmt = "json"
    return root.getEffectiveLevel(), fmt


def remove() -> None:
    """Take out the handler :func:`setup` added (others, such as a test runner's, stay)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER]:
        root.removeHandler(old)
