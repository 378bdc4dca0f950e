"""GPU benchmark: yapd as a client sees it, raw AsyncLLM (the floor) and ``vllm serve``
(the alternative), with the same prompts, in one run, on one machine.

    python -m yapctl.gpubench MODELS_DIR [--out docs/bench] [--phases yapd,raw,serve]

MODELS_DIR holds ``nemo-12b`` and ``hammer-3b`` folders (configs + tokenizers; weights are
``load_format="dummy"``: real shapes, random values, real timings). Every phase writes
its figures to the JSON file as soon as it has them. A program that prints figures, not
a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from yapctl import gpuenv, pyspy
from yapctl.bench import (
    SLOW_OVER_P50,
    BenchConfig,
    BenchReport,
    TurnResult,
    bench,
    cancel_latency,
    lockstep,
    pct,
    per_step,
    salted_persona,
    slow_bursts,
    turn_utterance,
)
from yapctl.client import AdminClient
from yapctl.toolfront import RemoteTool, decide, keep_stamps, run_loop, vllm_tool
from yapd import config
from yapd.config import Config, EnginesConfig, TurnConfig
from yapd.mps import NO_BINARY, MpsDaemon
from yapd.procfs import counters, host_cpu

LEVELS = (1, 8, 16, 24)
WORDS = ("the quick brown fox jumps over a lazy dog while the persona keeps talking about music movies "
         "travel plans and what to cook tonight because the user likes spicy food").split()
T = TypeVar("T")
# --profile-level: the window (after the level's warm-up turns) and the functions kept (enough to
# see a turn start's parts: prompts, vLLM's add_request, the frames).
PROFILE_AFTER_S = 3.0
PROFILE_S = 10.0
PROFILE_TOP = 80
PORT = 8123
SERVE_PORT = 8124
# The serve phase's passes over the levels: the chat prompt as text (as users call it), as
# yapd's token ids, and beside a second server for the tool model.
SERVE_PASSES = ("text", "ids", "tool")
# An engine's stamps of a request (yapd.engines.base.EngineStamps.ms_since), as figures are named.
STAMP_NAMES = ("queued", "scheduled", "first_token")


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


# The vLLM issue's prompt: a 600-token persona, a 2,000-token history (exactly, with NeMo's
# tokenizer) and a short utterance; 200 tokens out. Runs before af had 450 and 1,500 words:
# 471 and 1,555 tokens, a 2,058-token chat prompt where the issue asks ~2,630.
PROMPT = {"persona_words": 575, "history_words": 1930, "utterance_words": 20, "max_out": 200}
PROMPT_BEFORE_AF = {**PROMPT, "persona_words": 450, "history_words": 1500}  # files that recorded none
PERSONA = "<|persona|> " + text(PROMPT["persona_words"], 1)
HISTORY = "<|history|> " + text(PROMPT["history_words"], 2)
UTTERANCE = text(PROMPT["utterance_words"], 100)


def gaps(stamps: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]


ROUNDS = 8


def level_salt(s: Setup) -> str:
    """A level's persona salt under --fresh-prompts (a new one every level, A/B arm and
    start, so nothing is cached from an earlier one); "" otherwise."""
    return uuid.uuid4().hex[:8] if s.fresh_prompts else ""


def turns_for(c: int, rounds: int = ROUNDS) -> int:
    # Sessions whose turns are all alike run in lockstep, so a level is ``rounds`` bursts
    # of c starts and a p95 is decided by its slowest few bursts (one session: 3 x rounds).
    return max(3 * rounds, rounds * c)


def gc_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """yapd's collections and the ms spent in them, by generation, from one /status
    ``gc_pauses`` to a later one: a level's own (the counts there run from yapd's start)."""
    return {key: {g: round(after[key][g] - before[key].get(g, 0), 2) for g in after[key]}
            for key in ("collections", "ms")}


class CpuMeter:
    """The CPU time named processes use over a level, per turn: whether an EngineCore of
    yapd's spends more of it on a turn than raw's does (the front end's too); and, for
    where a slower one loses it, its page faults, context switches and busiest threads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: counters(pid) for name, pid in pids.items()}
        self.host_before = host_cpu()

    def per_turn(self, turns: int) -> dict[str, dict[str, Any]]:
        """Per process and turn: CPU ms, minor and major faults, voluntary and involuntary
        context switches, ms its threads were ready but waited for a CPU, moves of its
        threads between CPUs; the CPU ms and waits of its busiest threads (by name), and
        the minor faults of the threads that take most; and its resident MB at the end."""
        out = {}
        for name, pid in self.pids.items():
            was, now = self.before[name], counters(pid)
            if was is None or now is None or not turns:
                continue
            d = now.since(was)
            busiest = [t for t, v in sorted(d.threads.items(), key=lambda kv: -kv[1])[:6] if v > 0]
            out[name] = {"cpu_ms": round(d.cpu_s * 1000 / turns, 2), "minflt": round(d.minflt / turns, 1),
                         "majflt": round(d.majflt / turns, 2), "vcsw": round(d.vcsw / turns, 1),
                         "ivcsw": round(d.ivcsw / turns, 1), "runq_ms": round(d.runq_s * 1000 / turns, 3),
                         "migrations": round(d.migrations / turns, 1),
                         "threads_ms": {t: round(d.threads[t] * 1000 / turns, 2) for t in busiest},
                         "threads_runq_ms": {t: round(d.threads_runq.get(t, 0.0) * 1000 / turns, 3)
                                             for t in busiest},
                         # which threads take the faults (a forked tool core: ~230 a turn)
                         "threads_minflt": {t: round(n / turns, 1) for t, n in
                                            sorted(d.threads_minflt.items(), key=lambda kv: -kv[1])[:4] if n > 0},
                         # resident memory at the level's end (what a malloc setting may cost)
                         "rss_mb": round(d.rss_kb / 1024, 1)}
        return out

    def host(self) -> dict[str, Any]:
        """The machine's CPUs over the level: how many, the share of their time busy and
        the share stolen by a virtual machine's host; empty where /proc/stat is unread."""
        now = host_cpu()
        if self.host_before is None or now is None:
            return {}
        return {"cpus": now.cpus, **now.since(self.host_before).shares()}


@contextlib.contextmanager
def watching(s: Setup, c: int, pids: dict[str, int]) -> Iterator[Callable[[int], dict[str, Any]]]:
    """A level's watch on ``pids``: /proc's counters over it and, at --pyspy-level,
    py-spy's samples. Yields what gives the level's figures from its turns (warm-up ones
    included), to call once the block is left (the profiles are read then)."""
    meter = CpuMeter(pids)
    spied: dict[str, Any] = {}

    def figures(turns: int) -> dict[str, Any]:
        return {**proc_figures(meter, turns), **({"pyspy": spied, "pyspy_native": s.pyspy_native} if spied else {})}

    with pyspy.profiled(pids if c == s.pyspy_level else {}, s.work / "pyspy", spied, s.pyspy_native):
        yield figures


def proc_figures(meter: CpuMeter, turns: int) -> dict[str, Any]:
    """A level's figures from ``meter``: CPU ms per turn by process, and the rest of
    what /proc counted (:meth:`CpuMeter.per_turn`)."""
    proc = meter.per_turn(turns)
    return {"cpu_ms_per_turn": {name: p["cpu_ms"] for name, p in proc.items()}, "proc_per_turn": proc,
            **({"host_cpu": host} if (host := meter.host()) else {})}


async def yapd_processes(admin_socket: Path) -> dict[str, int]:
    """yapd's process ("front"), its EngineCores (by role) and its engine hosts ("tool_front"
    for the tool's, as raw's split names it), from its status."""
    async with AdminClient(admin_socket) as admin:
        st = await admin.request("status")
    engines = st.get("engines", {})
    return {"front": st["pid"], **{f"{role}_front": e["host_pid"] for role, e in engines.items() if e.get("host_pid")},
            **{role: e["pid"] for role, e in engines.items() if e.get("pid")}}


async def at_level(c: int, one: Callable[[int], Awaitable[T]], rounds: int = ROUNDS) -> list[T]:
    """``c`` warm-up turns (-1) side by side, then ``turns_for(c, rounds)`` turns over
    ``c`` workers, as yapd's bench runs a level: the results of the timed turns."""
    await asyncio.gather(*(one(-1) for _ in range(c)))
    counter = iter(range(turns_for(c, rounds)))
    rows: list[T] = []

    async def worker() -> None:
        for i in counter:
            rows.append(await one(i))

    await asyncio.gather(*(worker() for _ in range(c)))
    return rows


