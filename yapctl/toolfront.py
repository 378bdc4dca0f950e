"""A raw turn's tool decision, with the tool engine's front end in the bench's process or in
a process of its own (gpubench's ``rawsplit`` phase).

yapd, and raw vLLM as gpubench runs it, keep both engines' front ends (AsyncLLM: request
intake, output processing, detokenizing) on one event loop in one process; `vllm serve`
beside a tool server has one process per model. At 8-16 sessions that server pair was
ahead of raw in one process (docs/bench/README.md, run r: TTFT held for the decision at
16 sessions 65.84 ms against 72.69). ``RemoteTool`` runs raw's tool AsyncLLM in a child
process of its own, deciding each turn there, so that one run can say what the shared
front end costs before yapd is built any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import multiprocessing as mp
import os
import signal
import time
import uuid
from collections.abc import Coroutine, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

# (first output ms on the request's clock, decision ms, first output ms on the turn's
# clock, the tool engine's stamps on the turn's clock as keep_stamps says them)
ToolResult = tuple[float | None, float, float | None, dict[str, float]]

START_TIMEOUT_S = 600.0  # a cold tool engine compiles for minutes


def keep_stamps(into: dict[str, dict[str, float]], role: str, out: Any, t0_monotonic: float) -> None:
    """What a first output says of its request, as yapd's done timings name it: the engine's
    stamps (yapd.engines.vllm.request_stamps) as ms on the turn's clock where the engine
    keeps them, and the prompt tokens its prefix cache held."""
    from yapd.engines.vllm import request_stamps

    st = request_stamps(getattr(out, "metrics", None))
    said = st.ms_since(t0_monotonic) if st is not None else {}
    if isinstance(cached := getattr(out, "num_cached_tokens", None), int):
        said["cached_tokens"] = cached
    if said:
        into[role] = said


async def decide(engine: Any, prompt_ids: list[int], sp: Any, tool_names: Sequence[str], turn_t0: float,
                 t0_monotonic: float) -> ToolResult:
    """One turn's tool request, read until its decision settles, then closed (the abort,
    as yapd sends it once the decision is out). ``turn_t0`` is the turn's perf_counter,
    ``t0_monotonic`` its time.monotonic: both clocks are the host's own on Linux, so a
    child process measures on the turn's clock too."""
    from yapd.engines.vllm import token_prompt
    from yapd.toolcall import DecisionReader

    t0 = time.perf_counter()
    first = first_turn = None
    stamps: dict[str, dict[str, float]] = {}
    reader = DecisionReader(tool_names)
    gen = engine.generate(token_prompt(prompt_ids), sp, uuid.uuid4().hex)
    async for out in gen:
        if first is None:
            now = time.perf_counter()
            first, first_turn = (now - t0) * 1000, (now - turn_t0) * 1000
            keep_stamps(stamps, "tool", out, t0_monotonic)
        if reader.feed(out.outputs[0].text) is not None:
            break
    done = (time.perf_counter() - t0) * 1000
    await gen.aclose()
    return first, done, first_turn, stamps.get("tool", {})


