"""The GPU benchmark's run conditions, on this machine: bytecode counted and compiled for
real; the MPS daemon's lifecycle against a stand-in control binary (MPS needs a GPU)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from yapctl import gpuenv
from yapctl.gpubench.cli import main
from yapctl.gpubench.report import markdown, run_conditions
from yapctl.gpubench.runsetup import Setup
from yapctl.gpubench.servers import startup_lines
from yapd import config
from yapd.daemon import CACHE_VARS


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An importable package of two modules, never imported, with no bytecode."""
    root = tmp_path / "site" / "yap_bytecode_probe"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("X = 1\n")
    (root / "sub" / "__init__.py").write_text("def f():\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return "yap_bytecode_probe"


def test_bytecode_is_counted_then_compiled_as_pip_would(package):
    before = gpuenv.bytecode_state([package, "no_such_package_here"])
    assert before[package] == {"modules": 2, "bytecode": 0}
    assert before["no_such_package_here"] is None
    assert before["dont_write_bytecode"] is sys.dont_write_bytecode
    done = gpuenv.compile_packages([package, "no_such_package_here"])
    assert done["ok"] is True and done["seconds"] >= 0
    assert done["folders"] == [str(Path(importlib.util.find_spec(package).origin).parent.parent)]
    assert gpuenv.bytecode_state([package])[package] == {"modules": 2, "bytecode": 2}
    assert package not in sys.modules  # counted and compiled, never imported


def test_a_module_that_does_not_compile_is_reported(package, tmp_path):
    (tmp_path / "site" / package / "broken.py").write_text("def (:\n")
    assert gpuenv.compile_packages([package])["ok"] is False
    assert gpuenv.bytecode_state([package])[package] == {"modules": 3, "bytecode": 2}


def test_mps_without_its_control_binary_is_a_clear_error_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    rc = main([str(tmp_path / "models"), "--out", str(out), "--work", str(tmp_path / "work"), "--name", "t",
               "--mps", "--phases", "yapd"])
    assert rc == 2
    assert "nvidia-cuda-mps-control on PATH" in capsys.readouterr().err
    data = json.loads((out / "t.json").read_text())
    assert "nvidia-cuda-mps-control" in data["setup"]["mps_error"] and "mps" not in data["setup"]
    assert "yapd" not in data  # no phase ran without the MPS it was asked for
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


def test_mps_runs_the_runs_daemon_around_other_phases_and_lets_yapd_run_its_own(tmp_path, control_binary):
    """--mps: raw vLLM runs under the benchmark's daemon; for a yapd phase that daemon
    stops and yapd is told to run its own (engines.mps = "on"). Neither phase can run
    here (no vLLM): each records its error, and the daemon's log shows the order."""
    out, work = tmp_path / "out", tmp_path / "w"
    rc = main([str(tmp_path / "models"), "--out", str(out), "--work", str(work), "--name", "t", "--mps",
               "--phases", "raw,yapd", "--levels", "1"])
    assert rc == 0
    data = json.loads((out / "t.json").read_text())
    assert data["setup"]["mps"] is True and "error" in data["raw"] and "error" in data["yapd"]
    log = data["setup"]["mps_log_after_raw"]
    assert len(log) == 1 and log[0].startswith(f"start pipe={work / 'mps-bench' / 'pipe'}")
    assert [line.split(" pid=")[0] for line in (work / "mps-bench" / "log" / "control.log").read_text().splitlines()] \
        == [log[0].split(" pid=")[0], "command quit", "quit"]  # stopped before yapd's phase
    assert 'mps = "on"' in (work / "yapd.toml").read_text()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert Setup(tmp_path, work).config().engines.mps == "off"  # without --mps yapd runs none
    assert Setup(tmp_path, work, mps_priority="equal").config().engines.mps_priority == "equal"
    assert Setup(tmp_path, work, event_loop="asyncio").config().server.event_loop == "asyncio"
    assert Setup(tmp_path, work, request_order="tool_first").config().turn.request_order == "tool_first"
    assert Setup(tmp_path, work).config().turn.request_order == "chats_then_tools"  # yapd's own defaults
    assert Setup(tmp_path, work).config().engines.mps_priority == "equal"
    assert data["setup"]["mps_priority"] == "equal" and data["setup"]["request_order"] == "chats_then_tools"
    assert "yapd's engines at equal MPS priority; yapd's request order chats_then_tools" in (out / "t.md").read_text()
    # An A/B of the priority goes under two names: one file holds phases run alike.
    assert main([str(tmp_path / "models"), "--out", str(out), "--work", str(work), "--name", "t", "--mps",
                 "--mps-priority", "tool", "--phases", "raw", "--levels", "1"]) == 2


def test_run_conditions_head_the_table():
    setup = {"rounds": 24, "mps": True, "bytecode": {"dont_write_bytecode": True,
                                                     "torch": {"modules": 10, "bytecode": 10}, "vllm": None},
             "bytecode_compile": {"seconds": 31.5, "ok": True}}
    line = run_conditions(setup)[0]
    assert line == ("Run conditions: 24 lockstep rounds per level (after one warm-up round); under a private CUDA "
                    "MPS daemon; torch bytecode for 10 of 10 modules; byte-compiled first in 31.5 s.")
    assert line in markdown({"setup": setup, "yapd": {"c1": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}}})
    assert run_conditions({}) == []  # runs before these were recorded


@pytest.mark.parametrize(("order", "sent"), [("chats_then_tools", ["chat-0", "chat-1", "tool-0", "tool-1"]),
                                              ("tool_first", ["tool-0", "chat-0", "tool-1", "chat-1"])])
async def test_raws_turns_send_their_requests_in_the_order_named(order, sent):
    """Two sessions' turns starting in one loop round, as a level's turns do:
    chats_then_tools sends the round's chat requests before any tool request (the tool's
    begins in the next round); tool_first sends each turn's pair tool first, turn after
    turn. yapd's request orders of these names: tests/test_units.py."""
    if order == "tool_first" and sys.version_info < (3, 12):
        pytest.skip("tool_first leaves at once only with eager tasks (Python 3.12+, as on the device)")
    from yapctl.gpubench.raw import tool_request

    log: list[str] = []

    async def request(name: str) -> None:
        log.append(name)  # what AsyncLLM.generate's first step does: the request leaves
        await asyncio.sleep(0)

    async def turn(i: int) -> None:
        tool = tool_request(functools.partial(request, f"tool-{i}"), order)
        await request(f"chat-{i}")
        await tool

    await asyncio.gather(turn(0), turn(1))
    assert log == sent
    assert "raw sends each turn's tool request first" in " ".join(run_conditions({"raw_order": order})) \
        if order == "tool_first" else run_conditions({"raw_order": order}) == []


def test_an_empty_phase_list_runs_only_the_set_up(tmp_path, package, monkeypatch):
    """`--phases "" --compile-bytecode`: the device's first call compiles and records, and
    the phases come in later calls (each call has a time limit)."""
    monkeypatch.setattr(gpuenv, "PACKAGES", (package,))
    out = tmp_path / "out"
    rc = main([str(tmp_path / "models"), "--out", str(out), "--work", str(tmp_path / "work"), "--name", "t",
               "--phases", "", "--compile-bytecode", "--rounds", "16"])
    assert rc == 0
    setup = json.loads((out / "t.json").read_text())["setup"]
    assert setup["bytecode_compile"]["ok"] is True
    assert "rounds" not in setup and "mps" not in setup  # no phase ran: later calls set them
    assert setup["bytecode"][package] == {"modules": 2, "bytecode": 2}
    assert "byte-compiled first in" in (out / "t.md").read_text()


