"""yapctl's dashboard driven with Textual's Pilot against real demo daemons: live
connection numbers, the log follow and its filters, confirmed engine restarts, riding
out a daemon restart, the AWQ progress view, and the docs' screenshots.

Every wait is on a condition (``until``) with a generous deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, ProgressBar, Select, Static

from tests.conftest import run_turn, ws_connect
from tests.tui_screenshots import SIZE, capture, until
from yapctl.client import AdminClient
from yapctl.tui import Dashboard
from yapctl.tui.model import Backoff, LogBook, LogLine, percentile
from yapctl.tui.widgets import AwqScreen, ConfirmScreen

MARKER_PREFIX = "──── yapd restarted"


def dashboard(sock: Path) -> Dashboard:
    # Quick polls and short backoffs keep the tests' waits short; the defaults suit people.
    return Dashboard(sock, poll_interval=0.2, first_backoff=0.1, max_backoff=0.5)


def text(widget: Static) -> str:
    return str(widget.content)


def capacity(app: Dashboard) -> str:
    return text(app.capacity.query_one("#cap-numbers", Static))


def rows(table: DataTable[Any]) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def log_lines(app: Dashboard) -> list[str]:
    return app.log_pane.shown_text()


def count(lines: list[str], needle: str) -> int:
    return sum(needle in line for line in lines)


# --- against a real daemon ---------------------------------------------------------------------


async def test_connection_count_and_latency_follow_clients(shared_yapd):
    app = dashboard(shared_yapd.admin_socket)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link == "connected", what="the first status")
        assert "connected" in text(app.link_bar) and f"pid {shared_yapd.proc.pid}" in text(app.link_bar)
        base = int(app.status["capacity"]["active"])
        assert capacity(app).startswith(f"{base}/64")
        async with ws_connect(shared_yapd.url()) as ws:
            await until(pilot, lambda: capacity(app).startswith(f"{base + 1}/64"), what="the count going up")
            assert app.capacity.query_one(ProgressBar).progress == base + 1
            await run_turn(ws, session_id="tui-sess", user_utterance="who was Columbus?")

            def my_row() -> list[str] | None:
                return next((r for r in rows(app.table) if r[0] == "tui-sess"), None)

            await until(pilot, lambda: (r := my_row()) is not None and r[3] == "1" and r[5] != "-",
                        what="the session's row with one turn and its TTFT")
            row = my_row()
            assert row is not None and row[1].startswith("127.0.0.1:") and float(row[5]) > 0
            ttft = app.latency.query_one("#ttft-label", Static)
            await until(pilot, lambda: text(ttft).startswith("TTFT ms ") and "p95" in text(ttft),
                        what="the TTFT sparkline's numbers")
            assert app.latency.query_one("#ttft-spark").data  # type: ignore[attr-defined]
            engines = rows(app.engines)
            assert {r[0] for r in engines} == {"chat", "tool"} and all(r[1] == "ready" for r in engines)
        await until(pilot, lambda: capacity(app).startswith(f"{base}/64"), what="the count going down")
        assert not any(r[0] == "tui-sess" for r in rows(app.table))


async def test_session_ids_show_as_sent_not_as_markup(shared_yapd):
    """A client's session id "[/]..." closed every dashboard (MarkupError), and "[red]x"
    showed as a red "x"; a 256-character one pushed the other columns off."""
    ids = ["[/]closing", "[red]caller", "x" * 256]
    app = dashboard(shared_yapd.admin_socket)
    async with contextlib.AsyncExitStack() as stack:
        for sid in ids:
            ws = await stack.enter_async_context(ws_connect(shared_yapd.url()))
            await run_turn(ws, session_id=sid)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: {r[0] for r in rows(app.table)} >= {"[/]closing", "[red]caller",
                                                                         "x" * 39 + "…"},
                        what="the sessions' rows as sent")


async def test_log_pane_follows_the_log_with_level_filter_and_search(shared_yapd):
    app = dashboard(shared_yapd.admin_socket)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: count(log_lines(app), "yapd.daemon: ready port=") == 1, what="the log backlog")
        before = count(log_lines(app), "reload: no changes")
        await pilot.press("r")  # the reload binding: the daemon logs it, the follow brings it
        await until(pilot, lambda: count(log_lines(app), "reload: no changes") == before + 1,
                    what="the reload's log line")
        await until(pilot, lambda: app.activity and app.activity[-1] == "reloaded; applied now: nothing",
                    what="the reload's result")

        app.log_pane.query_one(Select).value = "warning"
        await until(pilot, lambda: not any(" INFO " in line for line in log_lines(app)), what="info lines hidden")
        app.log_pane.query_one(Select).value = "debug"
        await until(pilot, lambda: count(log_lines(app), "reload: no changes") == before + 1, what="them back")

        await pilot.press("slash", *"RELOAD")  # "/" focuses the search; case does not matter
        search = app.log_pane.query_one(Input)
        assert search.has_focus and search.value == "RELOAD"
        await until(pilot, lambda: log_lines(app) and all("reload" in line.lower() for line in log_lines(app)),
                    what="only matching lines")
        await pilot.press("escape")
        assert not search.has_focus
        # Keys typed into the search did not fire the bindings ("r" is reload).
        assert count(log_lines(app), "reload: no changes") == before + 1


async def test_restart_binding_confirms_then_restarts_the_engine_and_drain_toggles(make_yapd):
    d = make_yapd()
    app = dashboard(d.admin_socket)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link == "connected", what="the first status")
        chat_before, tool_before = count(d.lines, "engine ready role=chat"), count(d.lines, "engine ready role=tool")

        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm dialog")
        assert "Restart the tool engine?" in str(app.screen.query_one("#question", Static).content)
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="the dialog to close")
        assert not [w for w in app.workers if w.group == "actions"]  # cancelled: nothing sent

        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm dialog")
        await pilot.press("y")
        await until(pilot, lambda: count(d.lines, "engine ready role=tool") == tool_before + 1, timeout=120,
                    what="the daemon to restart its tool engine")
        await until(pilot, lambda: "restarted tool" in app.activity, timeout=60, what="the restart's result")
        assert count(d.lines, "engine ready role=chat") == chat_before
        await until(pilot, lambda: count(log_lines(app), "engine started role=tool") == 2,
                    what="the restart in the log pane")

        await pilot.press("d")  # drain toggles without a dialog: it is undone as easily
        await until(pilot, lambda: "DRAINING" in text(app.link_bar), what="the draining state")
        assert (await asyncio.to_thread(d.http, "/healthz", None))[0] == 503
        await pilot.press("d")
        await until(pilot, lambda: "DRAINING" not in text(app.link_bar) and " ready " in text(app.link_bar),
                    what="serving again")
        assert (await asyncio.to_thread(d.http, "/healthz", None))[0] == 200

        # A reload that could not apply everything says what, as a warning.
        d.write_config('[admin]\ngroup = "yap-no-such-group"\n')
        await pilot.press("r")
        await until(pilot, lambda: app.activity and "admin.group 'yap-no-such-group' does not exist"
                    in app.activity[-1], what="the reload's warning")


async def test_rides_out_a_daemon_restart(make_yapd):
    d = make_yapd()
    app = dashboard(d.admin_socket)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link == "connected" and count(log_lines(app), "ready port=") == 1,
                    what="the first status and log")
        old_pid = app.status["pid"]
        await asyncio.to_thread(d.stop)
        await until(pilot, lambda: app.link == "reconnecting" and "reconnecting" in text(app.link_bar),
                    what="the reconnecting state")
        # Still drawing and answering keys while nothing answers on the socket.
        await pilot.press("slash")
        assert app.log_pane.query_one(Input).has_focus
        await pilot.press("escape")

        d.start(wait=False)  # a new process on the same admin socket path
        assert d.proc is not None
        new_pid = d.proc.pid
        await until(pilot, lambda: app.link == "connected" and app.status.get("pid") == new_pid, timeout=120,
                    what="the dashboard to reach the new daemon")
        assert f"pid {new_pid}" in text(app.link_bar) and "reconnecting" not in text(app.link_bar)
        assert new_pid != old_pid

        def resubscribed() -> bool:
            lines = log_lines(app)
            marks = [i for i, line in enumerate(lines) if line.startswith(MARKER_PREFIX)]
            return len(marks) == 1 and any("ready port=" in line for line in lines[marks[0]:])

        await until(pilot, resubscribed, timeout=60, what="the new daemon's log after a restart marker")
        async with ws_connect(d.url()):
            await until(pilot, lambda: capacity(app).startswith("1/"), what="live numbers from the new daemon")


async def test_screenshots(shared_yapd, tmp_path):
    saved = await capture(shared_yapd, tmp_path)
    assert [p.name for p in saved] == ["tui-dashboard.svg", "tui-restart-confirm.svg"]
    dash, confirm = (p.read_text() for p in saved)
    assert dash.startswith("<svg") and "caller-7f3a" in dash and "caller-b21c" in dash
    assert "Restart&#160;the&#160;chat&#160;and&#160;tool&#160;engines?" in confirm


# --- the AWQ view against a scripted admin socket ---------------------------------------------
# The real job quantizes for half a minute of CPU even on the demo models, and is built
# elsewhere; these pin down what the dashboard does with its two kinds of answer.

STATUS = {"ok": True, "version": "0.1.0", "pid": 4242, "port": 8000, "deploy": "both", "ready": True,
          "draining": False, "uptime_s": 1.0, "capacity": {"active": 0, "max": 4, "available": 4, "at_capacity": False},
          "models": {"chat": "m/chat", "tool": "m/tool"}, "engines": {}}


# A line the stand-in sends, or a step of its script it awaits between two lines.
Scripted = dict[str, Any] | Callable[[], Awaitable[object]]


@contextlib.asynccontextmanager
async def scripted_daemon(path: Path, awq: Callable[[], list[Scripted]]) -> AsyncIterator[list[dict[str, Any]]]:
    """A stand-in admin socket: status, connections and stats as an idle daemon
    answers them, and ``awq()``'s lines for any awq request. Yields the requests seen."""
    seen: list[dict[str, Any]] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                req = json.loads(line)
                seen.append(req)
                replies: list[Scripted] | None = {
                    "status": [STATUS], "connections": [{"ok": True, "connections": []}],
                    "stats": [{"ok": True, "turns": 0, "ttft_ms": [], "tool_ms": []}]}.get(req["cmd"])
                if req["cmd"] == "awq":
                    replies = awq()
                for msg in replies or []:
                    if callable(msg):
                        await msg()  # a step of the script: it goes on after its client left
                    elif not writer.is_closing():  # its lines go nowhere once the client left
                        writer.write(json.dumps(msg).encode() + b"\n")
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                        await asyncio.sleep(0.05)
                if req["cmd"] == "logs":
                    await asyncio.Event().wait()  # a follow with nothing to say
        writer.close()

    server = await asyncio.start_unix_server(client, path=str(path))
    try:
        yield seen
    finally:
        server.close()


