"""yapctl (placeholder until the CLI lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    print("yapctl: not yet implemented")
    return 1
