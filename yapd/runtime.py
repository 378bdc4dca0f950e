"""What the server, the turns and the admin socket share: the live config, the
engines, metrics, the connection registry, and per-engine prompt pieces."""

from __future__ import annotations

import collections
import hmac
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from yapd.config import Config
from yapd.engines.base import Engine
from yapd.gcpause import GcPauses
from yapd.looplag import LoopLag
from yapd.metrics import Metrics
from yapd.prompts import ChatLayout, SharedTexts, encoder, persona_styles
from yapd.toolcall import instruction_block

if TYPE_CHECKING:
    from yapd.session import Session

Role = Literal["chat", "tool"]
TOOL_SYSTEM = "You are a helpful assistant."


@dataclass
class Capacity:
    active: int
    max: int

    def as_json(self) -> dict[str, Any]:
        return {"active": self.active, "max": self.max, "available": max(0, self.max - self.active),
                "at_capacity": self.active >= self.max}


class RecentStats:
    """The last few hundred turn latencies, for yapctl's charts."""

    def __init__(self, size: int = 300) -> None:
        self.ttft_ms: collections.deque[float] = collections.deque(maxlen=size)
        self.tool_ms: collections.deque[float] = collections.deque(maxlen=size)
        self.turns = 0

    def record(self, ttft_ms: float | None, tool_ms: float | None) -> None:
        self.turns += 1
        if ttft_ms is not None:
            self.ttft_ms.append(ttft_ms)
        if tool_ms is not None:
            self.tool_ms.append(tool_ms)

    def snapshot(self) -> dict[str, Any]:
        return {"turns": self.turns, "ttft_ms": list(self.ttft_ms), "tool_ms": list(self.tool_ms)}


@dataclass
class _ToolPrefix:
    key: tuple[Any, ...]
    ids: list[int]
    tail_ids: list[int]


@dataclass
class Runtime:
    cfg: Config
    metrics: Metrics = field(default_factory=Metrics)
    recent: RecentStats = field(default_factory=RecentStats)
    engines: dict[str, Engine] = field(default_factory=dict)
    sessions: set[Session] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    stopping: bool = False
    # Roles whose engines a restart is draining, stopping and starting: no new turns
    # (a drain that kept admitting them never ran dry under steady load).
    restarting: set[str] = field(default_factory=set)
    version: str = ""
    # The daemon's MPS state (yapd/mps.py), read when /status is asked.
    mps_status: Callable[[], dict[str, Any]] | None = None
    loop_lag: LoopLag = field(default_factory=LoopLag)
    gc_pauses: GcPauses = field(default_factory=GcPauses)
    _layouts: dict[int, ChatLayout] = field(default_factory=dict)
    _tool_prefix: _ToolPrefix | None = None
    _shared_texts: dict[str, tuple[Any, SharedTexts]] = field(default_factory=dict)
    # Each turn's number, in its engine requests' ids: clients choose their own request
    # ids, and two sessions (or a barge-in reusing one) may choose the same.
    _turn_numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def turn_number(self) -> int:
        return next(self._turn_numbers)

    # --- engines -------------------------------------------------------------------

    def engine(self, role: Role) -> Engine | None:
        return self.engines.get(role)

    def _missing(self) -> dict[str, str]:
        """Deployed roles with no engine object: a restart between stopping the old one
        and making its successor, or the first start before it makes them (an AWQ build,
        MPS's start)."""
        return {r: "restarting" if r in self.restarting else "starting"
                for r in ("chat", "tool") if self.cfg.deployed(r) and r not in self.engines}

    def engine_states(self) -> dict[str, str]:
        """Each engine's state, a deployed one without an engine object included (an
        alert on it must see it down, not gone)."""
        return {**{r: e.health().state for r, e in self.engines.items()}, **self._missing()}

    def engines_up(self) -> dict[str, bool]:
        return {**{r: e.health().ok for r, e in self.engines.items()}, **dict.fromkeys(self._missing(), False)}

    def engines_ready(self) -> bool:
        roles = [r for r in ("chat", "tool") if self.cfg.deployed(r)]
        return bool(roles) and all(
            r not in self.restarting and (e := self.engines.get(r)) is not None and e.health().ok for r in roles
        )

    def layout(self, engine: Engine) -> ChatLayout:
        tok = engine.tokenizer
        key = id(tok)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = ChatLayout.from_tokenizer(tok)
        return layout

    def shared_texts(self, role: str, tok: Any) -> SharedTexts:
        """Every session's personas for ``role``'s engine, tokenized once by ``tok``; a
        restarted engine's new tokenizer starts them afresh (its ids may differ)."""
        held = self._shared_texts.get(role)
        if held is None or held[0] is not tok:
            held = self._shared_texts[role] = (tok, SharedTexts(encoder(tok)))
        return held[1]

    def tool_prefix(self, engine: Engine) -> tuple[list[int], list[int]]:
        """Token ids of the Hammer prompt up to the query, and of its tail (cached per
        tokenizer and tool list: the prefix is the same for every turn)."""
        tok = engine.tokenizer
        key = (id(tok), tuple((t.name, t.description, repr(t.parameters)) for t in self.cfg.tools))
        if self._tool_prefix is None or self._tool_prefix.key != key:
            layout = self.layout(engine)
            head = layout.head + TOOL_SYSTEM + layout.middle if layout.system_role else layout.head
            ids = tok.encode(head + instruction_block(self.cfg.tools), add_special_tokens=False)
            tail = tok.encode(layout.tail, add_special_tokens=False)
            self._tool_prefix = _ToolPrefix(key, list(ids), list(tail))
        return self._tool_prefix.ids, self._tool_prefix.tail_ids

    def models(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for role in ("chat", "tool"):
            e = self.engines.get(role)
            out[role] = e.model if e is not None and self.cfg.deployed(role) else None
        return out

    # --- auth and capacity ---------------------------------------------------------

    def check_key(self, key: str | None) -> str | None:
        """The matching configured key, compared in constant time, or None."""
        if not key:
            return None
        found = None
        given = key.encode()
        for candidate in self.cfg.server.api_keys:
            # Compare against every key so timing tells nothing about which one matched.
            if hmac.compare_digest(given, candidate.encode()):
                found = candidate
        return found

    def capacity(self) -> Capacity:
        return Capacity(len(self.sessions), self.cfg.max_connections)

    def sessions_for_key(self, key: str) -> int:
        return sum(1 for s in self.sessions if s.api_key == key)

    def styles(self) -> dict[str, str]:
        return persona_styles(self.cfg.personas)

    def status(self, window_s: float | None = None) -> dict[str, Any]:
        """``window_s``: the span the event loop's lag and the long collections are read
        over (their kept window by default)."""
        return {
            "version": self.version,
            # Which replica answered, behind a balancer (packaging/haproxy/).
            "instance": f"{socket.gethostname()}:{os.getpid()}",
            "deploy": self.cfg.engines.deploy,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.engines_ready(),
            "draining": self.draining,
            "restarting": sorted(self.restarting),
            "capacity": self.capacity().as_json(),
            "models": self.models(),
            "engines": {**{role: e.describe() for role, e in self.engines.items()},
                        **{role: {"role": role, "state": state, "ok": False, "in_flight": 0}
                           for role, state in self._missing().items()}},
            "concurrent_mode": self.cfg.turn.concurrent,
            "mps": self.mps_status() if self.mps_status is not None else None,
            "loop_lag_ms": self.loop_lag.snapshot(window_s),
            "gc_pauses": self.gc_pauses.snapshot(window_s),
            "demo": self.cfg.demo,
        }
