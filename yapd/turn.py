"""One turn, top to bottom: ack, tool decision, chat stream, final, done.

A turn runs as its own task. Cancelling that task (cancel, barge-in, shutdown) stops
the engines' requests through their streams' ``finally`` blocks; the session then sends
the turn's ``done`` with ``cancelled: true`` (see :meth:`Turn.done_message`), so no token
of a cancelled turn can follow its ``done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from yapd import protocol
from yapd.config import Config, TurnConfig
from yapd.engines.base import Delta, Engine, EngineError, SamplingSpec
from yapd.prompts import PromptCache, build_chat_prompt, clip_text
from yapd.runtime import Runtime
from yapd.timeouts import within
from yapd.toolcall import Decision, DecisionReader, query_block

log = logging.getLogger("yapd.turn")

Send = Callable[[Any], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class TurnInput:
    request_id: str
    session_id: str
    utterance: str
    history_text: str
    persona_text: str
    seed: int


class Turn:
    def __init__(self, rt: Runtime, inp: TurnInput, send: Send, chat_cache: PromptCache | None,
                 tool_cache: PromptCache | None) -> None:
        self.rt = rt
        self.cfg: Config = rt.cfg  # one config for the whole turn, even across a reload
        self.inp = inp
        self.send = send
        self.chat_cache = chat_cache
        self.tool_cache = tool_cache
        self.t0 = time.perf_counter()
        self.t0_monotonic = time.monotonic()  # the engines' stamps' clock
        self.engine_id = engine_request_base(rt.turn_number(), inp.request_id)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_ms: float | None = None
        self.tool_ms: float | None = None
        # When each engine's first output reached us (ms from the start): what the engines
        # took, as against what the client saw.
        self.tool_first_ms: float | None = None
        self.chat_first_ms: float | None = None
        # The chat's first output with text: the first token of a reply can be part of a
        # character, whose text comes with the next one.
        self.chat_text_ms: float | None = None
        # What each engine says of its request at its first output, as done timings name
        # it: where its time to that output went (EngineStamps), and how much of the prompt
        # its prefix cache held.
        self.engines: dict[str, dict[str, float]] = {}
        self.text_parts: list[str] = []
        self.decision: Decision | None = None
        self.state = "starting"
        self.ack_sent = False
        self.ack_out = asyncio.Event()  # its send returned: the toolcall may follow it
        self.done_sent = False
        self.counted = False  # in yapd_turns_total: each turn once, by its outcome

    def _first_output(self, role: str, delta: Delta) -> float:
        """A request's first output: when it reached the turn (ms), and what its engine says
        of the request (done timings' ``engines``; the prompt cache counted in metrics)."""
        at = self._ms()
        said: dict[str, float] = delta.stamps.ms_since(self.t0_monotonic) if delta.stamps is not None else {}
        metrics = self.rt.metrics
        metrics.prompt_tokens.labels(role).inc(delta.prompt_tokens)
        if delta.cached_tokens is not None:
            said["cached_tokens"] = delta.cached_tokens
            metrics.prompt_cached_tokens.labels(role).inc(delta.cached_tokens)
        if said:
            self.engines[role] = said
        return at

    def _ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 2)

    # --- the turn ------------------------------------------------------------------

    async def run(self, ack: dict[str, Any]) -> None:
        chat = self.rt.engine("chat") if self.cfg.deployed("chat") else None
        tool = self.rt.engine("tool") if self.cfg.deployed("tool") else None
        chat_stream = self._chat_stream(chat) if chat is not None else None
        pending: list[asyncio.Task[Any]] = []
        try:
            try:
                if chat_stream is not None and tool is not None and self.cfg.turn.concurrent:
                    pending = list(self._start_both(tool, chat_stream))
                self.ack_sent = True
                await self.send(ack)
                self.ack_out.set()
                if tool is None:
                    if chat_stream is not None:
                        await self._stream_reply(chat_stream, None)
                elif chat_stream is None:
                    await self._decide(tool)
                elif pending:
                    first, decide = pending
                    await decide
                    await self._stream_reply(chat_stream, first)
                else:
                    await self._decide(tool)
                    await self._stream_reply(chat_stream, None)
            finally:
                try:
                    await _settle(pending)
                finally:
                    if chat_stream is not None:
                        # Ended while waiting on the decision with the chat's first delta
                        # read, its stream was left suspended: its request runs on until
                        # closed. (Still running in its cancelled first-delta task, when a
                        # second cancel cut the settling short, it closes itself there.)
                        with contextlib.suppress(RuntimeError):
                            await chat_stream.aclose()  # type: ignore[attr-defined]
        except EngineError as exc:
            log.error("turn failed request=%s session=%s: %s", self.inp.request_id, self.inp.session_id, exc)
            await self.send(protocol.error(protocol.ENGINE_UNAVAILABLE, f"the engine failed this turn: {exc}",
                                           self.inp.request_id))
            self.state = "failed"
            await self._send_done(cancelled=False, error=protocol.ENGINE_UNAVAILABLE)
            return
        if chat is not None:
            await self.send({"type": "final", "request_id": self.inp.request_id, "text": "".join(self.text_parts)})
        self.state = "done"
        await self._send_done(cancelled=False)

    def _start_both(self, tool: Engine, chat_stream: AsyncIterator[Delta]) -> tuple[asyncio.Task[Delta],
                                                                                    asyncio.Task[Decision]]:
        """Concurrent mode: both requests leave before the ack, in turn.request_order's
        order (the chat stream's first delta, the decision)."""
        order = self.cfg.turn.request_order
        if order == "tool_first":
            decide = start_now(self._decide(tool))
            return start_now(_first_delta(chat_stream)), decide
        first = start_now(_first_delta(chat_stream))
        if order == "chat_first":
            return first, start_now(self._decide(tool))
        return first, start_now(after_a_round(functools.partial(self._decide, tool)))

    # --- tool decision -------------------------------------------------------------

    def _tool_prompt(self, tool: Engine) -> list[int]:
        prefix, tail = self.rt.tool_prefix(tool)
        cache, t = self.tool_cache, self.cfg.turn
        assert cache is not None
        if not cache.cut_in_tokens:
            query = cache.encode_lines(tool_query(self.inp.utterance, self.inp.history_text, t))
            if len(query) <= t.user_utt_max_tokens + t.tool_history_tokens + QUERY_FRAME_TOKENS:
                return prefix + query + tail
            # Cut in characters, the utterance or history ran over its tokens (emoji, a
            # tokenizer that knows no CJK): cut in the tool's own tokens, from now on.
            cache.cut_in_tokens = True
        query = cache.encode_lines(tool_query(self.inp.utterance, self.inp.history_text, t, cache))
        return prefix + query + tail

    async def _decide(self, tool: Engine) -> Decision:
        self.state = "tool"
        t = self.cfg.turn
        reader = DecisionReader([x.name for x in self.cfg.tools])
        # Greedy; no stop string: the reader ends the answer at a blank line itself.
        spec = SamplingSpec(max_tokens=t.tool_max_tokens, temperature=0.0, top_k=1)
        stream = tool.stream(self._tool_prompt(tool), spec, f"{self.engine_id}:tool", t.send_together)

        async def read() -> Decision:
            async for delta in stream:
                if self.tool_first_ms is None:
                    self.tool_first_ms = self._first_output("tool", delta)
                self.rt.metrics.tokens.labels("tool").inc(delta.n_tokens)
                if reader.feed(delta.text) is not None:
                    break
            return reader.finish()

        try:
            try:
                decision = await within(read(), t.tool_timeout_s)
            except asyncio.TimeoutError:
                log.warning("tool decision timed out after %.1fs request=%s", t.tool_timeout_s, self.inp.request_id)
                decision = Decision("no", (), reader.text, "timeout")
            except EngineError as exc:
                if self.cfg.deployed("chat"):
                    # The reply matters more than the tool: go on without one.
                    log.error("tool engine failed, deciding no request=%s: %s", self.inp.request_id, exc)
                    decision = Decision("no", (), reader.text, "error")
                else:
                    raise
            # Sent as it settles, from here, never before the turn's ack: the request's
            # abort and the turn's wake-up once this task ends each wait their turn in a
            # busy event loop (H100, 16 sessions: the decision sent 9.7 ms after the tool's
            # first output, p50).
            await self.ack_out.wait()
            await self._send_decision(decision)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return decision

    async def _send_decision(self, decision: Decision) -> None:
        self.decision = decision
        self.tool_ms = self._ms()
        self.rt.metrics.tool_decision.observe(self.tool_ms / 1000)
        self.rt.metrics.tool_decisions.labels(decision.status, decision.reason).inc()
        await self.send({"type": "toolcall", "request_id": self.inp.request_id, **decision.as_json()})

    # --- chat reply ----------------------------------------------------------------

    async def _chat_stream(self, chat: Engine) -> AsyncIterator[Delta]:
        """The chat engine's deltas; the prompt is built on the first ``anext``, when the
        request goes out (concurrent mode orders the two requests by ``turn.request_order``)."""
        t = self.cfg.turn
        assert self.chat_cache is not None
        prompt = build_chat_prompt(
            self.chat_cache, self.rt.layout(chat), self.inp.persona_text, self.inp.history_text,
            self.inp.utterance, history_max_tokens=t.history_max_tokens, history_step=t.history_trim_step,
            utterance_max_tokens=t.user_utt_max_tokens, max_model_len=self.cfg.chat.max_model_len,
            max_out=t.chat_max_out, exact=t.exact_token_trim,
        )
        self.prompt_tokens = len(prompt.ids)
        spec = SamplingSpec(max_tokens=t.chat_max_out, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
                            repetition_penalty=t.repetition_penalty, ignore_eos=t.ignore_eos,
                            seed=self.inp.seed if t.seeded_sampling else None)
        stream = chat.stream(prompt.ids, spec, f"{self.engine_id}:chat", t.send_together)
        try:
            async for delta in stream:
                if self.chat_text_ms is None:
                    if self.chat_first_ms is None:
                        self.chat_first_ms = at = self._first_output("chat", delta)
                    else:
                        at = self._ms()
                    if delta.text:
                        self.chat_text_ms = at
                yield delta
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _stream_reply(self, stream: AsyncIterator[Delta], first: asyncio.Future[Delta] | None) -> None:
        self.state = "streaming"
        flush_s = self.cfg.turn.stream_flush_ms / 1000
        metrics = self.rt.metrics
        rid = self.inp.request_id
        pending = ""
        last_sent = 0.0
        try:
            if first is not None:
                try:
                    delta: Delta | None = await first
                except StopAsyncIteration:
                    delta = None
                deltas = _prepend(delta, stream)
            else:
                deltas = stream
            async for delta in deltas:
                self.completion_tokens += delta.n_tokens
                if not delta.text:
                    continue
                self.text_parts.append(delta.text)
                now = time.perf_counter()
                if self.ttft_ms is None:
                    # The first token always goes out at once: TTFT is what users feel.
                    await self.send(protocol.token(rid, delta.text))
                    self.ttft_ms = self._ms()
                    metrics.ttft.observe(self.ttft_ms / 1000)
                    last_sent = now
                    continue
                pending += delta.text
                if now - last_sent >= flush_s:
                    metrics.itl.observe(now - last_sent)
                    await self.send(protocol.token(rid, pending))
                    pending = ""
                    last_sent = now
            if pending:
                await self.send(protocol.token(rid, pending))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            metrics.tokens.labels("chat").inc(self.completion_tokens)

    # --- done ----------------------------------------------------------------------

    def done_message(self, *, cancelled: bool, error: str | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "done",
            "request_id": self.inp.request_id,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "timings": {"ttft_ms": self.ttft_ms, "tool_ms": self.tool_ms, "total_ms": self._ms(),
                        "engine_ttft_ms": self.chat_first_ms, "engine_text_ms": self.chat_text_ms,
                        "tool_first_ms": self.tool_first_ms},
            "cancelled": cancelled,
        }
        if self.engines:
            msg["timings"]["engines"] = self.engines
        if error:
            msg["error"] = error
        return msg

    def count(self, outcome: str) -> None:
        """The turn's outcome in yapd_turns_total, its time in yapd_turn_seconds and its
        figures in the recent stats, once, by whoever ends it first: every turn, a
        cancelled one too (only those that sent their own done were timed, and a duty
        cycle read off yapd_turn_seconds left out every barge-in)."""
        if not self.counted:
            self.counted = True
            self.rt.metrics.turns.labels(outcome).inc()
            self.rt.metrics.turn_total.observe(time.perf_counter() - self.t0)
            self.rt.recent.record(self.ttft_ms, self.tool_ms)

    async def _send_done(self, *, cancelled: bool, error: str | None = None) -> None:
        self.done_sent = True
        self.count("error" if error else "cancelled" if cancelled else "completed")
        await self.send(self.done_message(cancelled=cancelled, error=error))


