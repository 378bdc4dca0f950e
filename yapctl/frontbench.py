"""yapd's front end alone, without a GPU: a real yapd process whose engines are stand-ins.

    python -m yapctl.frontbench                          # the demo models' tokenizers
    python -m yapctl.frontbench --models MODELS --levels 1,8,16 --request-order chats_then_tools

The stand-in engines tokenize nothing and compute nothing: each request's first output
comes at the engine's first step ``--chat-first-ms`` / ``--tool-first-ms`` after it is
made, then a token a step, every ``--itl-ms`` (one engine's requests step together, as in
an EngineCore). Everything else is yapd's own: the WebSocket server, the session, both
prompts built with the real tokenizers (MODELS holds ``nemo-12b`` and ``hammer-3b``
folders, as gpubench's do), the turn, the frames. Sessions run in lockstep rounds with
gpubench's prompts, so a round's starts arrive together, as on the GPU bench.

It prints, per level: the client's TTFT and tool decision; the part of the TTFT outside
yapd's turn clock; when each turn's requests reached the engines, from its start message
being sent (the submission delay, what the GPU's engines cannot start before); and how
far apart one round's first and last requests were (a burst's requests spread over
``turns x`` yapd's per-turn start work); the client's inter-token gaps (each a step on the
engine's side: what they hold beyond it is the front end's) and their tail. On the GPU,
vLLM's own per-request work comes on top. A program that prints figures, not a test: the suite checks it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from yapctl.bench import BenchConfig, bench, gap_tail, gaps, gaps_by_starts, lockstep, pct
from yapctl.localyapd import LocalYapd
from yapd.config import Config, RequestOrder, TurnConfig
from yapd.engines.base import Delta, Engine, EngineHealth, SamplingSpec
from yapd.turn import client_request_id

KEY = "frontbench"
LOG_ENV = "YAPCTL_FRONTBENCH_LOG"  # each stand-in engine writes its requests to this path + ".<role>" as it stops
TIMING_ENV = "YAPCTL_FRONTBENCH_MS"  # "chat_first,tool_first,itl"


class Steps:
    """One stand-in engine's steps, ``every_s`` apart from its first request on: an
    EngineCore steps once for all its requests in flight, and their outputs reach the front
    end together, so a step's tokens are due at one time here too (one timer deadline:
    the event loop wakes their streams in one pass, as vLLM's output handler does)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.t0: float | None = None

    def at_or_after(self, t: float) -> float:
        """The first step at or after ``t`` (perf_counter)."""
        if self.t0 is None:
            self.t0 = t
        return self.t0 + math.ceil((t - self.t0) / self.every_s - 1e-9) * self.every_s

    @staticmethod
    async def until(t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))


class StandInEngine(Engine):
    """Answers after a fixed time, then a token a step; notes when each request was made
    (perf_counter: CLOCK_MONOTONIC, comparable with the client's in another process)."""

    backend = "standin"

    def __init__(self, role: str, cfg: Config) -> None:
        from yapd.awq import resolve_model

        self.role = role
        self.model = resolve_model(role, getattr(cfg, role), cfg)
        chat_ms, tool_ms, itl_ms = (float(x) / 1000 for x in os.environ.get(TIMING_ENV, "20,16,6").split(","))
        self.first_s = chat_ms if role == "chat" else tool_ms
        self.steps = Steps(itl_ms)
        self._tok: Any = None
        self._in_flight = 0
        self.made: list[tuple[str, str, float]] = []

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def tokenizer_source(self) -> tuple[str, str | None]:
        return self.model, None

    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        from yapd.engines.tokenizer import load_tokenizer

        self._tok = await asyncio.to_thread(load_tokenizer, self.model)

    async def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec, request_id: str,
                     together: bool = False) -> AsyncIterator[Delta]:
        made = time.perf_counter()
        self.made.append((request_id, self.role, made))
        self._in_flight += 1
        try:
            due = self.steps.at_or_after(made + self.first_s)
            await self.steps.until(due)
            if self.role == "tool":  # "no tool": the decision settles at once
                yield Delta("[]\n\n", 2, True, "stop", len(prompt_ids))
                return
            for i in range(spec.max_tokens):
                last = i == spec.max_tokens - 1
                yield Delta(" word", 1, last, "length" if last else None, len(prompt_ids))
                if not last:
                    due += self.steps.every_s
                    await self.steps.until(due)
        finally:
            self._in_flight -= 1

    async def abort(self, request_id: str) -> None:
        return None

    async def shutdown(self) -> None:
        # In yapd's process or in an engine host's (own_process): where it ran.
        if log := os.environ.get(LOG_ENV):
            await asyncio.to_thread(Path(f"{log}.{self.role}").write_text, json.dumps(self.made))

    def health(self) -> EngineHealth:
        return EngineHealth(self._tok is not None, "ready" if self._tok is not None else "starting")

    @property
    def in_flight(self) -> int:
        return self._in_flight


