"""Logging for the `kvnet` command: one stderr handler, quiet libp2p, and no floods.

Why this exists: py-libp2p logs a line per failed dial or DHT request, so a node whose peers left
printed hundreds of lines a minute into the output of `fetch` and `generate`. `setup(level)` gives
every command one handler on stderr, keeps libp2p's loggers quiet unless the level is debug or info,
and rate-limits: the same message (same logger, level and format string) is printed at most once per
`RATE_LIMIT_S` seconds; the next time it is printed it says how many copies were held back.

Importing libp2p resets its logger (it clears its handlers, sets WARNING and stops propagation), so
`setup` must run again after libp2p is imported; it is idempotent and cheap.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "warning"
RATE_LIMIT_S = 5.0
_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Loggers of noisy libraries. libp2p logs every failed dial to a departed peer at ERROR, so at the
# default level they are held at CRITICAL; --log-level info shows their errors, debug everything.
NOISY = ("libp2p", "multiaddr", "async_service")

_level = DEFAULT_LEVEL


class RateLimitFilter(logging.Filter):
    """Let a repeated message through at most once per `interval` seconds, with a count of the held-back ones.

    Messages are keyed by (logger name, level, format string): a dial failure to a different peer
    has the same format string, so a flood of them collapses to one line per interval."""

    def __init__(self, interval: float = RATE_LIMIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, int, str], float] = {}
        self._held: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [{held} similar messages suppressed in the last {self.interval:g} s]"
        return True


class NoisyFilter(logging.Filter):
    """Hold records of the NOISY libraries below `level`, whatever level their own loggers have.

    Setting the `libp2p` logger's level is not enough: some libp2p modules set their own logger's
    level (INFO) when their objects are created, after `setup` ran."""

    def __init__(self, level: int = logging.CRITICAL) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(record.name == n or record.name.startswith(n + ".") for n in NOISY)
        return not noisy or record.levelno >= self.level


class _Handler(logging.StreamHandler):
    """kvnet's own handler (marked, so `setup` never stacks a second one). It writes to whatever
    sys.stderr is at the time, so a redirected or captured stderr gets the messages."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.noisy = NoisyFilter()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def level_number(level: str) -> int:
    """The logging level for one of LEVELS (case-insensitive); ValueError otherwise."""
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    return getattr(logging, name.upper())


def setup(level: str | None = None) -> None:
    """Configure logging for a command (level: debug/info/warning/error; None keeps the last one).

    Call it when the command starts and again after anything imports libp2p."""
    global _level
    if level is not None:
        level_number(level)
        _level = level.lower()
    number = level_number(_level)
    root = logging.getLogger()
    existing = [h for h in root.handlers if isinstance(h, _Handler)]
    if existing:
        handler = existing[0]
    else:
        handler = _Handler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(handler.noisy)
        handler.addFilter(RateLimitFilter())
        root.addHandler(handler)
    root.setLevel(number)
    noisy_level = {logging.DEBUG: logging.DEBUG, logging.INFO: logging.ERROR}.get(number, logging.CRITICAL)
    handler.noisy.level = noisy_level
    for name in NOISY:
        lib = logging.getLogger(name)
        lib.handlers.clear()  # libp2p's own (queue) handler, if LIBP2P_DEBUG installed one
        lib.propagate = True  # through our handler and its rate limit
        lib.setLevel(noisy_level)


def current() -> str:
    """The level last passed to `setup` (so later re-runs after imports keep it)."""
    return _level
