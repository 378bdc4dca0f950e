"""An engine whose front end runs in an engine host (yapd/engines/host.py), a process of its
own: ``own_process = true`` in its section.

To yapd's turns it is an engine like the others: ``stream`` yields the host's deltas as
they come, closing it aborts the request there, ``health`` is what the host last said
(or "failed" once the host is gone). yapd keeps its own tokenizer for the engine (its
turns build the prompts), loaded from the source the host names as it begins, while the
engine loads there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from yapd import forking
from yapd.config import Config
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, EngineState, SamplingSpec
from yapd.engines.host import command
from yapd.engines.pipe import MessagePipe, MessageTooLarge, PipeClosed
from yapd.engines.tokenizer import load_tokenizer

log = logging.getLogger("yapd.engine.hosted")

# How long a shutdown waits for the host to stop its engine (vLLM's own shutdown waits for
# its EngineCore) before the host and its EngineCore are killed.
SHUTDOWN_WAIT_S = 30.0
PIPE_GRACE_S = 1.0
# A serving host is asked to answer this often; one silent for HOST_SILENT_S is hung (a
# stopped process, a wedged loop): it fails like a dead one, so its turns end and /healthz
# says so, instead of streams that wait for ever on a host that looks healthy.
HEARTBEAT_S = 5.0
HOST_SILENT_S = 20.0
# ... and one starting its engine, whose loop an import or a load may hold longer: a host
# stopped or wedged in its start made yapd's start (and the restart holding the engine
# lock) wait for ever, systemd's start timeout extended and its watchdog fed meanwhile.
HOST_SILENT_STARTING_S = 90.0
_END = object()


# What a host builds its engine with: "module:callable", called with the role and config.
LOCAL_FACTORY = "yapd.engines:create_local_engine"


class HostedEngine(Engine):
    def __init__(self, role: str, cfg: Config, local: Engine, factory: str = LOCAL_FACTORY) -> None:
        self.role = role
        self.cfg = cfg
        self.factory = factory
        # The engine as it would run in yapd, never started here: its model, backend and
        # memory plans (on disk, shared with the host's copy) answer for this one.
        self.local = local
        self.model = local.model
        self.backend = local.backend
        self.parallel_start_safe = local.parallel_start_safe
        self._state: EngineState = "stopped"
        self._detail = ""
        self._remote: EngineHealth | None = None
        self._host_children: list[int] = []  # while its vLLM engine starts: its EngineCore, say
        self._tok: Any = None
        self._tok_load: asyncio.Future[Any] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pipe: MessagePipe | None = None
        # Each stream by a key of its own on the pipe, not its request id: a request id
        # used again right after an abort must not get the old request's last deltas.
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._keys_of: dict[str, int] = {}
        self._next_key = itertools.count()
        self._started: asyncio.Future[str] | None = None
        self._unkeep: Callable[[], None] = _nothing
        self._reaper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._heard = 0.0  # when the host last said anything, time.monotonic()
        self.start_seconds: float | None = None

    def tokenizer_source(self) -> tuple[str, str | None]:
        return self.local.tokenizer_source()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def host_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def forget_memory_plan(self) -> None:
        self.local.forget_memory_plan()

    def health(self) -> EngineHealth:
        extra: dict[str, Any] = dict(self._remote.extra) if self._remote is not None else {}
        if self.start_seconds:
            extra["start_seconds"] = self.start_seconds
        if self._proc is not None:
            extra["host_pid"] = self._proc.pid
        if self._state == "ready" and self._remote is not None and not self._remote.ok:
            return EngineHealth(False, self._remote.state, self._remote.detail, extra)
        return EngineHealth(self._state == "ready", self._state, self._detail, extra)

    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        self._state, self._detail, self._remote, self._tok, self._tok_load = "starting", "", None, None, None
        self._host_children = []
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._started.add_done_callback(_retrieved)  # failed by the host's end after a start gave up
        try:
            await self._spawn()
            assert self._pipe is not None and self._proc is not None
            self._heartbeat = asyncio.create_task(self._watch(self._proc))
            self._pipe.send("start", self.factory, self.role, self.cfg, alongside, dict(child_env or {}),
                            logging.getLogger("yapd").getEffectiveLevel())
            self.model = await self._started
            if self._tok_load is None:
                raise EngineError(f"{self.role} engine host named no tokenizer")
            tok = await self._tok_load
            self.go_on("our tokenizer")
            if self._state != "starting":
                # The host died (or hung) after its engine started, while our tokenizer
                # loaded: a start that went on would call the dead engine ready.
                raise EngineError(f"{self.role} engine: {self._detail}")
        except Exception as exc:
            self._state = "failed"
            self._detail = self._detail or f"start failed: {exc}"
            if self._tok_load is not None:
                self._tok_load.cancel()
            await self._end_host(wait_s=SHUTDOWN_WAIT_S if self.host_pid is not None else 0)
            if isinstance(exc, EngineError):
                raise
            raise self.start_error(exc) from exc
        self._tok = tok
        self.start_seconds = round(time.perf_counter() - t0, 1)
        self._state = "ready"
        log.info("engine host ready role=%s pid=%s", self.role, self.host_pid)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Ask the host to answer, from its start on, and fail it when it stays silent."""
        self._heard = time.monotonic()
        while proc is self._proc and self._state in ("starting", "ready") and self._pipe is not None:
            self._tell("ping")
            asleep = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)
            if time.monotonic() - asleep > 2 * HEARTBEAT_S:
                # This loop was held up itself (yapd stopped, a long pause): the host's
                # answers may be unread yet, and its silence is measured from now.
                self._heard = max(self._heard, time.monotonic())
                continue
            silent = time.monotonic() - self._heard
            # A start yapd's stop abandoned is owed an answer as soon as a serving host is.
            limit = HOST_SILENT_S if self._state == "ready" or self.start_abandoned else HOST_SILENT_STARTING_S
            if silent > limit and proc is self._proc and self._state in ("starting", "ready"):
                self._host_gone(proc, f"the engine host has not answered for {silent:.0f} s (hung)")
                self._kill_host(proc)  # its end shows to the reaper; a restart starts another
                return

    async def _load_tokenizer(self, name: str, revision: str | None) -> Any:
        if self.backend == "vllm":
            from yapd.engines.vllm import after_the_setups

            await after_the_setups()  # an engine starting in this process, its set-up's GIL
        return await asyncio.to_thread(load_tokenizer, name, revision)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # yapd's end stays out of every other child (an EngineCore yapd forks): the host
        # sees yapd gone as the end of its pipe only once no copy of this end is left. The
        # host's end may leak into a core forked at this very moment; the host's exit is
        # then still seen, by the reaper.
        self._unkeep = forking.keep_out(ours.fileno())
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(
                *command(theirs.fileno(), self.cfg.server.event_loop), pass_fds=(theirs.fileno(),))
        except BaseException:  # no host: yapd's end goes too (each failed start leaked it)
            self._unkeep()
            self._unkeep = _nothing
            ours.close()
            raise
        finally:
            theirs.close()
        # The ends of this host, not of one an earlier start of this engine ran.
        self._pipe = await MessagePipe.open(ours, self._on_message, lambda exc: self._on_closed(proc, exc))
        self._reaper = asyncio.create_task(self._reap(proc))
        log.info("engine host started role=%s pid=%s", self.role, proc.pid)

    def abandon_start(self) -> None:
        super().abandon_start()
        self._tell("abandon")

    def set_log_level(self, level: int) -> None:
        """yapd's log level, reloaded: the host logs as yapd does."""
        self._tell("level", level)

    def _tell(self, *msg: Any) -> None:
        """A message to the host, where its pipe is open (gone, it hears nothing more)."""
        if self._pipe is not None and not self._pipe.closed:
            with contextlib.suppress(PipeClosed):
                self._pipe.send(*msg)

    def kill(self) -> None:
        """The fault tests' crash of the engine, in the host (the CPU engine's kill)."""
        if self._pipe is None or self._pipe.closed:
            raise EngineError(f"{self.role} engine host is not running")
        self._pipe.send("kill")

    # --- what the host says ----------------------------------------------------------

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        self._heard = time.monotonic()
        kind = msg[0]
        if kind == "pong":
            return
        if kind == "delta":
            if (queue := self._streams.get(msg[1])) is not None:
                queue.put_nowait(msg[2])
        elif kind == "end":
            if (queue := self._streams.get(msg[1])) is not None:
                queue.put_nowait(_END if msg[2] is None else EngineError(f"{self.role} engine: {msg[2]}"))
        elif kind == "log":
            record = logging.makeLogRecord(msg[1])
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif kind == "health":
            self._set_remote(msg[1])
        elif kind == "starting":
            _, self.model, (name, revision) = msg
            self._tok_load = asyncio.ensure_future(self._load_tokenizer(name, revision or None))
            self._tok_load.add_done_callback(_retrieved)  # a failed start may not await it
        elif kind == "children":
            self._host_children = list(msg[1])
            log.info("engine host's start processes role=%s pids=%s", self.role,
                     ",".join(map(str, self._host_children)) or "none")
        elif kind == "started":
            _, model, health = msg
            self._remote, self._host_children = health, []
            _settle(self._started, model)
        elif kind == "start_failed":
            _, error, health = msg
            self._remote = health
            self._detail = f"start failed: {error}"
            _settle(self._started, EngineError(error))

    def _set_remote(self, health: EngineHealth) -> None:
        was_ok = self._remote is None or self._remote.ok
        self._remote = health
        if was_ok and not health.ok and self._state == "ready":
            log.error("engine unhealthy role=%s: %s", self.role, health.detail or health.state)
            self._fail_streams(f"{self.role} engine is {health.state}: {health.detail}")

    def _on_closed(self, proc: asyncio.subprocess.Process, exc: Exception | None) -> None:
        if proc is not self._proc:
            return
        why = f"the engine host's pipe broke ({exc})" if exc else "the engine host closed its pipe"
        # Nothing more comes from the host. Its exit code, which says more, comes from the
        # reaper as a rule at once (a start fails with it); a host that lives on without
        # its pipe fails by this.
        self._fail_streams(f"{self.role} engine: {why}")
        asyncio.get_running_loop().call_later(PIPE_GRACE_S, self._host_gone, proc, why)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if code != 0 and proc is self._proc:
            self._kill_core()  # in any state: a stop may have begun as it died
        self._host_gone(proc, f"the engine host exited with code {code}")

    def _host_gone(self, proc: asyncio.subprocess.Process, why: str) -> None:
        if proc is not self._proc:
            return
        if self._state in ("starting", "ready"):
            self._state, self._detail = "failed", why
            log.error("engine failed role=%s: %s", self.role, why)
        _settle(self._started, EngineError(why))
        self._fail_streams(f"{self.role} engine: {why}")

    def _fail_streams(self, why: str) -> None:
        for queue in self._streams.values():
            queue.put_nowait(EngineError(why))

    def _kill_host(self, proc: asyncio.subprocess.Process) -> None:
        self._kill_core()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    def _kill_core(self) -> None:
        """A host that died leaves its EngineCore (its child, loading or serving) holding GPU
        memory: the one its health named, or the start processes it last said it had."""
        from yapd.engines.vllm import is_start_child

        pid = self._remote.extra.get("pid") if self._remote is not None else None
        for core in {*self._host_children, *([pid] if isinstance(pid, int) else [])}:
            if is_start_child(core):
                log.warning("ending the engine host's EngineCore role=%s pid=%d", self.role, core)
                with contextlib.suppress(OSError):
                    os.kill(core, signal.SIGKILL)

    # --- requests ----------------------------------------------------------------------

    async def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec,
                     request_id: str, together: bool = False) -> AsyncIterator[Delta]:
        if self._state != "ready" or self._pipe is None or (self._remote is not None and not self._remote.ok):
            raise EngineError(f"{self.role} engine is {self.health().state}")
        if request_id in self._keys_of:
            raise EngineError(f"{self.role} engine: request {request_id} is already running")
        key = next(self._next_key)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[key], self._keys_of[request_id] = queue, key
        done = False
        try:
            try:
                self._pipe.send("stream", key, request_id, prompt_ids, spec, together)
            except MessageTooLarge as exc:  # never sent: this request's error, the host serves on
                done = True
                raise EngineError(f"{self.role} engine: the request is too large to hand to its host: {exc}") \
                    from None
            while True:
                item = await queue.get()
                if item is _END:
                    done = True
                    return
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        except PipeClosed as exc:
            done = True
            raise EngineError(f"{self.role} engine: {exc}") from exc
        finally:
            del self._streams[key], self._keys_of[request_id]
            if not done:
                self._abort(key)

    async def abort(self, request_id: str) -> None:
        if (key := self._keys_of.get(request_id)) is not None:
            # The host says nothing of a request it aborts: its stream ends here, as a
            # request aborted in this process ends (finished, "abort").
            self._streams[key].put_nowait(Delta("", 0, True, "abort"))
            self._abort(key)

    def _abort(self, key: int) -> None:
        self._tell("abort", key)

    async def shutdown(self) -> None:
        if self._proc is None:
            self._state = "stopped"
            return
        self._state = "stopping"
        await self._end_host(SHUTDOWN_WAIT_S)
        self._state = "stopped"

    async def _end_host(self, wait_s: float) -> None:
        """Ask the host to stop its engine and exit; past ``wait_s``, kill it and its
        EngineCore."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        proc, pipe = self._proc, self._pipe
        if proc is None:
            return
        self._tell("stop")
        try:
            await asyncio.wait_for(proc.wait(), wait_s)
        except asyncio.TimeoutError:
            log.warning("engine host did not stop in %.0f s: killing it role=%s pid=%s", wait_s, self.role, proc.pid)
            self._kill_host(proc)
            await proc.wait()
        except asyncio.CancelledError:
            # Whoever waited on this stop gave up first (yapd's own stop, past its drain
            # time): the host and its EngineCore must not outlive yapd holding GPU memory.
            log.warning("engine host stop cut short: killing it role=%s pid=%s", self.role, proc.pid)
            self._kill_host(proc)
            raise
        if pipe is not None:
            pipe.close()
        self._unkeep()
        self._unkeep = _nothing
        if self._reaper is not None:
            await asyncio.gather(self._reaper, return_exceptions=True)
        self._proc = self._pipe = self._reaper = None


def _settle(future: asyncio.Future[Any] | None, value: Any) -> None:
    """``future``'s result, or its exception when ``value`` is one, unless it has one."""
    if future is not None and not future.done():
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def _nothing() -> None:
    pass


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