def serve(argv: list[str]) -> int:
    """yapd's own main with stand-in engines (the daemon process of this program); with
    ``own_process``, in engine hosts of their own."""
    from yapd import cli, daemon

    daemon.create_engine = stand_in
    return cli.main(argv)


def stand_in(role: str, cfg: Config) -> Engine:
    from yapd.engines.hosted import HostedEngine

    local = StandInEngine(role, cfg)
    if getattr(cfg, role).own_process:
        return HostedEngine(role, cfg, local, "yapctl.frontbench:StandInEngine")
    return local


async def level(url: str, c: int, rounds: int, prompts: dict[str, str], fresh: bool = False,
                closed: bool = False) -> dict[str, Any]:
    """``rounds`` lockstep rounds of ``c`` sessions (after a warm-up round): each turn's
    send time and what its client saw. ``fresh``: every turn's persona new (salted), so
    yapd tokenizes each turn's persona and history whole, as at the start of a call.
    ``closed``: no rounds; each session starts its next turn as its last one ends, as
    gpubench's levels run (their sessions drift apart, so starts come while others stream)."""
    sent: dict[str, float] = {}
    cfg = BenchConfig(url=url, key=KEY, n=rounds * c, concurrency=c, utterance=prompts["utterance"],
                      persona_text=prompts["persona"], history_text=prompts["history"],
                      persona_salt=uuid.uuid4().hex[:8] if fresh else "")
    if closed:
        rounds_of = [(await bench(cfg)).results]
        for res in rounds_of[0]:
            if res.done is not None and res.sent_pc is not None:
                sent[res.done["request_id"]] = res.sent_pc
    else:
        rounds_of = await lockstep(cfg, rounds, sent=sent)
    rows: list[dict[str, Any]] = []
    for i, results in enumerate(rounds_of):
        for res in results:
            if res.ok and res.done is not None:
                rows.append({"rid": res.done["request_id"], "round": i, "ttft_ms": res.ttft_ms,
                             "tool_ms": res.tool_ms, "server_ttft_ms": (res.done.get("timings") or {}).get("ttft_ms"),
                             "engine_text_ms": (res.done.get("timings") or {}).get("engine_text_ms"),
                             "inbound_ms": res.inbound_ms(), "sent_pc": res.sent_pc, "stamps": res.stamps})
    return {"sent": sent, "rows": rows, "closed": closed}


