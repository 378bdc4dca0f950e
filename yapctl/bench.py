"""WebSocket client tools: one turn (``yapctl chat``) and a concurrent benchmark
(``yapctl bench``), measuring what a client sees."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from yapd.protocol import ENDS_CONNECTION


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 2)


def gaps(stamps: list[float]) -> list[float]:
    """The gaps between consecutive times (seconds), in ms."""
    return [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]


# A gap this many times the median is a step or more missed: a token with no text of its
# own (its text came with the next) or a step that also ran other requests' prefills.
LONG_GAP = 1.5


def gap_tail(gaps: list[float]) -> dict[str, float | int | None]:
    """The long inter-token gaps (over ``LONG_GAP`` x the median): their share and their
    own p50 / p90. Where the share is near 1 %, a gap p99 falls on the edge between one
    step and two, and moves by a step's length with the share: the share says whether two
    p99s differ by how many long gaps there were or by how long they took."""
    median = pct(gaps, 50)
    if median is None:
        return {"gaps": 0, "over_ms": None, "long_pct": None, "long_p50": None, "long_p90": None}
    over = LONG_GAP * median
    long = [g for g in gaps if g > over]
    return {"gaps": len(gaps), "over_ms": round(over, 2), "long_pct": round(100 * len(long) / len(gaps), 2),
            "long_p50": pct(long, 50), "long_p90": pct(long, 90)}


def gaps_by_starts(turns: list[tuple[float, list[float]]]) -> dict[str, float | None]:
    """Each turn's inter-token gaps split by whether another turn was starting meanwhile:
    ``turns`` holds (start sent, its text outputs' times), seconds on one clock. A turn
    starts from its start to its first text: its front end's work and its prefill step(s)
    happen then, in the loop and the engine step the other sessions' tokens share. A gap
    is beside a start where it overlaps such a span (a turn's own start ends before its
    gaps begin). Which of the two holds a level's long gaps says whether a p99 over raw's
    is the starts' doing (their front-end work, their prefills) or the streaming's own."""
    spans: list[list[float]] = []  # the starts' spans, merged: start, end, sorted by start
    for start, stamps in sorted((t for t in turns if t[1]), key=lambda t: t[0]):
        first = stamps[0]
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], first)
        else:
            spans.append([start, first])
    begins = [s[0] for s in spans]
    beside: list[float] = []
    apart: list[float] = []
    for _, stamps in turns:
        for a, b in itertools.pairwise(stamps):
            # the last span to begin before b: the only one (merged, sorted) that can overlap (a, b)
            i = bisect.bisect_left(begins, b) - 1
            (beside if i >= 0 and spans[i][1] > a else apart).append((b - a) * 1000)
    every = beside + apart
    median = pct(every, 50)
    long_beside = sum(g > LONG_GAP * median for g in beside) if median is not None else 0
    long_all = long_beside + (sum(g > LONG_GAP * median for g in apart) if median is not None else 0)
    return {"beside_pct": round(100 * len(beside) / len(every), 2) if every else None,
            "beside_p99": pct(beside, 99), "apart_p99": pct(apart, 99),
            "long_beside_pct": round(100 * long_beside / long_all, 2) if long_all else None}


# vLLM stamps every output of one engine step with one time; an engine's steps are
# milliseconds apart, the same time seen through two clocks a few microseconds.
STEP_APART_MS = 0.5


def step_times(times_ms: list[float]) -> list[float]:
    """The engine steps among these first tokens' stamps (ms, one clock): each step's time,
    in order, stamps less than ``STEP_APART_MS`` apart taken as one step's."""
    s = sorted(times_ms)
    return s[:1] + [b for a, b in itertools.pairwise(s) if b - a > STEP_APART_MS]


def per_step(times_ms: list[float]) -> float | None:
    """How many of these first tokens (times in ms, one clock) an engine step made, on
    average: 8 when a burst of 8 requests had its first tokens from one step, 1 when each
    had its own."""
    if not times_ms:
        return None
    return round(len(times_ms) / len(step_times(times_ms)), 2)


def burst_steps(turns: list[tuple[float, float]]) -> dict[str, Any] | None:
    """How an engine took a burst of starts: ``turns`` holds each turn's (start, its
    request's first token stamped by the engine), ms on one clock; turns starting less than
    ``BURST_APART_S`` apart are one burst. Per burst, the engine steps that made first
    tokens: how many, the first and the last one's time from the burst's first start, and
    the time between them. At 16 sessions one start of the same code on the same host
    differs from the next by tens of ms in the tool's first token: more steps say the
    requests reached the engine strung out, longer ones that its steps ran slower."""
    if not turns:
        return None
    bursts: list[list[tuple[float, float]]] = []
    for start, first in sorted(turns):
        if bursts and start - bursts[-1][-1][0] < BURST_APART_S * 1000:
            bursts[-1].append((start, first))
        else:
            bursts.append([(start, first)])
    counts: list[float] = []
    firsts: list[float] = []
    lasts: list[float] = []
    between: list[float] = []
    for burst in bursts:
        t0 = burst[0][0]
        steps = step_times([first for _, first in burst])
        counts.append(len(steps))
        firsts.append(steps[0] - t0)
        lasts.append(steps[-1] - t0)
        between += [b - a for a, b in itertools.pairwise(steps)]
    return {"bursts": len(bursts), "steps": {"p50": pct(counts, 50), "max": max(counts)},
            "first_ms": pct(firsts, 50), "last_ms": {"p50": pct(lasts, 50), "p95": pct(lasts, 95)},
            "between_ms": {"p50": pct(between, 50), "p95": pct(between, 95)}}


# A level's starts go out in bursts (one per session, all at once); its tail can be one
# slow burst (every session behind one slow engine step) or slow turns everywhere.
SLOW_OVER_P50 = 2.0
BURST_APART_S = 0.05


def slow_bursts(sent_at: list[float], ttft_ms: list[float]) -> dict[str, Any] | None:
    """The turns whose TTFT was over ``SLOW_OVER_P50`` x the median, and the bursts they
    came in: starts sent less than ``BURST_APART_S`` apart are one burst, ``at_s`` is each
    such burst's first start, in seconds from the level's first start."""
    if not ttft_ms:
        return None
    over = SLOW_OVER_P50 * statistics.median(ttft_ms)
    slow = sorted(t for t, ms in zip(sent_at, ttft_ms, strict=True) if ms > over)
    starts = [t for i, t in enumerate(slow) if i == 0 or t - slow[i - 1] >= BURST_APART_S]
    first = min(sent_at)
    return {"over_ms": round(over, 2), "turns": len(slow), "of": len(ttft_ms), "bursts": len(starts),
            "at_s": [round(t - first, 2) for t in starts[:20]]}


@dataclass
class TurnResult:
    ok: bool
    ttft_ms: float | None = None
    tool_ms: float | None = None
    total_ms: float | None = None
    chunks: int = 0
    chars: int = 0
    text: str = ""
    toolcall: dict[str, Any] | None = None
    ack: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    error: str | None = None
    sent_at: float | None = None  # time.time() as the start was sent: the ack's "now" is on that clock
    sent_pc: float | None = None  # perf_counter() as the start was sent: the clock of ``stamps``
    stamps: list[float] = field(default_factory=list)  # perf_counter() as each token frame arrived

    @property
    def gaps_ms(self) -> list[float]:
        """Between its token frames, as the client saw them."""
        return gaps(self.stamps)

    def inbound_ms(self) -> float | None:
        """The start's way in: sent -> the daemon's turn begins (its ack's ``now``). Only
        meaningful with the daemon on this host (one wall clock)."""
        now = self.ack.get("now") if self.ack else None
        if self.sent_at is None or not isinstance(now, (int, float)):
            return None
        return (now - self.sent_at) * 1000


async def run_turn(ws: ClientConnection, start: dict[str, Any], timeout: float = 60,
                   on_token: Callable[[str], None] | None = None,
                   on_message: Callable[[dict[str, Any]], None] | None = None) -> TurnResult:
    """Send ``start`` and read that turn to its done; times are taken at the client.
    ``on_message`` sees every message as it arrives (``yapctl chat`` prints them)."""
    res = TurnResult(ok=False)
    res.sent_at = time.time()
    t0 = res.sent_pc = time.perf_counter()
    await ws.send(json.dumps(start))
    rid = start.get("request_id")
    parts: list[str] = []
    deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            res.error = "timeout"
            return res
        try:
            frame = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:  # yapd answered, just not in time: not "cannot reach"
            res.error = "timeout"
            return res
        msg = json.loads(frame)
        if rid is not None and msg.get("request_id") not in (None, rid):
            continue  # the end of a turn this start barged in on (one that timed out here)
        now = time.perf_counter()
        kind = msg.get("type")
        if on_message is not None:
            on_message(msg)
        if kind == "ack":
            res.ack = msg
        elif kind == "toolcall":
            res.toolcall = msg
            res.tool_ms = (now - t0) * 1000
        elif kind == "token":
            if not res.stamps:
                res.ttft_ms = (now - t0) * 1000
            res.stamps.append(now)
            res.chunks += 1
            parts.append(msg["text"])
            if on_token is not None:
                on_token(msg["text"])
        elif kind == "error":
            res.error = f"{msg.get('error_code')}: {msg.get('message')}"
            # Refused before its ack (a refused key or a full server as the connection opens,
            # a bad persona style, rate limited, draining): no done follows, and waiting for
            # one held `yapctl chat` to its timeout.
            if res.ack is None:
                return res
        elif kind == "done":
            res.done = msg
            res.total_ms = (now - t0) * 1000
            res.text = "".join(parts)
            res.chars = len(res.text)
            res.ok = res.error is None and not msg.get("cancelled")
            return res


@dataclass
class BenchConfig:
    url: str
    key: str
    n: int = 32
    concurrency: int = 8
    timeout: float = 60
    utterance: str = "who was Columbus?"
    persona_text: str | None = None
    history_text: str | None = None
    warmup: bool = True
    # Non-empty: every turn's persona is new to the engines (salted_persona), as at the start
    # of calls to many bots, so nothing of the chat prompt is in their prefix caches.
    persona_salt: str = ""


@dataclass
class BenchReport:
    results: list[TurnResult]
    wall_s: float
    concurrency: int

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        tool = [r.tool_ms for r in ok if r.tool_ms is not None]
        total = [r.total_ms for r in ok if r.total_ms is not None]
        gaps = [g for r in ok for g in r.gaps_ms]

        def timing(r: TurnResult, key: str) -> float | None:
            # The daemon's own view (done.timings): when the engines' first outputs
            # reached it, when it sent the decision and the first token.
            return r.done.get("timings", {}).get(key) if r.done else None

        def server(key: str) -> dict[str, float | None]:
            xs = [t for r in ok if (t := timing(r, key)) is not None]
            return {"p50": pct(xs, 50), "p95": pct(xs, 95)}

        # Per turn, what the client's TTFT holds beyond the daemon's own (its first token
        # sent, on the turn's clock): the start's way in and the daemon's reading of it
        # before the turn begins, and the token's way back.
        outside = [r.ttft_ms - t for r in ok if r.ttft_ms is not None and (t := timing(r, "ttft_ms")) is not None]
        # ... split at the turn's start: the way in (the start read behind other
        # sessions' messages on the daemon's loop) and the first token's way back.
        inbound, outbound = [], []
        for r in ok:
            sent, way_in = timing(r, "ttft_ms"), r.inbound_ms()
            if r.ttft_ms is not None and sent is not None and way_in is not None:
                inbound.append(way_in)
                outbound.append(r.ttft_ms - sent - way_in)
        # Per turn, the daemon's own delay in sending the first token once it had all it
        # waits for: the chat's first text and, when a tool decides, the decision sent.
        held = []
        for r in ok:
            sent, text, decided = timing(r, "ttft_ms"), timing(r, "engine_text_ms"), timing(r, "tool_ms")
            if sent is not None and text is not None:
                held.append(sent - max(text, decided if decided is not None else text))
        # What the engines say of each turn's requests (done.timings.engines): where the
        # time to the first output went (ms from the turn's start: queued, first scheduled,
        # first token) and the prompt tokens their prefix caches held. And how the turns'
        # first tokens shared engine steps: each put on one clock through its turn's start
        # (the ack's "now", with the daemon on this host).
        # Also, per turn, each first token's way out: from its EngineCore's stamp to the
        # turn holding it (the core's sending thread, the socket, the engine's output handler).
        said: dict[str, list[float]] = {}
        firsts: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            now = r.ack.get("now") if r.ack else None
            t = (r.done or {}).get("timings", {})
            reached = {"chat": t.get("engine_ttft_ms"), "tool": t.get("tool_first_ms")}
            for role, st in (t.get("engines") or {}).items():
                for name, value in st.items():
                    said.setdefault(f"server_{role}_{name}", []).append(value)
                if isinstance(now, (int, float)) and "first_token_ms" in st:
                    firsts.setdefault(role, []).append((now * 1000, now * 1000 + st["first_token_ms"]))
                if isinstance(at := reached.get(role), (int, float)) and "first_token_ms" in st:
                    said.setdefault(f"server_{role}_core_to_front_ms", []).append(at - st["first_token_ms"])
                    # The same way in two (where the engine stamps it): the core's side, up
                    # to yapd's side of the engine taking it, and the front end's.
                    if "taken_ms" in st:
                        said.setdefault(f"server_{role}_core_to_taken_ms", []).append(
                            st["taken_ms"] - st["first_token_ms"])
                        said.setdefault(f"server_{role}_taken_to_front_ms", []).append(at - st["taken_ms"])
        engines: dict[str, Any] = {key: {"p50": pct(xs, 50), "p95": pct(xs, 95)} for key, xs in sorted(said.items())}
        for role, xs in sorted(firsts.items()):
            engines[f"server_{role}_first_tokens_per_step"] = per_step([first for _, first in xs])
            engines[f"server_{role}_burst_steps"] = burst_steps(xs)
        # The chat prompt as the daemon built it (done.usage): what raw and serve must match.
        prompts: list[float] = [n for r in ok
                                if isinstance(n := ((r.done or {}).get("usage") or {}).get("prompt_tokens"), int)]
        timed = [(r.sent_at, r.ttft_ms) for r in ok if r.sent_at is not None and r.ttft_ms is not None]
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                key = (r.error or "cancelled").split(":")[0]
                errors[key] = errors.get(key, 0) + 1
        return {
            "turns": len(self.results), "completed": len(ok), "concurrency": self.concurrency,
            "wall_s": round(self.wall_s, 2), "errors": errors,
            "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99)},
            "tool_ms": {"p50": pct(tool, 50), "p95": pct(tool, 95), "p99": pct(tool, 99)},
            "itl_ms": {"p50": pct(gaps, 50), "p95": pct(gaps, 95), "p99": pct(gaps, 99)},
            "itl_tail": gap_tail(gaps),
            "itl_starts": gaps_by_starts([(r.sent_pc, r.stamps) for r in ok if r.sent_pc is not None]),
            "total_ms": {"p50": pct(total, 50), "p95": pct(total, 95), "p99": pct(total, 99)},
            "server_engine_ttft_ms": server("engine_ttft_ms"),
            "server_engine_text_ms": server("engine_text_ms"),
            "server_tool_first_ms": server("tool_first_ms"),
            "server_tool_ms": server("tool_ms"),
            "server_ttft_ms": server("ttft_ms"),
            "outside_turn_ms": {"p50": pct(outside, 50), "p95": pct(outside, 95)},
            "inbound_ms": {"p50": pct(inbound, 50), "p95": pct(inbound, 95)},
            "outbound_ms": {"p50": pct(outbound, 50), "p95": pct(outbound, 95)},
            "first_token_after_ready_ms": {"p50": pct(held, 50), "p95": pct(held, 95)},
            "prompt_tokens": {"p50": pct(prompts, 50), "max": max(prompts, default=None)},
            **engines,
            "ttft_slow": slow_bursts([t for t, _ in timed], [ms for _, ms in timed]),
        }


def turn_utterance(base: str, i: int) -> str:
    """Turn ``i``'s utterance (-1: the warm-up turn): each turn differs, as a real one does,
    so the engines' prefix caches never hold a whole prompt."""
    return f"{base} ({i})"


def salted_persona(persona: str, salt: str, i: int) -> str:
    """Turn ``i``'s persona under ``salt``: different from its first words on, so no prompt
    of a salted level shares a cached prefix with another (the tool's prompt, which holds
    no persona, stays cached)."""
    return f"({salt} {i}) {persona}" if salt else persona


def _start(cfg: BenchConfig, session: str, i: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "start", "session_id": session, "request_id": f"{session}-{i}",
                           "user_utterance": turn_utterance(cfg.utterance, i)}
    if cfg.persona_text is not None:
        msg["persona_text"] = salted_persona(cfg.persona_text, cfg.persona_salt, i)
    if cfg.history_text is not None:
        msg["history_text"] = cfg.history_text
    return msg


async def bench(cfg: BenchConfig, progress: Callable[[int, int], None] | None = None) -> BenchReport:
    """``cfg.n`` turns over ``cfg.concurrency`` connections, each its own session. With
    ``warmup`` every connection first runs one unrecorded turn (warm prefix cache)."""
    results: list[TurnResult] = []
    counter = iter(range(cfg.n))
    ready = asyncio.Event()  # set when every connection is warm: the clock starts then
    warm = asyncio.Event()
    warmed = 0

    def arrived() -> None:
        nonlocal warmed
        warmed += 1
        if warmed == cfg.concurrency:
            warm.set()

    async def worker(w: int) -> None:
        session = f"bench-{uuid.uuid4().hex[:8]}-{w}"
        try:
            async with _connect(cfg) as ws:
                if cfg.warmup:
                    warmup = await run_turn(ws, _start(cfg, session, -1), cfg.timeout)
                    if not warmup.ok:  # a session that could not finish one turn measures nothing
                        raise RuntimeError(f"the warm-up turn failed: {warmup.error}")
                arrived()
                await ready.wait()
                for i in counter:
                    res = await _timed_turn(ws, _start(cfg, session, i), cfg.timeout)
                    results.append(res)
                    if progress is not None:
                        progress(len(results), cfg.n)
                    if res.error and res.error.startswith((*ENDS_CONNECTION, "closed")):
                        return
        except Exception as exc:
            if not ready.is_set():
                arrived()
            results.append(TurnResult(ok=False, error=f"connect: {type(exc).__name__}: {exc}"))

    tasks = [asyncio.create_task(worker(w)) for w in range(cfg.concurrency)]
    await warm.wait()
    t0 = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    return BenchReport(results, time.perf_counter() - t0, cfg.concurrency)


def _connect(cfg: BenchConfig) -> Any:
    """One benchmark session's connection."""
    return connect(cfg.url, additional_headers={"X-API-Key": cfg.key}, max_size=None, open_timeout=cfg.timeout,
                   compression=None)


async def _timed_turn(ws: ClientConnection, start: dict[str, Any], timeout: float) -> TurnResult:
    """One turn of a benchmark; a client-side failure is that turn's result."""
    try:
        return await run_turn(ws, start, timeout)
    except (asyncio.TimeoutError, OSError) as exc:
        return TurnResult(ok=False, error=f"client: {type(exc).__name__}")
    except ConnectionClosed as exc:  # the daemon went away mid-turn: not a failure to connect
        return TurnResult(ok=False, error=f"closed: {exc}")


async def lockstep(cfg: BenchConfig, rounds: int, before_round: Callable[[int], Awaitable[None]] | None = None,
                   sent: dict[str, float] | None = None) -> list[list[TurnResult]]:
    """``cfg.concurrency`` sessions, each on its own connection, in ``rounds`` rounds (after
    a warm-up round when ``cfg.warmup``): every session starts a turn at once, and a round
    ends when all its turns are done. ``before_round(i)`` runs before round i (a live
    config change, so that two configs can take turns round by round on the same
    sessions); ``sent`` gets each turn's request_id -> perf_counter() as its start is
    sent. Turn ``w`` of round ``i`` is turn number ``i * concurrency + w`` (its utterance:
    :func:`turn_utterance`), so that no two turns of a level send one prompt, as
    :func:`bench`'s turns do. Each round's results, in session order."""
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(_connect(cfg)) for _ in range(cfg.concurrency)]
        sessions = [f"lockstep-{uuid.uuid4().hex[:8]}-{w}" for w in range(cfg.concurrency)]

        async def turn(ws: ClientConnection, session: str, i: int) -> TurnResult:
            start = _start(cfg, session, i)  # i: the turn's number, -1 for the warm-up round
            if sent is not None:
                sent[start["request_id"]] = time.perf_counter()
            return await _timed_turn(ws, start, cfg.timeout)

        out: list[list[TurnResult]] = []
        for i in range(-1 if cfg.warmup else 0, rounds):
            if i >= 0 and before_round is not None:
                await before_round(i)
            results = await asyncio.gather(*(turn(ws, s, i * cfg.concurrency + w if i >= 0 else -1)
                                             for w, (ws, s) in enumerate(zip(conns, sessions, strict=True))))
            if i >= 0:
                out.append(list(results))
    return out


