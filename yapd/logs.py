"""Logging: one line per event to stderr (journald adds its own timestamps), an
optional rotating file, and an in-memory ring that yapctl reads and follows."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import logging.handlers
import os
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any

from yapd.config import LoggingConfig
from yapd.unseen import visible


@dataclass(frozen=True)
class LogRecord:
    seq: int
    ts: float
    level: str
    logger: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "level": self.level, "logger": self.logger, "message": self.message}


class RingHandler(logging.Handler):
    """Keeps the last N records and feeds followers; safe to call from any thread."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.ring: collections.deque[LogRecord] = collections.deque(maxlen=size)
        self._seq = 0
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[LogRecord]]] = set()
        # A forked child (an EngineCore) that logs must not feed the parent's followers:
        # their loop is the parent's, and a call_soon_threadsafe from the child would write
        # to that loop's wakeup descriptor, which the child shares.
        os.register_at_fork(after_in_child=functools.partial(_forget_followers, weakref.ref(self)))

    def resize(self, size: int) -> None:
        """Keep the last ``size`` records from now on (a reload's logging.ring_lines)."""
        if size != self.ring.maxlen:
            self.ring = collections.deque(self.ring, maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # pragma: no cover - a broken format string must not kill logging
            msg = str(record.msg)
        self._seq += 1
        rec = LogRecord(self._seq, record.created, record.levelname.lower(), record.name, visible(msg))
        self.ring.append(rec)
        for loop, queue in list(self._followers):
            try:
                loop.call_soon_threadsafe(_offer, queue, rec)
            except RuntimeError:
                self._followers.discard((loop, queue))

    def tail(self, n: int) -> list[LogRecord]:
        if n <= 0:
            return []
        return list(self.ring)[-n:]

    def follow(self, maxsize: int = 1000) -> asyncio.Queue[LogRecord]:
        queue: asyncio.Queue[LogRecord] = asyncio.Queue(maxsize)
        self._followers.add((asyncio.get_running_loop(), queue))
        return queue

    def unfollow(self, queue: asyncio.Queue[LogRecord]) -> None:
        self._followers = {f for f in self._followers if f[1] is not queue}


def _forget_followers(ref: weakref.ref[RingHandler]) -> None:
    handler = ref()
    if handler is not None:
        handler._followers = set()


def _offer(queue: asyncio.Queue[LogRecord], rec: LogRecord) -> None:
    # A follower that cannot keep up loses lines rather than stalling the daemon.
    if not queue.full():
        queue.put_nowait(rec)


class LineFormatter(logging.Formatter):
    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        msg = visible(record.getMessage()).replace("\n", "\\n")
        line = f"{record.levelname.lower()} {record.name}: {msg}"
        if record.exc_info:
            line += " | " + visible(self.formatException(record.exc_info)).replace("\n", "\\n")
        if self.timestamps:
            t = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            line = f"{t}.{int(record.msecs):03d} {line}"
        return line


class SafeRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A full disk or a vanished log directory must not take the daemon down: report
    the first failure on stderr, drop file lines until writing works again."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            print(f"yapd: log file {self.baseFilename} unwritable; continuing on stderr only",
                  file=sys.stderr, flush=True)


_ours: list[logging.Handler] = []


def setup(cfg: LoggingConfig, ring: RingHandler | None = None) -> RingHandler:
    """(Re)configure the root logger; returns the ring handler (kept across reloads)."""
    root = logging.getLogger()
    for h in _ours:
        root.removeHandler(h)
        if not isinstance(h, RingHandler):
            try:
                h.close()
            except OSError as exc:
                # A file handler's close flushes: on a full disk it raises, and the reload
                # that called us stopped half-way with no handler left on stderr.
                print(f"yapd: closing log handler {h}: {exc}", file=sys.stderr, flush=True)
    _ours.clear()
    ts = cfg.timestamps == "on" or (cfg.timestamps == "auto" and not os.environ.get("JOURNAL_STREAM"))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(LineFormatter(ts))
    _ours.append(stderr)
    if cfg.file:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.file)), exist_ok=True)
            fh = SafeRotatingFileHandler(cfg.file, maxBytes=cfg.file_max_bytes, backupCount=cfg.file_backups,
                                         delay=True)
            fh.setFormatter(LineFormatter(True))
            _ours.append(fh)
        except OSError as exc:
            print(f"yapd: cannot open log file {cfg.file}: {exc}", file=sys.stderr, flush=True)
    if ring is None:
        ring = RingHandler(cfg.ring_lines)
    ring.resize(cfg.ring_lines)
    _ours.append(ring)
    for h in _ours:
        root.addHandler(h)
    set_level(cfg.level)
    # Libraries that log per request at INFO would drown the daemon's own lines.
    for noisy in ("yapd.websockets", "httpx", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return ring


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
