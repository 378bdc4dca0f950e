"""The yapd phase: yapd as a client sees it, level by level, and its A/B runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yapctl.bench import BenchConfig, BenchReport, TurnResult, bench, cancel_latency, lockstep
from yapctl.client import AdminClient
from yapctl.gpubench.measure import PROFILE_S, PROFILE_TOP, gc_between, profiled, watching
from yapctl.gpubench.prompts import HISTORY, PERSONA, UTTERANCE, level_salt
from yapctl.gpubench.results import Results
from yapctl.gpubench.runsetup import PORT, Setup, turns_for, with_overrides
from yapctl.gpubench.servers import log_end, start_yapd, startup_lines, step_budgets, stop


async def yapd_processes(admin_socket: Path) -> dict[str, int]:
    """yapd's process ("front"), its EngineCores (by role) and its engine hosts ("tool_front"
    for the tool's, as raw's split names it), from its status."""
    async with AdminClient(admin_socket) as admin:
        st = await admin.request("status")
    engines = st.get("engines", {})
    return {"front": st["pid"], **{f"{role}_front": e["host_pid"] for role, e in engines.items() if e.get("host_pid")},
            **{role: e["pid"] for role, e in engines.items() if e.get("pid")}}


async def backends_as_asked(admin_socket: Path, s: Setup) -> dict[str, str]:
    """Each engine's backend, from yapd's status; an error where one the config leaves to
    "auto" (the default a user runs) did not take vLLM on this GPU."""
    async with AdminClient(admin_socket) as admin:
        st = await admin.request("status")
    got = {role: e.get("backend", "?") for role, e in st.get("engines", {}).items()}
    cfg = s.config()
    asked = {"chat": cfg.chat.backend, "tool": cfg.tool.backend}
    if bad := {role: b for role, b in got.items() if asked.get(role) == "auto" and b != "vllm"}:
        raise RuntimeError(f"backend auto did not take vLLM: {bad}")
    return got


async def phase_yapd(res: Results, s: Setup) -> None:
    cfg = s.config_file()
    log = s.work / "yapd.log"
    offset = log_end(log)
    proc, cold = start_yapd(cfg, log)
    res.put("yapd", "start_s_first", round(cold, 1))
    # Whether yapd's engines run under its own MPS daemon, in its words.
    res.put("yapd", "mps_lines", [line for line in startup_lines(log, offset) if "yapd.mps" in line])
    res.put("yapd", "step_budgets", step_budgets(log, offset))
    url = f"ws://127.0.0.1:{PORT}/ws"
    admin_socket = cfg.parent / "admin.sock"
    res.put("yapd", "backends", await backends_as_asked(admin_socket, s))

    async def measured(c: int) -> tuple[dict[str, Any], BenchReport]:
        n = turns_for(c, s.rounds)
        before = (await loop_state())["gc_pauses"]
        t0 = time.perf_counter()
        with watching(s, c, await yapd_processes(admin_socket)) as figures:
            rep = await bench(BenchConfig(url=url, key="bench", n=n, concurrency=c, timeout=120,
                                          utterance=UTTERANCE, persona_text=PERSONA, history_text=HISTORY,
                                          persona_salt=level_salt(s)))
        # The measured turns alone first (no warm-up round, whose sessions are all new), then
        # the whole level: its window, ending later, holds the first's.
        turns = (await loop_state(rep.wall_s))["loop_lag_ms"]
        state = await loop_state(time.perf_counter() - t0)
        state["loop_lag_turns_ms"] = turns
        state["gc_pauses"]["level"] = gc_between(before, state["gc_pauses"])
        # The warm-up turns are in the CPU time too: per turn of the whole level.
        return {**rep.summary(), **state, **figures(n + c)}, rep

    async def level(c: int) -> dict[str, Any]:
        return (await measured(c))[0]

    async def restarted_levels(levels: Sequence[int]) -> None:
        """Every level measured ab_restarts times per config, A B B A ..., each start of
        both engines (restarted for it) measuring every level: yapd / yapd_b get each
        config's turns pooled per level, and ab_starts each start's own figures. What is
        measured once (the cancel, the profile) runs on the first A start, after its
        levels: as configured, with no engine restart back to A for it at the end, and
        kept by a call cut at its time limit in the arms after it."""
        pooled: dict[int, dict[str, list[TurnResult]]] = {c: {"a": [], "b": []} for c in levels}
        walls = {c: {"a": 0.0, "b": 0.0} for c in levels}
        starts: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
        arm = "a"
        for i, arm in enumerate(ab_arms(s.ab_restarts)):
            restart_s, lines = await restart_engines_with(cfg, s.config_text(), s.ab if arm == "b" else (),
                                                          admin_socket, log)
            for c in levels:
                summary, rep = await measured(c)
                pooled[c][arm] += rep.results
                walls[c][arm] += rep.wall_s
                starts[c].append({"arm": arm, "restart_s": restart_s, "restart_lines": lines,
                                  **{k: summary.get(k) for k in AB_START_FIGURES}})
                # each start and each config's pool so far land as they are measured: a call
                # cut at its time limit keeps them
                res.put("yapd_ab_starts", f"c{c}", starts[c])
                res.put("yapd" if arm == "a" else "yapd_b", f"c{c}", {
                    **BenchReport(pooled[c][arm], walls[c][arm], c).summary(),
                    "starts": sum(st["arm"] == arm for st in starts[c])})
            if i == 0:
                await once()
        if arm == "b":  # the process restart that follows starts from the file as configured
            await asyncio.to_thread(cfg.write_text, s.config_text())

    async def loop_state(window_s: float | None = None) -> dict[str, Any]:
        # How late yapd's event loop ran (a loop held up by token frames delays both
        # engines' outputs too), and its long collections: over the level's own span, at
        # most yapd's 20 s window. A level shorter than that window would otherwise take
        # in the start's one full collection at READY (run aa's at 16 sessions did).
        async with AdminClient(admin_socket) as admin:
            st = await admin.request("status", **({} if window_s is None else {"window_s": window_s}))
        return {"loop_lag_ms": st.get("loop_lag_ms"), "gc_pauses": st.get("gc_pauses")}

    async def once() -> None:
        """What the phase measures once, after the levels (of the first A start, with
        --ab-restarts): the loop profile at one level where asked, the cancel."""
        if s.profile_level:
            async def profile() -> dict[str, Any]:
                async with AdminClient(admin_socket, timeout=PROFILE_S + 30) as admin:
                    return await admin.request("profile", seconds=PROFILE_S, top=PROFILE_TOP)

            res.put("yapd", f"profile_c{s.profile_level}", await profiled(level(s.profile_level), profile))
        start = {"type": "start", "session_id": "cancel", "user_utterance": UTTERANCE, "persona_text": PERSONA,
                 "history_text": HISTORY}
        res.put("yapd", "cancel", await cancel_latency(url, "bench", n=20, start=start))

    try:
        if s.ab and s.ab_restarts:  # engine restarts cost tens of seconds each: one a measurement
            await restarted_levels(s.levels)
        else:
            for c in s.levels:
                if s.ab and s.ab_interleave:
                    a, b, wall = await interleaved(url, admin_socket, cfg, s.config_text(), s.ab, c, s.rounds)
                    state = await loop_state()
                    res.put("yapd", f"c{c}", {**BenchReport(a, wall / 2, c).summary(), **state})
                    res.put("yapd_b", f"c{c}", {**BenchReport(b, wall / 2, c).summary(), **state})
                    continue
                res.put("yapd", f"c{c}", await level(c))
                if s.ab:  # the same level again with the changes, then back
                    await reload_with(cfg, s.config_text(), s.ab, admin_socket)
                    res.put("yapd_b", f"c{c}", await level(c))
                    await reload_with(cfg, s.config_text(), (), admin_socket)
            await once()
    finally:
        stop(proc)
    if s.skip_restart:
        return
    offset = log.stat().st_size
    proc, warm = start_yapd(cfg, log)
    res.put("yapd", "start_s_restart", round(warm, 1))
    res.put("yapd", "restart_lines", startup_lines(log, offset))
    stop(proc)


# What ab_starts keeps of each start's level: enough to see how far the starts of one
# config spread, beside the pooled figures.
AB_START_FIGURES = ("ttft_ms", "tool_ms", "itl_ms", "server_chat_queued_ms", "server_chat_first_token_ms",
                    "server_chat_core_to_front_ms", "server_tool_queued_ms", "server_tool_first_token_ms",
                    "server_tool_core_to_front_ms", "cpu_ms_per_turn", "proc_per_turn")


def ab_arms(pairs: int) -> list[str]:
    """A B B A A B ...: ``pairs`` measurements of each config, in an order that a steady
    drift of the machine over the run hits both alike; it ends on A where it can."""
    return [arm for i in range(pairs) for arm in (("a", "b") if i % 2 == 0 else ("b", "a"))]


async def restart_engines_with(path: Path, text: str, overrides: Sequence[str], admin_socket: Path,
                               log: Path) -> tuple[float, list[str]]:
    """yapd's config file as ``text`` with ``overrides``, reloaded, then both engines
    restarted (whether or not a key changed: every measurement gets engines of its own
    start). Returns the restart's seconds and its start lines."""
    offset = (await asyncio.to_thread(log.stat)).st_size
    await reload_with(path, text, overrides, admin_socket, engine_keys=True)
    async with AdminClient(admin_socket, timeout=900) as admin:
        t0 = time.perf_counter()
        reply = await admin.request("restart", target="both", timeout=900)
        took = time.perf_counter() - t0
    if not reply.get("ok"):
        raise RuntimeError(f"engine restart for {list(overrides)} failed: {reply}")
    return round(took, 1), startup_lines(log, offset)