def vllm_tool(kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The tool AsyncLLM from ``kwargs`` (yapd.engines.vllm.engine_kwargs) and its requests'
    sampling (greedy, as yapd's; no stop string: vLLM would hold a one-character first
    token back a step)."""
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    return llm, SamplingParams(max_tokens=96, temperature=0.0, top_k=1, output_kind=RequestOutputKind.DELTA)


class RemoteTool:
    """The tool engine in a child process of its own (spawned: a fresh interpreter, as a
    second `vllm serve` is), built there by ``factory`` ("module:function" returning the
    engine and its sampling params), deciding the turns it is sent on an event loop of
    the bench's kind (``loop``: "uvloop" or asyncio's own)."""

    def __init__(self, conn: Connection, proc: BaseProcess, pid: int, core_pid: int | None) -> None:
        self._conn, self._proc = conn, proc
        self.pid, self.core_pid = pid, core_pid
        self._waiting: dict[int, asyncio.Future[ToolResult]] = {}
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone: Exception | None = None
        # What turns readable when the child ends. Its end comes as end-of-file on the pipe,
        # or on multiprocessing's sentinel, only where no process it forked (vLLM's
        # EngineCore) holds those open too: a pidfd (Linux 5.3) says so regardless.
        self._pidfd = _pidfd(pid)
        self._ended_fd = self._pidfd if self._pidfd is not None else proc.sentinel

    @classmethod
    def start(cls, factory: str, args: Sequence[Any], tool_names: Sequence[str], loop: str = "asyncio") -> RemoteTool:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(theirs, factory, list(args), list(tool_names), loop),
                           name="tool-front")
        proc.start()
        theirs.close()
        try:
            if not ours.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the tool's front end said nothing in {START_TIMEOUT_S:.0f} s")
            said = ours.recv()
        except (EOFError, OSError, RuntimeError) as exc:
            _end(proc)
            ours.close()
            why = f"exit code {proc.exitcode}" if isinstance(exc, (EOFError, OSError)) else str(exc)
            raise RuntimeError(f"the tool's front end did not start: {why}") from exc
        if "error" in said:
            _end(proc)
            ours.close()
            raise RuntimeError(f"the tool's front end did not start: {said['error']}")
        return cls(ours, proc, said["pid"], said.get("core_pid"))

    async def decide(self, prompt_ids: list[int], turn_t0: float, t0_monotonic: float) -> ToolResult:
        """The turn's decision from the child. The decision's time is this side's, from the
        send to the answer read here (the pipe both ways is in it, as a server's would be);
        the first output's are the child's, on the turn's clock."""
        if self._gone is not None:
            raise RuntimeError(f"the tool's front end is gone ({self._gone!r})")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unwatch()
            loop.add_reader(self._conn.fileno(), self._readable)
            loop.add_reader(self._ended_fd, self._ended)
            self._loop = loop
        key = next(self._keys)
        self._waiting[key] = answer = loop.create_future()
        sent = time.perf_counter()
        self._conn.send(("turn", key, prompt_ids, turn_t0, t0_monotonic))
        try:
            first, _, first_turn, stamps = await answer
        finally:
            self._waiting.pop(key, None)
        return first, (time.perf_counter() - sent) * 1000, first_turn, stamps

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                kind, key, value = self._conn.recv()
                answer = self._waiting.get(key)
                if answer is None or answer.done():
                    continue
                if kind == "ok":
                    answer.set_result(tuple(value))
                else:
                    answer.set_exception(RuntimeError(f"the tool's front end: {value}"))
        except Exception as exc:  # gone, or said what cannot be read: no turn can rely on it now
            self._fail(exc)

    def _ended(self) -> None:
        self._fail(RuntimeError(f"exit code {self._proc.exitcode}"))

    def _fail(self, exc: Exception) -> None:
        self._gone = exc
        self._unwatch()
        _end(self._proc, self.core_pid)
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(RuntimeError(f"the tool's front end is gone ({exc!r})"))

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
            self._loop.remove_reader(self._ended_fd)
        self._loop = None

    def shutdown(self) -> None:
        self._unwatch()
        with contextlib.suppress(OSError):
            self._conn.send(("stop", None, None, None, None))
        _end(self._proc, self.core_pid, wait_s=60)
        self._conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3 / Python 3.9
        return None


def _end(proc: BaseProcess, core_pid: int | None = None, wait_s: float = 0) -> None:
    """``proc`` ended: waited for up to ``wait_s``, else killed; where it did not end
    cleanly, its EngineCore too (a grandchild, which a killed front end leaves behind)."""
    proc.join(wait_s)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
    if proc.exitcode != 0 and core_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(core_pid, signal.SIGKILL)


def run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run ``main`` on asyncio's own loop unless uvloop is asked for by name."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _serve(conn: Connection, factory: str, args: list[Any], tool_names: list[str], loop: str) -> None:
    try:
        module, _, name = factory.partition(":")
        engine, sp = getattr(importlib.import_module(module), name)(*args)
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    from yapd.engines.vllm import core_pid

    conn.send({"pid": os.getpid(), "core_pid": core_pid(engine)})
    try:
        run_loop(_answer_turns(conn, engine, sp, tool_names), loop)
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()


async def _answer_turns(conn: Connection, engine: Any, sp: Any, tool_names: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    turns: set[asyncio.Task[None]] = set()

    async def answer(key: int, prompt_ids: list[int], turn_t0: float, t0_monotonic: float) -> None:
        try:
            result = await decide(engine, prompt_ids, sp, tool_names, turn_t0, t0_monotonic)
            conn.send(("ok", key, result))
        except Exception as exc:  # the turn's, not the others': said to the bench, which fails that turn
            conn.send(("error", key, f"{type(exc).__name__}: {exc}"))

    def readable() -> None:
        try:
            while conn.poll():
                kind, key, prompt_ids, turn_t0, t0_monotonic = conn.recv()
                if kind == "stop":
                    stop.set()
                    return
                turn = loop.create_task(answer(key, prompt_ids, turn_t0, t0_monotonic))
                turns.add(turn)
                turn.add_done_callback(turns.discard)
        except (EOFError, OSError):  # the bench is gone
            stop.set()

    loop.add_reader(conn.fileno(), readable)
    await stop.wait()
    loop.remove_reader(conn.fileno())