async def test_awq_refusal_is_a_notification(tmp_path):
    sock = tmp_path / "admin.sock"
    refusal = [{"ok": False, "error": "AWQ jobs are not available in this build"}]
    async with scripted_daemon(sock, lambda: refusal) as seen:
        app = dashboard(sock)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.link == "connected", what="the first status")
            await pilot.press("a")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirm dialog")
            await pilot.press("y")
            await until(pilot, lambda: app.activity and "not available" in app.activity[-1], what="the error")
            assert app.activity[-1] == "AWQ rebuild: AWQ jobs are not available in this build"
            assert not isinstance(app.screen, (AwqScreen, ConfirmScreen))
            assert any(n.message == app.activity[-1] and n.severity == "error" for n in app._notifications)
    assert {"cmd": "awq", "action": "rebuild", "target": "both"} in seen


async def awq_view_opened(pilot: Any, app: Any) -> AwqScreen:
    """The dashboard connected, then `a` and its confirmation: the AWQ rebuild's view."""
    await until(pilot, lambda: app.link == "connected", what="the first status")
    await pilot.press("a", "y")
    await until(pilot, lambda: isinstance(app.screen, AwqScreen), what="the progress view")
    screen = app.screen
    assert isinstance(screen, AwqScreen)
    return screen


async def test_awq_progress_view(tmp_path):
    sock = tmp_path / "admin.sock"
    # A model path with "[/x]" in it: read as markup, it closed the dashboard (MarkupError).
    events = [{"event": "progress", "role": "chat", "stage": "starting", "message": "quantizing m[/x]/chat"},
              *({"event": "progress", "role": "chat", "stage": "calibrating", "message": f"layer {i}/4",
                 "layer": i, "layers": 4} for i in range(1, 5)),
              {"ok": True, "built": {"chat": "/cache/awq/chat"}, "pushed": {}, "restarted": ["chat"]}]
    async with scripted_daemon(sock, lambda: events):
        app = dashboard(sock)
        async with app.run_test(size=SIZE) as pilot:
            screen = await awq_view_opened(pilot, app)
            await until(pilot, lambda: screen.outcome is not None, what="the job's end")
            bar = screen.query_one(ProgressBar)
            assert (bar.progress, bar.total) == (4, 4)
            assert "done" in str(screen.query_one("#awq-state", Static).content)
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, AwqScreen), what="the view to close")
            assert app.activity[-1] == "AWQ rebuild done: built chat, restarted chat"