async def cancel_latency(url: str, key: str, n: int = 10, start: dict[str, Any] | None = None,
                         timeout: float = 60) -> dict[str, Any]:
    """Client-observed cancel -> done, and barge-in -> new turn's first token."""
    cancel_ms: list[float] = []
    barge_ms: list[float] = []
    base = start or {"type": "start", "session_id": "cancel-bench", "user_utterance": "tell me a long story"}
    async with connect(url, additional_headers={"X-API-Key": key}, max_size=None, compression=None) as ws:

        async def first_token(rid: str) -> None:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                if msg["type"] == "token" and msg["request_id"] == rid:
                    return

        for i in range(n):
            await ws.send(json.dumps({**base, "request_id": f"c{i}"}))
            await first_token(f"c{i}")
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "cancel"}))
            while json.loads(await asyncio.wait_for(ws.recv(), timeout))["type"] != "done":
                pass
            cancel_ms.append((time.perf_counter() - t0) * 1000)
        for i in range(n):
            await ws.send(json.dumps({**base, "request_id": f"b{i}a"}))
            await first_token(f"b{i}a")
            t0 = time.perf_counter()
            await ws.send(json.dumps({**base, "request_id": f"b{i}b", "user_utterance": f"wait, stop ({i})"}))
            await first_token(f"b{i}b")
            barge_ms.append((time.perf_counter() - t0) * 1000)
            await ws.send(json.dumps({"type": "cancel"}))
            while json.loads(await asyncio.wait_for(ws.recv(), timeout))["type"] != "done":
                pass
    return {"cancel_to_done_ms": {"p50": pct(cancel_ms, 50), "p99": pct(cancel_ms, 99), "max": max(cancel_ms)},
            "barge_in_to_first_token_ms": {"p50": pct(barge_ms, 50), "p95": pct(barge_ms, 95)}}
