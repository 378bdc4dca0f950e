"""The dashboard's panels and dialogs. Each panel takes the daemon's JSON replies as
they come (``show``) and never talks to the socket itself; only the AWQ progress
dialog streams, from a worker of its own."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Log, ProgressBar, RichLog, Select, Sparkline, Static

from yapctl import fmt
from yapctl.client import AdminClient, AdminError
from yapctl.fmt import ago
from yapctl.tui.model import LEVELS, LogBook, LogLine, ms, numbers, percentile

LEVEL_STYLE = {"debug": "dim", "info": "green", "warning": "yellow", "error": "bold red",
               "critical": "bold white on red"}
SESSION_CHARS = 40  # a session id's column at most (ids may be 256 characters)
STATE_STYLE = {"ready": "green", "loading": "yellow", "starting": "yellow", "stopped": "red", "failed": "bold red"}


class LinkBar(Static):
    """One line at the top: whether we reach the daemon, and what it is."""

    DEFAULT_CSS = """
    LinkBar { height: 1; padding: 0 1; background: $panel; }
    LinkBar.-down { background: $warning 40%; }
    """

    def show_status(self, st: dict[str, Any]) -> None:
        self.set_class(False, "-down")
        state = ("DRAINING", "bold yellow") if st.get("draining") else \
            ("ready", "green") if st.get("ready") else ("not ready", "bold red")
        text = Text.assemble(("● connected", "bold green"), f"  yapd {st.get('version', '?')}",
                             f"  pid {st.get('pid', '?')}  port {st.get('port', '?')}",
                             f"  deploy {st.get('deploy', '?')}  ", state,
                             f"  up {ago(float(st.get('uptime_s') or 0))}",
                             ("  demo" if st.get("demo") else "", "dim"),
                             ("  MPS" if (st.get("mps") or {}).get("active") else "", "cyan"))
        if st.get("pending_restart_keys"):
            text.append(f"  restart pending: {', '.join(map(str, st['pending_restart_keys']))}", "yellow")
        self.update(text)

    def show_down(self, state: str, detail: str) -> None:
        self.set_class(True, "-down")
        self.update(Text.assemble((f"◌ {state}", "bold"), f"  {detail}"))


class CapacityPanel(Vertical):
    DEFAULT_CSS = """
    CapacityPanel { width: 30; }
    CapacityPanel ProgressBar { margin: 1 0 0 0; }
    CapacityPanel Bar { width: 18; }
    CapacityPanel #cap-numbers { margin: 1 0 0 0; }
    """

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=1, show_eta=False, id="cap-bar")
        yield Static("-/- connections", id="cap-numbers")
        yield Static("", id="cap-flight")

    def show(self, st: dict[str, Any]) -> None:
        cap = st.get("capacity") or {}
        active, most = int(cap.get("active", 0)), max(1, int(cap.get("max", 1)))
        self.active = active
        self.query_one(ProgressBar).update(total=most, progress=min(active, most))
        style = "bold red" if cap.get("at_capacity") else "bold"
        self.query_one("#cap-numbers", Static).update(
            Text.assemble((f"{active}/{most}", style), " connections", ("  FULL" if cap.get("at_capacity") else "",
                                                                          "bold red")))
        engines = st.get("engines") or {}
        in_flight = sum(int(e.get("in_flight") or 0) for e in engines.values() if isinstance(e, dict))
        self.query_one("#cap-flight", Static).update(f"{in_flight} request{'s' if in_flight != 1 else ''}"
                                                     " in flight")


class EnginesTable(DataTable[Any]):
    """Engines and their models, one row a role; a deployed role with no engine (between
    a restart's shutdown and the new one's creation) still gets its row."""

    DEFAULT_CSS = "EnginesTable { height: auto; max-height: 5; }"

    def on_mount(self) -> None:
        self.can_focus = False
        self.cursor_type = "none"
        self.add_columns("ENGINE", "STATE", "IN FLIGHT", "MODEL", "BACKEND", "DETAIL")

    def show(self, st: dict[str, Any]) -> None:
        engines = st.get("engines") or {}
        models = st.get("models") or {}
        deploy = st.get("deploy")
        deployed = {"chat", "tool"} if deploy == "both" else {deploy} if deploy in ("chat", "tool") else set()
        restarting = set(st.get("restarting") or ())
        self.clear()
        # A restart stops the engines before it makes new ones: their rows stay meanwhile
        # (the panel went blank for as long as vLLM took to stop).
        for role in sorted(set(engines) | deployed | {r for r, m in models.items() if m}):
            e = engines.get(role) or {}
            state = str(e.get("state") or ("restarting" if role in restarting else "absent"))
            self.add_row(role, Text(state, STATE_STYLE.get(state, "yellow")), str(e.get("in_flight", "")),
                         Text(short_model(str(e.get("model") or models.get(role) or ""))), Text(fmt.backend(e)),
                         Text(str(e.get("detail") or "")), key=role)


def short_model(model: str) -> str:
    """A Hub id as it is; a local checkout by its directory name (the path would push
    every other column off the panel)."""
    return Path(model).name if model.startswith(("/", "~", ".")) else model


class LatencyPanel(Vertical):
    """TTFT and tool-decision latency of the daemon's recent turns (its ``stats``)."""

    DEFAULT_CSS = """
    LatencyPanel { width: 42; }
    LatencyPanel Sparkline { height: 2; margin: 0 0 0 0; }
    """
    WINDOW = 80  # turns drawn: about one bar per column

    def compose(self) -> ComposeResult:
        yield Static("TTFT ms: no turns yet", id="ttft-label")
        yield Sparkline([], id="ttft-spark")
        yield Static("tool ms: no turns yet", id="tool-label")
        yield Sparkline([], id="tool-spark")

    def show(self, stats: dict[str, Any]) -> None:
        self.turns = int(stats.get("turns") or 0)
        for key, name in (("ttft", "TTFT"), ("tool", "tool")):
            values = numbers(stats.get(f"{key}_ms"))
            self.query_one(f"#{key}-spark", Sparkline).data = values[-self.WINDOW:]
            label = self.query_one(f"#{key}-label", Static)
            if not values:
                label.update(f"{name} ms: no turns yet")
                continue
            spread = f"  p50 {ms(percentile(values, 50))}  p95 {ms(percentile(values, 95))}"
            label.update(Text.assemble((f"{name} ms", "bold"), f" {ms(values[-1])}", (spread, "dim")))


