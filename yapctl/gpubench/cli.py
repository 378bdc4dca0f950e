"""gpubench's command line: which phases run, how, and into which file."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import typing
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from yapctl import gpubench, gpuenv
from yapctl.gpubench.measure import PROFILE_S
from yapctl.gpubench.pair import phase_pair
from yapctl.gpubench.prompts import PROMPT
from yapctl.gpubench.raw import phase_raw, phase_rawsplit
from yapctl.gpubench.report import markdown
from yapctl.gpubench.results import Results, gpu_name, host_identity
from yapctl.gpubench.runsetup import LEVELS, ROUNDS, SERVE_PASSES, Setup
from yapctl.gpubench.serve import phase_serve
from yapctl.gpubench.starts import phase_spawn, phase_startup, phase_warm
from yapctl.gpubench.yapdphase import phase_yapd
from yapctl.toolfront import run_loop
from yapd import config
from yapd.config import EnginesConfig, TurnConfig
from yapd.mps import NO_BINARY, MpsDaemon

# The phases that start yapd: under --mps yapd runs its own MPS daemon there.
YAPD_PHASES = {"yapd", "startup", "warm"}


PHASES: dict[str, Callable[[Results, Setup], Coroutine[Any, Any, None]]] = {
    "yapd": phase_yapd, "raw": phase_raw, "rawsplit": phase_rawsplit, "serve": phase_serve,
    "startup": phase_startup, "warm": phase_warm, "spawn": phase_spawn, "pair": phase_pair}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m yapctl.gpubench", description=gpubench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        "yapd_ab_starts keeps every start's figures; the cancel (and --profile-level) run on the "
                        "first A start, after its levels")
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
    gpu = gpu_name().replace("NVIDIA ", "").split()[0].lower() or "gpu"
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