@dataclass(frozen=True)
class Setup:
    """What one benchmark run holds fixed: the model folders, a work folder (caches,
    logs), the concurrency levels, lockstep rounds per level and the chat engine's
    tensor parallelism."""

    models: Path
    work: Path
    levels: tuple[int, ...] = LEVELS
    chat_tp: int = 1
    rounds: int = ROUNDS
    mps: bool = False  # yapd runs its own MPS daemon (engines.mps = "on"), else none ("off")
    mps_priority: str = EnginesConfig.mps_priority  # engines.mps_priority for yapd (yapd's default unless asked)
    event_loop: str = "auto"  # server.event_loop for yapd
    request_order: str = TurnConfig.request_order  # turn.request_order for yapd (yapd's default unless asked)
    # Live config changes ('turn.request_order="chat_first"') yapd runs each level with too, right
    # after the level as configured (an A/B on one process, reloaded over the admin socket).
    ab: tuple[str, ...] = ()
    # With ab: the two configs take turns round by round on the same sessions instead of
    # level after level (drift of the machine then hits both alike).
    ab_interleave: bool = False
    order_probe: bool = False  # the raw phase also times one session's requests in each order
    raw_order: str = "chats_then_tools"  # raw's turns: chat request at once, tool's a loop round later; or tool_first
    profile_level: int = 0  # yapd and raw run this level once more with their event loop profiled (0: not)
    serve_passes: tuple[str, ...] = SERVE_PASSES  # what the serve phase times (see --serve-passes)
    # The pair phase's chat and tool gpu_memory_utilization, for yapd's engines and raw's
    # alike: two of each share the GPU.
    pair_fractions: tuple[float, float] = (0.38, 0.09)
    # yapd config keys set for every phase (SECTION.KEY=VALUE, value as TOML): yapd's
    # config, and raw's and vllm serve's engines where they read it (engine_kwargs)
    sets: tuple[str, ...] = ()
    # yapd's and raw's processes (front end, EngineCores) sampled by py-spy at this level (0: not)
    pyspy_level: int = 0
    pyspy_native: bool = False  # with C and C++ frames (py-spy stops each process per sample)
    # How raw's engines start their EngineCores: "spawn", as every run's raw did before this
    # option (the bench process held a CUDA context, and vLLM then spawns), or "fork"
    raw_start_method: str = "spawn"
    skip_restart: bool = False  # the yapd phase ends without its process restart
    # Every turn's persona new to the engines (--fresh-prompts): each level under a salt
    # of its own (level_salt), so no turn's chat prompt is in a prefix cache.
    fresh_prompts: bool = False
    # With ab: each level is measured this many times per config, every time on engines
    # restarted for it (A B B A ...): ab may then change engine keys, and the starts' own
    # spread (several ms at one session, runs w-z) is sampled instead of deciding alone.
    ab_restarts: int = 0

    def config_text(self, chat: str = "nemo-12b", tool: str = "hammer-3b") -> str:
        return with_overrides(f"""
[server]
host = "127.0.0.1"
port = {PORT}
api_keys = ["bench"]
max_connections = 64
rate_limit_per_s = 1000.0
rate_limit_burst = 1000
event_loop = "{self.event_loop}"
[engines]
deploy = "both"
cache_dir = "{self.work / "cache"}"
mps = "{"on" if self.mps else "off"}"
mps_priority = "{self.mps_priority}"
[chat]
model = "{self.models / chat}"
backend = "vllm"
load_format = "dummy"
quantization = "fp8"
tensor_parallel_size = {self.chat_tp}
[tool]
model = "{self.models / tool}"
backend = "vllm"
load_format = "dummy"
[turn]
concurrent = true
request_order = "{self.request_order}"
ignore_eos = true
chat_max_out = 200
""", self.sets)

    def config(self, overrides: Sequence[str] = ()) -> Config:
        return config.from_mapping(config.tomllib.loads(with_overrides(self.config_text(), overrides)), "bench")

    def config_file(self) -> Path:
        path = self.work / "yapd.toml"
        path.write_text(self.config_text())
        return path


def with_overrides(text: str, overrides: Sequence[str]) -> str:
    """The bench's config text with ``section.key=value`` items set (value as TOML)."""
    lines = text.splitlines()
    for item in overrides:
        dotted, eq, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not eq or not dot or not key:
            raise ValueError(f"{item!r}: expected section.key=value")
        line = f"{key} = {value.strip()}"
        try:
            start = lines.index(f"[{section}]") + 1
        except ValueError:
            lines += [f"[{section}]", line]
            continue
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        at = next((i for i in range(start, end) if lines[i].split("=")[0].strip() == key), None)
        if at is None:
            lines.insert(start, line)
        else:
            lines[at] = line
    return "\n".join(lines) + "\n"


class Results:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():  # phases run in separate calls add to one file
            self.data = json.loads(path.read_text())
            return
        self.data = {"date": datetime.date.today().isoformat(), "machine": _gpu_name(), "prompt": dict(PROMPT)}
        try:
            import vllm

            self.data["vllm"] = vllm.__version__
        except ImportError:
            pass

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"RESULT {section}.{key} {json.dumps(value)}", flush=True)


def other_hosts(data: dict[str, Any]) -> list[str]:
    """A warning when the file's phases ran on more than one machine."""
    hosts = {ph: data[ph]["host"] for ph in PHASES if isinstance(data.get(ph), dict) and data[ph].get("host")}
    if len({json.dumps(h, sort_keys=True) for h in hosts.values()}) < 2:
        return []
    which = "; ".join(f"{ph} on boot {h.get('boot_id', '?')[:8]}, GPU {h.get('gpu_uuid', '?')[:13]}"
                      for ph, h in hosts.items())
    return [f"**The phases ran on different machines** ({which}): their columns are not comparable "
            "with each other.", ""]


def host_identity() -> dict[str, str]:
    """Which machine a phase ran on: the kernel's boot id (a new one on every machine and
    every boot) and the GPU's UUID. Phases of one file can run in separate calls, and a
    lent machine taken back in between means the next call runs on another host, whose
    figures are not comparable with the first's (run o: 20.75 against 19.5 ms at one
    session on the same GPU model)."""
    out: dict[str, str] = {}
    try:
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    uuids = _gpu_query("uuid")
    if uuids:
        out["gpu_uuid"] = ",".join(uuids)
    return out


def _gpu_name() -> str:
    names = _gpu_query("name")
    return names[0] if names else "unknown"


def _gpu_query(field: str) -> list[str]:
    """One nvidia-smi field of each GPU (none without nvidia-smi). Not torch: a CUDA
    context in this process would hold GPU memory, and make vLLM spawn raw's EngineCores
    whatever --raw-start-method asks."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []


# --- yapd -------------------------------------------------------------------------


def ends_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a server the bench starts: the kernel sends it SIGTERM when the
    bench dies, even by SIGKILL, and the server stops as on any SIGTERM. A device call's
    time limit ends the bench mid-phase; its yapd lived on, holding the port and the GPU,
    and the next call's yapd could not bind (2026-12-03). Linux only (``prctl``)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    bench = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != bench:  # the bench died before that: nobody to serve
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start_yapd(cfg_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    offset = log_end(log)  # the log is appended to: read only this start's lines
    out = log.open("ab")  # vLLM's own lines (phase timings) go to stdout: keep them
    proc = subprocess.Popen([sys.executable, "-m", "yapd", "--config", str(cfg_path), "--admin-socket",
                             str(cfg_path.parent / "admin.sock")], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=ends_with_us())
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"yapd exited {proc.returncode}; see {log}")
        if b"yapd.daemon: ready port=" in log.read_bytes()[offset:]:
            return proc, time.perf_counter() - t0
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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

    async def measured(c: int) -> tuple[dict[str, Any], BenchReport]:
        n = turns_for(c, s.rounds)
        before = (await loop_state())["gc_pauses"]
        t0 = time.perf_counter()
        with watching(s, c, await yapd_processes(admin_socket)) as figures:
            rep = await bench(BenchConfig(url=url, key="bench", n=n, concurrency=c, timeout=120,
                                          utterance=UTTERANCE, persona_text=PERSONA, history_text=HISTORY,
                                          persona_salt=level_salt(s)))
        state = await loop_state(time.perf_counter() - t0)
        state["gc_pauses"]["level"] = gc_between(before, state["gc_pauses"])
        # The warm-up turns are in the CPU time too: per turn of the whole level.
        return {**rep.summary(), **state, **figures(n + c)}, rep

    async def level(c: int) -> dict[str, Any]:
        return (await measured(c))[0]

    async def restarted_levels(levels: Sequence[int]) -> None:
        """Every level measured ab_restarts times per config, A B B A ..., each start of
        both engines (restarted for it) measuring every level: yapd / yapd_b get each
        config's turns pooled per level, and ab_starts each start's own figures."""
        pooled: dict[int, dict[str, list[TurnResult]]] = {c: {"a": [], "b": []} for c in levels}
        walls = {c: {"a": 0.0, "b": 0.0} for c in levels}
        starts: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
        arm = "a"
        for arm in ab_arms(s.ab_restarts):
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
        if arm == "b":  # what follows (the cancel) runs as configured
            await restart_engines_with(cfg, s.config_text(), (), admin_socket, log)

    async def loop_state(window_s: float | None = None) -> dict[str, Any]:
        # How late yapd's event loop ran (a loop held up by token frames delays both
        # engines' outputs too), and its long collections: over the level's own span, at
        # most yapd's 20 s window. A level shorter than that window would otherwise take
        # in the start's one full collection at READY (run aa's at 16 sessions did).
        async with AdminClient(admin_socket) as admin:
            st = await admin.request("status", **({} if window_s is None else {"window_s": window_s}))
        return {"loop_lag_ms": st.get("loop_lag_ms"), "gc_pauses": st.get("gc_pauses")}

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
        if s.profile_level:
            async def profile() -> dict[str, Any]:
                async with AdminClient(admin_socket, timeout=PROFILE_S + 30) as admin:
                    return await admin.request("profile", seconds=PROFILE_S, top=PROFILE_TOP)

            res.put("yapd", f"profile_c{s.profile_level}", await profiled(level(s.profile_level), profile))
        start = {"type": "start", "session_id": "cancel", "user_utterance": UTTERANCE, "persona_text": PERSONA,
                 "history_text": HISTORY}
        res.put("yapd", "cancel", await cancel_latency(url, "bench", n=20, start=start))
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


def ab_starts_table(starts: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each start of an --ab-restarts run, in the order they ran: how far one config's
    starts spread beside the other's."""
    if not starts:
        return []

    def p50(start: dict[str, Any], key: str) -> Any:
        return (start.get(key) or {}).get("p50", "-")

    def by_core(start: dict[str, Any], key: str) -> str:
        procs = start.get("proc_per_turn") or {}
        return slashed({role: p[key] for role, p in procs.items() if key in p}, ("chat", "tool"))

    lines = ["Each start (A: as configured, B: with the change), p50 ms:", "",
             "| sessions | start | engine restart s | TTFT | tool decision | chat engine queued -> first token "
             "(its way out to yapd) | tool engine queued -> first token (its way out) | minor faults a turn: "
             "chat / tool core | resident MB: chat / tool core |", "| --- | --- | --- | --- | --- | --- | --- | --- | "
             "--- |"]
    for lvl in sorted(starts, key=lambda k: int(k[1:]) if k[1:].isdigit() else 0):
        for i, st in enumerate(starts[lvl], 1):
            engines = " | ".join(f"{p50(st, f'server_{role}_queued_ms')} -> {p50(st, f'server_{role}_first_token_ms')}"
                                 f" ({p50(st, f'server_{role}_core_to_front_ms')})" for role in ("chat", "tool"))
            lines.append(f"| {lvl[1:]} | {i} {st['arm'].upper()} | {st['restart_s']} | {p50(st, 'ttft_ms')} | "
                         f"{p50(st, 'tool_ms')} | {engines} | {by_core(st, 'minflt')} | {by_core(st, 'rss_mb')} |")
    return [*lines, ""]


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


