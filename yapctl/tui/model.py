"""The dashboard's state without a screen or a socket: reconnect timing, the log
book behind the log pane, and the small formatting the panels share."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_NO = {name: (i + 1) * 10 for i, name in enumerate(LEVELS)}


class Backoff:
    """Delays between reconnect attempts: doubling from ``first`` up to ``cap``.

    No jitter: the only peer is one local daemon, and a connect to a Unix socket that
    nobody serves costs nothing, so there is no herd to spread out."""

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.first = first
        self.cap = max(cap, first)
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class LogLine:
    seq: int
    ts: float
    level: str
    logger: str
    message: str
    marker: bool = False  # a line of ours (a daemon restart), not the daemon's

    @classmethod
    def from_event(cls, msg: dict[str, Any]) -> LogLine:
        return cls(seq=int(msg.get("seq", 0)), ts=float(msg.get("ts", 0.0)), level=str(msg.get("level", "info")),
                   logger=str(msg.get("logger", "")), message=str(msg.get("message", "")))

    def matches(self, floor: int, needle: str) -> bool:
        if self.marker:
            return True
        if LEVEL_NO.get(self.level, 0) < floor:
            return False
        return not needle or needle in self.message.lower() or needle in self.logger.lower()


class LogBook:
    """Every log line received, with the pane's filter applied on the client side.

    Filtering here rather than asking the daemon again means a filter change redraws at
    once from what is already held, and a reconnect never loses the operator's view.
    On a re-subscribe the daemon sends its recent lines again; a line already held
    (same sequence number and timestamp: the same record of the same daemon) is dropped,
    so a dropped connection does not repeat lines, while a restarted daemon, whose
    numbering starts over, gets all of its lines shown."""

    def __init__(self, size: int = 5000) -> None:
        self.lines: collections.deque[LogLine] = collections.deque(maxlen=size)
        self._seen: set[tuple[int, float]] = set()
        self.level = "debug"
        self.search = ""

    @property
    def floor(self) -> int:
        return LEVEL_NO.get(self.level, 0)

    def add(self, line: LogLine) -> bool:
        """Keep ``line``; False when it is a repeat already held."""
        key = (line.seq, line.ts)
        if not line.marker:
            if key in self._seen:
                return False
            self._seen.add(key)
        if len(self.lines) == self.lines.maxlen:
            old = self.lines[0]
            self._seen.discard((old.seq, old.ts))
        self.lines.append(line)
        return True

    def mark(self, text: str) -> LogLine:
        line = LogLine(seq=0, ts=time.time(), level="info", logger="yapctl", message=text, marker=True)
        self.add(line)
        return line

    def visible(self, line: LogLine) -> bool:
        return line.matches(self.floor, self.search.lower())

    def shown(self, limit: int | None = None) -> list[LogLine]:
        out = [line for line in self.lines if self.visible(line)]
        return out[-limit:] if limit else out


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def ms(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.1f}"


def numbers(values: Any) -> list[float]:
    """The numeric items of a JSON list (the daemon's stats), anything else dropped."""
    if not isinstance(values, Iterable) or isinstance(values, (str, bytes, dict)):
        return []
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