def test_an_unknown_phase_or_no_rounds_is_refused_before_anything_runs(tmp_path, capsys):
    for argv, why in ((["--phases", "yapd,rwa"], "unknown phase(s) rwa"), (["--rounds", "0"], "at least 1"),
                      (["--serve-passes", "text,toll"], "--serve-passes takes some of"),
                      (["--serve-passes", ","], "--serve-passes takes some of")):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "models"), "--out", str(tmp_path / "out"), *argv])
        assert exc.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_phases_added_to_a_file_must_run_alike(tmp_path, package, monkeypatch, capsys):
    """A file's phases are compared with each other: a later call with other rounds or
    MPS would mix unlike figures, so it is refused and the file is left as it was."""
    monkeypatch.setattr(gpuenv, "PACKAGES", (package,))
    base = [str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--name", "t", "--phases", ""]
    assert main([*base, "--rounds", "16"]) == 0
    assert "rounds" not in json.loads((tmp_path / "out" / "t.json").read_text())["setup"]
    # What a phase would record (a phase needs a GPU here): the file as the device leaves it.
    data = json.loads((tmp_path / "out" / "t.json").read_text())
    data["setup"].update(rounds=16, mps=False)
    (tmp_path / "out" / "t.json").write_text(json.dumps(data))
    base[-1] = "spawn"
    before = (tmp_path / "out" / "t.json").read_text()
    assert main([*base, "--rounds", "8"]) == 2
    assert "rounds=16, not 8" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main([*base, "--rounds", "16", "--mps"]) == 2
    assert "mps=False, not True" in capsys.readouterr().err
    assert (tmp_path / "out" / "t.json").read_text() == before
    # a file of runs before af (450 / 1,500 words): the prompt differs, so no phase joins it
    data["prompt"] = {**data["prompt"], "persona_words": 450, "history_words": 1500}
    (tmp_path / "out" / "t.json").write_text(json.dumps(data))
    assert main([*base, "--rounds", "16"]) == 2
    assert "the prompt {'persona_words': 450" in capsys.readouterr().err


def test_fresh_prompts_salt_each_level_and_are_refused_where_two_sides_share_turns(tmp_path, capsys):
    """--fresh-prompts: a new salt every level (so no level finds another's prompts cached),
    nothing without it; said under the table; the pair phase and --ab-interleave share one
    turn's prompt between two sides and are refused with it."""
    from yapctl.gpubench.prompts import level_salt

    models, work = tmp_path / "models", tmp_path / "work"
    fresh = Setup(models, work, fresh_prompts=True)
    salts = {level_salt(fresh) for _ in range(50)}
    assert len(salts) == 50 and all(salts) and level_salt(Setup(models, work)) == ""
    assert "every turn's persona new to the engines" in "".join(run_conditions({"fresh_prompts": True}))
    assert "persona new" not in "".join(run_conditions({"fresh_prompts": False, "rounds": 8}))
    base = [str(models), "--out", str(tmp_path / "out"), "--work", str(work), "--fresh-prompts"]
    for argv in (["--phases", "yapd,pair"], ["--phases", "yapd", "--ab", "turn.temperature=0.5", "--ab-interleave"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *argv])
        assert exc.value.code == 2 and "--fresh-prompts salts each level" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_report_says_the_prompt_its_file_was_run_with():
    """The issue's 600 + 2,000-token prompt from run af on; older files keep their own
    words in the report, and the tokens a phase counted."""
    from yapctl.gpubench.prompts import PROMPT
    from yapctl.gpubench.report import prompt_line

    assert prompt_line({"prompt": PROMPT, "raw": {"prompt_tokens": {"chat": 2632, "tool": 454}}}).startswith(
        "575-word persona + 1,930-word history + 20-word utterance numbered per turn (2632 chat / 454 tool prompt "
        "tokens), 200 output tokens")
    old = {"prompt": {"persona_words": 450, "history_words": 1500, "utterance_words": 20, "max_out": 200}}
    assert prompt_line(old).startswith("450-word persona + 1,500-word history + 20-word utterance numbered per "
                                       "turn, 200 output tokens")
    level = {"c16": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {}}
    assert "450-word persona" in markdown({**old, "date": "2026-12-05", "machine": "H200", "setup": {}, "yapd": level})
    level["c16"]["prompt_tokens"] = {"p50": 2632, "max": 2633}  # a yapd-only file: yapd's own count
    assert "(2632 chat prompt tokens as yapd built them)" in prompt_line({"prompt": PROMPT, "yapd": level})


def test_start_lines_keep_whether_torch_compiles_aot_artifact_was_used(tmp_path):
    """A warm start that loads the AOT artifact skips Dynamo; one that does not says why
    (vLLM 0.26's own wording), and those lines must reach the bench's file."""
    kept = ["(EngineCore pid=7) INFO [decorators.py:312] Directly load AOT compilation from path /c/model",
            "(EngineCore pid=7) WARNING [decorators.py:319] Compiling model again due to a load failure from "
            "/c/model, reason: boom",
            "(EngineCore pid=7) INFO [decorators.py:708] saved AOT compiled function to /c/model",
            "(EngineCore pid=7) INFO [backends.py:1156] Dynamo bytecode transform time: 7.70 s",
            # yapd's own: when each engine forked (or spawned) its EngineCore, and its tokenizer's load
            "INFO yapd.engine.vllm: EngineCore forked 4.2 s into vLLM's start role=chat",
            "INFO yapd.engine.vllm: EngineCore spawned 1.3 s into vLLM's start role=tool",
            "INFO yapd.engine.vllm: our tokenizer took 2.6 s, after 3.1 s waiting for its turn role=chat",
            # which thread forked each core (engines.fork_from_main_thread)
            "WARNING yapd.engine.vllm: EngineCore not forked by yapd's main thread: yapd's event loop had stopped "
            "(1 of 1 forks) role=tool",
            # whether its imports loaded bytecode, wrote it or compiled from source each start
            "INFO yapd.daemon: bytecode under /c/pycache (engines.bytecode_cache): this start compiles torch, "
            "transformers, vllm from source, later ones load it; the install has none this process may load",
            "WARNING yapd.daemon: vllm has no bytecode in /site/vllm and this process cannot write it"]
    log = tmp_path / "yapd.log"
    log.write_text("\n".join(["before", *kept, "(EngineCore pid=7) INFO [core.py:1] Waiting for init message"]))
    assert startup_lines(log, len("before\n")) == kept


def test_each_engines_prompt_tokens_per_step_come_from_the_logs_to_the_report(tmp_path):
    """vLLM picks max_num_batched_tokens by how it is started (2048 from Python, 8192 in
    `vllm serve` on an H200: run ad), so the report says what each side ran with, and
    `vllm serve` gets yapd's where yapd sets one."""
    from yapctl.gpubench.serve import serve_args
    from yapctl.gpubench.servers import step_budgets

    log = tmp_path / "yapd.log"
    log.write_text("INFO [scheduler.py:252] Chunked prefill is enabled with max_num_batched_tokens=8192.\n"
                   "INFO [scheduler.py:252] Chunked prefill is enabled with max_num_batched_tokens=2048.\n"
                   "(EngineCore pid=9) INFO [core.py:1] Chunked prefill is enabled with max_num_batched_tokens=4096.\n")
    first = len(log.read_text().splitlines()[0]) + 1
    assert step_budgets(log) == [8192, 2048, 4096] and step_budgets(log, first) == [2048, 4096]
    assert step_budgets(tmp_path / "missing.log") == []
    assert startup_lines(log, first)[0].endswith("max_num_batched_tokens=2048.")  # an --ab start's too
    data = {"date": "2026-12-05", "machine": "H200", "setup": {},
            "yapd": {"c16": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {}, "step_budgets": [2048, 2048]},
            "serve": {"step_budgets": [8192], "tool_step_budgets": [8192]}}
    assert ("- prompt tokens per engine step (vLLM's max_num_batched_tokens, in the logs): yapd 2048, 2048; "
            "vllm serve 8192; its tool server 8192") in markdown(data).splitlines()
    kw = {"model": "/m", "load_format": "dummy", "kv_cache_dtype": "fp8", "gpu_memory_utilization": 0.7,
          "max_model_len": 5760, "max_num_seqs": 64, "tensor_parallel_size": 1, "quantization": "fp8"}
    assert "--max-num-batched-tokens" not in serve_args(kw, 1)  # serve's own default, as users run it
    args = serve_args({**kw, "max_num_batched_tokens": 8192}, 1)
    assert args[args.index("--max-num-batched-tokens") + 1] == "8192"


def test_yapds_own_mps_line_is_quoted_under_the_table():
    line = "2026-12-02T05:25:24.848 info yapd.mps: MPS control daemon started pid=849 pipe=/w/mps/pipe (x)"
    data = {"date": "2026-12-02", "machine": "H200", "setup": {"mps": True},
            "yapd": {"c16": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {}, "mps_lines": [line]}}
    assert f"- yapd's MPS, in its log: {line}" in markdown(data).splitlines()


def test_where_yapds_restart_got_its_bytecode_is_quoted_under_the_table():
    """A restart importing torch and vLLM from source took 49.8 s where one loading their
    bytecode took 33.8 (runs aw, av): the file says which a restart did."""
    line = ("2026-12-07T10:00:00.000 info yapd.daemon: bytecode under /w/cache/pycache (engines.bytecode_cache): "
            "loaded, written by a start before this one; the install has none this process may load")
    data = {"date": "2026-12-07", "machine": "H100", "setup": {},
            "yapd": {"c1": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {},
                     "restart_lines": ["2026-12-07T10:00:30.000 info yapd.daemon: ready port=1 loop=uvloop", line]}}
    shown = [ln for ln in markdown(data).splitlines() if ln.startswith("- yapd's restart, its bytecode: ")]
    assert shown == [f"- yapd's restart, its bytecode: {line}"]


def test_yapds_event_loop_lag_gets_a_row_where_it_was_taken():
    data = {"date": "2026-12-02", "machine": "H200", "setup": {},
            "yapd": {"c16": {"ttft_ms": {"p50": 1, "p95": 2},
                             "loop_lag_ms": {"p99_ms": 3.5, "max_ms": 12.25, "window_s": 13.2}},
                     "c8": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {}}}
    rows = [line for line in markdown(data).splitlines() if "event-loop lag" in line]
    assert rows == ["| 16 | in yapd: event-loop lag p99 / max ms (the last 13.2 s) | 3.5 / 12.25 | - | - |"]
    # Files since session 43 keep the measured turns' own, without the warm-up round.
    data["yapd"]["c16"]["loop_lag_turns_ms"] = {"p99_ms": 2.5, "max_ms": 3.25, "window_s": 11.9}
    rows = [line for line in markdown(data).splitlines() if "event-loop lag" in line]
    assert rows[1:] == ["| 16 | in yapd: event-loop lag p99 / max ms over the measured turns alone, no warm-up "
                        "round (the last 11.9 s) | 2.5 / 3.25 | - | - |"]
    assert not any("garbage" in line or "collections /" in line for line in markdown(data).splitlines())
    data["yapd"]["c16"]["gc_pauses"] = {"long_ms": 0.5, "long": 3, "max_ms": 31.5, "max_generation": 2,
                                        "window_s": 13.2}
    data["yapd"]["c8"]["gc_pauses"] = {"long_ms": 0.5, "long": 0, "max_ms": None, "max_generation": None,
                                       "window_s": 20.0}
    rows = [line for line in markdown(data).splitlines() if "garbage" in line]
    head = "in yapd: garbage collections of 0.5 ms or more: how many, the longest ms (its generation)"
    assert rows == [f"| 8 | {head} (the last 20 s) | 0 | - | - |",
                    f"| 16 | {head} (the last 13.2 s) | 3, 31.5 (2) | - | - |"]


def test_a_levels_collections_are_the_difference_of_two_status_replies():
    from yapctl.gpubench.measure import gc_between

    at_ready = {"collections": {"0": 2, "1": 0, "2": 1}, "ms": {"0": 0.31, "1": 0.0, "2": 24.57}}
    after = {"collections": {"0": 18, "1": 1, "2": 1}, "ms": {"0": 9.36, "1": 1.45, "2": 24.57}}
    level = gc_between(at_ready, after)
    assert level == {"collections": {"0": 16, "1": 1, "2": 0}, "ms": {"0": 9.05, "1": 1.45, "2": 0.0}}
    data = {"date": "2026-12-04", "machine": "H200", "setup": {},
            "yapd": {"c16": {"ttft_ms": {"p50": 1, "p95": 2}, "gc_pauses": {
                "long_ms": 0.5, "long": 0, "max_ms": None, "max_generation": None, "window_s": 13.2,
                "level": level}}, "cancel": {}}}
    rows = [line for line in markdown(data).splitlines() if "over the level" in line]
    assert rows == ["| 16 | in yapd: collections / ms in them over the level, generations 0; 1; 2 | "
                    "16 / 9.05; 1 / 1.45; 0 / 0.0 | - | - |"]


def test_slow_turns_get_a_row_with_their_bursts():
    slow = {"over_ms": 40.0, "turns": 16, "of": 256, "bursts": 1, "at_s": [12.5]}
    data = {"date": "2026-12-03", "machine": "H200", "setup": {},
            "yapd": {"c16": {"ttft_ms": {"p50": 20, "p95": 90}, "ttft_slow": slow},
                     "c1": {"ttft_ms": {"p50": 18, "p95": 20}, "ttft_slow": {**slow, "turns": 0, "bursts": 0,
                                                                              "at_s": []}}},
            "raw": {"c16": {"ttft_ms": {"p50": 20, "p95": 30}, "ttft_slow": {**slow, "at_s": [3.25, 7]}}}}
    head = ("turns with TTFT over 2 x its p50 (raw: held for the decision): how many, in how many bursts of starts "
            "(each burst's start, s into the level)")
    rows = [line for line in markdown(data).splitlines() if "2 x its p50" in line]
    assert rows == [f"| 1 | {head} | over 40 ms: 0 of 256, 0 (-) | - | - |",
                    f"| 16 | {head} | over 40 ms: 16 of 256, 1 (12.5) | over 40 ms: 16 of 256, 1 (3.25, 7) | - |"]


def test_raw_levels_count_their_slow_turns_held_for_the_decision():
    from yapctl.gpubench.raw import RawTurn, raw_level

    # Two bursts of two turns; the second burst's decisions came late (its chat did not).
    rows = [RawTurn(ttft=20.0, tool_first=10.0, tool_done=12.0, token_gaps=[], first_token=20.0,
                    t0_ms=1000.0 + i)
            for i in range(2)]
    rows += [RawTurn(ttft=20.0, tool_first=10.0, tool_done=70.0, token_gaps=[], first_token=20.0,
                     t0_ms=2000.0 + i)
             for i in range(2)]
    assert raw_level(rows)["ttft_slow"] == {"over_ms": 90.0, "turns": 0, "of": 4, "bursts": 0, "at_s": []}
    rows[-1] = dataclasses.replace(rows[-1], tool_done=200.0)
    assert raw_level(rows)["ttft_slow"] == {"over_ms": 90.0, "turns": 1, "of": 4, "bursts": 1, "at_s": [1.0]}


@pytest.mark.parametrize(("flag", "loop"), [("auto", "asyncio"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_raw_runs_on_the_event_loop_named(tmp_path, monkeypatch, flag, loop):
    """--event-loop names yapd's loop and, when named, the loop raw vLLM's clients run on
    (so the two compare on one loop); "auto" keeps raw on asyncio's own, as before."""
    from yapctl.gpubench import cli

    seen: list[str] = []

    async def probe(res, setup):
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    monkeypatch.setitem(cli.PHASES, "raw", probe)
    assert main([str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--name", "t",
                 "--phases", "raw", "--event-loop", flag]) == 0
    assert seen == [loop]


def test_config_overrides_set_replace_and_add_keys():
    from yapctl.gpubench.runsetup import with_overrides

    text = "[server]\nport = 1\n[turn]\nconcurrent = true\n"
    out = with_overrides(text, ["turn.concurrent=false", "turn.exact_token_trim = true", "logging.level=\"debug\""])
    assert config.tomllib.loads(out) == {"server": {"port": 1}, "turn": {"concurrent": False, "exact_token_trim": True},
                                         "logging": {"level": "debug"}}
    with pytest.raises(ValueError, match=r"section\.key=value"):
        with_overrides(text, ["tool_first=true"])


def test_ab_takes_live_keys_only(tmp_path, capsys):
    base = [str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--phases", ""]
    for bad in ("engines.mps_priority=\"tool\"", "server.event_loop=\"asyncio\"", "turn.concurrent=true",
                "turn.nonsense=1"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--ab", bad])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "engines.mps_priority" in err and "server.event_loop" in err and "nothing changes" in err
    assert "turn.nonsense" in err
    assert main([*base, "--ab", 'turn.request_order="tool_first"']) == 0
    assert main([*base, "--ab", 'turn.request_order="tool_first"', "--ab-interleave"]) == 0
    with pytest.raises(SystemExit) as exc:  # nothing to take turns with
        main([*base, "--ab-interleave"])
    assert exc.value.code == 2 and "give --ab too" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # yapd's default already: nothing to compare
        main([*base, "--ab", 'turn.request_order="chats_then_tools"'])


def test_ab_restarts_take_engine_keys_and_alternate_a_b_b_a(tmp_path, capsys):
    from yapctl.gpubench.yapdphase import ab_arms

    base = [str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--phases", ""]
    forked_tool = 'tool.start_method="fork"'  # its default spawns
    with pytest.raises(SystemExit) as exc:  # an engine key needs the engines restarted
        main([*base, "--ab", forked_tool])
    assert exc.value.code == 2 and "--ab-restarts" in capsys.readouterr().err
    assert main([*base, "--ab", forked_tool, "--ab-restarts", "2"]) == 0
    # the next lease's: three engine keys in B
    assert main([*base, "--ab", "engines.core_switch_interval_ms=0.5", "--ab", "engines.fork_from_main_thread=true",
                 "--ab", "engines.core_steady_heap=true",
                 "--ab-restarts", "2"]) == 0
    for bad in (["--ab-restarts", "2"], ["--ab", forked_tool, "--ab-restarts", "2", "--ab-interleave"],
                ["--ab", forked_tool, "--ab-restarts", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *bad])
        assert exc.value.code == 2 and "--ab-restarts N" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # still no process-restart key, restarts or not
        main([*base, "--ab", 'server.event_loop="asyncio"', "--ab-restarts", "2"])
    assert "need yapd's process restarted: server.event_loop" in capsys.readouterr().err
    assert ab_arms(1) == ["a", "b"]
    assert ab_arms(2) == ["a", "b", "b", "a"]
    assert ab_arms(3) == ["a", "b", "b", "a", "a", "b"]


def test_each_ab_start_gets_a_row_in_the_order_they_ran():
    def figures(ttft: float, tool_first: float) -> dict[str, Any]:
        return {"ttft_ms": {"p50": ttft, "p95": ttft + 5}, "tool_ms": {"p50": ttft - 2},
                "server_chat_queued_ms": {"p50": 1.7}, "server_chat_first_token_ms": {"p50": 16.5},
                "server_tool_queued_ms": {"p50": 2.0}, "server_tool_first_token_ms": {"p50": tool_first},
                "server_tool_core_to_front_ms": {"p50": 1.25}}

    data = {"date": "2026-12-05", "machine": "H200", "setup": {"ab": ['tool.start_method="spawn"'], "ab_restarts": 1},
            "yapd": {"c1": figures(21.9, 17.9)}, "yapd_b": {"c1": figures(19.2, 13.3)},
            "yapd_ab_starts": {"c1": [{"arm": "a", "restart_s": 24.8, **figures(21.9, 17.9),
                                       "proc_per_turn": {"chat": {"minflt": 17.0, "rss_mb": 5120.5},
                                                         "tool": {"minflt": 233.4, "rss_mb": 2048.0}}},
                                      {"arm": "b", "restart_s": 31.0, **figures(19.2, 13.3),
                                       "proc_per_turn": {"tool": {"minflt": 1.2}}}]}}
    text = markdown(data)
    assert "every level 1 times per config, A B B A ..., each start of both engines (restarted for it)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 | 1 A") or line.startswith("| 1 | 2 B")]
    assert rows == [
        "| 1 | 1 A | 24.8 | 21.9 | 19.9 | 1.7 -> 16.5 (-) | 2.0 -> 17.9 (1.25) | 17 / 233.4 | 5120.5 / 2048 |",
        "| 1 | 2 B | 31.0 | 19.2 | 17.2 | 1.7 -> 16.5 (-) | 2.0 -> 13.3 (1.25) | - / 1.2 | - / - |"]


async def test_an_ab_start_restarts_a_real_yapds_engines_with_an_engine_key(make_yapd, tmp_path):
    """What --ab-restarts does between two measurements, on a real yapd with the CPU
    engines: the config file with the change, a reload, both engines restarted (timed,
    their start lines returned), the change then in force; a key that needs the process
    restarted is refused."""
    from yapctl.gpubench.yapdphase import restart_engines_with

    log = tmp_path / "yapd.log"  # where the bench reads a restart's start lines from
    d = make_yapd(f'[logging]\nfile = "{log}"\n')
    text = d.config_path.read_text()
    took, lines = await restart_engines_with(d.config_path, text, ["chat.cpu_workers=2"], d.admin_socket, log)
    assert took >= 0 and any("engine started role=chat" in x for x in lines), lines
    assert "cpu_workers = 2" in d.config_path.read_text()
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == []
    with pytest.raises(RuntimeError, match="needs a process restart"):
        await restart_engines_with(d.config_path, text, ["server.write_buffer_bytes=65536"], d.admin_socket, log)
    await restart_engines_with(d.config_path, text, [], d.admin_socket, log)  # back as it was


def _demo_models_as_gpubenchs(tmp_path: Path, cache_dir: Path) -> tuple[Path, list[str]]:
    """The CPU demo models under gpubench's model names, and the --set options that run
    them on yapd's CPU engine."""
    import shutil

    models = tmp_path / "models"
    for name, role in (("nemo-12b", "chat"), ("hammer-3b", "tool")):
        shutil.copytree(cache_dir / "demo" / role, models / name)
    return models, [f"--set={role}.{key}={value}" for role in ("chat", "tool")
                    for key, value in (("backend", '"cpu"'), ("load_format", '"auto"'), ("quantization", '"none"'))]


def test_the_yapd_phase_keeps_a_levels_loop_lag_with_and_without_its_warm_up(tmp_path, cache_dir):
    """A real yapd on the CPU engines: each level's event-loop lag over its whole span
    (its warm-up round in it, where every session is new) and over its measured turns
    alone, the second a shorter window inside the first."""
    models, cpu = _demo_models_as_gpubenchs(tmp_path, cache_dir)
    out = tmp_path / "out"
    assert main([str(models), "--out", str(out), "--work", str(tmp_path / "work"), "--name", "t", "--phases", "yapd",
                 "--levels", "2", "--rounds", "2", "--skip-restart", *cpu]) == 0
    level = json.loads((out / "t.json").read_text())["yapd"]["c2"]
    whole, turns = level["loop_lag_ms"], level["loop_lag_turns_ms"]
    assert 0 < turns["samples"] < whole["samples"] and turns["window_s"] <= whole["window_s"], (whole, turns)
    assert turns["max_ms"] <= whole["max_ms"]
    assert "over the measured turns alone, no warm-up round" in (out / "t.md").read_text()


@pytest.mark.parametrize("change,key,levels", [('tool.start_method="fork"', "start_method", [1]),
                                               ("engines.core_switch_interval_ms=0.5", "core_switch_interval_ms",
                                                [1, 2])])
def test_the_yapd_phase_runs_an_ab_with_engine_restarts_on_the_cpu_engines(tmp_path, cache_dir, monkeypatch,
                                                                            change, key, levels):
    """The whole yapd phase of an --ab-restarts run, on a real yapd whose engines are the
    CPU demo models under gpubench's model names (--set backend "cpu"): each config
    measured on engines restarted for it, each start measuring every level, the turns of
    each config pooled per level, every start kept in order, the cancel measured on A's
    start, and the config file as it was once the last (B) measurement is done, with no
    engine restart back to A."""
    from yapctl.gpubench import yapdphase
    from yapctl.gpubench.runsetup import turns_for

    models, cpu = _demo_models_as_gpubenchs(tmp_path, cache_dir)
    out, work = tmp_path / "out", tmp_path / "work"
    cancelled_under: list[str] = []
    cancel_latency = yapdphase.cancel_latency

    async def config_at_cancel(*args: Any, **kwargs: Any) -> Any:
        cancelled_under.append((work / "yapd.toml").read_text())
        return await cancel_latency(*args, **kwargs)

    monkeypatch.setattr(yapdphase, "cancel_latency", config_at_cancel)
    assert main([str(models), "--out", str(out), "--work", str(work), "--name", "t", "--phases", "yapd",
                 "--levels", ",".join(map(str, levels)), "--rounds", "1", "--skip-restart", *cpu,
                 "--ab", change, "--ab-restarts", "1"]) == 0
    data = json.loads((out / "t.json").read_text())
    assert "error" not in data["yapd"], data["yapd"]
    for c in levels:
        starts = data["yapd_ab_starts"][f"c{c}"]
        assert [st["arm"] for st in starts] == ["a", "b"]
        assert all(st["restart_s"] >= 0 and any("engine started role=tool" in x for x in st["restart_lines"])
                   for st in starts), starts
        assert all(st["ttft_ms"]["p50"] is not None for st in starts), starts
        assert "proc_per_turn" in starts[0]  # each start's faults by process and thread (here: yapd's own)
        for section in ("yapd", "yapd_b"):
            pooled = data[section][f"c{c}"]
            assert pooled["turns"] == turns_for(c, 1) and pooled["starts"] == 1, pooled
    assert key not in (work / "yapd.toml").read_text()  # back to A after B
    # One engine start a measurement, each measuring every level: the first start, A and B.
    assert (work / "yapd.log").read_text().count("engine started role=tool") == 3
    assert data["yapd"]["cancel"]["cancel_to_done_ms"]["p50"] is not None
    assert len(cancelled_under) == 1 and key not in cancelled_under[0]  # on A's start
    assert "| 1 | 2 B |" in (out / "t.md").read_text()


async def test_ab_reloads_a_real_yapd_live_and_refuses_what_a_reload_cannot_apply(make_yapd):
    from yapctl.gpubench.yapdphase import reload_with

    d = make_yapd("[turn]\nconcurrent = true\n")
    text = d.config_path.read_text()
    await reload_with(d.config_path, text, ['turn.request_order="chat_first"'], d.admin_socket)
    d.wait_for("reload applied live keys: turn.request_order")
    with pytest.raises(RuntimeError, match="did not apply live"):
        await reload_with(d.config_path, text, ['engines.mps="off"'], d.admin_socket)
    await reload_with(d.config_path, text, [], d.admin_socket)  # back as it was


async def test_a_level_is_profiled_after_its_warm_up_and_a_failed_level_ends_the_window(monkeypatch):
    from yapctl.gpubench import measure
    from yapd.loopprofile import LoopProfiler

    monkeypatch.setattr(measure, "PROFILE_AFTER_S", 0.05)
    asked: list[float] = []

    async def level() -> None:
        await asyncio.sleep(0.3)

    async def profile() -> dict[str, Any]:
        asked.append(asyncio.get_running_loop().time())
        return await LoopProfiler().run(0.1)

    t0 = asyncio.get_running_loop().time()
    reply = await measure.profiled(level(), profile)
    assert reply["wall_s"] >= 0.1 and asked[0] - t0 >= 0.05

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("level failed")

    asked.clear()
    with pytest.raises(RuntimeError, match="level failed"):
        await measure.profiled(failing(), profile)
    await asyncio.sleep(0.1)
    assert asked == []  # the window was cancelled before it opened


def test_the_loop_profiles_of_yapd_and_raw_are_tabled_by_package():
    def prof(busy: float, **own: float) -> dict[str, Any]:
        total = sum(own.values())
        return {"busy_s": busy, "by_package": [{"package": k, "own_ms": v, "share": v / total}
                                                for k, v in sorted(own.items(), key=lambda kv: -kv[1])]}

    data = {"date": "2026-12-02", "machine": "H200", "setup": {},
            "yapd": {"c16": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {},
                     "profile_c16": prof(4.0, websockets=1500.0, vllm=2000.0, yapd=500.0)},
            "raw": {"c16": {}, "profile_c16": prof(2.5, vllm=2400.0, asyncio=100.0)}}
    lines = markdown(data).splitlines()
    at = lines.index("| package | yapd | raw |")
    assert "at 16 sessions" in lines[at - 2] and "yapd 4.0 s / raw 2.5 s" in lines[at - 2]
    assert lines[at + 2:at + 7] == ["| vllm | 2000 (50%) | 2400 (96%) |", "| websockets | 1500 (38%) | - |",
                                    "| yapd | 500 (12%) | - |", "| asyncio | - | 100 (4%) |", ""]
    assert not [line for line in markdown({**data, "yapd": {}, "raw": {}}).splitlines() if "| package |" in line]


def test_the_ab_table_sets_each_level_beside_its_changed_run():
    row = {"ttft_ms": {"p50": 1.0, "p95": 2.0}, "tool_ms": {"p50": 3.0, "p95": 4.0},
           "server_tool_first_ms": {"p50": 5.0, "p95": 6.0}, "itl_ms": {"p50": 1.0, "p99": 7.0}}
    changed = {k: {q: v * 10 for q, v in m.items()} for k, m in row.items()}
    table = markdown({"setup": {"ab": ["turn.request_order=\"chat_first\""]}, "yapd": {"c16": row},
                      "yapd_b": {"c16": changed}})
    assert "## yapd with `turn.request_order=\"chat_first\"`" in table
    assert "| 16 | 1 / 2 / 10 / 20 | 3 / 4 / 30 / 40 | 5 / 6 / 50 / 60 | 7 / 70 |" in table


def test_the_order_probe_and_the_decision_sent_get_their_rows():
    probe = {"raw": {"chat_first_ms": {"p50": 20.5, "p95": 24.0}, "tool_first_ms": {"p50": 15.0, "p95": 18.0}},
             "chat_alone": {"chat_first_ms": {"p50": 17.0, "p95": 19.0}, "tool_first_ms": {"p50": None, "p95": None}}}
    data = {"date": "2026-12-02", "machine": "H200", "setup": {},
            "yapd": {"c1": {"ttft_ms": {"p50": 1, "p95": 2}, "server_tool_ms": {"p50": 16.5, "p95": 19.25},
                            "server_ttft_ms": {"p50": 20.5, "p95": 23.0}, "outside_turn_ms": {"p50": 2.5, "p95": 4.0},
                            "server_engine_text_ms": {"p50": 19.0, "p95": 22.0},
                            "first_token_after_ready_ms": {"p50": 0.2, "p95": 0.5}},
                     "c8": {"ttft_ms": {"p50": 1, "p95": 2}}, "cancel": {}},
            "raw": {"c1": {}, "order_probe": probe}}
    lines = markdown(data).splitlines()
    assert [line for line in lines if "decision sent" in line] == [
        "| 1 | in yapd: tool decision sent p50 / p95 ms | 16.5 / 19.25 | - | - |"]
    assert [line for line in lines if "beyond it" in line] == [
        "| 1 | in yapd: first token sent p50 / p95 ms; client TTFT beyond it p50 / p95 ms "
        "| 20.5 / 23; 2.5 / 4 | - | - |"]
    assert [line for line in lines if "first text" in line] == [
        "| 1 | in yapd: chat first text p50 / p95 ms; first token sent after it and the decision p50 / p95 ms "
        "| 19 / 22; 0.2 / 0.5 | - | - |"]
    assert "| raw | 20.5 / 24 | 15 / 18 |" in lines
    assert "| chat_alone | 17 / 19 | - / - |" in lines


async def test_the_order_probe_sends_each_turns_requests_in_its_order():
    """vLLM needs a GPU: stand-ins that log when each request reaches its engine (the
    first step of ``generate``, as AsyncLLM adds it) and stream a few outputs."""
    from types import SimpleNamespace

    from yapctl.gpubench.raw import PROBE_ORDERS, order_probe

    added: list[str] = []
    closed: list[str] = []

    class Engine:
        def __init__(self, role: str) -> None:
            self.role = role

        async def generate(self, prompt, sp, request_id):
            added.append(self.role)
            try:
                for n in range(sp):
                    await asyncio.sleep(0)
                    yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[n])])
            finally:
                closed.append(self.role)

    out = await order_probe(Engine("chat"), Engine("tool"), lambda i: ([1, 2], [3]), 3, 5, turns=2)
    assert list(out) == list(PROBE_ORDERS)
    # One warm-up turn, then the orders take turns: raw, chat_then_tool, tool_then_chat, alone, alone.
    assert added == ["chat", "tool", "chat", "tool", "tool", "chat", "chat", "tool"] * 3
    assert sorted(closed) == sorted(added)
    assert out["chat_alone"]["tool_first_ms"] == {"p50": None, "p95": None}
    assert all(out[o]["turns"] == 2 and out[o]["chat_first_ms"]["p50"] is not None for o in PROBE_ORDERS[:4])
    assert out["tool_alone"]["tool_first_ms"]["p50"] is not None


def test_env_reaches_every_phase_is_recorded_and_must_match(tmp_path, monkeypatch, capsys):
    from yapctl.gpubench import cli

    seen: list[str | None] = []

    async def probe(res, setup):
        seen.append(os.environ.get("YAP_BENCH_PROBE"))

    monkeypatch.setitem(cli.PHASES, "raw", probe)
    monkeypatch.delenv("YAP_BENCH_PROBE", raising=False)
    base = [str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--name", "t",
            "--phases", "raw"]
    assert main([*base, "--env", "YAP_BENCH_PROBE=a=1"]) == 0
    assert seen == ["a=1"]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["setup"]["env"] == {"YAP_BENCH_PROBE": "a=1"}
    assert "environment YAP_BENCH_PROBE=a=1" in (tmp_path / "t.md").read_text()
    monkeypatch.delenv("YAP_BENCH_PROBE")
    assert main(base) == 2  # the file's phases ran with it: a run without it goes elsewhere
    assert "env={'YAP_BENCH_PROBE': 'a=1'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--env", "NOEQUALS"])