def summarize(c: int, data: dict[str, Any], made: list[tuple[str, str, float]]) -> dict[str, Any]:
    sent, rows = data["sent"], data["rows"]
    at: dict[str, dict[str, float]] = {}
    for request_id, role, t in made:
        at.setdefault(client_request_id(request_id), {})[role] = t
    delay: dict[str, list[float]] = {"chat": [], "tool": []}
    spans: list[float] = []
    by_round: dict[int, list[str]] = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r["rid"])
        for role in delay:
            if role in at.get(r["rid"], {}):
                delay[role].append((at[r["rid"]][role] - sent[r["rid"]]) * 1000)
    for rids in by_round.values() if not data.get("closed") else ():  # closed: no rounds
        times = [t for rid in rids for t in at.get(rid, {}).values()]
        if len(times) > 1:
            spans.append((max(times) - min(times)) * 1000)
    ttft = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
    outside = [r["ttft_ms"] - r["server_ttft_ms"] for r in rows
               if r["ttft_ms"] is not None and r["server_ttft_ms"] is not None]
    tool = [r["tool_ms"] for r in rows if r["tool_ms"] is not None]
    server_ttft = [r["server_ttft_ms"] for r in rows if r["server_ttft_ms"] is not None]
    text_to_sent = [r["server_ttft_ms"] - r["engine_text_ms"] for r in rows
                    if r["server_ttft_ms"] is not None and r.get("engine_text_ms") is not None]
    inbound = [r["inbound_ms"] for r in rows if r["inbound_ms"] is not None]
    between = [g for r in rows for g in gaps(r["stamps"])]

    def q(xs: list[float]) -> dict[str, float | None]:
        return {"p50": pct(xs, 50), "p95": pct(xs, 95)}

    return {
        "sessions": c, "turns": len(rows),
        "ttft_ms": q(ttft), "server_ttft_ms": q(server_ttft), "tool_ms": q(tool), "outside_turn_ms": q(outside),
        "inbound_ms": q(inbound), "text_to_sent_ms": q(text_to_sent),
        # Every stand-in token comes on a step: what the client's gaps hold beyond the step is
        # the front end's (its other sessions' tokens and starts, the frames' way out).
        "itl_ms": {"p50": pct(between, 50), "p99": pct(between, 99)}, "itl_tail": gap_tail(between),
        "itl_starts": gaps_by_starts([(r["sent_pc"], r["stamps"]) for r in rows if r.get("sent_pc") is not None]),
        "chat_request_after_send_ms": q(delay["chat"]), "tool_request_after_send_ms": q(delay["tool"]),
        "round_requests_span_ms": {"p50": round(statistics.median(spans), 2) if spans else None},
        "per_turn_start_ms": round(statistics.median(spans) / (c - 1), 3) if spans and c > 1 else None,
    }


async def _measure(d: LocalYapd, levels: Sequence[int], rounds: int, prompts: dict[str, str],
                   profile_level: int, fresh: bool = False,
                   closed: bool = False) -> tuple[dict[int, dict[str, Any]], dict[str, Any] | None]:
    from yapctl.client import AdminClient

    url = d.url(key=None)
    out: dict[int, dict[str, Any]] = {}
    for c in levels:
        out[c] = await level(url, c, rounds, prompts, fresh, closed)
    profile = None
    if profile_level:
        async def window() -> dict[str, Any]:
            await asyncio.sleep(1.0)
            async with AdminClient(d.admin_socket, timeout=60) as admin:
                return await admin.request("profile", seconds=3.0, top=25)

        task = asyncio.ensure_future(window())
        while not task.done():
            await level(url, profile_level, rounds, prompts, fresh, closed)
        profile = await task
    return out, profile


