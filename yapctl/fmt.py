"""Small text formatters shared by the CLI and the TUI."""

from __future__ import annotations


def ago(seconds: float) -> str:
    """A short duration for tables: 42s, 3m05s, 2h07m."""
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