async def test_interleaved_ab_takes_turns_round_by_round_on_a_real_yapd(make_yapd):
    """--ab-interleave: the config as written (A) and with --ab's change (B) alternate
    round by round on the same sessions; every turn ran under its own config (A replies 8
    tokens, B 3), and the daemon is back on A afterwards."""
    from tests.conftest import KEY
    from yapctl.gpubench.runsetup import turns_for
    from yapctl.gpubench.yapdphase import interleaved

    d = make_yapd("[turn]\nconcurrent = true\nignore_eos = true\nchat_max_out = 8\n")
    text = d.config_path.read_text()
    a, b, wall = await interleaved(d.url(key=None), d.admin_socket, d.config_path, text, ["turn.chat_max_out=3"],
                                   2, 2, key=KEY)
    assert len(a) == len(b) == turns_for(2, 2) and wall > 0
    # Every token counts, also those that held back the start of a character.
    assert {r.done["usage"]["completion_tokens"] for r in a if r.done} == {8}
    assert {r.done["usage"]["completion_tokens"] for r in b if r.done} == {3}
    assert all(r.ok for r in a + b)
    assert d.config_path.read_text() == text
    # A, B, A, B, A, B, then back to A: six changes.
    d.wait_for("reload applied live keys: turn.chat_max_out", count=6)
    assert len([line for line in d.lines if "reload applied live keys: turn.chat_max_out" in line]) == 6


