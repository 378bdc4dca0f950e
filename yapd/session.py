"""One client connection's state and message handling, with no socket in sight:
the server hands it parsed messages and a ``send`` coroutine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from yapd import protocol
from yapd.engines.base import Engine, EngineError, SamplingSpec
from yapd.prompts import PromptCache, compose_persona, fit_prefix, style_key, trim_history
from yapd.runtime import Runtime
from yapd.turn import Send, Turn, TurnInput, start_now

log = logging.getLogger("yapd.session")


@dataclass
class PersonaState:
    """What the client chose. None: the configured default as it is now (a reload's new
    default reached only the sessions opened after it, each having copied the old one)."""
    style: str | None = None
    gender: str | None = None
    user_identity: str | None = None
    text_override: str | None = None


class RateLimiter:
    """Token bucket: ``rate`` messages a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def retune(self, rate: float, burst: int) -> None:
        """New limits (a reload), the bucket kept: a lower burst caps what it holds now."""
        self.rate, self.burst = rate, float(burst)
        self.tokens = min(self.tokens, self.burst)

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Session:
    def __init__(self, rt: Runtime, send: Send, *, remote: str = "", api_key: str = "") -> None:
        self.rt = rt
        self._send = send
        self.remote = remote
        self.api_key = api_key
        self.session_id: str | None = None
        self.connected_at = time.time()
        self.turns = 0
        self.last_ttft_ms: float | None = None
        self.persona = PersonaState()
        self.history_text = ""
        self.turn: Turn | None = None
        self.turn_ack: dict[str, Any] = {}  # the ack of self.turn, sent by its task or before its done
        self.turn_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._warming: dict[str, asyncio.Task[None]] = {}  # the warm-up in flight of each segment
        self._caches: dict[str, tuple[Any, PromptCache]] = {}
        self.limiter = RateLimiter(rt.cfg.server.rate_limit_per_s, rt.cfg.server.rate_limit_burst)

    # --- sending -------------------------------------------------------------------

    async def send(self, msg: Any) -> None:
        if isinstance(msg, dict):
            if msg.get("type") == "error":
                self.rt.metrics.errors.labels(msg["error_code"]).inc()
            msg = protocol.dumps(msg)
        await self._send(msg)

    async def send_error(self, exc: protocol.ProtocolError) -> None:
        await self.send(protocol.error(exc.code, exc.message, exc.request_id))

    @property
    def state(self) -> str:
        if self.turn is not None and self.turn_task is not None and not self.turn_task.done():
            return self.turn.state
        return "warming" if self._side_tasks else "idle"

    def info(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "remote": self.remote, "connected_at": self.connected_at,
                "turns": self.turns, "state": self.state, "last_ttft_ms": self.last_ttft_ms}

    # --- persona -------------------------------------------------------------------

    def _check_persona(self, fields: protocol.PersonaFields, request_id: str | None = None) -> None:
        styles = self.rt.styles()
        if fields.persona_style is not None and fields.persona_style not in styles:
            raise protocol.ProtocolError(
                protocol.INVALID_PERSONA_STYLE,
                f"unknown persona_style {fields.persona_style!r}; allowed: {', '.join(sorted(styles))}",
                request_id,
            )

    def _apply_persona(self, fields: protocol.PersonaFields, request_id: str | None = None) -> bool:
        """Update the session's persona; raises invalid_persona_style before changing anything."""
        self._check_persona(fields, request_id)
        before = (*self._effective(), self.persona.text_override)
        if fields.persona_style is not None:
            self.persona.style = fields.persona_style
        if fields.assistant_gender is not None:
            self.persona.gender = fields.assistant_gender
        if fields.user_identity is not None:
            self.persona.user_identity = fields.user_identity
        if fields.persona_text is not None:
            self.persona.text_override = fields.persona_text.strip() or None
        after = (*self._effective(), self.persona.text_override)
        return before != after

    def _effective(self) -> tuple[str, str, str]:
        """The persona style, gender and user identity in force: the client's, else the
        configured default. A style a reload removed falls back to the default (the ack
        kept naming it while the default voice spoke)."""
        t = self.rt.cfg.turn
        p = self.persona
        style = p.style if p.style is not None and p.style in self.rt.styles() else style_key(t.default_persona_style)
        return (style, p.gender if p.gender is not None else t.default_gender,
                p.user_identity if p.user_identity is not None else t.default_user_identity)

    def persona_text(self) -> str:
        if self.persona.text_override:
            return self.persona.text_override
        style, gender, identity = self._effective()
        return compose_persona(self.rt.styles()[style], gender, identity)

    def _cache(self, role: str, engine: Engine | None) -> PromptCache | None:
        """The session's token cache for an engine; a restarted engine gets a new one."""
        if engine is None:
            return None
        tok = engine.tokenizer
        held = self._caches.get(role)
        if held is None or held[0] is not tok:
            held = (tok, PromptCache(tok, self.rt.shared_texts(role, tok)))
            self._caches[role] = held
        return held[1]

    # --- messages ------------------------------------------------------------------

    async def handle(self, msg: protocol.ClientMessage) -> None:
        if isinstance(msg, protocol.Start):
            await self.start_turn(msg)
        elif isinstance(msg, protocol.Cancel):
            if msg.request_id is None or self.turn is None or msg.request_id == self.turn.inp.request_id:
                await self.cancel_turn("cancel")
            # else a cancel of a turn that is over (a late one): the turn now in flight goes on
        elif isinstance(msg, protocol.Ping):
            await self.send({"type": "pong", "now": time.time()})
        elif isinstance(msg, protocol.SetPersona):
            changed = self._apply_persona(msg.persona)
            await self.send({"type": "ack", "for": "set_persona", "ok": True, "changed": changed,
                             **self._persona_json()})
        elif isinstance(msg, protocol.WarmPersona):
            self._apply_persona(msg.persona)
            self._warm_soon("persona", "")
        elif isinstance(msg, protocol.WarmHistory):
            self._apply_persona(msg.persona)
            self.history_text = msg.history_text
            self._warm_soon("history", msg.history_text)

    def _persona_json(self) -> dict[str, Any]:
        style, gender, identity = self._effective()
        return {"persona_style": style, "assistant_gender": gender, "user_identity": identity,
                "persona_text_override": self.persona.text_override is not None}

    def _check_serving(self, request_id: str | None) -> None:
        if self.rt.stopping or self.rt.draining:
            raise protocol.ProtocolError(protocol.SHUTTING_DOWN, "the server is draining; no new turns",
                                         request_id)
        if restarting := sorted(r for r in self.rt.restarting if self.rt.cfg.deployed(r)):
            raise protocol.ProtocolError(protocol.ENGINE_UNAVAILABLE, f"the {' and '.join(restarting)} "
                                         f"{'engine is' if len(restarting) == 1 else 'engines are'} restarting; "
                                         "try again shortly", request_id)
        if not self.rt.engines_ready():
            raise protocol.ProtocolError(protocol.ENGINE_UNAVAILABLE, "engines are not ready; try again shortly",
                                         request_id)

    async def start_turn(self, msg: protocol.Start) -> None:
        request_id = msg.request_id if msg.request_id is not None else uuid.uuid4().hex[:16]
        # A refused start leaves the turn in flight alone.
        self._check_persona(msg.persona, request_id)
        self._check_serving(request_id)
        # Barge-in: the old turn's done goes out before anything of the new one.
        await self.cancel_turn("barge_in")
        self._stop_warming()
        self._apply_persona(msg.persona, request_id)
        if self.session_id is None or self.session_id != msg.session_id:
            self.session_id = msg.session_id
        if msg.history_text is not None:
            self.history_text = msg.history_text
        rt = self.rt
        inp = TurnInput(request_id=request_id, session_id=msg.session_id, utterance=msg.user_utterance,
                        history_text=self.history_text, persona_text=self.persona_text(),
                        seed=secrets.randbelow(2**31))
        turn = Turn(rt, inp, self.send, self._cache("chat", rt.engine("chat") if rt.cfg.deployed("chat") else None),
                    self._cache("tool", rt.engine("tool") if rt.cfg.deployed("tool") else None))
        ack = {"type": "ack", "for": "start", "ok": True, "request_id": request_id, "session_id": msg.session_id,
               "seed": inp.seed, "now": time.time(), **self._persona_json(), "models": rt.models()}
        self.turn, self.turn_ack = turn, ack
        self.turns += 1
        # Started at once (Python 3.12's eager tasks): the turn's engine requests go out
        # before this returns.
        self.turn_task = task = start_now(self._run_turn(turn, ack), name=f"turn-{request_id}")
        if not (turn.ack_out.is_set() or task.done()):
            # An ordinary task (Python before 3.12) sends its ack a round later: the next
            # frame read with this one waits for it, or its reply (a set_persona's ack, a
            # pong) would come first and a client pairing acks in order would pair wrongly.
            acked = asyncio.ensure_future(turn.ack_out.wait())
            try:
                await asyncio.wait([task, acked], return_when=asyncio.FIRST_COMPLETED)
            finally:
                acked.cancel()

    async def _run_turn(self, turn: Turn, ack: dict[str, Any]) -> None:
        try:
            await turn.run(ack)
        except asyncio.CancelledError:
            raise
        except protocol.ClientGone:
            # The client left mid-turn (the server cancels this task as it notices too).
            log.debug("client gone mid-turn request=%s", turn.inp.request_id)
            turn.count("client_gone")  # unless its done counted it
        except Exception as exc:
            log.exception("turn crashed request=%s", turn.inp.request_id)
            if not turn.done_sent:
                turn.count("error")
                with contextlib.suppress(Exception):
                    await self._ack_first(turn)
                    await self.send(protocol.error(protocol.INTERNAL_ERROR, f"internal error: {type(exc).__name__}",
                                                   turn.inp.request_id))
                    turn.done_sent = True
                    await self.send(turn.done_message(cancelled=False, error=protocol.INTERNAL_ERROR))
        finally:
            if turn.ttft_ms is not None:
                self.last_ttft_ms = turn.ttft_ms

    async def cancel_turn(self, cause: str) -> None:
        """End the turn in flight, if any, and send its done (cancelled)."""
        task, turn = self.turn_task, self.turn
        if task is None or turn is None or task.done():
            return
        t0 = time.perf_counter()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
        if not turn.done_sent:
            turn.done_sent = True
            self.rt.metrics.cancels.labels(cause).inc()
            turn.count("cancelled")
            await self._ack_first(turn)
            await self.send(turn.done_message(cancelled=True))
            self.rt.metrics.cancel_latency.observe(time.perf_counter() - t0)

    async def _ack_first(self, turn: Turn) -> None:
        """A turn's ack, where it ends before its task sent one: barged in before the task
        first ran (an ordinary task, before Python 3.12), its done still follows its ack."""
        if not turn.ack_sent and turn is self.turn:
            turn.ack_sent = True
            await self.send(self.turn_ack)

    # --- warm-up -------------------------------------------------------------------

    def _warm_soon(self, segment: str, history_text: str) -> None:
        """A warm-up of ``segment``, superseding the one in flight: a client that warmed on
        each interim transcript queued every superseded prefill ahead of its own turn (and
        of other sessions': 40 warms at once, within the rate limit, held another
        session's TTFT at 2 s on the CPU engine). The superseded one ends unanswered."""
        self._stop_warming(segment)
        task = asyncio.create_task(self._warm(segment, history_text))
        self._warming[segment] = task
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _stop_warming(self, *segments: str) -> None:
        """End the warm-ups in flight of ``segments`` (all where none is named: a start's
        own prefill covers them, and a warm still prefilling would compute it twice)."""
        for segment in segments or list(self._warming):
            task = self._warming.pop(segment, None)
            if task is not None:
                task.cancel()

    async def _warm(self, segment: str, history_text: str) -> None:
        """Prefill persona (and history) into the chat engine's prefix cache."""
        rt = self.rt
        chat = rt.engine("chat") if rt.cfg.deployed("chat") else None
        t0 = time.perf_counter()
        try:
            if chat is None or not chat.health().ok:
                raise EngineError("no chat engine is serving")
            cache = self._cache("chat", chat)
            assert cache is not None
            layout = rt.layout(chat)
            t = rt.cfg.turn
            persona = cache.persona_ids(layout.head + self.persona_text())
            hist: list[int] = []
            if segment == "history" and history_text.strip():
                hist = trim_history(cache.history_ids("\n\nConversation so far:\n" + history_text.strip(),
                                                      t.history_max_tokens, exact=t.exact_token_trim),
                                    t.history_max_tokens, t.history_trim_step)
            # Cut as a turn's prompt would be with the longest utterance: what is warmed is
            # the prefix a turn then finds (a long persona is trimmed, not refused).
            room = (rt.cfg.chat.max_model_len - t.chat_max_out - t.user_utt_max_tokens
                    - len(cache.encode_fixed(layout.middle)) - len(cache.encode_fixed(layout.tail)))
            persona, hist = fit_prefix(persona, hist, max(1, room), t.history_trim_step)
            ids = persona + hist
            stream = chat.stream(ids, SamplingSpec(max_tokens=1, temperature=0.0), f"warm-{uuid.uuid4().hex[:12]}")
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            await self.send({"type": "warmed", "segment": segment, "tokens": len(ids),
                             "ms": round((time.perf_counter() - t0) * 1000, 2)})
        except EngineError as exc:
            with contextlib.suppress(protocol.ClientGone):
                await self.send(protocol.error(protocol.ENGINE_UNAVAILABLE, f"warm-up failed: {exc}"))
        except protocol.ClientGone:
            pass  # nobody left to tell
        except Exception as exc:  # a task of its own: said to the client, not lost in the loop's log
            log.exception("warm-up crashed session=%s", self.session_id)
            with contextlib.suppress(protocol.ClientGone):
                await self.send(protocol.error(protocol.INTERNAL_ERROR, f"warm-up failed: internal error: "
                                               f"{type(exc).__name__}"))

    # --- teardown ------------------------------------------------------------------

    async def close(self) -> None:
        """The connection is gone: stop everything it started (no messages sent)."""
        if self.turn is not None and self.turn_task is not None and not self.turn_task.done():
            self.turn.count("client_gone")  # unless its done counted it
        tasks = [t for t in (self.turn_task, *self._side_tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
