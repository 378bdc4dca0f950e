"""SVG screenshots of the dashboard for the docs, taken against a demo daemon with
live connections; and the condition wait the TUI tests share.

    .venv/bin/python -m tests.tui_screenshots [OUT_DIR]     # default: docs/

Demo models are built into $YAPD_TEST_CACHE (or a temporary directory) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

from tests.conftest import ROOT, Yapd, run_turn, ws_connect
from yapctl.tui import Dashboard
from yapctl.tui.widgets import ConfirmScreen, ConnectionsTable, LatencyPanel, LogPane

SIZE = (130, 42)


async def until(pilot: Pilot[Any], cond: Callable[[], object], timeout: float = 60, what: str = "condition") -> None:
    """Let the app run until ``cond()`` holds; fail after ``timeout`` seconds.

    The deadline is generous (a loaded 2-core machine runs the daemon and the app side
    by side) but the wait ends as soon as the condition is met."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.05)


async def capture(d: Yapd, out_dir: Path) -> list[Path]:
    """The dashboard with two callers (one mid-conversation), then the restart dialog."""
    out_dir.mkdir(parents=True, exist_ok=True)
    app = Dashboard(d.admin_socket, poll_interval=0.3)
    saved: list[Path] = []
    async with app.run_test(size=SIZE) as pilot:
        async with ws_connect(d.url()) as caller, ws_connect(d.url()) as other:
            for text in ("who was Columbus?", "and what did he find?", "show me the map", "thanks!"):
                await run_turn(caller, session_id="caller-7f3a", user_utterance=text, timeout=60)
            await run_turn(other, session_id="caller-b21c", user_utterance="hello?", timeout=60)
            table = app.query_one(ConnectionsTable)
            await until(pilot, lambda: table.row_count == 2 and app.stats.get("turns", 0) >= 5
                        and getattr(app.query_one(LatencyPanel), "turns", 0) >= 5, what="two callers and their turns")
            await until(pilot, lambda: len(app.query_one(LogPane).shown_text()) > 5, what="log lines")
            await pilot.pause(0.2)
            saved.append(Path(app.save_screenshot("tui-dashboard.svg", str(out_dir))))
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm dialog")
            await pilot.pause(0.2)
            saved.append(Path(app.save_screenshot("tui-restart-confirm.svg", str(out_dir))))
            await pilot.press("n")
    return saved


def main(argv: list[str]) -> int:
    from yapd import demo

    out_dir = Path(argv[0]) if argv else ROOT / "docs"
    with contextlib.ExitStack() as stack:
        import os

        cache = Path(os.environ.get("YAPD_TEST_CACHE") or stack.enter_context(tempfile.TemporaryDirectory()))
        demo.build(cache / "demo")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        d = Yapd(work / "d", cache)
        d.start()
        stack.callback(d.stop)
        for path in asyncio.run(capture(d, out_dir)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
