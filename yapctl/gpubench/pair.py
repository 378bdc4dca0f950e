"""yapd and raw on one GPU at once, taking turns round by round."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from yapctl.bench import BenchConfig, BenchReport, lockstep
from yapctl.gpubench.measure import CpuMeter, proc_figures
from yapctl.gpubench.prompts import HISTORY, PERSONA, UTTERANCE
from yapctl.gpubench.raw import RawEngines, RawTurn, raw_level, raw_prompts
from yapctl.gpubench.results import Results
from yapctl.gpubench.runsetup import PORT, Setup, turns_for, with_overrides
from yapctl.gpubench.servers import start_yapd, stop
from yapctl.gpubench.yapdphase import yapd_processes


async def phase_pair(res: Results, s: Setup) -> None:
    """yapd and raw on one GPU at once, each with part of its memory, taking turns round
    by round at every level: the drift of the machine between two phases (a few ms at one
    session, seen between runs q and r) hits both alike. Both under the run's MPS daemon."""
    fractions = [f"{role}.gpu_memory_utilization={frac}"
                 for role, frac in zip(("chat", "tool"), s.pair_fractions, strict=True)]
    path = s.work / "yapd-pair.toml"
    path.write_text(with_overrides(s.config_text(), fractions))
    res.put("pair", "gpu_memory_utilization", {"chat": s.pair_fractions[0], "tool": s.pair_fractions[1]})
    proc, started = start_yapd(path, s.work / "yapd.log")
    res.put("pair", "yapd_start_s", round(started, 1))
    try:
        cfg = s.config(fractions)
        tp = raw_prompts(s, cfg)
        t0 = time.perf_counter()
        raw = RawEngines.start(cfg, tp.turn, s.raw_order, s.raw_start_method)
        res.put("pair", "raw_start_s", round(time.perf_counter() - t0, 1))
        res.put("pair", "raw_start_method", {"asked": s.raw_start_method, "used": raw.start_method})
        try:
            for c in s.levels:
                yapd_cpu = CpuMeter(await yapd_processes(path.parent / "admin.sock"))
                raw_cpu = CpuMeter(raw.processes())
                level = await paired_level(f"ws://127.0.0.1:{PORT}/ws", raw.turn, c, s.rounds)
                for side, meter in (("yapd", yapd_cpu), ("raw", raw_cpu)):
                    # warm-up turns included; raw's front end also ran yapd's bench client here
                    level[side].update(proc_figures(meter, level[side]["turns"] + c))
                res.put("pair", f"c{c}", level)
        finally:
            raw.shutdown()
    finally:
        stop(proc)


async def paired_level(url: str, raw_turn: Callable[[int], Awaitable[RawTurn]], c: int, rounds: int,
                       key: str = "bench", sent: dict[str, float] | None = None) -> dict[str, Any]:
    """Level ``c`` for yapd (over ``url``) and raw taking turns: before each of yapd's
    lockstep rounds, raw runs its own round of ``c`` turns with the same prompts
    (:func:`turns_for`'s count for each, after a warm-up round each). ``sent``: as
    :func:`lockstep`'s."""
    raw_rows: list[RawTurn] = []

    async def raw_round(i: int) -> None:
        raw_rows.extend(await asyncio.gather(*(raw_turn(i * c + w) for w in range(c))))

    await asyncio.gather(*(raw_turn(-1) for _ in range(c)))
    cfg = BenchConfig(url=url, key=key, concurrency=c, timeout=120, utterance=UTTERANCE, persona_text=PERSONA,
                      history_text=HISTORY)
    t0 = time.perf_counter()
    done = await lockstep(cfg, turns_for(c, rounds) // c, raw_round, sent)
    wall = time.perf_counter() - t0
    return {"yapd": BenchReport([r for rs in done for r in rs], wall / 2, c).summary(), "raw": raw_level(raw_rows)}