# vLLM's own timing lines: where an engine start's seconds go.
STARTUP_LINES = re.compile(r"(took|takes|finished in|Compiling a graph|Directly load|cache)"
                           r".*?[0-9.]+ ?(s|secs|seconds)\b|engine started role=|ready port=|engines load |"
                           r"Overriding VLLM_WORKER|EngineCore started by|EngineCore (forked|spawned)|yapd\.mps:|"
                           # each engine's prompt tokens per step: an --ab may change it
                           r"max_num_batched_tokens=|"
                           # what each core got of yapd's settings for it (engines.core_*)
                           r"GIL switch interval|steady heap|keeps malloc's defaults|yapd's main thread|"
                           # whether torch.compile's AOT artifact was saved and loaded (else Dynamo reruns)
                           r"AOT compil|Compiling model again|Dynamo bytecode transform")


# vLLM's scheduler says its per-step prompt token budget as each engine starts.
BUDGET_LINE = re.compile(rb"Chunked prefill is enabled with max_num_batched_tokens=(\d+)")


def step_budgets(log: Path, offset: int = 0) -> list[int]:
    """Each engine's max_num_batched_tokens, in the order they started, from ``log``
    (vLLM picks 2048 from Python and 8192 in `vllm serve` on an H200: run ad)."""
    try:
        text = log.read_bytes()[offset:]
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in BUDGET_LINE.finditer(text)]


def log_end(log: Path) -> int:
    """Where the next start's lines will begin in ``log`` (appended to across starts)."""
    return log.stat().st_size if log.exists() else 0


def startup_lines(log: Path, offset: int) -> list[str]:
    text = log.read_bytes()[offset:].decode(errors="replace")
    return [line.strip()[:240] for line in text.splitlines() if STARTUP_LINES.search(line)]


async def phase_startup(res: Results, s: Setup) -> None:
    """Where start time goes: a first start (cold caches), then ``warm``; each with
    vLLM's own phase timings."""
    cfg = s.config_file()
    log = s.work / "startup.log"
    offset = log_end(log)
    proc, first = start_yapd(cfg, log)
    res.put("startup", "first_start_s", round(first, 1))
    res.put("startup", "first_start_lines", startup_lines(log, offset))
    stop(proc)
    await phase_warm(res, s)


async def phase_warm(res: Results, s: Setup) -> None:
    """Restarts with every cache warm: the process (start to READY) and both engines over
    the admin socket (``yapctl restart both``)."""
    cfg = s.config_file()
    log = s.work / "startup.log"
    put = functools.partial(res.put, "startup")  # each figure lands as soon as it is taken
    offset = log_end(log)
    proc, warm = start_yapd(cfg, log)
    put("process_restart_s", round(warm, 1))
    put("process_restart_lines", startup_lines(log, offset))
    try:
        offset = log.stat().st_size
        t0 = time.perf_counter()
        async with AdminClient(cfg.parent / "admin.sock", timeout=900) as admin:
            reply = await admin.request("restart", target="both", timeout=900)
        put("engine_restart_s", round(time.perf_counter() - t0, 1))
        put("engine_restart_reply", reply)
        put("engine_restart_lines", startup_lines(log, offset))
    finally:
        stop(proc)


PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - t0, 2)
if os.environ.get("PROBE_PARENT_CUDA") == "1":
    import torch
    torch.cuda.get_device_capability(0)
    mark("parent_cuda_init")
import torch
mark("import_torch")
from vllm import AsyncEngineArgs, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
mark("import_vllm")
from yapd.engines.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
mark("tokenizer")
llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], load_format="dummy", gpu_memory_utilization=0.3,
                                                max_model_len=4096, max_num_seqs=64, disable_log_stats=True))
mark("engine_ready")
import asyncio
async def one():
    async for _ in llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), "p"):
        pass
asyncio.run(one())
mark("first_token")
llm.shutdown()
mark("shutdown")
print("PROBE " + json.dumps(marks), flush=True)
"""


async def phase_spawn(res: Results, s: Setup) -> None:
    """What the EngineCore start method costs: one engine (Hammer-3B shape) started in a
    fresh process with spawn (CUDA touched in the parent first, as yapd did) and with fork."""
    env0 = {**os.environ, "VLLM_CACHE_ROOT": str(s.work / "cache" / "vllm")}
    runs = [("warmup", "spawn", "1"), ("spawn_parent_cuda", "spawn", "1"), ("spawn", "spawn", "0"),
            ("fork", "fork", "0")]
    for name, method, parent_cuda in runs:
        env = {**env0, "VLLM_WORKER_MULTIPROC_METHOD": method, "PROBE_PARENT_CUDA": parent_cuda}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, str(s.models / "hammer-3b")], env=env,  # noqa: ASYNC221
                             capture_output=True, text=True, timeout=600)
        wall = round(time.perf_counter() - t0, 1)
        line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
        timing = [x.strip()[:200] for x in (out.stdout + out.stderr).splitlines() if STARTUP_LINES.search(x)]
        res.put("spawn", name, {"wall_s": wall, "marks": json.loads(line[6:]) if line else None,
                                "rc": out.returncode, "vllm_lines": timing,
                                "tail": None if line else (out.stdout + out.stderr)[-1500:]})


# --- raw AsyncLLM ----------------------------------------------------------------


class _Tok:
    def __init__(self, tok: Any) -> None:
        self.tokenizer = tok


class TurnPrompts:
    """The exact token ids yapd builds for each of the bench's turns (chat and tool):
    the floor and ``vllm serve`` get the prompts yapd's engines get."""

    def __init__(self, s: Setup) -> None:
        from yapd.engines.tokenizer import load_tokenizer
        from yapd.runtime import Runtime

        self.cfg = s.config()
        # yapd's own loading: a Mistral model's tokenizer gets its corrected pre-tokenizer
        self.chat_tok: Any = load_tokenizer(str(s.models / "nemo-12b"))
        self.tool_tok: Any = load_tokenizer(str(s.models / "hammer-3b"))
        rt = Runtime(self.cfg)
        self.layout = rt.layout(_Tok(self.chat_tok))  # type: ignore[arg-type]
        self.tool_prefix, self.tool_tail = rt.tool_prefix(_Tok(self.tool_tok))  # type: ignore[arg-type]
        self._memo: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        self.salt = ""  # the level's persona salt (level_salt): set before building its turns

    def turn(self, i: int) -> tuple[list[int], list[int]]:
        """(chat ids, tool ids) of turn ``i`` (see yapctl.bench.turn_utterance) under the
        current salt."""
        key = (self.salt, i)
        if key not in self._memo:
            from yapd.prompts import PromptCache, build_chat_prompt
            from yapd.turn import tool_query

            t = self.cfg.turn
            utterance = turn_utterance(UTTERANCE, i)
            persona = salted_persona(PERSONA, self.salt, i)
            chat = build_chat_prompt(PromptCache(self.chat_tok), self.layout, persona, HISTORY, utterance,
                                     history_max_tokens=t.history_max_tokens, history_step=t.history_trim_step,
                                     utterance_max_tokens=t.user_utt_max_tokens,
                                     max_model_len=self.cfg.chat.max_model_len, max_out=t.chat_max_out,
                                     exact=t.exact_token_trim).ids
            query = PromptCache(self.tool_tok).encode_lines(tool_query(utterance, HISTORY, t))
            self._memo[key] = chat, self.tool_prefix + query + self.tool_tail
        return self._memo[key]

    def chat_text(self, i: int) -> str:
        """Turn ``i``'s chat prompt as the text a `vllm serve` user would send."""
        return str(self.chat_tok.decode(self.turn(i)[0], skip_special_tokens=False))

    def all(self, levels: tuple[int, ...], rounds: int = ROUNDS) -> None:
        """Build every turn's prompts ahead of the clock (under the current salt)."""
        for i in range(-1, max(turns_for(c, rounds) for c in levels)):
            self.turn(i)

    def level(self, s: Setup, c: int) -> None:
        """Before level ``c``: a salt of its own under --fresh-prompts, its turns built."""
        self.salt = level_salt(s)
        if self.salt:
            self.all((c,), s.rounds)


@dataclass(frozen=True)
class RawTurn:
    """One raw turn's timings (ms from the turn's start, just before its chat request)."""

    ttft: float | None  # the first output with text: what a client sees first
    gaps: list[float]  # between outputs with text
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


