"""The markdown table beside a run's JSON file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from yapctl.bench import LONG_GAP, SLOW_OVER_P50
from yapctl.gpubench.measure import PROFILE_S
from yapctl.gpubench.prompts import PROMPT_BEFORE_AF
from yapctl.gpubench.servers import BYTECODE_LINES

# An engine's stamps of a request (yapd.engines.base.EngineStamps.ms_since), as figures are named.
STAMP_NAMES = ("queued", "scheduled", "first_token")


def num(x: float | None, unit: str = "") -> str:
    """A figure as the tables show it: "-" where it is missing."""
    return "-" if x is None else f"{x:g}{unit}"


def other_hosts(data: dict[str, Any]) -> list[str]:
    """A warning when the file's phases ran on more than one machine."""
    hosts = {ph: v["host"] for ph, v in data.items() if isinstance(v, dict) and v.get("host")}
    if len({json.dumps(h, sort_keys=True) for h in hosts.values()}) < 2:
        return []
    which = "; ".join(f"{ph} on boot {h.get('boot_id', '?')[:8]}, GPU {h.get('gpu_uuid', '?')[:13]}"
                      for ph, h in hosts.items())
    return [f"**The phases ran on different machines** ({which}): their columns are not comparable "
            "with each other.", ""]


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


WAY_OUT_HEAD = ("first token from its EngineCore's stamp to the front end holding it, chat / tool: "
                "p50, p95 ms")
SPLIT_HEAD = ("that way in two: the core's side (its output thread, the socket) up to the engine's output "
              "handler taking it, then the front end's (output processing, the turn waking), chat / tool: p50 ms")


STAMP_HEAD = ("queued / scheduled / first token p50 ms (turn's clock); cached prompt tokens p50; "
              "first tokens per engine step")


BURST_HEAD = ("a burst of starts, the engine steps that made its first tokens, chat -- tool: how many p50 (max); "
              "the first step's p50, the last's p50 / p95 ms after the burst's first start; p50 / p95 ms "
              "between steps")


def burst_cell(steps: dict[str, Any] | None) -> str:
    """One engine's ``burst_steps`` figures as BURST_HEAD gives them."""
    if not steps:
        return "-"
    last, between = steps["last_ms"], steps["between_ms"]
    return (f"{num(steps['steps']['p50'])} ({num(steps['steps']['max'])}); {num(steps['first_ms'])}, "
            f"{num(last['p50'])} / {num(last['p95'])}; {num(between['p50'])} / {num(between['p95'])}")


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
        return num(v.get("p50") if isinstance(v, dict) else v)

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
    bursts = {section: [figure(section, f"{prefix}{role}_burst_steps") for role in ("chat", "tool")]
              for section, prefix in (("yapd", "server_"), ("raw", ""))}
    if any(b for roles in bursts.values() for b in roles):
        cells = [" -- ".join(f"{role}: {burst_cell(b)}" for role, b in zip(("chat", "tool"), roles, strict=True))
                 if any(roles) else "-" for roles in bursts.values()]
        rows.append((BURST_HEAD, cells[0], cells[1]))
    split = [[figure("yapd", f"server_{role}_{part}_ms") for part in ("core_to_taken", "taken_to_front")]
             for role in ("chat", "tool")]
    if any(v is not None for parts in split for v in parts):
        rows.append((SPLIT_HEAD, " / ".join(" + ".join(map(shown, parts)) for parts in split), "-"))

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
        return " / ".join(num(v.get(q)) for q in (a, b))

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


def tail_cell(tail: dict[str, Any] | None) -> str:
    if not tail or tail.get("long_pct") is None:
        return "-"
    share = f"{tail['long_pct']:g} % of {tail['gaps']} (over {tail['over_ms']:g})"
    return f"{share}; {tail['long_p50']} / {tail['long_p90']}"


def starts_cell(split: dict[str, Any] | None) -> str:
    if not split or split.get("beside_pct") is None:
        return "-"
    return (f"{num(split['apart_p99'])} / {num(split['beside_p99'])}; {num(split['beside_pct'], ' %')}; "
            f"{num(split['long_beside_pct'], ' %')}")


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
        return num(data.get(sec, {}).get(lvl, {}).get(metric, {}).get(q))

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
    # A serve run with only its tool pass (`--serve-passes tool`) holds "c8_with_tool" alone.
    shown = sorted({int(k[1:].removesuffix("_with_tool")) for sec in LATENCY_SECTIONS for k in data.get(sec, {})
                    if k[:1] == "c" and k[1:].removesuffix("_with_tool").isdigit()})
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
        served = f"{lvl}_with_tool" if f"{lvl}_with_tool" in data.get("serve", {}) else lvl
        tails = [tail_cell(data.get(sec, {}).get(v, {}).get("itl_tail"))
                 for sec, v in (("yapd", lvl), ("raw", lvl), ("serve", served))]
        if any(t != "-" for t in tails):
            lines.append(f"| {c} | ITL gaps over {LONG_GAP:g} x its p50 (a step or more missed): share %; "
                         f"their p50 / p90 ms | {' | '.join(tails)} |")
        splits = [starts_cell(data.get(sec, {}).get(lvl, {}).get("itl_starts")) for sec in ("yapd", "raw")]
        if any(t != "-" for t in splits):
            lines.append(f"| {c} | ITL p99 ms apart from / beside other turns' starts (sent to first text); "
                         f"gaps beside them; long gaps beside them | {' | '.join(splits)} | - |")
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
        if data.get("yapd", {}).get(lvl, {}).get("loop_lag_turns_ms"):
            lines.append(f"| {c} | in yapd: event-loop lag p99 / max ms over the measured turns alone, no warm-up "
                         f"round (the last {g('yapd', lvl, 'loop_lag_turns_ms', 'window_s')} s) | "
                         f"{g('yapd', lvl, 'loop_lag_turns_ms', 'p99_ms')} / "
                         f"{g('yapd', lvl, 'loop_lag_turns_ms', 'max_ms')} | - | - |")
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
            cells = [" / ".join(num(v[m][q]) for q in ("p50", "p95"))
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
              # whether the restart imported torch and vLLM from source (run aw) or bytecode
              *(f"- yapd's restart, its bytecode: {line}" for line in y.get("restart_lines", [])
                if re.search(BYTECODE_LINES, line)),
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
