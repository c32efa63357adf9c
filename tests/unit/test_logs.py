"""Logging: JSON lines, and repeated warnings rate-limited per message (not per argument)."""

from __future__ import annotations

import json
import logging

from proxy.logs import JsonFormatter, RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.ERROR, name: str = "proxy.x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_error_is_let_through_in_a_burst_then_once_per_interval() -> None:
    clock = Clock()
    limit = RateLimit(burst=3, every=10.0, clock=clock)
    passed = [limit.filter(record("cannot dial %s", f"10.0.0.{i}")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another message")) is True  # each message has its own budget
    clock.now = 10.0
    r = record("cannot dial %s", "10.0.0.99")
    assert limit.filter(r) is True
    assert r.getMessage() == "cannot dial 10.0.0.99 (7 similar messages suppressed)"
    assert limit.filter(record("cannot dial %s", "x")) is False


def test_info_and_debug_are_never_limited() -> None:
    limit = RateLimit(burst=1, every=3600.0, clock=Clock())
    assert all(limit.filter(record("sync done", level=logging.INFO)) for _ in range(100))


def test_json_lines() -> None:
    r = record("listening on %s", "10.96.0.10:80/TCP", level=logging.INFO, name="proxy.proxier")
    line = json.loads(JsonFormatter().format(r))
    assert line["level"] == "info" and line["logger"] == "proxy.proxier"
    assert line["msg"] == "listening on 10.96.0.10:80/TCP" and isinstance(line["ts"], float)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        r = logging.LogRecord("proxy.app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(r))
    assert "ValueError: boom" in line["err"] and "\n" not in JsonFormatter().format(r)


def test_worker_processes_log_as_their_parent_does_and_say_which_they_are() -> None:
    from proxy import logs

    record = logging.LogRecord("proxy.dataplane.tcp", logging.WARNING, __file__, 1, "cannot dial %s", ("x",), None)
    try:
        logs.setup(logging.INFO, "json")
        assert logs.current() == (logging.INFO, "json")
        logs.setup(logging.INFO, "json", worker=2)
        handler = next(h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER)
        assert handler.formatter is not None
        assert json.loads(handler.formatter.format(record))["worker"] == 2
        logs.setup(logging.DEBUG, "text", worker=3)
        assert logs.current() == (logging.DEBUG, "text")
        handler = next(h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER)
        assert handler.formatter is not None
        assert " worker 3 proxy.dataplane.tcp: cannot dial x" in handler.formatter.format(record)
    finally:
        logs.remove()
        logging.getLogger().setLevel(logging.WARNING)