def test_the_gpus_are_named_by_nvidia_smi_not_by_a_cuda_context(tmp_path, monkeypatch):
    """The bench names its GPU and the host's GPUs through nvidia-smi (a stand-in here):
    a CUDA context in its process would make vLLM spawn raw's EngineCores."""
    from yapctl.gpubench import results

    tool = tmp_path / "nvidia-smi"
    tool.write_text('#!/bin/sh\ncase "$1" in\n--query-gpu=name) printf "NVIDIA H200\\nNVIDIA H200\\n" ;;\n'
                    '--query-gpu=uuid) printf "GPU-a\\n\\nGPU-b\\n" ;;\nesac\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert results.gpu_name() == "NVIDIA H200"
    assert results.host_identity()["gpu_uuid"] == "GPU-a,GPU-b"
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert results.gpu_name() == "unknown" and "gpu_uuid" not in results.host_identity()


def test_a_level_is_watched_with_py_spy_at_its_level_only(tmp_path, monkeypatch):
    """/proc's figures at every level; py-spy's (here: why there are none) only at
    --pyspy-level, marked with whether native frames were asked for."""
    from yapctl import pyspy
    from yapctl.gpubench import measure

    monkeypatch.setattr(pyspy, "binary", lambda: None)
    s = Setup(tmp_path, tmp_path / "w", pyspy_level=16, pyspy_native=True)
    with measure.watching(s, 1, {"me": os.getpid()}) as figures:
        pass
    got = figures(2)
    assert set(got) == {"cpu_ms_per_turn", "proc_per_turn", "host_cpu"} and "me" in got["proc_per_turn"]
    with measure.watching(s, 16, {"me": os.getpid()}) as figures:
        pass
    got = figures(2)
    assert "py-spy is not installed" in got["pyspy"]["error"] and got["pyspy_native"] is True
    assert "me" in got["cpu_ms_per_turn"]


def test_phases_on_different_machines_are_flagged_in_the_table():
    """A lease lost between two calls puts the next phase on another host: the table says
    so, and says nothing while every phase ran on one machine."""
    from yapctl.gpubench.report import markdown
    from yapctl.gpubench.results import host_identity

    here = host_identity()
    assert len(here["boot_id"]) >= 32  # Linux: every machine (and boot) has its own
    level = {"c1": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}}
    one = {"date": "2026-12-03", "machine": "H200", "setup": {},
           "yapd": {**level, "host": here}, "raw": {**level, "host": dict(here)}}
    assert "different machines" not in markdown(one)
    other = {**here, "boot_id": "0123456789abcdef-another-host"}
    two = {**one, "raw": {**level, "host": other}}
    warning = [line for line in markdown(two).splitlines() if "different machines" in line]
    assert len(warning) == 1 and "yapd on boot " + here["boot_id"][:8] in warning[0]
    assert "raw on boot 01234567" in warning[0]


