"""yapctl: see and steer a running yapd.

Over the admin socket: status, connections, logs, reload, restart, drain, awq, profile.
Over the WebSocket, as a client would: chat (one turn) and bench (many).
With no subcommand on a terminal it opens the dashboard (``yapctl tui``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from yapctl import fmt
from yapctl.client import (
    EXIT_DENIED,
    EXIT_DOWN,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AdminClient,
    AdminError,
    socket_path,
)
from yapctl.fmt import ago

EPILOG = """\
exit codes:
  0  done
  1  the daemon answered and the operation failed, or it did not answer in time
     (or a bench/chat turn failed)
  2  bad command line
  3  yapd is not running (no socket, nobody listening, or it went away)
  4  permission denied (add yourself to the daemon's group, or run as root)
  130  interrupted (Ctrl-C)
  141  whatever read the output stopped reading it (`yapctl logs | head`), as SIGPIPE would

environment: YAP_ADMIN_SOCKET (default socket), YAP_URL and YAP_API_KEY (chat, bench)
"""

DEFAULT_URL = "ws://127.0.0.1:8000/ws"
LEVELS = ("debug", "info", "warning", "error", "critical")
# 128 + SIGPIPE: what a shell reports for `cat` or `git log` killed by a reader that left,
# so `set -o pipefail` scripts see the same from yapctl; KeyboardInterrupt's 130 is alike.
EXIT_PIPE = 141


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # nan and inf would reach asyncio's timers (nan times out at once; profile sends it on)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _seconds(text: str) -> float:
    """A time limit: 0 or less would time out before yapd could answer."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yapctl", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", help="admin socket (default: $YAP_ADMIN_SOCKET, "
                   "$RUNTIME_DIRECTORY/admin.sock, /run/yapd/admin.sock, $XDG_RUNTIME_DIR/yapd/admin.sock, "
                   "/tmp/yapd-<uid>/admin.sock)")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds to wait for each reply (default 30; a turn's for chat and bench: 60)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("status", help="daemon, engines, capacity")
    s.add_argument("--json", action="store_true", help="print the raw JSON reply")
    s = sub.add_parser("connections", help="live WebSocket sessions")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("logs", help="recent log lines from the daemon's ring buffer")
    s.add_argument("-n", type=int, default=50, metavar="N", help="last N lines (default 50)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("--level", choices=LEVELS, default="debug", help="lowest level shown")
    s.add_argument("--grep", metavar="TEXT", help="only lines containing TEXT (case-insensitive)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_parser("reload", help="re-read the config file (as SIGHUP does)")
    s = sub.add_parser("restart", help="drain turns and restart engines")
    s.add_argument("target", nargs="?", choices=("chat", "tool", "both"), default="both")
    s = sub.add_parser("drain", help="refuse new turns, /healthz 503 (for a balancer)")
    s.add_argument("--off", action="store_true", help="end draining: accept turns again")
    s = sub.add_parser("awq", help="AWQ 4-bit models: status, rebuild, cancel")
    awq = s.add_subparsers(dest="awq_action", metavar="ACTION", required=True)
    awq.add_parser("status", help="cached AWQ models and the running job")
    r = awq.add_parser("rebuild", help="quantize again, then switch engines over")
    r.add_argument("target", nargs="?", choices=("chat", "tool", "both"), default="both")
    r.add_argument("--json", action="store_true", help="print progress events as JSON lines")
    awq.add_parser("cancel", help="end the running quantization (the cached model it would replace stays)")

    s = sub.add_parser("profile", help="where the daemon's event loop spends its time (cProfile over a window)")
    # Its range is yapd's to say (profile refuses what it will not do); nan it never sees.
    s.add_argument("--seconds", type=_number, default=10.0, help="how long to profile (default 10, at most 300)")
    s.add_argument("--top", type=int, default=20, help="functions listed (default 20)")
    s.add_argument("--json", action="store_true", help="print the raw JSON reply")

    s = sub.add_parser("chat", help="one turn over the WebSocket, as a client sees it")
    s.add_argument("utterance")
    _ws_args(s)
    s.add_argument("--gender", choices=("woman", "man"), help="assistant_gender")
    s.add_argument("--style", help="persona_style")
    s.add_argument("--persona", help="persona_text")
    s.add_argument("--history", help="history_text")
    s.add_argument("--json", action="store_true", help="print every message received as JSON")
    s = sub.add_parser("bench", help="concurrent sessions; TTFT, tool decision, token gaps")
    s.add_argument("-n", type=int, default=32, help="turns in all (default 32)")
    s.add_argument("-c", type=int, default=8, help="concurrent connections (default 8)")
    _ws_args(s)
    s.add_argument("--utterance", default="who was Columbus?")
    s.add_argument("--no-warmup", action="store_true", help="do not run a warm-up turn per connection")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    sub.add_parser("tui", help="the live dashboard (default on a terminal)")
    return p


def _ws_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--url", default=os.environ.get("YAP_URL", DEFAULT_URL), help=f"default $YAP_URL or {DEFAULT_URL}")
    s.add_argument("--key", default=os.environ.get("YAP_API_KEY", ""), help="API key (default $YAP_API_KEY)")
    s.add_argument("--timeout", type=_seconds, default=None, dest="turn_timeout",
                   help="seconds per turn (default: yapctl's --timeout, else 60)")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Output still buffered (a table) goes now, where a closed pipe is caught
            # below, not in the interpreter's last flush (a traceback-like warning, exit 120).
            sys.stdout.flush()
    except BrokenPipeError:
        # Python ignores SIGPIPE, so writing to a pipe whose reader left (`yapctl logs | head -1`)
        # raises. The reader has what it wanted: end quietly, with stdout on /dev/null so the
        # interpreter's own flush at exit has nowhere to fail (the Python docs' "Note on SIGPIPE").
        with contextlib.suppress(OSError, ValueError):  # a stdout with no descriptor (tests)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `yapctl --timeout 5 chat ...` means the turn's too; each has its own default
    if getattr(args, "turn_timeout", None) is None:
        args.turn_timeout = args.timeout if args.timeout is not None else 60.0
    if args.timeout is None:
        args.timeout = 30.0
    if args.command is None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            args.command = "tui"
        else:
            parser.print_help()
            return EXIT_OK
    handler = HANDLERS[args.command]
    try:
        if args.command == "tui":
            from yapctl.tui import run_tui

            # None: the dashboard looks the default up at each connect (see Dashboard.socket)
            return run_tui(Path(args.socket) if args.socket else None)
        return asyncio.run(handler(args))
    except AdminError as exc:
        print(f"yapctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(socket_path(args.socket), timeout=args.timeout)


def _print_json(obj: Any, out: TextIO = sys.stdout) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True), file=out)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


# --- admin commands --------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        st = await c.request("status")
    if args.json:
        _print_json(st)
        return EXIT_OK
    cap = st.get("capacity", {})
    state = "draining" if st.get("draining") else "ready" if st.get("ready") else "not ready"
    print(f"yapd {st.get('version')}  pid {st.get('pid')}  port {st.get('port')}  up {ago(st.get('uptime_s', 0))}"
          f"  deploy {st.get('deploy')}  {state}{'  (demo)' if st.get('demo') else ''}")
    in_flight = sum(int(e.get("in_flight", 0)) for e in st.get("engines", {}).values())
    print(f"connections {cap.get('active', '?')}/{cap.get('max', '?')}  engine requests in flight {in_flight}")
    lag = st.get("loop_lag_ms") or {}
    if lag.get("samples"):
        # Late timers delay every engine output and frame: `yapctl profile` says why.
        print(f"event loop late by p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms "
              f"(last {lag['window_s']:g} s)")
    gcp = st.get("gc_pauses") or {}
    if gcp.get("long"):
        print(f"garbage collection held it {gcp['long']} times for {gcp['long_ms']:g} ms or more, longest "
              f"{gcp['max_ms']} ms (generation {gcp['max_generation']}; last {gcp['window_s']:g} s)")
    if st.get("systemd_status"):
        print(f"systemd: {st['systemd_status']}")
    mps = st.get("mps")
    if mps:
        where = f"daemon pid {mps['daemon_pid']}, " if mps.get("daemon_pid") else ""
        # As the chat engine reports it: only a forked EngineCore gets the priority.
        chat_env = st.get("engines", {}).get("chat", {}).get("child_env") or {}
        first = "; chat engine at below-normal priority" if chat_env.get("CUDA_MPS_CLIENT_PRIORITY") == "1" else ""
        print(f"mps {'on' if mps.get('active') else 'off'} ({where}{mps.get('reason')}{first})")
    rows = []
    for role, eng in sorted(st.get("engines", {}).items()):
        rows.append([role, str(eng.get("state", "?")), fmt.backend(eng), str(eng.get("model", "")),
                     str(eng.get("in_flight", "")), str(eng.get("detail", "") or "")])
    if rows:
        print()
        print(_table(rows, ["ENGINE", "STATE", "BACKEND", "MODEL", "IN FLIGHT", "DETAIL"]))
    if st.get("pending_restart_keys"):
        print(f"\nkeys waiting for an engine restart: {', '.join(st['pending_restart_keys'])}")
    return EXIT_OK


async def cmd_connections(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        reply = await c.request("connections")
    conns = reply.get("connections", [])
    if args.json:
        _print_json(conns)
        return EXIT_OK
    now = time.time()
    rows = [[str(x.get("session_id") or "-"), str(x.get("remote") or "-"),
             ago(now - float(x.get("connected_at", now))), str(x.get("turns", 0)), str(x.get("state", "")),
             _fmt(x.get("last_ttft_ms"))] for x in conns]
    print(_table(rows, ["SESSION", "PEER", "SINCE", "TURNS", "STATE", "LAST TTFT MS"]))
    print(f"{len(conns)} connection{'s' if len(conns) != 1 else ''}")
    return EXIT_OK


def format_log(rec: dict[str, Any]) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(float(rec.get("ts", time.time()))))
    return f"{ts} {str(rec.get('level', '')).upper():<7} {rec.get('logger', '')}: {rec.get('message', '')}"


async def cmd_logs(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise AdminError("-n must be 0 or more", EXIT_USAGE)
    async with _client(args) as c:
        req: dict[str, Any] = {"n": args.n, "follow": args.follow, "level": args.level}
        if args.grep:
            req["grep"] = args.grep
        async for msg in c.stream("logs", timeout=None if args.follow else -1, **req):
            if msg.get("event") == "log":
                print(json.dumps(msg) if args.json else format_log(msg), flush=True)
    return EXIT_OK


async def cmd_reload(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        reply = await c.request("reload")
    applied = reply.get("applied") or []
    print(f"reloaded; applied now: {', '.join(applied) if applied else 'nothing'}")
    if reply.get("needs_engine_restart"):
        print(f"needs an engine restart (yapctl restart): {', '.join(reply['needs_engine_restart'])}")
    if reply.get("needs_daemon_restart"):
        print(f"needs a daemon restart (systemctl restart yapd): {', '.join(reply['needs_daemon_restart'])}")
    for warning in reply.get("warnings") or []:
        print(f"yapctl: warning: {warning}", file=sys.stderr)
    return EXIT_OK


async def cmd_restart(args: argparse.Namespace) -> int:
    # A restart loads models again: minutes for big ones on a cold cache.
    async with AdminClient(socket_path(args.socket), timeout=max(args.timeout, 1800.0)) as c:
        async for msg in c.stream("restart", target=args.target):
            if msg.get("event"):
                print(msg.get("message", ""), flush=True)
            else:
                note = "" if msg.get("drained", True) else " (drain timed out: turns in flight were cut)"
                if msg.get("stopped"):
                    note += f"; stopped {', '.join(msg['stopped'])} (no longer deployed)"
                print(f"restarted {', '.join(msg.get('roles', [])) or 'nothing deployed'}{note}")
    return EXIT_OK


async def cmd_drain(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        reply = await c.request("drain", on=not args.off)
    if args.off:
        print("accepting turns again")
    else:
        print(f"draining: new turns refused, /healthz 503; {reply.get('active', 0)} connections still open")
    return EXIT_OK


async def cmd_profile(args: argparse.Namespace) -> int:
    async with AdminClient(socket_path(args.socket), timeout=max(args.seconds, 0) + args.timeout) as c:
        reply = await c.request("profile", seconds=args.seconds, top=args.top)
    if args.json:
        _print_json(reply)
        return EXIT_OK
    print(f"event loop over {reply['wall_s']} s: {reply['busy_s']} s inside profiled calls, "
          f"{reply.get('waiting_s', 0)} s waiting (cProfile slows Python code: read the shares)")
    print(_table([[g["package"], f"{g['own_ms']:.1f}", f"{g['share']:.1%}"] for g in reply["by_package"]],
                 ["package", "own ms", "share"]))
    print()
    print(_table([[f"{r['own_ms']:.1f}", f"{r['total_ms']:.1f}", str(r["calls"]), r["function"]] for r in reply["top"]],
                 ["own ms", "total ms", "calls", "function"]))
    return EXIT_OK


async def cmd_awq(args: argparse.Namespace) -> int:
    if args.awq_action == "status":
        async with _client(args) as c:
            _print_json(await c.request("awq", action="status"))
        return EXIT_OK
    if args.awq_action == "cancel":
        async with _client(args) as c:
            reply = await c.request("awq", action="cancel")
        print(f"cancelled the AWQ job for the {reply['cancelled']} model ({reply['model']})")
        return EXIT_OK
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # Quantizing a 12B model takes a while: each progress line restarts the clock.
    async with AdminClient(socket_path(args.socket), timeout=max(args.timeout, 3600.0)) as c:
        if args.json:
            try:
                async for msg in c.stream("awq", action="rebuild", target=args.target):
                    print(json.dumps(msg), flush=True)
            except AdminError as exc:
                if exc.reply is None:
                    raise
                # The failed rebuild's whole reply (what was built or pushed before the failure).
                print(json.dumps(exc.reply), flush=True)
                print(f"yapctl: {exc}", file=sys.stderr)
                return exc.exit_code
            return EXIT_OK
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=_stderr_console(), transient=False) as bar:
            tasks: dict[str, Any] = {}
            async for msg in c.stream("awq", action="rebuild", target=args.target):
                if msg.get("event") == "progress":
                    role = str(msg.get("role", "awq"))
                    if role not in tasks:
                        tasks[role] = bar.add_task(role, total=None)
                    desc = f"{role}: {msg.get('stage', '')} {msg.get('message', '')}".strip()
                    total = msg.get("layers")
                    # Only layer events move the bar; "saving", "pushing" keep it where it is.
                    if isinstance(total, int) and total > 0:
                        bar.update(tasks[role], description=desc, completed=msg.get("layer", 0), total=total)
                    else:
                        bar.update(tasks[role], description=desc)
                elif "event" not in msg:
                    for t in tasks.values():
                        task = bar.tasks[t]
                        if task.total:
                            bar.update(t, completed=task.total)
                    print(json.dumps({k: v for k, v in msg.items() if k != "ok"}))
    return EXIT_OK


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


# --- WebSocket client tools ------------------------------------------------------------


def _start_message(args: argparse.Namespace) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "start", "user_utterance": args.utterance, "session_id": f"yapctl-{os.getpid()}"}
    for arg, name in (("gender", "assistant_gender"), ("style", "persona_style"), ("persona", "persona_text"),
                      ("history", "history_text")):
        if getattr(args, arg):
            msg[name] = getattr(args, arg)
    return msg


async def cmd_chat(args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

    from yapctl.bench import run_turn
    from yapd.protocol import CLOSE_POLICY, CLOSE_TRY_AGAIN, ENDS_CONNECTION

    def show(msg: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(msg), flush=True)
        elif msg["type"] == "ack":
            print(f"ack request_id={msg.get('request_id')}", flush=True)
        elif msg["type"] == "toolcall":
            print(f"toolcall {msg.get('status')} {json.dumps(msg.get('calls', []))}", flush=True)
        elif msg["type"] == "token":
            sys.stdout.write(msg["text"])
            sys.stdout.flush()
        elif msg["type"] == "error":
            print(f"\nerror {msg.get('error_code')}: {msg.get('message')}", file=sys.stderr, flush=True)

    timeout = args.turn_timeout
    try:
        async with connect(args.url, additional_headers={"X-API-Key": args.key} if args.key else None,
                           open_timeout=timeout, max_size=None, compression=None) as ws:
            res = await run_turn(ws, _start_message(args), timeout, on_message=show)
    except InvalidStatus as exc:  # something answered, not with a WebSocket: a wrong path, a proxy
        print(f"yapctl: {args.url} answered HTTP {exc.response.status_code}", file=sys.stderr)
        return EXIT_FAILED
    except ConnectionClosed as exc:
        # yapd answered and closed: a refused key (1008) or a full server (1013)
        if exc.rcvd is not None and exc.rcvd.code in (CLOSE_POLICY, CLOSE_TRY_AGAIN):
            return _refused(exc.rcvd.reason, denied=exc.rcvd.code == CLOSE_POLICY)
        print(f"yapctl: the connection to {args.url} ended: {exc}", file=sys.stderr)
        return EXIT_DOWN
    except BrokenPipeError:
        raise  # our stdout closed (`| head`): main() ends quietly, 141
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        # An exception is true whatever its text, and a TimeoutError may have none.
        timed_out = isinstance(exc, asyncio.TimeoutError)
        why = str(exc) or ("timed out" if timed_out else type(exc).__name__)
        print(f"yapctl: cannot reach yapd at {args.url}: {why}{f' (after {timeout:g} s)' if timed_out else ''}",
              file=sys.stderr)
        return EXIT_DOWN
    if res.error == "timeout":
        print(f"\nyapctl: no done within {timeout:g} s", file=sys.stderr)
        return EXIT_FAILED
    refused = (res.error or "").split(":", 1)[0]
    if refused in ENDS_CONNECTION:  # said before the close: same as 1008 / 1013
        return _refused(refused, denied=refused == "authentication_failed")
    stream_ms = (res.total_ms - res.ttft_ms) if res.total_ms is not None and res.ttft_ms is not None else None
    metrics = {"ttfb_ms": _r(res.ttft_ms), "tool_ms": _r(res.tool_ms), "total_ms": _r(res.total_ms),
               "stream_ms": _r(stream_ms), "chunks": res.chunks, "chars": res.chars}
    if args.json:  # one JSON object a line, the summary too
        print(json.dumps({"type": "summary", "metrics": metrics, "final": res.text}))
    else:
        if res.ttft_ms is not None:
            print()
        print("metrics " + " ".join(f"{k}={v}" for k, v in metrics.items()))
        print(f"final {json.dumps(res.text)}")
    return EXIT_OK if res.ok else EXIT_FAILED


def _refused(reason: str, *, denied: bool) -> int:
    """yapd turned the connection away: a refused key is exit 4, a full server 1."""
    print(f"yapctl: yapd refused the connection: {reason}", file=sys.stderr)
    return EXIT_DENIED if denied else EXIT_FAILED


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


async def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from yapctl.bench import BenchConfig, bench

    if args.n < 1 or args.c < 1:
        raise AdminError("-n and -c must be at least 1", EXIT_USAGE)
    cfg = BenchConfig(url=args.url, key=args.key, n=args.n, concurrency=args.c, timeout=args.turn_timeout,
                      utterance=args.utterance, warmup=not args.no_warmup)
    with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_stderr_console(), transient=True) as bar:
        task = bar.add_task("turns", total=args.n)
        report = await bench(cfg, lambda done, total: bar.update(task, completed=done))
    # Turns a connection that failed never ran count as asked and not completed.
    summary = {**report.summary(), "asked": args.n}
    if args.json:
        _print_json(summary)
    else:
        print(f"{summary['completed']}/{args.n} turns completed, concurrency {summary['concurrency']}, "
              f"{summary['wall_s']} s")
        rows = [[name, *(_fmt(summary[key].get(p)) for p in ("p50", "p95", "p99"))]
                for name, key in (("ttft", "ttft_ms"), ("tool decision", "tool_ms"), ("token gap", "itl_ms"),
                                  ("total", "total_ms"))]
        print(_table(rows, ["MS", "P50", "P95", "P99"]))
        if summary["errors"]:
            print("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())))
    return EXIT_OK if summary["completed"] == args.n else EXIT_FAILED


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


async def _tui_placeholder(args: argparse.Namespace) -> int:  # pragma: no cover - main() runs the TUI itself
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "status": cmd_status, "connections": cmd_connections, "logs": cmd_logs, "reload": cmd_reload,
    "restart": cmd_restart, "drain": cmd_drain, "awq": cmd_awq, "profile": cmd_profile, "chat": cmd_chat,
    "bench": cmd_bench,
    "tui": _tui_placeholder,
}

__all__ = ["EXIT_DENIED", "EXIT_DOWN", "EXIT_FAILED", "EXIT_OK", "EXIT_PIPE", "build_parser", "main"]