class ConnectionsTable(DataTable[Any]):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns("SESSION", "PEER", "SINCE", "TURNS", "STATE", "LAST TTFT MS")

    def show(self, conns: list[dict[str, Any]]) -> None:
        # Rebuilt whole each poll (a few dozen rows at most); keep the operator's row.
        row = self.cursor_row
        now = time.time()
        self.clear()
        for i, c in enumerate(conns):
            state = str(c.get("state", ""))
            # Text, not str: a DataTable reads a str as markup ("[/]" as a session id closed
            # the dashboard); a long id is cut, or it pushes every other column off.
            self.add_row(Text(fmt.clip(str(c.get("session_id") or "-"), SESSION_CHARS)),
                         Text(str(c.get("remote") or "-")),
                         ago(now - float(c.get("connected_at") or now)), str(c.get("turns", 0)),
                         Text(state, "dim" if state == "idle" else "bold cyan"), ms(c.get("last_ttft_ms")),
                         key=f"{i}:{c.get('session_id')}:{c.get('connected_at')}")
        if self.row_count:
            self.move_cursor(row=min(row, self.row_count - 1), animate=False)


class LogPane(Vertical):
    """The daemon's log as it is written, filtered by level and a search string."""

    DEFAULT_CSS = """
    LogPane #log-controls { height: 3; }
    LogPane #log-level { width: 20; }
    LogPane #log-search { width: 1fr; }
    LogPane RichLog { height: 1fr; }
    """
    MAX_SHOWN = 2000

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.book = LogBook()

    def compose(self) -> ComposeResult:
        with Horizontal(id="log-controls"):
            yield Select([(level, level) for level in LEVELS], value="debug", allow_blank=False, id="log-level",
                         prompt="level")
            yield Input(placeholder="search the log (/)", id="log-search")
        yield RichLog(max_lines=self.MAX_SHOWN, wrap=False, markup=False, highlight=False, id="log-view")

    @property
    def view(self) -> RichLog:
        return self.query_one("#log-view", RichLog)

    def add(self, msg: dict[str, Any]) -> None:
        line = LogLine.from_event(msg)
        if self.book.add(line) and self.book.visible(line):
            self.view.write(render(line))

    def mark(self, text: str) -> None:
        self.view.write(render(self.book.mark(text)))

    def redraw(self) -> None:
        view = self.view
        view.clear()
        for line in self.book.shown(self.MAX_SHOWN):
            view.write(render(line))

    def shown_text(self) -> list[str]:
        """The lines the pane holds now, as plain text."""
        return [strip.text for strip in self.view.lines]

    @on(Select.Changed, "#log-level")
    def _level(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.book.level:
            self.book.level = event.value
            self.redraw()

    @on(Input.Changed, "#log-search")
    def _search(self, event: Input.Changed) -> None:
        self.book.search = event.value.strip()
        self.redraw()


def render(line: LogLine) -> Text:
    if line.marker:
        return Text(f"──── {line.message} ────", "bold magenta")
    stamp = time.strftime("%H:%M:%S", time.localtime(line.ts))
    return Text.assemble((stamp, "dim"), " ", (f"{line.level.upper():<8}", LEVEL_STYLE.get(line.level, "")),
                         (line.logger, "cyan"), ": ", line.message)


# --- dialogs ---------------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no before an action that interrupts service."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; padding: 1 2; border: thick $warning; background: $surface; }
    ConfirmScreen #question { width: 1fr; margin: 0 0 1 0; }
    ConfirmScreen #detail { width: 1fr; margin: 0 0 1 0; color: $text-muted; }
    ConfirmScreen Horizontal { height: auto; align: right middle; }
    ConfirmScreen Button { margin: 0 0 0 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, detail: str = "", yes: str = "Yes") -> None:
        super().__init__()
        self.question, self.detail, self.yes = question, detail, yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.question, "bold"), id="question")
            if self.detail:
                yield Label(self.detail, id="detail")
            with Horizontal():
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        # Enter on the focused button must not be the destructive choice by accident.
        self.query_one("#no", Button).focus()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    text: str