@pytest.mark.parametrize("passes", [("text", "ids", "tool"), ("text", "tool"), ("ids",)])
async def test_the_serve_phase_times_the_passes_asked_for(tmp_path, monkeypatch, passes):
    """--serve-passes: each level is timed with the chat prompt as text and as token ids,
    and the tool server is started and asked beside the chat, only where asked for."""
    from yapctl.gpubench import results, runsetup
    from yapctl.gpubench import serve as servephase

    posted: list[tuple[int, bool]] = []
    started: list[int] = []
    levels: list[int] = []  # each pass's levels, each begun with its own prompts (a salt under --fresh-prompts)

    class Prompts:
        def __init__(self, s: Setup) -> None:
            pass

        def all(self, levels: Any, rounds: int) -> None:
            pass

        def turn(self, i: int) -> tuple[list[int], list[int]]:
            return [1, 2, 3], [4, 5]

        def chat_text(self, i: int) -> str:
            return "a b c"

        def level(self, s: Setup, c: int) -> None:
            levels.append(c)

    async def post_stream(body: dict[str, Any], port: int = runsetup.SERVE_PORT, until: Any = None) -> Any:
        posted.append((port, isinstance(body["prompt"], str)))
        return 1.0, [0.5], 2.0

    async def healthy(proc: Any, port: int, log: Path) -> None:
        started.append(port)

    monkeypatch.setattr(servephase, "TurnPrompts", Prompts)
    envs: list[dict[str, str]] = []
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_CACHE_PATH", str(tmp_path / "set"))  # one set already: yapd's start keeps it too

    def serve(kw: dict[str, Any], port: int, log: Path, env: Any) -> object:
        envs.append(env)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:  # as vLLM's scheduler says it at each start
            f.write(f"INFO [scheduler.py:252] Chunked prefill is enabled with max_num_batched_tokens={port}.\n")
        return object()

    monkeypatch.setattr(servephase, "_serve", serve)
    monkeypatch.setattr(servephase, "_wait_healthy", healthy)
    monkeypatch.setattr(servephase, "_post_stream", post_stream)
    monkeypatch.setattr(servephase, "stop", lambda proc: None)
    (tmp_path / "models" / "nemo-12b").mkdir(parents=True)
    (tmp_path / "models" / "hammer-3b").mkdir()
    setup = Setup(tmp_path / "models", tmp_path / "work", levels=(1, 2), rounds=1, serve_passes=passes)
    res = results.Results(tmp_path / "r.json")
    await servephase.phase_serve(res, setup)
    serve = res.data["serve"]
    tool = "tool" in passes
    assert started == [runsetup.SERVE_PORT, runsetup.SERVE_PORT + 1][:1 + tool]
    # both servers on yapd's caches: FlashInfer's JIT modules and Triton's kernels too
    cache = tmp_path / "work" / "cache"
    for env in envs:
        assert env["FLASHINFER_WORKSPACE_BASE"] == str(cache / "flashinfer")
        assert env["TRITON_CACHE_DIR"] == str(cache / "triton")
        assert env["VLLM_CACHE_ROOT"] == str(cache / "vllm")
        assert env["CUDA_CACHE_PATH"] == str(tmp_path / "set")
    chat_passes = [x for x in passes if x != "tool"]
    assert levels == [c for c in (1, 2) for _ in chat_passes] + [1, 2] * tool, levels
    # each server's budget from its own log, this start's line only
    assert serve["step_budgets"] == [runsetup.SERVE_PORT]
    assert serve.get("tool_step_budgets") == ([runsetup.SERVE_PORT + 1] if tool else None)
    for c in (1, 2):
        assert ("ttft_ms" in serve[f"c{c}"]) == ("text" in passes)
        assert ("token_ids" in serve[f"c{c}"]) == ("ids" in passes)
        assert (f"c{c}_with_tool" in serve) == tool
    chat = [as_text for port, as_text in posted if port == runsetup.SERVE_PORT]
    turns = sum(c + runsetup.turns_for(c, 1) for c in (1, 2))  # warm-up turns and timed ones
    assert chat.count(True) == turns * ("text" in passes)
    assert chat.count(False) == turns * ("ids" in passes) + turns * tool  # beside the tool: token ids
    assert len(posted) - len(chat) == turns * tool


class _Out:
    """What AsyncLLM.generate yields, as far as the raw turns read it."""

    def __init__(self, text: str, metrics: Any = None, cached: int | None = None) -> None:
        self.outputs = [type("Completion", (), {"text": text, "token_ids": [1]})()]
        self.metrics = metrics
        self.num_cached_tokens = cached