async def interleaved(url: str, admin_socket: Path, path: Path, text: str, ab: Sequence[str], c: int,
                      rounds: int, key: str = "bench") -> tuple[list[TurnResult], list[TurnResult], float]:
    """Level ``c`` with the config ``text`` (A) and with ``ab`` (B) taking turns round by
    round on the same ``c`` sessions, each config as many rounds as a level has
    (:func:`turns_for`), reloaded live before each round; back to A at the end. A's and
    B's turns and the wall time of both."""
    per_config = turns_for(c, rounds) // c

    async def before(i: int) -> None:
        await reload_with(path, text, ab if i % 2 else (), admin_socket)

    cfg = BenchConfig(url=url, key=key, concurrency=c, timeout=120, utterance=UTTERANCE, persona_text=PERSONA,
                      history_text=HISTORY)
    t0 = time.perf_counter()
    try:
        rounds_done = await lockstep(cfg, 2 * per_config, before)
    finally:
        await reload_with(path, text, (), admin_socket)
    wall = time.perf_counter() - t0
    return ([r for rs in rounds_done[::2] for r in rs], [r for rs in rounds_done[1::2] for r in rs], wall)


async def reload_with(path: Path, text: str, overrides: Sequence[str], admin_socket: Path,
                      engine_keys: bool = False) -> None:
    """Write yapd's config file ``path`` as ``text`` with ``overrides`` and have yapd
    reload it; only live keys may change (anything else would wait for a restart), or
    with ``engine_keys`` engine keys too (the caller restarts the engines)."""
    await asyncio.to_thread(path.write_text, with_overrides(text, overrides))
    async with AdminClient(admin_socket) as admin:
        reply = await admin.request("reload")
    if engine_keys:
        if not reply.get("ok") or reply.get("needs_daemon_restart"):
            raise RuntimeError(f"reload for {list(overrides)} failed or needs a process restart: {reply}")
    elif not reply.get("ok") or reply.get("needs_engine_restart") or reply.get("needs_daemon_restart"):
        raise RuntimeError(f"reload for {list(overrides)} did not apply live: {reply}")
