"""The floor: raw AsyncLLM fed the token ids yapd builds, a turn as yapd runs one."""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from yapctl.bench import burst_steps, gap_tail, gaps, gaps_by_starts, pct, per_step, slow_bursts
from yapctl.gpubench.measure import PROFILE_S, PROFILE_TOP, at_level, profiled, watching
from yapctl.gpubench.prompts import TurnPrompts
from yapctl.gpubench.results import Results
from yapctl.gpubench.runsetup import Setup
from yapctl.toolfront import RemoteTool, decide, keep_stamps, vllm_tool
from yapd.config import Config

T = TypeVar("T")


@dataclass(frozen=True)
class RawTurn:
    """One raw turn's timings (ms from the turn's start, just before its chat request)."""

    ttft: float | None  # the first output with text: what a client sees first
    tool_first: float | None  # the tool's first output, on the tool request's own clock
    tool_done: float  # the decision read, on the tool request's own clock
    token_gaps: list[float]  # between every token, text or not
    first_token: float | None  # the first token, text or not
    tool_first_turn: float | None = None  # the tool's first output on the turn's clock (yapd's clock)
    # What each engine said of its request, as yapd's done timings name it: its stamps
    # ({queued,scheduled,first_token}_ms on the turn's clock) where its request stats are on
    # (--set ROLE.extra_engine_args={disable_log_stats=false}), and cached_tokens
    stamps: dict[str, dict[str, float]] = field(default_factory=dict)
    t0_ms: float = 0.0  # the turn's start, time.monotonic() in ms: the stamps' own clock
    t0_pc: float = 0.0  # the turn's start, time.perf_counter(): the clock of ``text_at``
    text_at: list[float] = field(default_factory=list)  # perf_counter() of each output with text

    @property
    def gaps(self) -> list[float]:
        """Between outputs with text."""
        return gaps(self.text_at)


def raw_level(rows: Sequence[RawTurn]) -> dict[str, Any]:
    """A level's figures from its raw turns."""
    def q(xs: list[float], hi: int = 95) -> dict[str, float | None]:
        return {"p50": pct(xs, 50), f"p{hi}": pct(xs, hi)}

    ttft = [r.ttft for r in rows if r.ttft is not None]
    # What a client of yapd's protocol could at best see on these engines: the reply waits
    # for the tool decision (toolcall comes before any token).
    gated = [max(r.ttft, r.tool_done) for r in rows if r.ttft is not None]
    text_gaps = [g for r in rows for g in r.gaps]
    # How each engine's first tokens shared its steps: (the turn's start, its first token)
    steps: dict[str, Any] = {}
    for role in ("chat", "tool"):
        if turns := [(r.t0_ms, r.t0_ms + r.stamps[role]["first_token_ms"]) for r in rows
                     if "first_token_ms" in r.stamps.get(role, {})]:
            steps[f"{role}_first_tokens_per_step"] = per_step([first for _, first in turns])
            steps[f"{role}_burst_steps"] = burst_steps(turns)
    return {"turns": len(rows), "ttft_ms": q(ttft), "ttft_gated_ms": q(gated),
            "ttft_token_ms": q([r.first_token for r in rows if r.first_token is not None]),
            "itl_ms": q(text_gaps, 99),
            "itl_token_ms": q([g for r in rows for g in r.token_gaps], 99),
            "itl_tail": gap_tail(text_gaps),
            "itl_starts": gaps_by_starts([(r.t0_pc, r.text_at) for r in rows]),
            # on the tool request's own clock (tool_first_token_ms, where the engine keeps
            # request stats, is its core's stamp on the turn's clock; before 2026-12-04 this
            # figure had that name and the stamp overwrote it)
            "tool_first_output_ms": q([r.tool_first for r in rows if r.tool_first is not None]),
            "tool_first_turn_ms": q([r.tool_first_turn for r in rows if r.tool_first_turn is not None]),
            "tool_ms": q([r.tool_done for r in rows]),
            # each first token's way from its EngineCore's stamp to this loop (as yapd's)
            "chat_core_to_front_ms": q([r.first_token - r.stamps["chat"]["first_token_ms"] for r in rows
                                        if r.first_token is not None and "first_token_ms" in r.stamps.get("chat", {})]),
            "tool_core_to_front_ms": q([r.tool_first_turn - r.stamps["tool"]["first_token_ms"] for r in rows
                                        if r.tool_first_turn is not None
                                        and "first_token_ms" in r.stamps.get("tool", {})]),
            **{f"{role}_{name}": q([r.stamps[role][name] for r in rows if name in r.stamps.get(role, {})])
               for role, name in sorted({(role, name) for r in rows for role, said in r.stamps.items()
                                         for name in said})},
            **steps,
            # held for the decision, as yapd's client TTFT is
            "ttft_slow": slow_bursts([r.t0_ms / 1000 for r in rows if r.ttft is not None], gated)}