class _Engine:
    """An AsyncLLM stand-in: ``texts`` one output each, a loop round apart; notes each
    request's prompt and whether its stream was closed before its end (the abort). With
    ``stats``, its outputs carry request stats as vLLM's do with them on; ``cached``, the
    prompt tokens found in its prefix cache (vLLM's always say)."""

    def __init__(self, texts: list[str], stats: bool = False, cached: int | None = None, step_s: float = 0.001) -> None:
        self.texts = texts
        self.stats = stats
        self.cached = cached
        self.step_s = step_s
        self.prompts: list[list[int]] = []
        self.closed_early = 0

    async def generate(self, prompt: Any, sp: Any, request_id: str) -> Any:
        from types import SimpleNamespace

        self.prompts.append(list(prompt["prompt_token_ids"]))
        queued = time.monotonic()
        metrics = SimpleNamespace(queued_ts=queued, scheduled_ts=0.0, first_token_ts=0.0) if self.stats else None
        sent = 0
        try:
            for text in self.texts:
                await asyncio.sleep(self.step_s)
                if metrics is not None and not metrics.first_token_ts:
                    metrics.scheduled_ts, metrics.first_token_ts = queued + 0.0005, time.monotonic()
                sent += 1
                yield _Out(text, metrics, self.cached)
        finally:
            if sent < len(self.texts):
                self.closed_early += 1


class _FailingOn(_Engine):
    """A stand-in whose requests for a prompt ending in ``fail_on`` fail."""

    def __init__(self, texts: list[str], fail_on: int, **kwargs: Any) -> None:
        super().__init__(texts, **kwargs)
        self.fail_on = fail_on

    async def generate(self, prompt: Any, sp: Any, request_id: str) -> Any:
        if prompt["prompt_token_ids"][-1] == self.fail_on:
            raise ValueError("the engine refused the request")
        async for out in super().generate(prompt, sp, request_id):
            yield out


def tool_stand_in(texts: list[str], step_s: float = 0.001, fail_on: int = -1) -> tuple[_Engine, None]:
    """yapctl.toolfront's factory for a stand-in tool engine (request stats on, nothing cached)."""
    return _FailingOn(texts, fail_on, stats=True, cached=0, step_s=step_s), None


def tool_with_a_core(texts: list[str], step_s: float) -> tuple[Any, None]:
    """A stand-in tool engine with a process of its own, as vLLM's EngineCore is: forked, so
    it holds the front end's end of the pipe too; found where yapd looks for a core's pid."""
    from types import SimpleNamespace

    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    engine: Any = _Engine(texts, step_s=step_s)
    engine.engine_core = SimpleNamespace(resources=SimpleNamespace(
        engine_manager=SimpleNamespace(processes=[SimpleNamespace(pid=pid)])))
    return engine, None


def failing_tool(texts: list[str]) -> tuple[_Engine, None]:
    raise ValueError("no such model")


async def test_a_tool_front_end_of_its_own_decides_turns_in_its_process():
    """gpubench's rawsplit phase: raw's tool engine in a spawned process of its own deciding
    the turns raw sends it, side by side, on the turn's clock (the host's one monotonic
    clock), with its stamps; raw's turn and processes as with the tool in-process; a
    factory that fails is a clear error at the start; the child ends at the shutdown."""
    from yapctl.gpubench.raw import RawEngines, raw_level
    from yapctl.toolfront import RemoteTool

    tool = RemoteTool.start("tests.test_gpuenv:tool_stand_in", [["[]\n\n", "never read"], 0.5, 13], ["get_weather"])
    try:
        assert tool.pid != os.getpid()
        t0, t0_monotonic = time.perf_counter(), time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(tool.decide([20, i], t0, t0_monotonic) for i in range(4))),
                                         30)
        for first, done, first_turn, stamps in results:
            assert first is not None and first_turn is not None and 0 <= first <= done and first <= first_turn
            assert stamps["cached_tokens"] == 0 and 0 <= stamps["queued_ms"] <= stamps["first_token_ms"] <= first_turn
        # Side by side in the child: each first output a 0.5 s step after the turn began, not one
        # after another (the last at 2 s).
        assert max(r[2] for r in results if r[2] is not None) < 1000, results
        # A request the engine refuses fails its own turn only.
        with pytest.raises(RuntimeError, match="the tool's front end: ValueError: the engine refused the request"):
            await asyncio.wait_for(tool.decide([20, 13], t0, t0_monotonic), 30)
        raw = RawEngines(_Engine(["Hel", "lo"], cached=16), tool, lambda i: ([10, i], [20, i]), ["get_weather"],
                         "chats_then_tools", None, None)
        level = raw_level([await raw.turn(1), await raw.turn(2)])
        assert level["turns"] == 2 and level["tool_ms"]["p50"] is not None and level["ttft_gated_ms"]["p50"] is not None
        assert level["tool_queued_ms"]["p50"] is not None  # the child's stamps reached the turn
        # one gap a turn, the turns one after the other: none beside another's start
        assert level["itl_starts"]["beside_pct"] == 0.0 and level["itl_starts"]["apart_p99"] is not None, level
        assert raw.processes() == {"front": os.getpid(), "tool_front": tool.pid}  # stand-ins: no EngineCores
    finally:
        tool.shutdown()
    assert not tool._proc.is_alive() and tool._proc.exitcode == 0
    with pytest.raises(RuntimeError, match="did not start: ValueError: no such model"):
        RemoteTool.start("tests.test_gpuenv:failing_tool", [[]], ["get_weather"])


@pytest.mark.parametrize("factory", ["tool_stand_in", "tool_with_a_core"])
async def test_turns_waiting_on_a_tool_front_end_that_dies_fail_at_once(factory: str):
    """The child killed with a turn waiting: that turn fails, and every later one at once.
    With a core process of its own holding the pipe open (vLLM's EngineCore, forked from
    the front end) its end is seen all the same, and that core goes with it."""
    from yapctl.toolfront import RemoteTool

    tool = RemoteTool.start(f"tests.test_gpuenv:{factory}", [["[]\n\n"], 30.0], ["get_weather"])
    try:
        waiting = asyncio.ensure_future(tool.decide([20, 1], time.perf_counter(), time.monotonic()))
        await asyncio.sleep(0)  # sent
        os.kill(tool.pid, 9)
        with pytest.raises(RuntimeError, match="front end is gone"):
            await asyncio.wait_for(waiting, 30)
        with pytest.raises(RuntimeError, match="front end is gone"):
            await asyncio.wait_for(tool.decide([20, 2], time.perf_counter(), time.monotonic()), 5)
        if tool.core_pid is not None:
            from yapd.engines.vllm import wait_gone

            assert wait_gone(tool.core_pid, 10), "the core outlived its front end"
    finally:
        tool.shutdown()
        if tool.core_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(tool.core_pid, 9)


def test_the_table_has_a_row_for_raw_with_the_tools_front_end_apart():
    data = {"date": "2026-12-05", "machine": "H200", "vllm": "0.26.0",
            "raw": {"c16": {"ttft_ms": {"p50": 70.0, "p95": 85.0}}},
            "raw_split": {"c16": {"ttft_gated_ms": {"p50": 64.5, "p95": 80.25}, "ttft_ms": {"p50": 63.0, "p95": 79.0},
                                  "tool_ms": {"p50": 40.0, "p95": 55.0}, "itl_ms": {"p50": 6.0, "p99": 12.5},
                                  "cpu_ms_per_turn": {"front": 12.5, "tool_front": 3.25, "chat": 600.0}}}}
    rows = [line for line in markdown(data).splitlines() if line.startswith("| 16 | raw with the tool")]
    assert rows == ["| 16 | raw with the tool's front end in a process of its own: TTFT held for the decision "
                    "p50 / p95 ms; TTFT; tool decision (sent -> answer read); ITL p50 / p99; CPU ms per turn: front "
                    "end / tool's front end / chat EngineCore / tool EngineCore | - | 64.5 / 80.25; 63 / 79; 40 / 55; "
                    "6 / 12.5; 12.5 / 3.25 / 600 / - | - |"]


async def test_a_raw_turn_counts_the_first_text_the_first_token_and_the_tools_first_output_on_both_clocks():
    """A first token that is only part of a character has no text: TTFT waits for the
    next one, the per-token figure does not; the tool's request is read until its
    decision settles and then closed, and its first output is timed on its own clock and
    on the turn's (the one yapd's figures use)."""
    from yapctl.gpubench.raw import RawEngines, raw_level

    chat = _Engine(["", "Hel", "lo", " there"], stats=True, cached=16)
    tool = _Engine(["[]\n\n", "never read"], cached=0)
    raw = RawEngines(chat, tool, lambda i: ([10, i], [20, i]), ["get_weather"], "chats_then_tools", None, None)
    turn = await raw.turn(3)
    assert chat.prompts == [[10, 3]] and tool.prompts == [[20, 3]]
    assert tool.closed_early == 1 and chat.closed_early == 0
    assert turn.first_token is not None and turn.ttft is not None and turn.ttft > turn.first_token
    assert len(turn.gaps) == 2 and len(turn.token_gaps) == 3
    assert turn.tool_first is not None and turn.tool_first_turn is not None
    assert turn.tool_first_turn >= turn.tool_first and turn.tool_done >= turn.tool_first
    # The chat engine keeps request stats, the tool's does not: only the chat's stamps,
    # on the turn's clock, the first token's before the turn had it; both say what their
    # prefix caches held.
    queued, scheduled, first = (turn.stamps["chat"][f"{name}_ms"] for name in ("queued", "scheduled", "first_token"))
    assert 0 <= queued <= scheduled <= first <= turn.first_token + 0.01 and turn.stamps["tool"] == {"cached_tokens": 0}
    assert turn.stamps["chat"]["cached_tokens"] == 16
    assert raw.processes() == {"front": os.getpid()}  # stand-ins: no EngineCore processes
    level = raw_level([turn, await raw.turn(4)])
    assert level["turns"] == 2 and level["ttft_ms"]["p50"] is not None
    assert level["tool_first_turn_ms"]["p50"] >= level["tool_first_output_ms"]["p50"]
    assert set(level["itl_ms"]) == {"p50", "p99"}
    assert level["chat_queued_ms"]["p50"] <= level["chat_first_token_ms"]["p50"] and "tool_queued_ms" not in level
    assert level["chat_cached_tokens"]["p50"] == 16 and level["tool_cached_tokens"]["p50"] == 0
    # Each first token's way from its core's stamp to this loop: only where stamps are kept.
    assert -0.01 <= level["chat_core_to_front_ms"]["p50"] <= level["ttft_token_ms"]["p50"]
    assert level["tool_core_to_front_ms"] == {"p50": None, "p95": None}
    # Two turns one after the other: each first token from its own step.
    assert level["chat_first_tokens_per_step"] == 1.0 and "tool_first_tokens_per_step" not in level
    # ... their steps timed from their bursts' first starts (one burst or two), the tool's none.
    chat = level["chat_burst_steps"]
    assert chat["bursts"] in (1, 2) and chat["steps"]["max"] == 3 - chat["bursts"], chat
    assert 0 < chat["first_ms"] <= chat["last_ms"]["p50"] and "tool_burst_steps" not in level, level