def main(argv: list[str] | None = None) -> int:
    from yapctl.gpubench.prompts import HISTORY, PERSONA, UTTERANCE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, help="a folder with nemo-12b and hammer-3b tokenizer folders "
                                               "(default: the demo models' tokenizer)")
    p.add_argument("--levels", default="1,8,16")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--request-order", default=TurnConfig.request_order, choices=typing.get_args(RequestOrder))
    p.add_argument("--chat-first-ms", type=float, default=20.0)
    p.add_argument("--tool-first-ms", type=float, default=16.0)
    p.add_argument("--itl-ms", type=float, default=6.0)
    p.add_argument("--max-out", type=int, default=40, help="tokens per reply")
    p.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    p.add_argument("--own-process", default="", choices=("", "chat", "tool", "both"),
                   help="these engines in engine hosts of their own (own_process): what the hop costs")
    p.add_argument("--profile-level", type=int, default=0, metavar="SESSIONS",
                   help="then run this level with yapd's event loop profiled for 3 s (yapctl profile)")
    p.add_argument("--fresh-prompts", action="store_true",
                   help="every turn's persona new to yapd (salted per level and turn): each turn's prompts "
                        "tokenized whole, as at the start of a call, not from the session's cached persona")
    p.add_argument("--closed-loop", action="store_true",
                   help="no lockstep rounds: each session starts its next turn as its last ends (gpubench's "
                        "levels), so turns start while others stream")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--cache-dir", type=Path, help="yapd's cache directory (where the demo models are built)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    if args.rounds < 1 or not levels or min(levels) < 1:
        p.error("--rounds and every level must be at least 1")
    with tempfile.TemporaryDirectory(prefix="frontbench-") as tmp:
        work = Path(tmp)
        hosted = {"chat", "tool"} if args.own_process == "both" else {args.own_process}
        models = "".join(
            f"[{role}]\n" + (f'model = "{args.models / folder}"\n' if args.models is not None else "")
            + ("own_process = true\n" if role in hosted else "")
            for role, folder in (("chat", "nemo-12b"), ("tool", "hammer-3b")))
        config = (f'{models}[turn]\nconcurrent = true\nignore_eos = true\nchat_max_out = {args.max_out}\n'
                  f'request_order = "{args.request_order}"\n')
        log = work / "requests.json"
        d = LocalYapd(work, KEY, config=config, demo=args.models is None,
                      server={"max_connections": max([*levels, args.profile_level]) + 8, "rate_limit_per_s": 1000.0,
                              "rate_limit_burst": 1000, "event_loop": args.event_loop},
                      env={LOG_ENV: str(log), TIMING_ENV: f"{args.chat_first_ms},{args.tool_first_ms},{args.itl_ms}"},
                      cache_dir=args.cache_dir, entry=[sys.executable, "-m", "yapctl.frontbench", "--serve"])
        d.start(timeout=300)
        try:
            raw, profile = asyncio.run(_measure(d, levels, args.rounds, {"persona": PERSONA, "history": HISTORY,
                                                                          "utterance": UTTERANCE}, args.profile_level,
                                                   args.fresh_prompts, args.closed_loop))
        finally:
            d.stop()
        made = [(str(r), str(role), float(t)) for role_log in sorted(work.glob(f"{log.name}.*"))
                for r, role, t in json.loads(role_log.read_text())]
    setup: dict[str, Any] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    setup.update(models=str(args.models or "demo"), python=sys.version.split()[0])
    figures = {f"c{c}": summarize(c, raw[c], made) for c in levels}
    report: dict[str, Any] = {"setup": setup, "levels": figures}
    if profile is not None:
        report["profile"] = profile
    for name, s in figures.items():
        print(f"{name}: TTFT p50/p95 {s['ttft_ms']['p50']} / {s['ttft_ms']['p95']} ms, tool {s['tool_ms']['p50']} / "
              f"{s['tool_ms']['p95']}, outside yapd's turn {s['outside_turn_ms']['p50']} / "
              f"{s['outside_turn_ms']['p95']} (the start's way in {s['inbound_ms']['p50']} / "
              f"{s['inbound_ms']['p95']}); first text to sent {s['text_to_sent_ms']['p50']} / "
              f"{s['text_to_sent_ms']['p95']}; requests made after the start was sent: chat "
              f"{s['chat_request_after_send_ms']['p50']} / {s['chat_request_after_send_ms']['p95']}, tool "
              f"{s['tool_request_after_send_ms']['p50']} / {s['tool_request_after_send_ms']['p95']}; a round's "
              f"requests over {s['round_requests_span_ms']['p50']} ms ({s['per_turn_start_ms']} ms a turn); "
              f"ITL p50/p99 {s['itl_ms']['p50']} / {s['itl_ms']['p99']} (a step {args.itl_ms} ms); "
              f"its p99 apart from / beside other turns' starts {s['itl_starts']['apart_p99']} / "
              f"{s['itl_starts']['beside_p99']} ({s['itl_starts']['beside_pct']} % of the gaps beside them)")
    if profile is not None:
        print("event loop: " + ", ".join(f"{g['package']} {g['share']:.0%}" for g in profile["by_package"][:8]))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        raise SystemExit(serve(sys.argv[2:]))
    raise SystemExit(main())