async def test_closing_the_awq_view_mid_job_stops_watching_and_the_dashboard_goes_on(tmp_path):
    """Esc while progress lines still come (they keep coming: the job is the daemon's):
    the view's watcher stops with it, instead of failing on the view's removed widgets
    and taking the dashboard down (WorkerFailed: NoMatches '#awq-log')."""
    sock = tmp_path / "admin.sock"
    events = [{"event": "progress", "role": "chat", "stage": "starting", "message": "quantizing m/chat"},
              *({"event": "progress", "role": "chat", "stage": "calibrating", "message": f"layer {i}/40",
                 "layer": i, "layers": 40} for i in range(1, 30))]
    # Its lines go on through the Esc, and its end comes only once the view has closed:
    # sent on a clock from the request, all of them (1.5 s) came before the Esc on a
    # loaded machine, the job's error closed the view itself, and the Esc closed nothing.
    escape, closed, sent = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def all_sent() -> None:
        sent.set()

    script: list[Scripted] = [*events[:5], escape.wait, *events[5:], closed.wait,
                              {"ok": False, "error": "chat: the job exited with -9"}, all_sent]
    async with scripted_daemon(sock, lambda: script):
        app = dashboard(sock)
        async with app.run_test(size=SIZE) as pilot:
            state = (await awq_view_opened(pilot, app)).query_one("#awq-state", Static)
            await until(pilot, lambda: "layer 4/40" in text(state), what="the job's first lines")
            escape.set()
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, AwqScreen), what="the view to close")
            # The stand-in goes on sending its lines (one each 50 ms, then the job's error)
            # on the connection the view had, unless the view hung up: a watcher still
            # reading them has them all, and time to fail on them.
            closed.set()
            await until(pilot, sent.is_set, what="the job's last lines")
            await pilot.pause(0.5)
            assert app.is_running and app.return_code is None
            assert app.activity[-1] == "AWQ rebuild goes on in the daemon (yapctl awq status)"