def raw_level(rows: Sequence[RawTurn]) -> dict[str, Any]:
    """A level's figures from its raw turns."""
    def q(xs: list[float], hi: int = 95) -> dict[str, float | None]:
        return {"p50": pct(xs, 50), f"p{hi}": pct(xs, hi)}

    ttft = [r.ttft for r in rows if r.ttft is not None]
    # What a client of yapd's protocol could at best see on these engines: the reply waits
    # for the tool decision (toolcall comes before any token).
    gated = [max(r.ttft, r.tool_done) for r in rows if r.ttft is not None]
    return {"turns": len(rows), "ttft_ms": q(ttft), "ttft_gated_ms": q(gated),
            "ttft_token_ms": q([r.first_token for r in rows if r.first_token is not None]),
            "itl_ms": q([g for r in rows for g in r.gaps], 99),
            "itl_token_ms": q([g for r in rows for g in r.token_gaps], 99),
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
            **{f"{role}_first_tokens_per_step": per_step(xs) for role in ("chat", "tool")
               if (xs := [r.t0_ms + r.stamps[role]["first_token_ms"] for r in rows
                          if "first_token_ms" in r.stamps.get(role, {})])},
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
        tool_task = tool_request(self._tool(i, t0, engine_stamps, t0_monotonic), self.order)
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
        return RawTurn((stamps[0] - t0) * 1000 if stamps else None, gaps(stamps), tool_first, tool_done,
                       gaps(token_stamps), (token_stamps[0] - t0) * 1000 if token_stamps else None,
                       tool_first_turn, engine_stamps, t0_monotonic * 1000)


WAY_OUT_HEAD = ("first token from its EngineCore's stamp to the front end holding it, chat / tool: "
                "p50, p95 ms")
STAMP_HEAD = ("queued / scheduled / first token p50 ms (turn's clock); cached prompt tokens p50; "
              "first tokens per engine step")


CPU_HEAD = "CPU ms per turn: front end / chat EngineCore / tool EngineCore"
RUNQ_HEAD = ("ms per turn ready to run but waiting for a CPU: front end / chat EngineCore / tool EngineCore; "
             "the machine's CPUs busy / stolen by its host, %")
FAULT_HEAD = ("minor faults per turn: front end / chat EngineCore / tool EngineCore; the tool EngineCore's "
              "by thread")


def said_rows(figure: Callable[[str, str], Any]) -> list[tuple[str, str, str]]:
    """A level's rows of what each engine said of its requests (a row per role:
    STAMP_HEAD), of each first token's way from its core's stamp to the front end
    (WAY_OUT_HEAD), of the CPU time each process used (CPU_HEAD), of its waits for a CPU
    (RUNQ_HEAD) and of its minor faults (FAULT_HEAD), as (role or head, yapd's cell, raw's
    cell); a row only where either run has its figures.
    ``figure(section, name)``: that level's figure, None where missing."""
    def shown(v: Any) -> str:
        v = v.get("p50") if isinstance(v, dict) else v
        return "-" if v is None else f"{v:g}"

    rows = []
    for role in ("chat", "tool"):
        names = [*(f"{role}_{name}_ms" for name in STAMP_NAMES), f"{role}_cached_tokens",
                 f"{role}_first_tokens_per_step"]
        said = {section: [figure(section, f"{prefix}{name}") for name in names]
                for section, prefix in (("yapd", "server_"), ("raw", ""))}
        if any(v is not None for values in said.values() for v in values):
            cells = [f"{' / '.join(map(shown, v[:3]))}; {shown(v[3])}; {shown(v[4])}" for v in said.values()]
            rows.append((role, cells[0], cells[1]))
    way_out = {section: [figure(section, f"{prefix}{role}_core_to_front_ms") for role in ("chat", "tool")]
               for section, prefix in (("yapd", "server_"), ("raw", ""))}
    if any((v or {}).get("p50") is not None for values in way_out.values() for v in values):
        cells = [" / ".join(f"{shown(v)}, {v.get('p95'):g}" if v and v.get("p95") is not None else shown(v)
                            for v in values) for values in way_out.values()]
        rows.append((WAY_OUT_HEAD, cells[0], cells[1]))

    def by_process(values: dict[str, Any] | None) -> str:
        if not values:
            return "-"
        hosts = [f"{name} {values[name]:g}" for name in ("chat_front", "tool_front") if name in values]
        return slashed(values, ("front", "chat", "tool")) + (f" (engine hosts: {', '.join(hosts)})" if hosts else "")

    cpu = {section: figure(section, "cpu_ms_per_turn") for section in ("yapd", "raw")}
    if any(cpu.values()):
        cells = [by_process(c) for c in cpu.values()]
        rows.append((CPU_HEAD, cells[0], cells[1]))
    procs = {section: figure(section, "proc_per_turn") or {} for section in ("yapd", "raw")}
    waits = {section: ({name: p["runq_ms"] for name, p in per.items() if "runq_ms" in p},
                       figure(section, "host_cpu") or {}) for section, per in procs.items()}
    if any(runq or host for runq, host in waits.values()):
        cells = [f"{by_process(runq)}; {host.get('busy_pct', '-')} / {host.get('steal_pct', '-')}"
                 if runq or host else "-" for runq, host in waits.values()]
        rows.append((RUNQ_HEAD, cells[0], cells[1]))
    if any("threads_minflt" in p for per in procs.values() for p in per.values()):
        def faults(per: dict[str, Any]) -> str:
            if not per:
                return "-"
            tool = (per.get("tool") or {}).get("threads_minflt") or {}
            return (f"{by_process({n: p['minflt'] for n, p in per.items() if 'minflt' in p})}; "
                    f"{', '.join(f'{t} {n:g}' for t, n in tool.items()) or '-'}")

        rows.append((FAULT_HEAD, faults(procs["yapd"]), faults(procs["raw"])))
    return rows


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


async def profiled(level: Awaitable[Any], profile: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``profile()``'s answer, asked ``PROFILE_AFTER_S`` into ``level`` (after its warm-up
    turns), once the level is done; a failed level takes the window down with it."""

    async def window() -> dict[str, Any]:
        await asyncio.sleep(PROFILE_AFTER_S)
        return await profile()

    task = asyncio.ensure_future(window())
    try:
        await level
    except BaseException:
        task.cancel()
        raise
    return await task


def tool_request(coro: Coroutine[Any, Any, T], order: str) -> asyncio.Task[T]:
    """Raw's tool request of a turn, made before its chat request. chats_then_tools
    (every run before run n; "chat_first" in run n's files): it begins in the loop's next
    round, so at N sessions a round's chat requests all leave before its tool requests;
    tool_first: at once, before the turn's chat request, one turn after another. yapd's
    turn.request_order of the same names sends them the same way."""
    from yapd.turn import after_a_round, start_now

    return start_now(coro) if order == "tool_first" else start_now(after_a_round(coro))


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
            tool_task = tool_request(t(), "chats_then_tools")
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


# --- vllm serve ------------------------------------------------------------------


async def _post_stream(body: dict[str, Any], port: int = SERVE_PORT,
                       until: Callable[[str], bool] | None = None) -> tuple[float | None, list[float], float]:
    """POST /v1/completions with stream=true over plain asyncio; client-side timings: the
    first output with text, the gaps after it, and when the stream ended or ``until``
    (fed each text) said to stop reading, which closes the connection (vLLM aborts)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
    await writer.drain()
    first = None
    stamps: list[float] = []
    buf = b""
    stop_reading = False
    while not stop_reading:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and not stop_reading:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                d = json.loads(line[5:])
                text = d["choices"][0].get("text") if d.get("choices") else None
                if text:
                    now = time.perf_counter()
                    if first is None:
                        first = (now - t0) * 1000
                    stamps.append(now)
                    stop_reading = until is not None and until(text)
    end = (time.perf_counter() - t0) * 1000
    writer.close()
    return first, gaps(stamps), end


async def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}; see {log}")
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await w.drain()
            head = await r.read(64)
            w.close()
            if b" 200 " in head:
                return
        except OSError:
            pass
        await asyncio.sleep(1)


def serve_args(kw: dict[str, Any], port: int) -> list[str]:
    """``vllm serve``'s command line with yapd's own engine settings for one role, so the
    comparison is like for like (and vLLM's compile cache, keyed on them, may already be
    warm)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", kw["model"],
            "--load-format", kw["load_format"], "--kv-cache-dtype", kw["kv_cache_dtype"],
            "--gpu-memory-utilization", str(kw["gpu_memory_utilization"]),
            "--max-model-len", str(kw["max_model_len"]), "--max-num-seqs", str(kw["max_num_seqs"]),
            "--enable-prefix-caching", "--enable-chunked-prefill",
            "--tensor-parallel-size", str(kw["tensor_parallel_size"]),
            "--port", str(port), "--host", "127.0.0.1", "--disable-log-stats"]
    if kw.get("quantization"):
        args += ["--quantization", kw["quantization"]]
    if kw.get("max_num_batched_tokens"):  # yapd's where it sets one; else serve's own default
        args += ["--max-num-batched-tokens", str(kw["max_num_batched_tokens"])]
    return args


def _serve(kw: dict[str, Any], port: int, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(serve_args(kw, port), stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=ends_with_us())


async def phase_serve(res: Results, s: Setup) -> None:
    from yapd.engines.vllm import engine_kwargs, gpu_capability
    from yapd.toolcall import DecisionReader

    tp = TurnPrompts(s)
    tp.all(s.levels, s.rounds)
    log = s.work / "serve.log"
    env = {**os.environ, "VLLM_CACHE_ROOT": str(s.work / "cache" / "vllm")}
    cfg = s.config()
    kw = engine_kwargs("chat", cfg, cfg.chat.model, gpu_capability())
    tool_kw = engine_kwargs("tool", cfg, cfg.tool.model, gpu_capability())
    procs = []
    serve_offset = log_end(log)
    try:
        t0 = time.perf_counter()
        procs.append(_serve(kw, SERVE_PORT, log, env))
        await _wait_healthy(procs[0], SERVE_PORT, log)
        res.put("serve", "start_s", round(time.perf_counter() - t0, 1))
        res.put("serve", "step_budgets", step_budgets(log, serve_offset))
        chat_ids, tool_ids = tp.turn(0)
        res.put("serve", "prompt_tokens", {"chat": len(chat_ids), "tool": len(tool_ids)})

        def chat_body(ids: bool, i: int) -> dict[str, Any]:
            # As users call it: the prompt as text (the server tokenizes it every time);
            # and fed yapd's token ids, which spares it that work.
            prompt: Any = tp.turn(i)[0] if ids else tp.chat_text(i)
            return {"model": kw["model"], "prompt": prompt, "add_special_tokens": False, "max_tokens": 200,
                    "min_tokens": 200, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95, "stream": True}

        async def post(ids: bool, i: int) -> tuple[float | None, list[float], float]:
            return await _post_stream(chat_body(ids, i))

        def summary(rows: list[tuple[float | None, list[float], float]]) -> dict[str, Any]:
            ttft = [r[0] for r in rows if r[0] is not None]
            itl = [g for r in rows for g in r[1]]
            return {"turns": len(rows), "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
                    "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)}}

        for c in s.levels:
            figures: dict[str, Any] = {}
            if "text" in s.serve_passes:
                tp.level(s, c)
                figures = {"prompt": "text", **summary(await at_level(c, functools.partial(post, False), s.rounds))}
            if "ids" in s.serve_passes:
                tp.level(s, c)  # not the text pass's prompts: the server holds those cached
                figures["token_ids"] = summary(await at_level(c, functools.partial(post, True), s.rounds))
            if figures:
                res.put("serve", f"c{c}", figures)
        if "tool" not in s.serve_passes:
            return

        # What a user would run instead of yapd's two engines: a second `vllm serve` for
        # the tool model on the same GPU, both asked each turn (token ids, as yapd's).
        t0 = time.perf_counter()
        tool_log = s.work / "serve-tool.log"
        tool_offset = log_end(tool_log)
        procs.append(_serve(tool_kw, SERVE_PORT + 1, tool_log, env))
        await _wait_healthy(procs[1], SERVE_PORT + 1, tool_log)
        res.put("serve", "tool_start_s", round(time.perf_counter() - t0, 1))
        res.put("serve", "tool_step_budgets", step_budgets(tool_log, tool_offset))

        async def both(i: int) -> tuple[float | None, list[float], float]:
            reader = DecisionReader([x.name for x in cfg.tools])
            tool = asyncio.ensure_future(_post_stream(
                {"model": tool_kw["model"], "prompt": tp.turn(i)[1], "add_special_tokens": False,
                 "max_tokens": 96, "temperature": 0.0, "top_k": 1, "stream": True},
                SERVE_PORT + 1, lambda text: reader.feed(text) is not None))
            chat = await _post_stream(chat_body(True, i))
            return chat[0], chat[1], (await tool)[2]

        for c in s.levels:
            tp.level(s, c)
            rows = await at_level(c, both, s.rounds)
            gated = [max(r[0], r[2]) for r in rows if r[0] is not None]
            tool_ms = [r[2] for r in rows]
            res.put("serve", f"c{c}_with_tool", {**summary([(r[0], r[1], r[2]) for r in rows]),
                                                 "tool_ms": {"p50": pct(tool_ms, 50), "p95": pct(tool_ms, 95)},
                                                 "ttft_gated_ms": {"p50": pct(gated, 50), "p95": pct(gated, 95)}})
    finally:
        for proc in reversed(procs):
            stop(proc)


# --- report ----------------------------------------------------------------------


def run_conditions(setup: dict[str, Any]) -> list[str]:
    """The table's footing: rounds per level, MPS, and whether torch and vLLM loaded from
    bytecode (start times depend on it). Empty for runs that recorded none of it."""
    parts = []
    if "rounds" in setup:
        parts.append(f"{setup['rounds']} lockstep rounds per level (after one warm-up round)")
    if "mps" in setup:
        parts.append("under a private CUDA MPS daemon" if setup["mps"] else "no MPS (the GPU time-slices processes)")
    if setup.get("mps") and "mps_priority" in setup:
        parts.append("yapd's chat engine at MPS below-normal priority" if setup["mps_priority"] == "tool"
                     else "yapd's engines at equal MPS priority")
    if setup.get("env"):
        parts.append("environment " + " ".join(f"{k}={v}" for k, v in setup["env"].items()))
    if setup.get("event_loop", "auto") != "auto":
        parts.append(f"yapd on the {setup['event_loop']} event loop")
    if "request_order" in setup:
        parts.append(f"yapd's request order {setup['request_order']}")
    elif "tool_first" in setup:  # runs before request_order (run n and earlier)
        parts.append(f"yapd sends each turn's {'tool' if setup['tool_first'] else 'chat'} request first")
    if setup.get("set"):
        parts.append("yapd config " + ", ".join(f"`{x}`" for x in setup["set"]))
    if setup.get("fresh_prompts"):
        parts.append("every turn's persona new to the engines (--fresh-prompts): the chat prompt prefilled whole, "
                     "the tool's still cached")
    if setup.get("raw_order") == "tool_first":
        parts.append("raw sends each turn's tool request first, then its chat request, as yapd does")
    for pkg, st in (setup.get("bytecode") or {}).items():
        if isinstance(st, dict):
            parts.append(f"{pkg} bytecode for {st['bytecode']} of {st['modules']} modules")
    if "bytecode_compile" in setup:
        parts.append(f"byte-compiled first in {setup['bytecode_compile'].get('seconds')} s")
    return [f"Run conditions: {'; '.join(parts)}.", ""] if parts else []


def prompt_line(data: dict[str, Any]) -> str:
    """What each turn sent, from the file: words, and the tokens a phase counted."""
    p = data.get("prompt") or PROMPT_BEFORE_AF
    counted = next((data[sec]["prompt_tokens"] for sec in ("raw", "raw_split", "serve")
                    if isinstance(data.get(sec, {}).get("prompt_tokens"), dict)), None)
    built = next((lvl["prompt_tokens"]["p50"] for lvl in data.get("yapd", {}).values()
                  if isinstance(lvl, dict) and (lvl.get("prompt_tokens") or {}).get("p50")), None)
    tokens = f" ({counted['chat']} chat / {counted['tool']} tool prompt tokens)" if counted else \
        f" ({built:g} chat prompt tokens as yapd built them)" if built else ""
    return (f"{p['persona_words']}-word persona + {p['history_words']:,}-word history + {p['utterance_words']}-word "
            f"utterance numbered per turn{tokens}, {p['max_out']} output tokens; all of a turn's chat prompt but "
            "its utterance is cached from the turn before")


def step_budget_lines(data: dict[str, Any]) -> list[str]:
    """The engines' prompt tokens per step as their logs said (runs from ae on)."""
    y, sv = data.get("yapd", {}), data.get("serve", {})
    said = [f"yapd {', '.join(map(str, y['step_budgets']))}" if y.get("step_budgets") else "",
            f"vllm serve {', '.join(map(str, sv['step_budgets']))}" if sv.get("step_budgets") else "",
            f"its tool server {', '.join(map(str, sv['tool_step_budgets']))}" if sv.get("tool_step_budgets") else ""]
    said = [x for x in said if x]
    return [f"- prompt tokens per engine step (vLLM's max_num_batched_tokens, in the logs): {'; '.join(said)}"] \
        if said else []


def profile_table(data: dict[str, Any], packages: int = 10) -> list[str]:
    """yapd's and raw's event loops at one level, own time by package (--profile-level)."""
    key = next((k for sec in ("yapd", "raw") for k in data.get(sec, {}) if k.startswith("profile_c")), None)
    if key is None:
        return []
    shares = {sec: {g["package"]: g for g in data.get(sec, {}).get(key, {}).get("by_package", [])}
              for sec in ("yapd", "raw")}
    names = sorted({*shares["yapd"], *shares["raw"]},
                   key=lambda n: -max(shares[sec].get(n, {}).get("own_ms", 0) for sec in ("yapd", "raw")))

    def cell(sec: str, name: str) -> str:
        g = shares[sec].get(name)
        return "-" if g is None else f"{g['own_ms']:g} ({g['share']:.0%})"

    busy = " / ".join(f"{sec} {data.get(sec, {}).get(key, {}).get('busy_s', '-')} s"
                      for sec in ("yapd", "raw"))
    return ["", f"Event loop at {key[len('profile_c'):]} sessions under cProfile for {PROFILE_S:g} s "
            f"(busy: {busy}), own ms (share) by package:", "",
            "| package | yapd | raw |", "| --- | --- | --- |",
            *(f"| {n} | {cell('yapd', n)} | {cell('raw', n)} |" for n in names[:packages])]


def pair_table(pair: dict[str, Any]) -> list[str]:
    """The pair phase's lines: yapd and raw level by level, their rounds taking turns."""
    levels = sorted((k for k in pair if k[:1] == "c" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if not levels:
        return []

    def two(side: str, lvl: str, metric: str, a: str = "p50", b: str = "p95") -> str:
        v = pair[lvl].get(side, {}).get(metric) or {}
        return " / ".join("-" if v.get(q) is None else f"{v[q]:g}" for q in (a, b))

    frac = pair.get("gpu_memory_utilization", {})
    lines = ["## yapd and raw taking turns round by round (pair phase)", "",
             f"Both on the GPU at once, each engine with part of its memory (chat {frac.get('chat')}, tool "
             f"{frac.get('tool')}), under one MPS daemon; before each of yapd's rounds raw runs one of its own "
             f"with the same prompts. yapd started in {pair.get('yapd_start_s')} s, raw's engines in "
             f"{pair.get('raw_start_s')} s.", "",
             "| sessions | TTFT p50 / p95 ms: yapd | raw | raw held for the decision | tool decision (yapd) / "
             "tool first output (raw, turn's clock) p50 / p95 ms | chat / tool engine first output in yapd p50 ms "
             "| ITL p99 ms: yapd / raw |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for lvl in levels:
        y, r = pair[lvl].get("yapd", {}), pair[lvl].get("raw", {})
        engine = " / ".join(str((y.get(m) or {}).get("p50", "-")) for m in ("server_engine_ttft_ms",
                                                                            "server_tool_first_ms"))
        itl = " / ".join(str((side.get("itl_ms") or {}).get("p99", "-")) for side in (y, r))
        lines.append(f"| {lvl[1:]} | {two('yapd', lvl, 'ttft_ms')} | {two('raw', lvl, 'ttft_ms')} | "
                     f"{two('raw', lvl, 'ttft_gated_ms')} | {two('yapd', lvl, 'tool_ms')}; "
                     f"{two('raw', lvl, 'tool_first_turn_ms')} | {engine} | {itl} |")
    stamps = []
    for lvl in levels:
        def said(side: str, name: str, lvl: str = lvl) -> Any:
            return pair[lvl].get(side, {}).get(name)

        stamps += [f"| {lvl[1:]} | {what} | {y} | {r} |" for what, y, r in said_rows(said)]
    if stamps:
        lines += ["", f"What each engine said of a turn's request ({STAMP_HEAD}), and the CPU time each "
                  "process used per turn (warm-up turns included; raw's front end is also the bench's client).", "",
                  "| sessions | engine or figure | yapd | raw |", "| --- | --- | --- | --- |", *stamps]
    return [*lines, ""]


def slow_cell(slow: dict[str, Any] | None) -> str:
    if not slow:
        return "-"
    at = ", ".join(f"{t:g}" for t in slow["at_s"])
    return f"over {slow['over_ms']:g} ms: {slow['turns']} of {slow['of']}, {slow['bursts']} ({at or '-'})"


# The sections of a run's file with figures per level (c1, c8, ...).
LATENCY_SECTIONS = ("yapd", "raw", "raw_split", "serve")


def slashed(values: Mapping[str, Any], names: Sequence[str]) -> str:
    """``values`` of ``names`` as "a / b / c", "-" for one that is missing."""
    return " / ".join(f"{values[n]:g}" if n in values else "-" for n in names)


def markdown(data: dict[str, Any]) -> str:
    def g(sec: str, lvl: str, metric: str, q: str) -> str:
        v = data.get(sec, {}).get(lvl, {}).get(metric, {}).get(q)
        return "-" if v is None else f"{v:g}"

    # Runs before 2026-11-25 (g) fed `vllm serve` token ids only.
    texts = any(isinstance(v, dict) and v.get("prompt") == "text" for v in data.get("serve", {}).values())
    serve_prompt = ("as text (as users call it) and, where shown, as yapd's token ids" if texts
                    else "as yapd's token ids")
    lines = [f"# yapd vs raw vLLM vs vllm serve: {data.get('machine')} ({data.get('date')}, vLLM {data.get('vllm')})",
             "", "Chat: Mistral-NeMo-12B shape, FP8 weights + FP8 KV, 0.70 of GPU memory; tool: Hammer-2.1-3B "
             "shape, bf16, 0.20; both in one process (where shown, raw also with the tool's front end in a process of "
             f"its own); dummy weights. Prompt: {prompt_line(data)}. yapd: client-observed over "
             "WebSocket, concurrent mode. raw: AsyncLLM fed the token ids yapd builds for each turn, both engines "
             "loaded, chat + tool per turn. serve: `vllm serve` /v1/completions streaming, chat only, the same "
             f"chat prompt sent {serve_prompt}; where shown, also beside a second `vllm serve` for the tool "
             "model on the same GPU, both asked each turn with yapd's token ids (what a user would run instead "
             "of yapd's two engines). Chat tensor parallelism: "
             f"{data.get('setup', {}).get('chat_tensor_parallel_size', 1)} GPU(s). TTFT and ITL count outputs "
             "that carry text, as a client receives them (random weights often emit a token that is only part "
             "of a character; its text comes with the next one); raw per token as well.", "",
             *run_conditions(data.get("setup", {})), *other_hosts(data),
             "| sessions | figure | yapd | raw AsyncLLM | vllm serve |", "| --- | --- | --- | --- | --- |"]
    def two(sec: str, lvl: str, metric: str, a: str, b: str) -> str:
        return f"{g(sec, lvl, metric, a)} / {g(sec, lvl, metric, b)}"

    latency = any(sec in data for sec in LATENCY_SECTIONS)
    if not latency:  # a start-time-only (or set-up only) run
        lines = [f"# yapd engine start: {data.get('machine')} ({data.get('date')}, vLLM {data.get('vllm')})", "",
                 *run_conditions(data.get("setup", {}))]
    shown = sorted({int(k[1:]) for sec in LATENCY_SECTIONS for k in data.get(sec, {})
                    if k[:1] == "c" and k[1:].isdigit()})
    for c in shown if latency else ():
        lvl = f"c{c}"
        lines.append(f"| {c} | TTFT p50 / p95 ms | {two('yapd', lvl, 'ttft_ms', 'p50', 'p95')} | "
                     f"{two('raw', lvl, 'ttft_ms', 'p50', 'p95')} | {two('serve', lvl, 'ttft_ms', 'p50', 'p95')} |")
        lines.append(f"| {c} | TTFT first token (text or not) p50 / p95 ms | - | "
                     f"{two('raw', lvl, 'ttft_token_ms', 'p50', 'p95')} | - |")
        ids = data.get("serve", {}).get(lvl, {}).get("token_ids", {}).get("ttft_ms", {})
        if ids:
            lines.append(f"| {c} | TTFT, vllm serve fed token ids, p50 / p95 ms | - | - | "
                         f"{ids.get('p50')} / {ids.get('p95')} |")
        if data.get("raw", {}).get(lvl, {}).get("ttft_gated_ms") or f"{lvl}_with_tool" in data.get("serve", {}):
            wt = f"{lvl}_with_tool"
            lines.append(f"| {c} | TTFT held for the tool decision (toolcall before tokens) p50 / p95 ms | "
                         f"{two('yapd', lvl, 'ttft_ms', 'p50', 'p95')} | "
                         f"{two('raw', lvl, 'ttft_gated_ms', 'p50', 'p95')} | "
                         f"{two('serve', wt, 'ttft_gated_ms', 'p50', 'p95')} (with tool server) |")
            lines.append(f"| {c} | TTFT, vllm serve beside a tool server, chat alone counted, p50 / p95 ms | - | - | "
                         f"{two('serve', wt, 'ttft_ms', 'p50', 'p95')} |")
        if lvl in data.get("raw_split", {}):
            cpu = data["raw_split"][lvl].get("cpu_ms_per_turn", {})
            lines.append(f"| {c} | raw with the tool's front end in a process of its own: TTFT held for the "
                         "decision p50 / p95 ms; TTFT; tool decision (sent -> answer read); ITL p50 / p99; CPU ms "
                         "per turn: front end / tool's front end / chat EngineCore / tool EngineCore | - | "
                         f"{two('raw_split', lvl, 'ttft_gated_ms', 'p50', 'p95')}; "
                         f"{two('raw_split', lvl, 'ttft_ms', 'p50', 'p95')}; "
                         f"{two('raw_split', lvl, 'tool_ms', 'p50', 'p95')}; "
                         f"{two('raw_split', lvl, 'itl_ms', 'p50', 'p99')}; "
                         f"{slashed(cpu, ('front', 'tool_front', 'chat', 'tool'))} | - |")
        lines.append(f"| {c} | ITL p50 / p99 ms | {two('yapd', lvl, 'itl_ms', 'p50', 'p99')} | "
                     f"{two('raw', lvl, 'itl_ms', 'p50', 'p99')} | {two('serve', lvl, 'itl_ms', 'p50', 'p99')} |")
        lines.append(f"| {c} | ITL per token p50 / p99 ms | - | {two('raw', lvl, 'itl_token_ms', 'p50', 'p99')} | - |")
        serve_tool = data.get("serve", {}).get(f"{lvl}_with_tool", {}).get("tool_ms")
        own = "tool_first_output_ms" if "tool_first_output_ms" in data.get("raw", {}).get(lvl, {}) else \
            "tool_first_token_ms"  # a file from before the rename (with request stats on: the core's stamp)
        lines.append(f"| {c} | tool decision p50 / p95 ms | {two('yapd', lvl, 'tool_ms', 'p50', 'p95')} | "
                     f"{two('raw', lvl, 'tool_ms', 'p50', 'p95')} (first token "
                     f"{g('raw', lvl, own, 'p50')}) | "
                     f"{two('serve', f'{lvl}_with_tool', 'tool_ms', 'p50', 'p95') if serve_tool else '-'} |")
        lines.append(f"| {c} | total p50 ms | {g('yapd', lvl, 'total_ms', 'p50')} | - | - |")
        lines.append(f"| {c} | in yapd: chat / tool engine first output p50 ms | "
                     f"{g('yapd', lvl, 'server_engine_ttft_ms', 'p50')} / "
                     f"{g('yapd', lvl, 'server_tool_first_ms', 'p50')} | - | - |")
        def said(sec: str, name: str, lvl: str = lvl) -> Any:
            return data.get(sec, {}).get(lvl, {}).get(name)

        for what, y, r in said_rows(said):
            what = f"{what} engine: {STAMP_HEAD}" if what in ("chat", "tool") else what
            lines.append(f"| {c} | {what} | {y} | {r} | - |")
        if data.get("yapd", {}).get(lvl, {}).get("server_tool_ms"):
            lines.append(f"| {c} | in yapd: tool decision sent p50 / p95 ms | "
                         f"{two('yapd', lvl, 'server_tool_ms', 'p50', 'p95')} | - | - |")
        if data.get("yapd", {}).get(lvl, {}).get("outside_turn_ms"):
            lines.append(f"| {c} | in yapd: first token sent p50 / p95 ms; client TTFT beyond it p50 / p95 ms | "
                         f"{two('yapd', lvl, 'server_ttft_ms', 'p50', 'p95')}; "
                         f"{two('yapd', lvl, 'outside_turn_ms', 'p50', 'p95')} | - | - |")
        if data.get("yapd", {}).get(lvl, {}).get("inbound_ms", {}).get("p50") is not None:
            lines.append(f"| {c} | client TTFT beyond it: the start's way in (sent -> turn begins) / the first "
                         f"token's way back, p50 / p95 ms | {two('yapd', lvl, 'inbound_ms', 'p50', 'p95')}; "
                         f"{two('yapd', lvl, 'outbound_ms', 'p50', 'p95')} | - | - |")
        if data.get("yapd", {}).get(lvl, {}).get("first_token_after_ready_ms"):
            lines.append(f"| {c} | in yapd: chat first text p50 / p95 ms; first token sent after it and the "
                         f"decision p50 / p95 ms | {two('yapd', lvl, 'server_engine_text_ms', 'p50', 'p95')}; "
                         f"{two('yapd', lvl, 'first_token_after_ready_ms', 'p50', 'p95')} | - | - |")
        slows = [said(ph, "ttft_slow") for ph in ("yapd", "raw")]
        if any(slows):
            lines.append(f"| {c} | turns with TTFT over {SLOW_OVER_P50:g} x its p50 (raw: held for the decision): "
                         "how many, in how many bursts of starts (each burst's start, s into the level) | "
                         f"{' | '.join(slow_cell(x) for x in slows)} | - |")
        if data.get("yapd", {}).get(lvl, {}).get("loop_lag_ms"):
            lines.append(f"| {c} | in yapd: event-loop lag p99 / max ms (the last "
                         f"{g('yapd', lvl, 'loop_lag_ms', 'window_s')} s) | "
                         f"{g('yapd', lvl, 'loop_lag_ms', 'p99_ms')} / {g('yapd', lvl, 'loop_lag_ms', 'max_ms')}"
                         " | - | - |")
        gcp = data.get("yapd", {}).get(lvl, {}).get("gc_pauses")
        if gcp:
            longest = "" if gcp["max_ms"] is None else f", {gcp['max_ms']} ({gcp['max_generation']})"
            lines.append(f"| {c} | in yapd: garbage collections of {gcp['long_ms']:g} ms or more: how many, the "
                         f"longest ms (its generation) (the last {gcp['window_s']:g} s) | {gcp['long']}{longest} "
                         "| - | - |")
            if "level" in gcp:
                by_gen = "; ".join(f"{n} / {gcp['level']['ms'][g]}" for g, n in gcp["level"]["collections"].items())
                lines.append(f"| {c} | in yapd: collections / ms in them over the level, generations 0; 1; 2 | "
                             f"{by_gen} | - | - |")
    probe = data.get("raw", {}).get("order_probe")
    if probe:
        lines += ["", "Raw, one session, by the order each turn's two requests leave in (8-token replies, "
                  "the orders taking turns; first outputs p50 / p95 ms):", "",
                  "| order | chat first output | tool first output |", "| --- | --- | --- |"]
        for order, v in probe.items():
            cells = [" / ".join("-" if v[m][q] is None else f"{v[m][q]:g}" for q in ("p50", "p95"))
                     for m in ("chat_first_ms", "tool_first_ms")]
            lines.append(f"| {order} | {' | '.join(cells)} |")
    lines += profile_table(data)
    y = data.get("yapd", {})
    cancel = y.get("cancel", {})
    lines += [] if not latency else ["", f"- cancel -> done (client): {cancel.get('cancel_to_done_ms')}",
              f"- barge-in -> new first token (client): {cancel.get('barge_in_to_first_token_ms')}",
              f"- yapd start to READY, first start: {y.get('start_s_first')} s; restart with warm compile cache: "
              f"{y.get('start_s_restart')} s",
              f"- raw engines start: {data.get('raw', {}).get('start_s')} s; vllm serve start: "
              f"{data.get('serve', {}).get('start_s')} s",
              *(f"- yapd's MPS, in its log: {line}" for line in y.get("mps_lines", [])),
              *step_budget_lines(data), ""]
    sp = data.get("spawn")
    if sp:
        lines += ["## EngineCore start method", "",
                  "One engine (Hammer-3B shape), each run in a fresh process, compile cache warm after `warmup`;"
                  " seconds from process start. spawn_parent_cuda: a CUDA context in the parent first (vLLM then"
                  " spawns); spawn: none; fork: vLLM's default.", "",
                  "| run | import vllm | tokenizer | engine ready | from_engine_args | process wall |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for run, v in sp.items():
            m = v.get("marks") or {}
            if "engine_ready" in m:
                lines.append(f"| {run} | {m['import_vllm']} | {m['tokenizer']} | {m['engine_ready']} | "
                             f"{round(m['engine_ready'] - m['tokenizer'], 1)} | {v['wall_s']} |")
        lines.append("")
    if data.get("yapd_b"):
        ab = ", ".join(f"`{x}`" for x in data.get("setup", {}).get("ab", []))
        restarts = data.get("setup", {}).get("ab_restarts")
        how = (f"every level {restarts} times per config, A B B A ..., each start of both engines (restarted for "
               "it) measuring every level (the turns of one config pooled; each start below)" if restarts else
               "its rounds taking turns with the ones above, on the same sessions" if data.get("setup", {}).get(
                   "ab_interleave") else "each level run right after the one above, on the same process")
        lines += [f"## yapd with {ab}: {how}", "",
                  "| sessions | TTFT p50 / p95 ms: as above / changed | tool decision p50 / p95 ms | "
                  "tool engine first output in yapd p50 / p95 ms | ITL p99 ms |", "| --- | --- | --- | --- | --- |"]
        for lvl in sorted(data["yapd_b"], key=lambda k: int(k[1:]) if k[1:].isdigit() else 0):
            if not (lvl[:1] == "c" and lvl[1:].isdigit()):
                continue
            cells = [f"{two('yapd', lvl, m, a, b)} / {two('yapd_b', lvl, m, a, b)}" for m, a, b in (
                ("ttft_ms", "p50", "p95"), ("tool_ms", "p50", "p95"), ("server_tool_first_ms", "p50", "p95"))]
            itl = f"{g('yapd', lvl, 'itl_ms', 'p99')} / {g('yapd_b', lvl, 'itl_ms', 'p99')}"
            lines.append(f"| {lvl[1:]} | {' | '.join(cells)} | {itl} |")
        lines.append("")
        lines += ab_starts_table(data.get("yapd_ab_starts") or {})
    lines += pair_table(data.get("pair") or {})
    st = data.get("startup")
    if st:
        lines += ["## Start and restart", "",
                  "- " + ", ".join(f"{name} {st[key]} s" for key, name in (
                      ("first_start_s", "first start"), ("engine_restart_s", "engine restart (admin, both)"),
                      ("process_restart_s", "process restart")) if key in st), ""]
        for key in ("first_start_lines", "process_restart_lines", "engine_restart_lines"):
            if key not in st:
                continue
            lines += [f"{key.replace('_lines', '').replace('_', ' ')}:", "", "```", *st.get(key, []), "```", ""]
    return "\n".join(lines)


# The phases that start yapd: under --mps yapd runs its own MPS daemon there.
YAPD_PHASES = {"yapd", "startup", "warm"}

PHASES: dict[str, Callable[[Results, Setup], Coroutine[Any, Any, None]]] = {
    "yapd": phase_yapd, "raw": phase_raw, "rawsplit": phase_rawsplit, "serve": phase_serve,
    "startup": phase_startup, "warm": phase_warm, "spawn": phase_spawn, "pair": phase_pair}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "yap-gpubench")
    p.add_argument("--phases", default="yapd,raw,serve",
                   help="comma-separated: yapd, raw, rawsplit (raw with the tool engine's front end in a process "
                        "of its own), serve, startup, warm, spawn, pair; empty for only the set-up "
                        "(--compile-bytecode, say)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--rounds", type=int, default=ROUNDS, help="lockstep rounds per level (p95s want many)")
    p.add_argument("--name", default="")
    p.add_argument("--chat-tp", type=int, default=1, help="the chat engine's tensor_parallel_size (GPUs)")
    p.add_argument("--compile-bytecode", action="store_true",
                   help="byte-compile the site-packages holding torch and vLLM first, as a pip install does "
                        "(start times otherwise include compiling modules from source where no .pyc exists)")
    p.add_argument("--mps", action="store_true",
                   help="every phase under CUDA MPS (engines share the GPU at once instead of taking turns): "
                        "yapd its own daemon (engines.mps = \"on\"), the others a private one of the run's; "
                        "without it yapd runs with engines.mps = \"off\"")
    p.add_argument("--mps-priority", choices=typing.get_args(config.MpsPriority), default=EnginesConfig.mps_priority,
                   help="yapd's engines.mps_priority under --mps: the chat engine below normal (tool) or not "
                        f"(default: yapd's, {EnginesConfig.mps_priority})")
    p.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="yapd's server.event_loop; raw vLLM runs on uvloop when it is named, else on "
                        "asyncio's own loop")
    p.add_argument("--request-order", choices=typing.get_args(config.RequestOrder), default=TurnConfig.request_order,
                   help="yapd's turn.request_order: the order each turn's two requests leave in "
                        f"(default: yapd's, {TurnConfig.request_order})")
    p.add_argument("--ab", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="in the yapd phase, run each level again right after with this live config change "
                        "(reloaded over the admin socket; repeatable; value as TOML), recorded as yapd_b")
    p.add_argument("--ab-interleave", action="store_true",
                   help="with --ab: the two configs take turns round by round on the same sessions (each level "
                        "as many rounds of each as a level has), so that drift hits both alike")
    p.add_argument("--ab-restarts", type=int, default=0, metavar="N",
                   help="with --ab: measure every level N times per config (A B B A ...), each time on both "
                        "engines restarted for it (one restart measures every level); --ab may then change engine "
                        "keys (e.g. 'tool.start_method=\"spawn\"'); yapd and yapd_b pool each config's turns, "
                        "yapd_ab_starts keeps every start's figures")
    p.add_argument("--order-probe", action="store_true",
                   help="the raw phase also times one session's two requests in each order they can leave in")
    p.add_argument("--raw-order", choices=("chats_then_tools", "tool_first"), default="chats_then_tools",
                   help="raw's turns: the chat request at once and the tool's a loop round later (as every run "
                        "before run n), or the tool's first and the chat's right after; as yapd's request orders "
                        "of these names send them")
    p.add_argument("--pyspy-level", type=int, default=0, metavar="SESSIONS",
                   help="at this level, py-spy samples yapd's and raw's processes (front end, each EngineCore): "
                        "where each one's CPU time goes, by function (needs py-spy installed)")
    p.add_argument("--pyspy-native", action="store_true",
                   help="with --pyspy-level: C and C++ frames too (where in torch or the CUDA driver a call's time "
                        "goes); py-spy then stops each process for every sample, so that level's timings are "
                        "disturbed")
    p.add_argument("--raw-start-method", choices=("spawn", "fork"), default="spawn",
                   help="how raw's engines start their EngineCores (every run before this option: spawn)")
    p.add_argument("--skip-restart", action="store_true",
                   help="the yapd phase ends without its process restart (a shorter device call)")
    p.add_argument("--fresh-prompts", action="store_true",
                   help="every turn's persona new to the engines (its first words salted per level and turn), "
                        "so no chat prompt is in a prefix cache: the first turns of calls to many bots, where "
                        "the chat engine prefills whole prompts (yapd, raw and serve; not pair, not --ab-interleave)")
    p.add_argument("--profile-level", type=int, default=0, metavar="SESSIONS",
                   help="after the levels, yapd and raw run this level once more with their event loop under "
                        f"cProfile for {PROFILE_S:g} s (yapctl profile): where each loop's time goes, by package")
    p.add_argument("--serve-passes", default=",".join(SERVE_PASSES),
                   help="what the serve phase times at each level, comma-separated: text (the chat prompt as "
                        "users send it), ids (as yapd's token ids), tool (beside a second server for the tool "
                        "model); fewer passes fit a shorter device call")
    p.add_argument("--pair-fractions", default=",".join(map(str, Setup.pair_fractions)), metavar="CHAT,TOOL",
                   help="the pair phase's gpu_memory_utilization for each chat and tool engine (yapd's and raw's "
                        "alike: the four share the GPU)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="sets",
                   help="a yapd config key for every phase (value as TOML; repeatable): yapd's config and the "
                        "engine settings raw and vllm serve take from it, e.g. "
                        "'tool.extra_engine_args={disable_log_stats=false}' (vLLM's request stats: where each "
                        "engine's time to its first output went)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the environment of every phase (yapd's process, raw's engines, vllm serve), "
                        "e.g. a VLLM_* switch to compare start times; repeatable")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            p.error(f"--env takes KEY=VALUE, not {item!r}")
        env[key.strip()] = value
    serve_passes = tuple(x for x in args.serve_passes.split(",") if x)
    if not serve_passes or set(serve_passes) - set(SERVE_PASSES):
        p.error(f"--serve-passes takes some of {', '.join(SERVE_PASSES)}, not {args.serve_passes!r}")
    try:
        chat_frac, tool_frac = (float(x) for x in args.pair_fractions.split(","))
    except ValueError:
        p.error(f"--pair-fractions takes CHAT,TOOL, not {args.pair_fractions!r}")
    if not (0 < chat_frac and 0 < tool_frac and 2 * (chat_frac + tool_frac) <= 0.98):
        p.error(f"--pair-fractions {args.pair_fractions}: two of each must fit on one GPU (2 x (chat + tool) "
                "<= 0.98)")
    unknown = {name for name in args.phases.split(",") if name} - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    setup = Setup(args.models, args.work, tuple(int(x) for x in args.levels.split(",")), args.chat_tp, args.rounds,
                  args.mps, args.mps_priority, args.event_loop, args.request_order, tuple(args.ab), args.ab_interleave,
                  args.order_probe, args.raw_order, args.profile_level, serve_passes, (chat_frac, tool_frac),
                  tuple(args.sets), pyspy_level=args.pyspy_level, pyspy_native=args.pyspy_native,
                  raw_start_method=args.raw_start_method, skip_restart=args.skip_restart,
                  ab_restarts=args.ab_restarts, fresh_prompts=args.fresh_prompts)
    if args.fresh_prompts and (args.ab_interleave or "pair" in args.phases.split(",")):
        p.error("--fresh-prompts salts each level of yapd, raw and serve; the pair phase and --ab-interleave "
                "share their turns' prompts between two sides and take none")
    try:
        config.validate(setup.config())
    except (ValueError, config.ConfigError) as exc:
        p.error(f"--set: {exc}")
    if args.ab_interleave and not setup.ab:
        p.error("--ab-interleave takes turns between the config and --ab's changes: give --ab too")
    if args.ab_restarts < 0 or (args.ab_restarts and (not setup.ab or args.ab_interleave)):
        p.error("--ab-restarts N (N >= 1) restarts the engines between --ab's two configs: give --ab, "
                "without --ab-interleave")
    if setup.ab:
        try:
            live, engine, restart = config.diff_keys(setup.config(), setup.config(setup.ab))
        except (ValueError, config.ConfigError) as exc:
            p.error(f"--ab: {exc}")
        if restart or not (live or engine):
            p.error(f"--ab changes keys a reload applies (an engine restart too, with --ab-restarts); these "
                    f"need yapd's process restarted: {', '.join(restart) or 'nothing changes'}")
        if engine and not args.ab_restarts:
            p.error(f"--ab changes only live keys (a reload applies them); these do not: {', '.join(engine)} "
                    "(give --ab-restarts N to restart the engines between the two)")
    gpu = _gpu_name().replace("NVIDIA ", "").split()[0].lower() or "gpu"
    name = args.name or f"{gpu}-{datetime.date.today().isoformat()}"
    res = Results(args.out / f"{name}.json")
    phases = [ph for ph in args.phases.split(",") if ph]  # none: only the set-up
    # Phases of one file are compared with each other: they must run alike (a set-up-only
    # call runs none, so it neither checks nor records these).
    alike = {"rounds": setup.rounds, "mps": args.mps, "mps_priority": args.mps_priority,
             "event_loop": args.event_loop, "request_order": args.request_order, "ab": list(setup.ab),
             "ab_interleave": args.ab_interleave, "ab_restarts": args.ab_restarts,
             "env": env, "raw_order": args.raw_order, "raw_start_method": args.raw_start_method,
             "set": list(setup.sets), "fresh_prompts": args.fresh_prompts} if phases else {}
    earlier = res.data.get("setup", {})
    if phases and res.data.get("prompt", PROMPT) != PROMPT:
        print(f"gpubench: {name}.json holds phases run with the prompt {res.data['prompt']}, not {PROMPT}: "
              "run under another --name", file=sys.stderr)
        return 2
    for key, value in alike.items():
        if earlier.get(key, value) != value:
            print(f"gpubench: {name}.json holds phases run with {key}={earlier[key]}, not {value}: "
                  f"run this one alike or under another --name", file=sys.stderr)
            return 2
    res.put("setup", "chat_tensor_parallel_size", setup.chat_tp)
    if args.compile_bytecode:
        res.put("setup", "bytecode_compile", gpuenv.compile_packages())
    res.put("setup", "bytecode", gpuenv.bytecode_state())
    # yapd's phases run yapd's own MPS daemon (engines.mps = "on"); the others, this one.
    mps = MpsDaemon(args.work / "mps-bench") if args.mps else None
    if mps is not None and mps.binary is None:  # no MPS here: say so, run nothing without it
        res.put("setup", "mps_error", f"--mps: {NO_BINARY}")
        print(f"gpubench: --mps: {NO_BINARY}", file=sys.stderr)
        return 2
    os.environ.update(env)  # yapd's processes inherit it, raw's engines run in this one
    try:
        for key, value in alike.items():
            res.put("setup", key, value)
        for ph in phases:
            try:
                if mps is not None and ph in YAPD_PHASES:
                    mps.stop()
                elif mps is not None:
                    mps.start()
                res.data.get(ph, {}).pop("error", None)  # an earlier call's, for this one to replace
                res.put(ph, "host", host_identity())
                # asyncio's own loop unless uvloop is named (yapd's phases only wait there; raw runs its engines'
                # clients on it)
                run_loop(PHASES[ph](res, setup), setup.event_loop)
            except Exception as exc:
                res.put(ph, "error", f"{type(exc).__name__}: {exc}")
            if mps is not None and ph not in YAPD_PHASES:
                res.put("setup", f"mps_log_after_{ph}", mps.log_tail())
            (args.out / f"{name}.md").write_text(markdown(res.data))
    finally:
        if mps is not None:
            mps.stop()
    report = markdown(res.data)
    (args.out / f"{name}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