class AwqScreen(ModalScreen[Outcome]):
    """Streams ``awq rebuild``: a bar per model being quantized, and its messages.

    The job belongs to the daemon: closing this view (or losing the connection) stops
    watching it, not the job."""

    DEFAULT_CSS = """
    AwqScreen { align: center middle; }
    AwqScreen > Vertical { width: 90; height: 24; padding: 1 2; border: thick $accent; background: $surface; }
    AwqScreen #awq-bars { height: auto; }
    AwqScreen Log { height: 1fr; margin: 1 0; }
    AwqScreen #awq-foot { height: auto; align: right middle; }
    AwqScreen #awq-state { width: 1fr; }
    """
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, socket: Path, target: str = "both") -> None:
        super().__init__()
        self.socket, self.target = socket, target
        self.outcome: Outcome | None = None
        self._bars: dict[str, ProgressBar] = {}

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"AWQ rebuild ({self.target})", "bold"))
            yield Vertical(id="awq-bars")
            yield Log(max_lines=500, id="awq-log")
            with Horizontal(id="awq-foot"):
                yield Static("starting…", id="awq-state")
                yield Button("Close (esc)", id="close")

    def on_mount(self) -> None:
        self.rebuild()

    @work(exclusive=True, group="awq")
    async def rebuild(self) -> None:
        try:
            # Quantizing a 12B model takes a while between progress lines.
            async with AdminClient(self.socket, timeout=3600.0) as client:
                async for msg in client.stream("awq", action="rebuild", target=self.target):
                    if "event" in msg:
                        await self._progress(msg)
                    else:
                        self._finish(msg)
        except AdminError as exc:
            # Refusals ("not available in this build", "already running", "nothing to
            # rebuild") come back at once: nothing to watch, so the view goes.
            self.dismiss(Outcome(False, f"AWQ rebuild: {exc}"))

    async def _progress(self, msg: dict[str, Any]) -> None:
        role = str(msg.get("role", "awq"))
        layers, layer = msg.get("layers"), msg.get("layer")
        if isinstance(layers, int) and layers > 0:
            bar = self._bars.get(role)
            if bar is None:
                bar = self._bars[role] = ProgressBar(total=layers, show_eta=True)
                await self.query_one("#awq-bars", Vertical).mount(Label(role), bar)
            bar.update(total=layers, progress=layer if isinstance(layer, int) else 0)
        text = f"{role}: {msg.get('stage', '')} {msg.get('message', '')}".strip()
        self.query_one("#awq-log", Log).write_line(text)
        self.query_one("#awq-state", Static).update(Text(text))  # a model path's "[/x]" is not markup

    def _finish(self, msg: dict[str, Any]) -> None:
        built = ", ".join(msg.get("built") or {}) or "nothing"
        restarted = ", ".join(msg.get("restarted") or []) or "nothing"
        text = f"AWQ rebuild done: built {built}, restarted {restarted}"
        if msg.get("note"):
            text += f" ({msg['note']})"
        for bar in self._bars.values():
            if bar.total:
                bar.update(progress=bar.total)
        self.outcome = Outcome(True, text)
        self.query_one("#awq-log", Log).write_line(text)
        self.query_one("#awq-state", Static).update(Text("done", "bold green"))

    def action_close(self) -> None:
        # Stop watching first: a progress line read after the view's widgets are gone
        # would fail the worker, and a failed worker ends the whole dashboard.
        self.workers.cancel_group(self, "awq")
        self.dismiss(self.outcome or Outcome(True, "AWQ rebuild goes on in the daemon (yapctl awq status)"))

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.action_close()