# --- the parts without a screen ----------------------------------------------------------------


async def test_an_admin_read_cancelled_as_its_line_arrives_ends_cancelled(tmp_path):
    """A watcher cancelled (the AWQ view's, at its close) in the loop round its next line
    arrives in: the read ends cancelled. asyncio.wait_for (before Python 3.12) returned the
    line instead, and the view's watcher read on into its removed widgets."""
    sock = tmp_path / "admin.sock"
    async with scripted_daemon(sock, lambda: []), AdminClient(sock) as client:
        reading = asyncio.ensure_future(client.read(10))
        for _ in range(5):
            await asyncio.sleep(0)  # the read waits on its line
        assert client._reader is not None and not reading.done()
        client._reader.feed_data(b'{"event": "progress"}\n')  # the line, in this round
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(0.25, 2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.25


def test_log_book_drops_repeats_but_not_a_new_daemons_lines():
    book = LogBook(size=3)

    def line(seq: int, ts: float, level: str = "info", message: str = "m") -> LogLine:
        return LogLine(seq=seq, ts=ts, level=level, logger="yapd.x", message=message)

    assert book.add(line(1, 10.0)) and book.add(line(2, 11.0, "warning", "Reload done"))
    assert not book.add(line(2, 11.0, "warning", "Reload done"))  # re-sent after a reconnect
    assert book.add(line(2, 50.0))  # a restarted daemon numbers from 1 again
    book.level = "warning"
    assert [x.seq for x in book.shown()] == [2]
    book.level, book.search = "debug", "reload"
    assert [x.message for x in book.shown()] == ["Reload done"]
    book.add(line(3, 51.0))
    book.add(line(4, 52.0))  # pushes (1, 10.0) and (2, 11.0) out of the bounded book...
    assert book.add(line(2, 11.0))  # ...and out of the repeat check with them
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([], 95) is None


def test_cli_opens_the_dashboard(monkeypatch, tmp_path):
    """``yapctl tui`` hands the socket to run_tui; the import path the CLI uses works."""
    import yapctl.tui

    got: list[Path] = []
    monkeypatch.setattr(yapctl.tui, "run_tui", lambda path: got.append(path) or 0)
    from yapctl.cli import main

    assert main(["--socket", str(tmp_path / "x.sock"), "tui"]) == 0
    assert got == [tmp_path / "x.sock"]
    monkeypatch.delenv("YAP_ADMIN_SOCKET", raising=False)
    assert main(["tui"]) == 0 and got[-1] is None  # the dashboard looks the default up itself


async def test_a_dashboard_with_no_socket_given_finds_the_daemon_that_came_later(make_yapd, monkeypatch, tmp_path):
    """No --socket: the default is looked up at each connect. A dashboard opened while the
    service was stopped (systemd removes /run/yapd with it) kept the per-user fallback it
    found then, "not running" for ever once the service was back."""
    d = make_yapd()
    monkeypatch.setenv("YAP_ADMIN_SOCKET", str(tmp_path / "not-yet.sock"))
    app = Dashboard(None, poll_interval=0.2, first_backoff=0.1, max_backoff=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.link != "connected" and "not-yet.sock" in text(app.link_bar),
                    what="the dashboard failing on the first default")
        monkeypatch.setenv("YAP_ADMIN_SOCKET", str(d.admin_socket))  # the default now names the daemon
        await until(pilot, lambda: app.link == "connected", what="the daemon found at the default's new place")


def test_the_engines_panel_keeps_the_deployed_roles_through_a_restart():
    """Between a restart's stop of the engines and the new ones, status has no engines: the
    deployed roles keep their rows, "restarting" (the panel went blank meanwhile)."""
    from textual.app import App

    from yapctl.tui.widgets import EnginesTable

    class One(App[None]):
        def compose(self) -> Any:
            yield EnginesTable(id="t")

    async def main() -> list[list[str]]:
        app = One()
        async with app.run_test(size=SIZE):
            table = app.query_one(EnginesTable)
            table.show({"deploy": "both", "engines": {}, "models": {"chat": None, "tool": None},
                        "restarting": ["chat", "tool"]})
            return rows(table)

    shown = asyncio.run(main())
    assert [r[:2] for r in shown] == [["chat", "restarting"], ["tool", "restarting"]], shown