async def test_a_raw_tool_first_output_keeps_its_own_clock_beside_its_cores_stamp():
    """With the tool engine's request stats on, the level has both the tool's first output
    on its own request's clock and its core's first-token stamp on the turn's clock (one
    name once held both, the stamp overwriting the other)."""
    from yapctl.gpubench.raw import RawEngines, raw_level

    chat = _Engine(["Hel", "lo"], stats=True, cached=16)
    tool = _Engine(["[]\n\n", "never read"], stats=True, cached=0)
    raw = RawEngines(chat, tool, lambda i: ([10, i], [20, i]), ["get_weather"], "chats_then_tools", None, None)
    level = raw_level([await raw.turn(1), await raw.turn(2)])
    own, stamp, turn = (level[k]["p50"] for k in ("tool_first_output_ms", "tool_first_token_ms", "tool_first_turn_ms"))
    assert own is not None and stamp is not None and own <= turn and stamp <= turn + 0.01, level
    assert -0.01 <= level["tool_core_to_front_ms"]["p50"] <= turn, level


async def test_the_yapd_phase_refuses_engines_that_backend_auto_left_on_the_cpu(make_yapd, tmp_path):
    """The bench runs yapd on backend = "auto", a user's default: engines that did not take
    vLLM (a GPU host where auto went wrong) stop its yapd phase instead of timing a CPU
    engine; backends the run names itself (the CPU tests' "cpu") are as asked."""
    from yapctl.gpubench.runsetup import Setup
    from yapctl.gpubench.yapdphase import backends_as_asked

    d = make_yapd("")
    assert Setup(tmp_path, tmp_path / "w").config().chat.backend == "auto"
    with pytest.raises(RuntimeError, match=re.escape("backend auto did not take vLLM: {'chat': 'cpu', 'tool': 'cpu'}")):
        await backends_as_asked(d.admin_socket, Setup(tmp_path, tmp_path / "w"))
    cpu = Setup(tmp_path, tmp_path / "w", sets=('chat.backend="cpu"', 'tool.backend="cpu"'))
    assert await backends_as_asked(d.admin_socket, cpu) == {"chat": "cpu", "tool": "cpu"}


