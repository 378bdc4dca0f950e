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
import importlib
import itertools
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Sequence
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
    engine and its sampling params), deciding the turns it is sent."""

    def __init__(self, conn: Any, proc: Any, pid: int, core_pid: int | None) -> None:
        self._conn, self._proc = conn, proc
        self.pid, self.core_pid = pid, core_pid
        self._waiting: dict[int, asyncio.Future[ToolResult]] = {}
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(cls, factory: str, args: Sequence[Any], tool_names: Sequence[str]) -> RemoteTool:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(theirs, factory, list(args), list(tool_names)), name="tool-front")
        proc.start()
        theirs.close()
        if not ours.poll(START_TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"the tool's front end said nothing in {START_TIMEOUT_S:.0f} s")
        said = ours.recv()
        if "error" in said:
            proc.join(30)
            raise RuntimeError(f"the tool's front end did not start: {said['error']}")
        return cls(ours, proc, said["pid"], said.get("core_pid"))

    async def decide(self, prompt_ids: list[int], turn_t0: float, t0_monotonic: float) -> ToolResult:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._loop.remove_reader(self._conn.fileno())
            loop.add_reader(self._conn.fileno(), self._readable)
            self._loop = loop
        key = next(self._keys)
        self._waiting[key] = answer = loop.create_future()
        self._conn.send(("turn", key, prompt_ids, turn_t0, t0_monotonic))
        try:
            return await answer
        finally:
            self._waiting.pop(key, None)

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
        except Exception as exc:  # the child is gone (or said nonsense): every turn waiting on it fails
            assert self._loop is not None
            self._loop.remove_reader(self._conn.fileno())
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(RuntimeError(f"the tool's front end is gone ({exc!r})"))

    def shutdown(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        try:
            self._conn.send(("stop", None, None, None, None))
        except OSError:
            pass
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._conn.close()


def _serve(conn: Any, factory: str, args: list[Any], tool_names: list[str]) -> None:
    try:
        module, _, name = factory.partition(":")
        engine, sp = getattr(importlib.import_module(module), name)(*args)
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    from yapd.engines.vllm import core_pid

    conn.send({"pid": os.getpid(), "core_pid": core_pid(engine)})
    try:
        asyncio.run(_answer_turns(conn, engine, sp, tool_names))
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()


async def _answer_turns(conn: Any, engine: Any, sp: Any, tool_names: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    turns: set[asyncio.Task[None]] = set()

    async def answer(key: int, prompt_ids: list[int], turn_t0: float, t0_monotonic: float) -> None:
        try:
            result = await decide(engine, prompt_ids, sp, tool_names, turn_t0, t0_monotonic)
        except Exception as exc:
            conn.send(("error", key, f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", key, result))

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
    for turn in list(turns):
        turn.cancel()