class RawEngines:
    """The floor: a chat and a tool ``AsyncLLM`` fed the token ids yapd builds, a turn
    as yapd's concurrent mode runs one (both requests, in ``order``; the tool's read
    until its decision settles, then aborted)."""

    def __init__(self, chat: Any, tool: Any, prompts: Callable[[int], tuple[list[int], list[int]]],
                 tool_names: Sequence[str], order: str, chat_sp: Any, tool_sp: Any,
                 start_method: str | None = None) -> None:
        self.chat, self.tool, self.prompts = chat, tool, prompts
        self.tool_names = list(tool_names)
        self.order = order
        self.chat_sp, self.tool_sp = chat_sp, tool_sp
        self.start_method = start_method  # how vLLM started the EngineCores (it may overrule what was asked)

    @classmethod
    def start(cls, cfg: Config, prompts: Callable[[int], tuple[list[int], list[int]]], order: str,
              start_method: str = "spawn", split_tool: bool = False, loop: str = "asyncio") -> RawEngines:
        """Both engines in this process, or with ``split_tool`` the tool's in a process of
        its own (yapctl.toolfront), started once the chat's has loaded (each sizes its KV
        cache from the memory it finds free)."""
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        from yapd.engines.vllm import engine_kwargs, gpu_capability

        # vLLM reads it at each EngineCore's start, and sets "spawn" there itself where it
        # must (a CUDA context in this process).
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = start_method
        chat = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs("chat", cfg, cfg.chat.model,
                                                                          gpu_capability())))
        tool_kwargs = engine_kwargs("tool", cfg, cfg.tool.model, gpu_capability())
        names = [x.name for x in cfg.tools]
        try:
            tool, tool_sp = (RemoteTool.start("yapctl.toolfront:vllm_tool", [tool_kwargs], names, loop), None) \
                if split_tool else vllm_tool(tool_kwargs)
        except BaseException:
            chat.shutdown()  # its GPU memory, for the phases after this one
            raise
        chat_sp = SamplingParams(max_tokens=200, min_tokens=200, ignore_eos=True, temperature=0.8, top_p=0.95,
                                 output_kind=RequestOutputKind.DELTA)
        return cls(chat, tool, prompts, names, order, chat_sp, tool_sp, os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"))

    def shutdown(self) -> None:
        self.chat.shutdown()
        self.tool.shutdown()

    def processes(self) -> dict[str, int]:
        """This process (raw's front end, and the bench), the tool's front end where it has
        one of its own, and the engines' EngineCores."""
        from yapd.engines.vllm import core_pid

        pids = {"front": os.getpid()}
        cores = {"chat": core_pid(self.chat)}
        if isinstance(self.tool, RemoteTool):
            pids["tool_front"] = self.tool.pid
            cores["tool"] = self.tool.core_pid
        else:
            cores["tool"] = core_pid(self.tool)
        pids.update({role: pid for role, pid in cores.items() if pid is not None})
        return pids

    async def _tool(self, i: int, turn_t0: float, engine_stamps: dict[str, dict[str, float]],
                    t0_monotonic: float) -> tuple[float | None, float, float | None]:
        prompt = self.prompts(i)[1]
        if isinstance(self.tool, RemoteTool):
            first, done, first_turn, stamps = await self.tool.decide(prompt, turn_t0, t0_monotonic)
        else:
            first, done, first_turn, stamps = await decide(self.tool, prompt, self.tool_sp, self.tool_names,
                                                           turn_t0, t0_monotonic)
        if stamps:
            engine_stamps["tool"] = stamps
        return first, done, first_turn

    async def turn(self, i: int) -> RawTurn:
        """Turn ``i`` (see TurnPrompts.turn): both engines together."""
        from yapd.engines.vllm import token_prompt

        t0, t0_monotonic = time.perf_counter(), time.monotonic()
        engine_stamps: dict[str, dict[str, float]] = {}
        tool_task = tool_request(functools.partial(self._tool, i, t0, engine_stamps, t0_monotonic), self.order)
        stamps: list[float] = []  # outputs with text: what a client of yapd or vllm serve sees
        token_stamps: list[float] = []  # every token, text or not (a byte of a character held back)
        async for out in self.chat.generate(token_prompt(self.prompts(i)[0]), self.chat_sp, uuid.uuid4().hex):
            if out.outputs[0].token_ids:
                now = time.perf_counter()
                if not token_stamps:
                    keep_stamps(engine_stamps, "chat", out, t0_monotonic)
                token_stamps.append(now)
                if out.outputs[0].text:
                    stamps.append(now)
        tool_first, tool_done, tool_first_turn = await tool_task
        # TTFT as a client counts it: the first text (the first token may be part of a
        # character, with nothing to show yet); the first token's time is kept beside it.
        return RawTurn((stamps[0] - t0) * 1000 if stamps else None, tool_first, tool_done,
                       gaps(token_stamps), (token_stamps[0] - t0) * 1000 if token_stamps else None,
                       tool_first_turn, engine_stamps, t0_monotonic * 1000, t0, stamps)


def raw_prompts(s: Setup, cfg: Config) -> TurnPrompts:
    """Every turn's prompts, built ahead of the clock, for raw's engines on ``cfg`` (whose
    compile caches are yapd's)."""
    from yapd.daemon import cache_env

    cache_env(cfg)
    tp = TurnPrompts(s)
    tp.all(s.levels, s.rounds)
    return tp


async def phase_raw(res: Results, s: Setup, section: str = "raw", split_tool: bool = False) -> None:
    """raw: both engines' front ends in this process (as yapd has them); raw_split (the
    ``rawsplit`` phase): the tool's in a process of its own (yapctl.toolfront)."""
    cfg = s.config()
    tp = raw_prompts(s, cfg)
    chat_ids, tool_ids = tp.turn(0)
    res.put(section, "prompt_tokens", {"chat": len(chat_ids), "tool": len(tool_ids)})
    t0 = time.perf_counter()
    raw = RawEngines.start(cfg, tp.turn, s.raw_order, s.raw_start_method, split_tool, s.event_loop)
    res.put(section, "start_s", round(time.perf_counter() - t0, 1))
    res.put(section, "start_method", {"asked": s.raw_start_method, "used": raw.start_method})
    try:
        for c in s.levels:
            tp.level(s, c)
            with watching(s, c, raw.processes()) as figures:
                level = raw_level(await at_level(c, raw.turn, s.rounds))
            res.put(section, f"c{c}", {**level, **figures(level["turns"] + c)})
        if split_tool:
            return  # the profile and the order probe are of both engines' clients in this process
        if s.profile_level:  # the same window as yapd's, on raw's own loop
            from yapd.loopprofile import LoopProfiler

            res.put("raw", f"profile_c{s.profile_level}", await profiled(
                at_level(s.profile_level, raw.turn, s.rounds), lambda: LoopProfiler().run(PROFILE_S, PROFILE_TOP)))
        if s.order_probe:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            short = SamplingParams(max_tokens=8, min_tokens=8, ignore_eos=True, temperature=0.8, top_p=0.95,
                                   output_kind=RequestOutputKind.DELTA)
            res.put("raw", "order_probe", await order_probe(raw.chat, raw.tool, tp.turn, short, raw.tool_sp,
                                                            3 * s.rounds))
    finally:
        raw.shutdown()


async def phase_rawsplit(res: Results, s: Setup) -> None:
    await phase_raw(res, s, "raw_split", split_tool=True)


def tool_request(begin: Callable[[], Coroutine[Any, Any, T]], order: str) -> asyncio.Task[T]:
    """Raw's tool request of a turn, made before its chat request. chats_then_tools
    (every run before run n; "chat_first" in run n's files): it begins in the loop's next
    round, so at N sessions a round's chat requests all leave before its tool requests;
    tool_first: at once, before the turn's chat request, one turn after another. yapd's
    turn.request_order of the same names sends them the same way."""
    from yapd.turn import after_a_round, start_now

    return start_now(begin()) if order == "tool_first" else start_now(after_a_round(begin))


# How one session's two requests leave, per turn: raw (the tool's in a task that waits for
# the loop's next round, the chat's at once: phase_raw's turns), chat_then_tool (both at
# once, chat first: yapd's request_order chat_first), tool_then_chat (tool_first), each alone.
PROBE_ORDERS = ("raw", "chat_then_tool", "tool_then_chat", "chat_alone", "tool_alone")


async def order_probe(chat: Any, tool: Any, prompts: Callable[[int], tuple[list[int], list[int]]], chat_sp: Any,
                      tool_sp: Any, turns: int) -> dict[str, Any]:
    """Each engine's first output at one session by the order the requests leave in,
    the orders taking turns so drift hits all alike. ``prompts(i)``: turn i's (chat, tool)
    token ids; ``chat_sp`` should ask for a short reply: only the first outputs count."""
    from yapd.engines.vllm import token_prompt
    from yapd.turn import start_now

    async def first(llm: Any, ids: list[int], sp: Any, t0: float, stop: bool) -> float | None:
        at = None
        gen = llm.generate(token_prompt(ids), sp, uuid.uuid4().hex)
        try:
            async for out in gen:
                if at is None and out.outputs[0].token_ids:
                    at = (time.perf_counter() - t0) * 1000
                    if stop:  # the tool request ends at its first output, as a decision does
                        break
        finally:
            await gen.aclose()
        return at

    async def one(order: str, i: int) -> tuple[float | None, float | None]:
        chat_ids, tool_ids = prompts(i)
        t0 = time.perf_counter()
        c = functools.partial(first, chat, chat_ids, chat_sp, t0, False)
        t = functools.partial(first, tool, tool_ids, tool_sp, t0, True)
        if order == "raw":
            tool_task = tool_request(t, "chats_then_tools")
            return await c(), await tool_task
        if order == "chat_alone":
            return await c(), None
        if order == "tool_alone":
            return None, await t()
        if order == "chat_then_tool":
            ct = start_now(c())
            tt = start_now(t())
        else:
            tt = start_now(t())
            ct = start_now(c())
        return await ct, await tt

    rows: dict[str, list[tuple[float | None, float | None]]] = {o: [] for o in PROBE_ORDERS}
    for order in PROBE_ORDERS:  # one warm-up turn each
        await one(order, -1)
    for i in range(turns):
        for order in PROBE_ORDERS:
            rows[order].append(await one(order, i))

    def q(xs: list[float | None]) -> dict[str, float | None]:
        ys = [x for x in xs if x is not None]
        return {"p50": pct(ys, 50), "p95": pct(ys, 95)}

    return {o: {"turns": len(r), "chat_first_ms": q([x[0] for x in r]), "tool_first_ms": q([x[1] for x in r])}
            for o, r in rows.items()}
