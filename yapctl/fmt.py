"""Small text formatters shared by the CLI and the TUI."""

from __future__ import annotations

from typing import Any


def ago(seconds: float) -> str:
    """A short duration for tables: 42s, 3m05s, 2h07m."""
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def backend(engine: dict[str, Any]) -> str:
    """An engine's backend as its status says it, how its EngineCore started (vLLM: forked
    or spawned) and where its front end runs when that is a process of its own
    (own_process: its engine host's pid)."""
    name = str(engine.get("backend", ""))
    notes = []
    if engine.get("core_started_by") in ("fork", "spawn"):
        notes.append("core forked" if engine["core_started_by"] == "fork" else "core spawned")
    if engine.get("host_pid"):
        notes.append(f"own process {engine['host_pid']}")
    return f"{name} ({', '.join(notes)})" if notes else name


def clip(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, the cut marked."""
    return text if len(text) <= most else text[:most - 1] + "…"
