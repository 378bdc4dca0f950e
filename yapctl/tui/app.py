"""The dashboard app: panels fed by two long-lived workers (a poll of status,
connections and stats; a follow of the log), and operator actions in workers of their
own. Every socket wait happens in an async worker, so the screen keeps drawing and
answering keys while the daemon is slow, restarting or gone."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any, Literal

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Static

from yapctl.client import EXIT_FAILED, AdminClient, AdminError, socket_path
from yapctl.tui.model import Backoff
from yapctl.tui.widgets import (
    AwqScreen,
    CapacityPanel,
    ConfirmScreen,
    ConnectionsTable,
    EnginesTable,
    LatencyPanel,
    LinkBar,
    LogPane,
    Outcome,
)
from yapd.timeouts import within

Severity = Literal["information", "warning", "error"]
LinkState = Literal["connecting", "connected", "reconnecting"]
RESTART_DETAIL = ("Turns in flight finish first (up to the drain timeout); new turns wait for the engine. "
                  "Big models take minutes to load.")


class Dashboard(App[int]):
    TITLE = "yapctl"
    SUB_TITLE = "yapd dashboard"
    AUTO_FOCUS = "#connections"
    CSS = """
    #top { height: 9; }
    #top > * { border: round $primary-darken-1; padding: 0 1; }
    #engines-box { width: 1fr; }
    #connections { height: 1fr; border: round $primary-darken-1; }
    #logs { height: 2fr; border: round $primary-darken-1; }
    #activity { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("r", "reload", "Reload"),
        Binding("c", "restart('chat')", "Restart chat"),
        Binding("t", "restart('tool')", "Restart tool"),
        Binding("b", "restart('both')", "Restart both"),
        Binding("d", "drain", "Drain on/off"),
        Binding("a", "awq", "AWQ rebuild"),
        Binding("slash", "search", "Search log", key_display="/"),
        Binding("escape", "leave_search", "Back", show=False),
        Binding("q", "quit", "Quit"),
    ]

    @property
    def socket(self) -> Path:
        """The one given, else the default, looked up at each connect: a dashboard opened
        while the service was stopped (systemd removes /run/yapd with it) found the
        per-user fallback and kept it once the service was back."""
        return self._socket or socket_path(None)

    def __init__(self, socket: str | Path | None = None, *, poll_interval: float = 1.0, request_timeout: float = 10.0,
                 first_backoff: float = 0.25, max_backoff: float = 5.0, log_backlog: int = 200) -> None:
        super().__init__()
        self._socket = Path(socket) if socket else None
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.first_backoff, self.max_backoff = first_backoff, max_backoff
        self.log_backlog = log_backlog
        self.link: LinkState = "connecting"
        self.status: dict[str, Any] = {}
        self.connections: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self.activity: collections.deque[str] = collections.deque(maxlen=50)
        self._online = asyncio.Event()
        self._kick = asyncio.Event()
        self._log_pid: int | None = None

    def compose(self) -> ComposeResult:
        # Held by reference: App.query_one looks at the screen on top, which is a dialog
        # while one is open, and the workers keep updating the panels under it.
        self.link_bar = LinkBar(id="link")
        self.capacity = CapacityPanel(id="capacity")
        self.engines = EnginesTable(id="engines")
        self.latency = LatencyPanel(id="latency")
        self.table = ConnectionsTable(id="connections")
        self.log_pane = LogPane(id="logs")
        self.activity_bar = Static("", id="activity")
        yield self.link_bar
        with Horizontal(id="top"):
            yield self.capacity
            with Horizontal(id="engines-box") as box:
                yield self.engines
            yield self.latency
        self.engines_box = box
        yield self.table
        yield self.log_pane
        yield self.activity_bar
        yield Footer()

    def on_mount(self) -> None:
        for widget, title in ((self.capacity, "capacity"), (self.engines_box, "engines"),
                              (self.latency, "latency (recent turns)"), (self.table, "connections"),
                              (self.log_pane, "log")):
            widget.border_title = title
        self.link_bar.show_down("connecting", f"to {self.socket}")
        self.poll()
        self.follow_logs()

    @property
    def draining(self) -> bool:
        return bool(self.status.get("draining"))

    def say(self, text: str, severity: Severity = "information") -> None:
        """A toast, and the last line of the activity bar (so it stays readable after the
        toast fades)."""
        self.activity.append(text)
        if not self.is_running:
            return
        style = {"information": "", "warning": "yellow", "error": "bold red"}[severity]
        self.activity_bar.update(Text(text, style))
        self.notify(text, severity=severity, timeout=8 if severity == "error" else 4, markup=False)

    def _busy(self, text: str) -> None:
        if not self.is_running:
            return
        self.activity_bar.update(Text(text, "italic"))

    # --- the daemon's state ---------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        backoff = Backoff(self.first_backoff, self.max_backoff)
        while True:
            client = AdminClient(self.socket, timeout=self.request_timeout)
            try:
                await client.connect()
                while True:
                    st = await client.request("status")
                    conns = await client.request("connections")
                    stats = await self._optional(client, "stats")
                    backoff.reset()
                    self._show(st, conns.get("connections") or [], stats)
                    await self._nap(self.poll_interval)
            except AdminError as exc:
                # Anything short of a clean reply (gone, refused, timed out mid-line) leaves
                # this connection in an unknown state: start a fresh one.
                self._offline(exc, backoff)
            finally:
                await client.close()
            await self._nap(backoff.next())

    async def _optional(self, client: AdminClient, cmd: str) -> dict[str, Any]:
        """A command an older daemon may not know: its refusal is no reason to reconnect."""
        try:
            return await client.request(cmd)
        except AdminError as exc:
            if exc.exit_code == EXIT_FAILED and str(exc).startswith("unknown command"):
                return {}
            raise

    async def _nap(self, seconds: float) -> None:
        """Sleep until the next poll, or until an action asks for fresh numbers."""
        self._kick.clear()
        try:
            await within(self._kick.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def refresh_soon(self) -> None:
        self._kick.set()

    def _show(self, st: dict[str, Any], conns: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        if not self.is_running:
            return  # quitting: the panels are being taken down before the workers stop
        if self.link != "connected":
            if self.link == "reconnecting":
                self.say(f"reconnected to yapd (pid {st.get('pid')})")
            self.link = "connected"
        self.status, self.connections, self.stats = st, conns, stats
        self._online.set()
        self.link_bar.show_status(st)
        self.capacity.show(st)
        self.engines.show(st)
        self.table.show(conns)
        if stats:
            self.latency.show(stats)

    def _offline(self, exc: AdminError, backoff: Backoff) -> None:
        if not self.is_running:
            return
        self._online.clear()
        if self.link == "connected":
            self.link = "reconnecting"
        delay = min(backoff.cap, backoff.first * (2 ** backoff.attempt))
        self.link_bar.show_down(self.link, f"(attempt {backoff.attempt + 1}, next in {delay:.1f} s): {exc}")

    # --- the log -------------------------------------------------------------------------

    @work(exclusive=True, group="logs")
    async def follow_logs(self) -> None:
        backoff = Backoff(self.first_backoff, self.max_backoff)
        pane = self.log_pane
        while True:
            await self._online.wait()
            pid = self.status.get("pid")
            try:
                async with AdminClient(self.socket, timeout=self.request_timeout) as client:
                    if self._log_pid is not None and pid != self._log_pid:
                        pane.mark(f"yapd restarted: pid {self._log_pid} -> {pid}")
                    self._log_pid = pid
                    # A follow stays quiet while the daemon has nothing to say: no line timeout.
                    async for msg in client.stream("logs", timeout=None, n=self.log_backlog, follow=True):
                        backoff.reset()
                        if msg.get("event") == "log" and self.is_running:
                            pane.add(msg)
            except AdminError:
                pass  # the poll notices too and says so; wait for it to see the daemon again
            await asyncio.sleep(backoff.next())

    # --- actions ---------------------------------------------------------------------------

    def action_search(self) -> None:
        self.log_pane.query_one("#log-search").focus()

    def action_leave_search(self) -> None:
        self.table.focus()

    def action_reload(self) -> None:
        self.do_reload()

    @work(group="actions")
    async def do_reload(self) -> None:
        self._busy("reloading the config…")
        try:
            async with AdminClient(self.socket, timeout=self.request_timeout) as c:
                reply = await c.request("reload")
        except AdminError as exc:
            self.say(f"reload failed: {exc}", "error")
            return
        applied = ", ".join(reply.get("applied") or []) or "nothing"
        text = f"reloaded; applied now: {applied}"
        severity: Severity = "information"
        if reply.get("needs_engine_restart"):
            text += f"; needs an engine restart: {', '.join(reply['needs_engine_restart'])}"
            severity = "warning"
        if reply.get("needs_daemon_restart"):
            text += f"; needs a daemon restart: {', '.join(reply['needs_daemon_restart'])}"
            severity = "warning"
        for warning in reply.get("warnings") or []:
            text += f"; {warning}"
            severity = "warning"
        self.say(text, severity)
        self.refresh_soon()

    def action_restart(self, target: str) -> None:
        what = "chat and tool engines" if target == "both" else f"{target} engine"

        def answered(yes: bool | None) -> None:
            if yes:
                self.do_restart(target)

        self.push_screen(ConfirmScreen(f"Restart the {what}?", RESTART_DETAIL, yes="Restart"), answered)

    @work(group="actions")
    async def do_restart(self, target: str) -> None:
        self._busy(f"restarting {target}…")
        try:
            # A restart loads models again: minutes for big ones on a cold cache.
            async with AdminClient(self.socket, timeout=1800.0) as c:
                async for msg in c.stream("restart", target=target):
                    if "event" in msg:
                        self._busy(str(msg.get("message", "")))
                        continue
                    roles = ", ".join(msg.get("roles") or []) or "nothing deployed"
                    note = "" if msg.get("drained", True) else " (drain timed out: turns in flight were cut)"
                    self.say(f"restarted {roles}{note}", "warning" if note else "information")
        except AdminError as exc:
            self.say(f"restart {target} failed: {exc}", "error")
        self.refresh_soon()

    def action_drain(self) -> None:
        self.do_drain(not self.draining)

    @work(group="actions")
    async def do_drain(self, on: bool) -> None:
        try:
            async with AdminClient(self.socket, timeout=self.request_timeout) as c:
                reply = await c.request("drain", on=on)
        except AdminError as exc:
            self.say(f"drain failed: {exc}", "error")
            return
        if on:
            self.say(f"draining: new turns refused, /healthz 503; {reply.get('active', 0)} connections open", "warning")
        else:
            self.say("accepting turns again")
        self.status["draining"] = on  # so a second press toggles back before the next poll
        self.refresh_soon()

    def action_awq(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.push_screen(AwqScreen(self.socket, "both"), self._awq_done)

        self.push_screen(ConfirmScreen("Rebuild the AWQ models?", "Quantizes the deployed models again (minutes to "
                                       "an hour on a GPU), then restarts the engines in awq mode onto them.",
                                       yes="Rebuild"), answered)

    def _awq_done(self, outcome: Outcome | None) -> None:
        if outcome is not None:
            self.say(outcome.text, "information" if outcome.ok else "error")
        self.refresh_soon()


def run_tui(path: str | Path | None = None) -> int:
    app = Dashboard(path)
    app.run()
    return app.return_code or 0