async def test_a_paired_level_runs_a_raw_round_before_each_yapd_round_with_the_same_turns(make_yapd):
    """The pair phase's level on a real yapd (CPU engines) and stand-in raw turns: raw's
    warm-up round, then before each of yapd's rounds raw's round of the same turn
    numbers; every turn of a level has its own number (its own prompt)."""
    from tests.conftest import KEY
    from yapctl.gpubench.pair import paired_level
    from yapctl.gpubench.raw import RawTurn
    from yapctl.gpubench.runsetup import turns_for
    from yapctl.gpubench.yapdphase import yapd_processes

    d = make_yapd("[turn]\nconcurrent = true\nignore_eos = true\nchat_max_out = 4\n")
    # The processes whose CPU time a level counts: yapd's (its CPU engines run inside it).
    assert await yapd_processes(d.admin_socket) == {"front": d.pid}
    raw_at: dict[int, float] = {}

    async def raw_turn(i: int) -> RawTurn:
        raw_at.setdefault(i, time.perf_counter())
        await asyncio.sleep(0)
        return RawTurn(5.0, 2.0, 3.0, [1.0], 4.0, 2.5, text_at=[0.0, 0.001])

    c, rounds = 2, 2
    sent: dict[str, float] = {}
    out = await paired_level(d.url(key=None), raw_turn, c, rounds, key=KEY, sent=sent)
    n = turns_for(c, rounds)
    # (turn number, sent at) of yapd's timed turns; request ids end in "-<number>"
    yapd_turns = [(int(rid.rsplit("-", 1)[1]), at) for rid, at in sent.items() if not rid.endswith("--1")]
    assert len(yapd_turns) == n
    assert out["raw"]["turns"] == n and out["yapd"]["completed"] == n
    assert sorted(raw_at) == [-1, *range(n)]
    assert out["raw"]["tool_first_turn_ms"]["p50"] == 2.5
    for i in range(n // c):
        yapd_round = [t for t in yapd_turns if t[0] // c == i]
        assert sorted(t[0] for t in yapd_round) == [i * c + w for w in range(c)]
        # raw's round i ran after yapd's round i - 1 was sent and before yapd's round i was
        assert all(raw_at[i * c + w] < min(t[1] for t in yapd_round) for w in range(c))
        if i:
            assert all(raw_at[i * c + w] > max(t[1] for t in yapd_turns if t[0] // c == i - 1)
                       for w in range(c))


def test_pair_fractions_must_leave_room_for_two_of_each(tmp_path, capsys):
    for bad in ("0.5,0.2", "0.4", "x,0.1", "0,0.1"):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--pair-fractions", bad])
        assert "--pair-fractions" in capsys.readouterr().err


def test_the_pair_table_sets_yapd_beside_raw_level_by_level():
    from yapctl.gpubench.report import (
        BURST_HEAD,
        CPU_HEAD,
        FAULT_HEAD,
        RUNQ_HEAD,
        SPLIT_HEAD,
        WAY_OUT_HEAD,
        pair_table,
    )

    level = {"yapd": {"ttft_ms": {"p50": 21.0, "p95": 24.0}, "tool_ms": {"p50": 18.0, "p95": 23.0},
                      "server_engine_ttft_ms": {"p50": 19.0}, "server_tool_first_ms": {"p50": 17.5},
                      "itl_ms": {"p99": 11.5}},
             "raw": {"ttft_ms": {"p50": 17.0, "p95": 23.0}, "ttft_gated_ms": {"p50": 17.5, "p95": 23.0},
                     "tool_first_turn_ms": {"p50": 13.0, "p95": 18.0}, "itl_ms": {"p99": 11.4}}}
    lines = pair_table({"gpu_memory_utilization": {"chat": 0.38, "tool": 0.09}, "c8": level, "c1": level})
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 8 ")]
    assert [r[:4] for r in rows] == ["| 1 ", "| 8 "]
    assert rows[0] == ("| 1 | 21 / 24 | 17 / 23 | 17.5 / 23 | 18 / 23; 13 / 18 | 19.0 / 17.5 | 11.5 / 11.4 |")
    assert "chat 0.38, tool 0.09" in "\n".join(lines)
    assert not any("What each engine said" in line for line in lines)
    level["yapd"].update(server_tool_queued_ms={"p50": 0.4}, server_tool_first_tokens_per_step=2.5)
    level["raw"].update(tool_queued_ms={"p50": 0.2}, tool_scheduled_ms={"p50": 0.3}, tool_first_token_ms={"p50": 9.0},
                        tool_cached_tokens={"p50": 448})
    lines = pair_table({"c1": level})
    assert "| 1 | tool | 0.4 / - / -; -; 2.5 | 0.2 / 0.3 / 9; 448; - |" in lines, lines
    assert not any("| chat |" in x for x in lines)
    assert not any(BURST_HEAD in x for x in lines)
    level["yapd"]["server_tool_burst_steps"] = {"bursts": 12, "steps": {"p50": 4, "max": 6}, "first_ms": 14.5,
                                                "last_ms": {"p50": 52.25, "p95": 80.0},
                                                "between_ms": {"p50": 11.0, "p95": 19.5}}
    lines = pair_table({"c1": level})
    assert f"| 1 | {BURST_HEAD} | chat: - -- tool: 4 (6); 14.5, 52.25 / 80; 11 / 19.5 | - |" in lines, lines
    del level["yapd"]["server_tool_burst_steps"]
    level["yapd"]["cpu_ms_per_turn"] = {"front": 1.5, "chat": 12.25, "tool": 8.0}
    level["raw"]["cpu_ms_per_turn"] = {"front": 2.0}
    lines = pair_table({"c1": level})
    assert f"| 1 | {CPU_HEAD} | 1.5 / 12.25 / 8 | 2 / - / - |" in lines
    level["yapd"]["cpu_ms_per_turn"]["tool_front"] = 0.75  # the tool engine in a host of its own
    hosted = pair_table({"c1": level})
    assert f"| 1 | {CPU_HEAD} | 1.5 / 12.25 / 8 (engine hosts: tool_front 0.75) | 2 / - / - |" in hosted, hosted
    del level["yapd"]["cpu_ms_per_turn"]["tool_front"]
    assert not any(RUNQ_HEAD in x for x in lines)
    level["yapd"]["proc_per_turn"] = {"front": {"runq_ms": 0.25}, "chat": {"runq_ms": 1.5}, "tool": {}}
    level["yapd"]["host_cpu"] = {"cpus": 16, "busy_pct": 21.5, "steal_pct": 3.25}
    lines = pair_table({"c1": level})
    assert f"| 1 | {RUNQ_HEAD} | 0.25 / 1.5 / -; 21.5 / 3.25 | - |" in lines, lines
    assert not any(FAULT_HEAD in x for x in lines)
    level["yapd"]["proc_per_turn"] = {"front": {"minflt": 84.5, "threads_minflt": {"python3": 80.0}},
                                      "chat": {"minflt": 7.1, "threads_minflt": {}},
                                      "tool": {"minflt": 233.4, "threads_minflt": {"VLLM::EngineCor": 220.5,
                                                                                   "ZMQbg/IO/0": 12.5}}}
    level["raw"]["proc_per_turn"] = {"tool": {"minflt": 1.2, "threads_minflt": {}}}
    lines = pair_table({"c1": level})
    assert (f"| 1 | {FAULT_HEAD} | 84.5 / 7.1 / 233.4; VLLM::EngineCor 220.5, ZMQbg/IO/0 12.5 | "
            "- / - / 1.2; - |") in lines, lines
    level["raw"]["chat_core_to_front_ms"] = {"p50": None, "p95": None}  # raw without request stats
    assert not any(WAY_OUT_HEAD in x for x in pair_table({"c1": level}))
    level["yapd"].update(server_chat_core_to_front_ms={"p50": 2.25, "p95": 3.5},
                         server_tool_core_to_front_ms={"p50": 1.5, "p95": 2.0})
    level["raw"]["chat_core_to_front_ms"] = {"p50": 1.75, "p95": None}
    lines = pair_table({"c1": level})
    assert f"| 1 | {WAY_OUT_HEAD} | 2.25, 3.5 / 1.5, 2 | 1.75 / - |" in lines, lines
    assert not any(SPLIT_HEAD in x for x in lines)
    level["yapd"].update(server_chat_core_to_taken_ms={"p50": 1.5, "p95": 2.5},
                         server_chat_taken_to_front_ms={"p50": 0.75, "p95": 1.0})
    assert f"| 1 | {SPLIT_HEAD} | 1.5 + 0.75 / - + - | - |" in pair_table({"c1": level})
    assert pair_table({}) == []


def setups_seen_by_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Setup], list[str]]:
    """The raw phase stood in by one that keeps the Setup each run hands it; with the
    arguments of a run of that phase alone into tmp_path (file ``t``)."""
    from yapctl.gpubench import cli

    seen: list[Setup] = []

    async def probe(res: Any, setup: Setup) -> None:
        seen.append(setup)

    monkeypatch.setitem(cli.PHASES, "raw", probe)
    return seen, [str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--name", "t",
                  "--phases", "raw"]


def test_probe_options_reach_the_phases_and_raws_start_method_is_recorded(tmp_path, monkeypatch):
    """--raw-start-method, --pyspy-level, --pyspy-native and --skip-restart reach the phases; raw's start
    method is one the phases of one file must share (fork against spawn is two files)."""
    seen, base = setups_seen_by_raw(tmp_path, monkeypatch)
    assert main([*base, "--raw-start-method", "fork", "--pyspy-level", "1", "--pyspy-native", "--skip-restart"]) == 0
    assert (seen[0].raw_start_method, seen[0].pyspy_level, seen[0].pyspy_native, seen[0].skip_restart) == \
        ("fork", 1, True, True)
    assert json.loads((tmp_path / "t.json").read_text())["setup"]["raw_start_method"] == "fork"
    assert main(base) == 2  # spawn (the default) into a file of fork's
    assert main([*base, "--name", "u"]) == 0
    assert (seen[1].raw_start_method, seen[1].pyspy_level, seen[1].pyspy_native, seen[1].skip_restart) == \
        ("spawn", 0, False, False)


def test_set_reaches_yapds_config_and_the_engines_settings_and_is_recorded(tmp_path, monkeypatch, capsys):
    from yapd.engines.vllm import engine_kwargs

    seen, base = setups_seen_by_raw(tmp_path, monkeypatch)
    assert main([*base, "--set", "tool.extra_engine_args={disable_log_stats=false}"]) == 0
    cfg = seen[0].config()
    assert engine_kwargs("tool", cfg, cfg.tool.model, (9, 0))["disable_log_stats"] is False
    assert engine_kwargs("chat", cfg, cfg.chat.model, (9, 0))["disable_log_stats"] is True
    assert "[tool]" in seen[0].config_text() and "disable_log_stats=false" in seen[0].config_text()
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["setup"]["set"] == ["tool.extra_engine_args={disable_log_stats=false}"]
    assert "yapd config `tool.extra_engine_args={disable_log_stats=false}`" in (tmp_path / "t.md").read_text()
    for bad in ("turn.temperature=9", "nodot=1"):
        with pytest.raises(SystemExit):
            main([*base, "--name", "u", "--set", bad])
        assert "--set" in capsys.readouterr().err


def test_cpu_meter_counts_a_process_cpu_time_and_faults_per_turn():
    """/proc's CPU time, page faults and busiest threads of a real process (this one) over
    a stretch of work, per turn; nothing for a process that is gone."""
    from yapctl.gpubench.measure import CpuMeter, proc_figures
    from yapd.procfs import counters

    def cpu_seconds(pid: int) -> float | None:
        c = counters(pid)
        return c.cpu_s if c is not None else None

    me, gone = os.getpid(), subprocess.Popen(["true"])
    gone.wait()
    assert counters(gone.pid) is None
    meter = CpuMeter({"me": me, "gone": gone.pid})
    start = cpu_seconds(me)
    assert start is not None
    pages = 8192

    touched, done = threading.Event(), threading.Event()

    def touch() -> None:  # in a thread of its own name: /proc counts each thread's faults
        ctypes.CDLL(None).prctl(15, b"toucher", 0, 0, 0)  # PR_SET_NAME
        fresh = bytearray(pages * 4096)  # mapped, not yet touched: each page faults once when written
        fresh[::4096] = b"x" * pages
        touched.set()
        done.wait(30)  # alive while /proc is read: an ended thread's faults are no thread's

    toucher = threading.Thread(target=touch)
    toucher.start()
    assert touched.wait(30)
    # Burn 100 ms of this thread's own CPU, not the process's: the toucher's page faults
    # count towards the process, and a slow host once left this thread 70 ms of 100 (CI).
    burnt = time.thread_time()
    while time.thread_time() - burnt < 0.1 or (cpu_seconds(me) or 0) - start < 0.1:
        sum(range(10_000))
    try:
        figures = proc_figures(meter, 2)
    finally:
        done.set()
        toucher.join()
    used = figures["cpu_ms_per_turn"]
    assert set(used) == {"me"} and 50 <= used["me"] < 500, used
    mine = figures["proc_per_turn"]["me"]
    assert mine["cpu_ms"] == used["me"] and mine["minflt"] >= pages / 2 / 2, mine
    assert mine["threads_ms"] and sum(mine["threads_ms"].values()) >= 40, mine  # this thread did the work
    assert mine["vcsw"] >= 0 and mine["ivcsw"] >= 0 and mine["majflt"] >= 0
    assert mine["runq_ms"] >= 0 and mine["migrations"] >= 0, mine
    assert set(mine["threads_runq_ms"]) == set(mine["threads_ms"]), mine
    # Which thread took them, per turn (pages / 2 turns, less what was touched before)
    assert next(iter(mine["threads_minflt"])) == "toucher" and mine["threads_minflt"]["toucher"] >= pages / 2 / 2, mine
    assert mine["rss_mb"] >= pages * 4096 / 2**20, mine  # the touched pages are resident (kept alive)
    host = figures["host_cpu"]
    assert host["cpus"] >= 1 and 0 < host["busy_pct"] <= 100 and 0 <= host["steal_pct"] <= 100, host


def test_a_phase_run_again_drops_the_error_an_earlier_call_left(tmp_path, monkeypatch):
    """A call cut short leaves its phase's error in the file; the call that runs the phase
    again must not carry it beside its own figures (run u-fork's file did, 2026-12-03)."""
    from yapctl.gpubench import cli

    async def failing(res, setup):
        raise RuntimeError("yapd exited 1")

    async def working(res, setup):
        res.put("raw", "c1", {"turns": 1})

    base = [str(tmp_path / "models"), "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--name", "t",
            "--phases", "raw"]
    monkeypatch.setitem(cli.PHASES, "raw", failing)
    assert main(base) == 0
    assert json.loads((tmp_path / "t.json").read_text())["raw"]["error"] == "RuntimeError: yapd exited 1"
    monkeypatch.setitem(cli.PHASES, "raw", working)
    assert main(base) == 0
    raw = json.loads((tmp_path / "t.json").read_text())["raw"]
    assert raw["c1"] == {"turns": 1} and "error" not in raw


def test_a_killed_bench_takes_the_yapd_it_started_with_it(tmp_path, cache_dir):
    """A device call's time limit ends the bench mid-phase. The yapd it started lived on,
    holding the port and the GPU, and the next call's yapd could not bind (2026-12-03):
    now the kernel sends it SIGTERM when the bench dies, even by SIGKILL, and it stops as
    on any SIGTERM."""
    import select
    import signal

    cfg, log = tmp_path / "yapd.toml", tmp_path / "yapd.log"
    cfg.write_text('demo = true\n[server]\nhost = "127.0.0.1"\nport = 0\napi_keys = ["k"]\n')
    bench = ("import sys, time; from pathlib import Path; from yapctl.gpubench.servers import start_yapd; "
             "proc, _ = start_yapd(Path(sys.argv[1]), Path(sys.argv[2])); print(proc.pid, flush=True); "
             "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", bench, str(cfg), str(log)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "YAP_CACHE_DIR": str(cache_dir)})
    try:
        assert proc.stdout is not None
        yapd = os.pidfd_open(int(proc.stdout.readline()))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        assert select.select([yapd], [], [], 30)[0], "yapd outlived the bench"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the process itself, even if its pid is reused
            signal.pidfd_send_signal(yapd, signal.SIGKILL)
        os.close(yapd)
    assert "SIGTERM received" in log.read_text() and "yapd.daemon: stopped" in log.read_text()


def test_report_shows_a_serve_run_of_its_tool_pass_alone() -> None:
    # `--serve-passes tool` leaves only "cN_with_tool" levels; run al's table came out empty.
    lvl = {"ttft_ms": {"p50": 80.0, "p95": 122.31}, "ttft_gated_ms": {"p50": 80.5, "p95": 123.0},
           "tool_ms": {"p50": 48.6, "p95": 93.79}}
    lines = markdown({"date": "2026-12-06", "machine": "H100", "setup": {},
                      "serve": {"c16_with_tool": lvl}}).splitlines()
    assert "| 16 | TTFT held for the tool decision (toolcall before tokens) p50 / p95 ms | - / - | - / - | " \
           "80.5 / 123 (with tool server) |" in lines
    assert "| 16 | TTFT, vllm serve beside a tool server, chat alone counted, p50 / p95 ms | - | - | 80 / 122.31 |" \
        in lines