def engine_request_base(number: int, request_id: str) -> str:
    """A turn's engine requests' ids, less their ":chat" / ":tool": the turn's number makes
    them unique (clients choose request ids, and two sessions may choose the same), its
    request id says whose they are in the engines' logs."""
    return f"{number}-{request_id}"


def client_request_id(engine_request_id: str) -> str:
    """The client's request id in one of its turn's engine request ids."""
    return engine_request_id.rsplit(":", 1)[0].partition("-")[2]


def start_now(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """A task that has already run up to its first wait when this returns (Python 3.12's
    eager tasks), so an engine request it makes is on its way at once. An ordinary task
    waits for the event loop's next round, and under load a round takes milliseconds
    (measured on the H100 at 16 sessions: the tool's decision 42 ms after the start
    instead of 98). Older Pythons get an ordinary task."""
    loop = asyncio.get_running_loop()
    eager = getattr(asyncio, "eager_task_factory", None)
    if eager is not None:
        task: asyncio.Task[T] = eager(loop, coro, name=name)
        return task
    return loop.create_task(coro, name=name)


async def after_a_round(begin: Callable[[], Awaitable[T]]) -> T:
    """``begin()``, called in the event loop's next round: turns that start in one round
    (a burst of messages read together) send what they send at once before anything
    deferred this way. Run it with :func:`start_now`: an ordinary task would begin a
    round later already, and this one round after that. A callable, not a coroutine: one
    made beforehand and cancelled with its task before the task's first step (Python
    before 3.12, no eager tasks: a barge-in one round after a start) was never awaited,
    and said so in the journal."""
    await asyncio.sleep(0)
    return await begin()


async def _settle(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel what is still running and collect every outcome (an error the turn
    never awaited must not end up as "exception was never retrieved"). A cancel of the
    turn itself while it waits here goes through (the connection closing as a barge-in
    is being settled): swallowed, the turn ran on past its end."""
    for task in tasks:
        if not task.done():
            task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def _first_delta(stream: AsyncIterator[Delta]) -> Delta:
    return await anext(stream)


# The tool query's own words around the utterance and history (query_block), in tokens, with room.
QUERY_FRAME_TOKENS = 64


def tool_query(utterance: str, history_text: str, t: TurnConfig, tokens: PromptCache | None = None) -> str:
    """The per-turn part of the tool prompt: the utterance and the end of the history,
    cut to start on a whole line; in characters (about 4 a token), or with ``tokens``
    (the tool's cache) in its own tokens too."""
    recent = ""
    if t.tool_history_tokens and history_text:
        recent = history_text[-t.tool_history_tokens * 4:]
        nl = recent.find("\n")
        if 0 <= nl < len(recent) - 1 and len(history_text) > len(recent):
            recent = recent[nl + 1:]
        if tokens is not None:  # its last whole lines within the tokens
            recent = tokens.tail_lines(recent, t.tool_history_tokens)
    utterance = clip_text(utterance, t.user_utt_max_tokens, from_end=False)
    if tokens is not None:
        utterance = tokens.first_tokens(utterance, t.user_utt_max_tokens)
    return query_block(utterance, recent)


async def _prepend(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    if first is None:
        return
    yield first
    if first.finished:
        return
    async for delta in rest:
        yield delta
