"""An engine host: one engine's front end in a process of its own (``own_process = true``
in the engine's section; yapd/engines/hosted.py is yapd's side).

yapd runs each engine's front end (vLLM's ``AsyncLLM``: request intake, output
processing, detokenizing) on its own event loop beside the WebSocket server. With both
engines there, their outputs take turns on one loop and one GIL: on an H200 raw vLLM with
the tool's front end in a process of its own answered 16 sessions 14 ms sooner at p50
(docs/bench/README.md, run ac). Here the engine runs as it would in yapd, on this
process's loop; yapd sends its requests (prompt token ids, sampling, request id) and
reads each delta back over a socketpair (yapd/engines/pipe.py). Logs go to yapd's own
handlers; vLLM's own output goes to the inherited stdout, as it does in yapd.

Started by yapd as ``python -c`` (:func:`command`), never by a user.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from yapd.engines.base import Engine, EngineHealth, SamplingSpec
from yapd.engines.pipe import MessagePipe, PipeClosed
from yapd.turn import start_now

log = logging.getLogger("yapd.engine.host")

# How often the host looks at its engine's health (a dead EngineCore) to tell yapd of a
# change: yapd's /healthz and watchdog read what it was last told.
HEALTH_POLL_S = 0.2


def command(fd: int, event_loop: str) -> list[str]:
    """The command line of a host reading and writing ``fd``: this interpreter, with this
    process's import path (a host must import the same yapd and vLLM as yapd, installed
    or run from a checkout)."""
    code = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from yapd.engines.host import main; main()"
    return [sys.executable, "-c", code, json.dumps(sys.path), str(fd), event_loop]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    fd, event_loop = int(args[1]), args[2]
    # Ctrl-C in a terminal reaches the whole process group: yapd stops its engines in
    # order, this one included, over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # yapd's reload, not ours
    from yapd import gcpause

    gcpause.hold_for_start()  # as yapd's own start does, until the engine has loaded
    from yapd.cli import run_loop

    sys.exit(run_loop(Host(socket.socket(fileno=fd)).run(), event_loop))


class Host:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pipe: MessagePipe | None = None
        self._engine: Engine | None = None
        self._start: asyncio.Task[None] | None = None
        self._streams: dict[int, asyncio.Task[None]] = {}  # by yapd's key for each stream
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._abandon: asyncio.Task[None] | None = None
        self._abandoned = False  # yapd is stopping: a start not yet begun ends at its first step

    async def run(self) -> int:
        from yapd import forking

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # The engine's own children (a forked EngineCore) must not keep yapd's end of the
        # pipe from seeing this process end.
        forking.keep_out(self._sock.fileno())
        # Before the pipe opens: yapd's "start" (with its log level) may be read at once
        # (uvloop reads it within open()), and must not be overwritten after.
        root = logging.getLogger()
        root.addHandler(_ToYapd(self))
        root.setLevel(logging.INFO)
        self._pipe = await MessagePipe.open(self._sock, self._on_message, self._on_closed)
        self._loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        health = asyncio.create_task(self._watch_health())
        await self._stop.wait()
        health.cancel()
        await self._end()
        return 0

    def send(self, *msg: Any) -> None:
        """To yapd, from any thread (a log record comes from wherever it was logged)."""
        if threading.get_ident() != self._loop_thread:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                self._loop.call_soon_threadsafe(self.send, *msg)
            return
        if self._pipe is not None and not self._pipe.closed:
            with contextlib.suppress(PipeClosed):
                self._pipe.send(*msg)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "stream":
            _, key, rid, prompt_ids, spec, together = msg
            # On its way to the engine before this returns, as a turn's request in yapd is
            # (or, together, with the others this host's pass reads from its pipe).
            running = start_now(self._stream(key, rid, prompt_ids, spec, together))
            if not running.done():
                self._streams[key] = running
        elif kind == "abort":
            if (task := self._streams.pop(msg[1], None)) is not None:
                task.cancel()  # closing the engine's stream aborts the request there
        elif kind == "start":
            _, factory, role, cfg, alongside, child_env, level = msg
            logging.getLogger().setLevel(level)
            self._start = asyncio.create_task(self._start_engine(factory, role, cfg, alongside, child_env))
        elif kind == "ping":
            self.send("pong")
        elif kind == "level":
            logging.getLogger().setLevel(msg[1])
        elif kind == "abandon":
            self._abandoned = True
            self._abandon = asyncio.create_task(self._end_start())
        elif kind == "kill":
            if self._engine is not None and hasattr(self._engine, "kill"):
                self._engine.kill()
        elif kind == "stop":
            self._stop.set()

    def _on_closed(self, exc: Exception | None) -> None:
        if exc is not None:
            log.error("engine host: the pipe to yapd broke: %s", exc)
        self._stop.set()  # yapd is gone, or done with us: the engine goes too

    async def _start_engine(self, factory: str, role: str, cfg: Any, alongside: bool,
                            child_env: Mapping[str, str]) -> None:
        from yapd import gcpause

        try:
            _title(f"yapd {role} engine host")
            module, _, name = factory.partition(":")
            self._engine = engine = getattr(importlib.import_module(module), name)(role, cfg)
            if self._abandoned:
                engine.abandon_start()
            # yapd loads its own tokenizer for the engine while the engine loads here.
            self.send("starting", engine.model, await asyncio.to_thread(engine.tokenizer_source))
            await engine.start(alongside=alongside, child_env=child_env)
        except Exception as exc:  # the start's error, said to yapd, whose start fails with it
            self.send("start_failed", str(exc), self._engine.health() if self._engine is not None else None)
            return
        gcpause.settle()  # as yapd does after its own engines' loads
        self.send("started", engine.model, engine.health())

    async def _stream(self, key: int, rid: str, prompt_ids: Sequence[int], spec: SamplingSpec,
                      together: bool) -> None:
        finished = False
        log.debug("request %s: %d prompt tokens, up to %d new", rid, len(prompt_ids), spec.max_tokens)
        try:
            if self._engine is None:
                raise RuntimeError("the engine host has no engine")
            async for delta in self._engine.stream(prompt_ids, spec, rid, together):
                self.send("delta", key, delta)
                finished = delta.finished
            if not finished:
                self.send("end", key, None)
        except asyncio.CancelledError:
            pass  # yapd aborted it: it reads no more of it
        except Exception as exc:  # this request's: said to yapd, which fails that turn only
            self.send("end", key, str(exc))
        finally:
            self._streams.pop(key, None)

    async def _watch_health(self) -> None:
        """Tells yapd of each change of the engine's health once it has started, and while
        a vLLM engine starts, of its start processes (its EngineCore, loading): should this
        host die then, yapd ends them, as they would hold GPU memory with no one to stop
        them."""
        from yapd.engines.vllm import start_children

        told: EngineHealth | None = None
        kids: list[int] = []
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            if self._engine is None or self._start is None:
                continue
            if not self._start.done():
                if self._engine.backend == "vllm" and (now := sorted(start_children())) != kids:
                    self.send("children", now)
                    kids = now
                continue
            health = self._engine.health()
            if health != told:
                self.send("health", health)
                told = health

    async def _end_start(self) -> None:
        """yapd is stopping while this engine loads: its start ends after the step it is in,
        its EngineCore or model inspection (this process's children) ended as yapd ends
        its own engines' (yapd.engines.vllm.end_loading_starts)."""
        from yapd.engines.vllm import end_loading_starts

        if self._engine is not None and self._start is not None and not self._start.done():
            await end_loading_starts([self._engine])

    async def _end(self) -> None:
        self._abandoned = True
        if self._start is not None and not self._start.done():
            await (self._abandon if self._abandon is not None else self._end_start())
            with contextlib.suppress(Exception):
                await self._start
        for task in list(self._streams.values()):
            task.cancel()
        if self._engine is not None:
            try:
                await self._engine.shutdown()
            except Exception as exc:
                log.warning("engine host: shutting the engine down: %s", exc)
        if self._pipe is not None:
            self._pipe.close()  # after what it holds is written: yapd reads the last logs


class _ToYapd(logging.Handler):
    """This process's log records, to yapd's handlers (its journal lines, the log ring
    `yapctl logs` reads), with their own time."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self._host = host

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self._host.send("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                                    "msg": text, "created": record.created, "msecs": record.msecs,
                                    "threadName": record.threadName})
        except Exception:
            self.handleError(record)


def _title(text: str) -> None:
    """What ps and top show for this process, where setproctitle is installed (vLLM brings
    it): otherwise ``python -c`` and yapd's import path."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(text)
