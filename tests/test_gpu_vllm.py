"""The protocol's core cases against the vLLM backend (run on the GPU device).

Skipped without CUDA and vllm. Uses the kit's tiny-qwen2 checkpoint (real safetensors
loading, random weights) as both chat and tool model: YAPD_GPU_MODEL points at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EngineCores, Yapd, recv, run_turn, send, until_done, ws_connect
from tests.decoding import texts
from tests.test_cli import yapctl
from tests.test_protocol_e2e import check_turn
from yapctl.bench import per_step
from yapd.daemon import CACHE_VARS
from yapd.engines.memplan import PLAN_FILE
from yapd.engines.samplerjit import built
from yapd.engines.vllm import starting_cores
from yapd.mps import MPS_CONTROL, PIPE_ENV, PRIORITY_ENV, renumbered_devices
from yapd.procfs import children, counters


def _cuda() -> bool:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


# Cold starts compile for minutes: far beyond the suite's per-test default.
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1200), pytest.mark.skipif(not _cuda(), reason="needs CUDA and vllm")]
MODEL = os.environ.get("YAPD_GPU_MODEL", "/tmp/models/tiny-qwen2")


@pytest.fixture(scope="module")
def gpu_yapd(tmp_path_factory):
    cache = Path(os.environ.get("YAPD_GPU_CACHE", str(tmp_path_factory.mktemp("gpucache"))))
    d = Yapd(tmp_path_factory.mktemp("gpu"), cache, demo=False, config=f"""
[engines]
deploy = "both"
# Not the default ("equal" sets nothing): the chat engine below normal under MPS, checked below.
mps_priority = "tool"
# Named, not left to the default: the priority reaches only a forked EngineCore, and
# test_gpu_engine_cores_are_forked_and_hold_no_yapd_socket checks forked cores.
start_method = "fork"
# Not the default (0 sets nothing): each core's GIL switch interval, a forked core's by the
# at-fork hook, a spawned one's by yapd's vLLM plugin (checked below).
core_switch_interval_ms = 0.5
# Not the default either: a forked core's malloc keeps its heap (glibc), checked below.
core_steady_heap = true
[chat]
model = "{MODEL}"
backend = "vllm"
quantization = "none"
gpu_memory_utilization = 0.30
max_model_len = 4096
[tool]
model = "{MODEL}"
backend = "vllm"
gpu_memory_utilization = 0.20
max_model_len = 4096
# Not the default ("spawn"): forked as engines.start_method says, so the checks below of
# forked cores hold for both; test_gpu_a_spawned_tool_core_beside_a_forked_chat_core runs
# the default.
start_method = ""
# vLLM's request stats on for the tool engine only: its turns' done timings then say
# where its first output's time went, the chat's do not (checked below).
extra_engine_args = {{ disable_log_stats = false }}
[turn]
concurrent = true
""", server={"max_connections": 32},
             env={"VLLM_LOGGING_STREAM": "ext://sys.stderr"})  # the EngineCores' own lines in d.lines
    # Compile caches carried over stay warm, but the memory plans must be this start's own
    # (test_gpu_memory_plans_side_by_side_and_fallback): on a cache an earlier lease or
    # call filled, the file held plans of other tests' engines too.
    plans_file = cache / "vllm" / PLAN_FILE
    plans_file.unlink(missing_ok=True)
    # FlashInfer's workspace as the daemon's cache_env sets it (gputest.sh may name the
    # bench's): whether this start is the one that must build the sampler.
    var = "FLASHINFER_WORKSPACE_BASE"
    d.flashinfer = Path(os.environ.get(var) or cache / CACHE_VARS[var])  # type: ignore[attr-defined]
    d.sampler_was_built = built(d.flashinfer)  # type: ignore[attr-defined]
    d.start(timeout=600)
    d.first_plans = json.loads(plans_file.read_text())  # type: ignore[attr-defined]
    # Where the start's time went, in every run's log
    marks = (" took ", "engine started", "EngineCore forked", "EngineCore spawned", "FlashInfer's sampler")
    print("\n".join(x for x in d.lines if any(m in x for m in marks)), flush=True)
    yield d
    d.stop(60)


def _children(pid: int) -> list[tuple[int, str]]:
    return [(kid, cmdline.replace(b"\0", b" ").decode()) for kid, cmdline in children(pid).items()]


@pytest.mark.parametrize("when", ["fork", "spawn", "before-core"])
def test_gpu_stop_while_an_engine_loads_ends_its_start(tmp_path, when):
    """SIGTERM while a vLLM engine loads (its own compile cache: a long first load) stops
    the daemon in seconds, not at the load's end; it exits 0 and leaves no EngineCore.
    fork: at a forked core's first line; the core is ended. spawn: as soon as a spawned
    core exists, while it still imports torch and vLLM, untitled; the core is ended.
    before-core: as vLLM's start begins in yapd's own thread (its config), before any
    core; the start ends (its model inspection ended, on this empty cache) and no core is
    started. First in the module,
    while the GPU is free (no MPS daemon of gpu_yapd's yet)."""
    d = Yapd(tmp_path / "d", tmp_path / "cache", demo=False, config=f"""
[engines]
deploy = "chat"
mps = "off"
start_method = "{"fork" if when == "fork" else "spawn"}"
[chat]
model = "{MODEL}"
backend = "vllm"
quantization = "none"
gpu_memory_utilization = 0.15
max_model_len = 2048
""", env={"VLLM_LOGGING_STREAM": "ext://sys.stderr"})  # vLLM's lines beside yapd's, timed, in d.lines
    started = time.perf_counter()
    d.start(wait=False)
    core = None
    # What it got to is printed as it goes (run with -s): a run cut short says where.
    try:
        if when == "fork":
            line = d.wait_for("(EngineCore", timeout=300)  # the first line vLLM prefixes with the core's pid
            core = int(re.search(r"\(EngineCore\S* pid=(\d+)\)", line).group(1))  # type: ignore[union-attr]
            print(f"EngineCore pid={core} began {time.perf_counter() - started:.1f} s after the start", flush=True)
            with EngineCores() as watched:
                watched.watch(core)
                rc, took = _stop_timed(d)
                watched.assert_gone()
        elif when == "spawn":
            d.wait_for("vLLM config took", timeout=300)
            core, title = _first_core(d)
            print(f"EngineCore pid={core} spawned {time.perf_counter() - started:.1f} s after the start: {title}",
                  flush=True)
            assert "spawn_main" in title, title  # not yet titled: still importing
            with EngineCores() as watched:
                watched.watch(core)
                rc, took = _stop_timed(d)
                watched.assert_gone()
            assert not any("(EngineCore" in x for x in d.lines), "the core was ended after its import"
        else:
            d.wait_for("starting vLLM engine role=chat", timeout=300)
            print(f"engine start began {time.perf_counter() - started:.1f} s after the start", flush=True)
            rc, took = _stop_timed(d)
            # After vLLM's config step, or at once if the stop ended its model inspection
            d.wait_for("stopped while starting: chat engine start abandoned", timeout=5)
            assert not any("ending their EngineCore" in x or "(EngineCore" in x for x in d.lines)
    except BaseException:
        print("\n".join(d.lines[-60:]), flush=True)  # here as it fails: a run cut short has no summary
        raise
    finally:
        d.stop()
    print("\n".join(x for x in d.lines if "took" in x or "stop" in x), flush=True)
    assert rc == 0 and took < 30, (rc, took)
    if core is not None:
        d.wait_for(f"stopping while engines load: ending their EngineCore pid={core}", timeout=5)


def _first_core(d: Yapd, timeout: float = 120) -> tuple[int, str]:
    """yapd's first EngineCore child and its command line, as soon as it exists (polled:
    nothing tells another process of a child's birth)."""
    assert d.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cores := starting_cores(d.proc.pid):
            pid = min(cores)
            return pid, dict(_children(d.proc.pid)).get(pid, "")
        time.sleep(0.02)
    raise AssertionError(f"no EngineCore {timeout} s after vLLM's config:\n" + "\n".join(d.lines[-40:]))


def _stop_timed(d: Yapd) -> tuple[int, float]:
    """SIGTERM, and yapd's exit code with the seconds it took (printed as it comes)."""
    proc = d.proc
    assert proc is not None
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("yapd still running 120 s after SIGTERM:\n" + "\n".join(d.lines[-40:])) from None
    took = time.perf_counter() - t0
    print(f"stop while loading: {took:.1f} s, rc {rc}", flush=True)
    return rc, took


async def test_gpu_turns_cancel_barge_in(gpu_yapd):
    st = json.loads(gpu_yapd.http("/status")[1])
    assert {e["backend"] for e in st["engines"].values()} == {"vllm"}
    # Each engine names its EngineCore: one of yapd's own child processes.
    cores = {p for p, _ in _children(gpu_yapd.proc.pid)}
    assert {st["engines"][role]["pid"] for role in ("chat", "tool")} <= cores, (st["engines"], cores)
    # Collection held off through the start (yapd/gcpause.py), on again once the engines
    # loaded, torch's and vLLM's objects frozen out of its walks.
    gcp = st["gc_pauses"]
    assert gcp["enabled"] is True and gcp["frozen"] > 300_000, gcp
    print(f"gc at ready: frozen {gcp['frozen']}, collections {gcp['collections']}, ms {gcp['ms']}")
    if shutil.which(MPS_CONTROL) and PIPE_ENV not in os.environ and not renumbered_devices(os.environ):
        # engines.mps = "auto": both engines run under yapd's own MPS daemon, the chat
        # engine's EngineCore below normal priority (mps_priority = "tool" above).
        assert st["mps"]["active"] is True and st["mps"]["daemon_pid"], st["mps"]
        assert st["engines"]["chat"]["child_env"] == {PRIORITY_ENV: "1"}, st["engines"]
        assert "child_env" not in st["engines"]["tool"]
        gpu_yapd.wait_for(f"EngineCore started with {PRIORITY_ENV}=1 role=chat", timeout=1)
        out = yapctl("status", sock=gpu_yapd.admin_socket).stdout
        assert "; chat engine at below-normal priority)" in out, out
        print(f"mps checked: daemon pid {st['mps']['daemon_pid']}, chat child_env {st['engines']['chat']['child_env']}")
    else:  # the run's log says the MPS checks were not made, and why
        print(f"mps not checked: {MPS_CONTROL} on PATH: {bool(shutil.which(MPS_CONTROL))}, "
              f"{PIPE_ENV} set: {PIPE_ENV in os.environ}, devices renumbered: {renumbered_devices(os.environ)}")
    async with ws_connect(gpu_yapd.url()) as ws:
        for i in range(3):
            msgs = await run_turn(ws, user_utterance=f"who was Columbus? {i}", history_text="User: hi\n" * 50)
            check_turn(msgs)
            timings = msgs[-1]["timings"]
            stamps = timings["engines"]["tool"]
            assert "queued_ms" not in timings["engines"]["chat"], timings  # its request stats are off
            if i:  # the persona, the history and the tool list came before: in the prefix caches
                assert all(timings["engines"][role]["cached_tokens"] > 0 for role in ("chat", "tool")), timings
            # The EngineCore's stamps (its own process, one monotonic clock): queued, then
            # scheduled, then the first token, which reached yapd after that.
            assert 0 <= stamps["queued_ms"] <= stamps["scheduled_ms"] <= stamps["first_token_ms"], stamps
            assert stamps["first_token_ms"] <= timings["tool_first_ms"] + 0.01, timings
            # ... taken from the core by the engine's output handler in yapd in between
            # (yapd.engines.receipts: its request stats on, so receipts are kept).
            assert stamps["first_token_ms"] <= stamps["taken_ms"] <= timings["tool_first_ms"] + 0.01, timings
            assert "taken_ms" not in timings["engines"]["chat"], timings
        print(f"tool engine stamps (ms from the turn's start): {stamps}, first output in yapd "
              f"{timings['tool_first_ms']}; chat prompt {msgs[-1]['usage']['prompt_tokens']} tokens, "
              f"{timings['engines']['chat']['cached_tokens']} of them cached")
        await send(ws, type="start", session_id="s", user_utterance="story", request_id="a")
        while (await recv(ws))["type"] != "token":
            pass
        t0 = time.perf_counter()
        await send(ws, type="cancel")
        msgs = await until_done(ws)
        assert msgs[-1]["cancelled"] is True and msgs[-1]["request_id"] == "a"
        print(f"cancel->done {1000 * (time.perf_counter() - t0):.2f} ms")
        await send(ws, type="start", session_id="s", user_utterance="one", request_id="b1")
        await recv(ws)
        await send(ws, type="start", session_id="s", user_utterance="two", request_id="b2")
        first = await until_done(ws)
        assert first[-1]["request_id"] == "b1"
        check_turn(await until_done(ws), "b2")
        await send(ws, type="warm_history", history_text="User: hello\n" * 100)
        assert (await recv(ws))["type"] == "warmed"


BACKEND_AUTO_THEN_FORK = """
import os, sys
from yapd import config
from yapd.engines import resolve_backend
cfg = config.load(None, env={})
assert cfg.chat.backend == "auto"
assert resolve_backend(cfg.chat, demo=False) == "vllm", "backend auto did not take vLLM on a GPU host"
pid = os.fork()  # as vLLM forks its EngineCore
if pid == 0:
    import torch
    try:
        torch.zeros(1, device="cuda")
        os._exit(0)
    except Exception as exc:
        print(exc, flush=True)
        os._exit(3)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_gpu_a_cold_start_builds_the_sampler_beside_its_engines(gpu_yapd):
    """Where no FlashInfer sampling module was built, the start built it in a process of its
    own as the engines loaded, and the cores' warm-ups used that build (none of their own
    JIT compile to wait for); a warm start leaves it be."""
    log = "\n".join(gpu_yapd.lines)
    assert built(gpu_yapd.flashinfer), "the cores sampled, so the module must be there"
    if gpu_yapd.sampler_was_built:
        assert "FlashInfer's sampler: not built" not in log, log[-3000:]
        return
    assert "building it beside the engines' start" in log, log[-3000:]
    m = re.search(r"FlashInfer's sampler: sampling built in ([\d.]+) s \(([\d.]+) s after its start\)", log)
    assert m, log[-3000:]
    print(f"sampler built beside the start in {m[1]} s ({m[2]} s after its start)")


def test_gpu_backend_auto_takes_vllm_and_leaves_a_forked_core_its_cuda():
    """The default config's backend = "auto" decides in yapd's own process, before any
    EngineCore is forked: asked of CUDA's runtime (torch.cuda.is_available), every forked
    core failed "Cannot re-initialize CUDA in forked subprocess". In a fresh process: this
    module's own is_available() has poisoned the pytest process's forks already."""
    out = subprocess.run([sys.executable, "-c", BACKEND_AUTO_THEN_FORK], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_sampling_params_are_one_per_role_and_model_and_copied_shallow():
    """What the engine hands vLLM for each request: one SamplingParams per spec, role and
    model (vLLM adds a model's EOS ids to it in place), which vLLM copies shallowly per
    request (skip_clone) instead of deep-copying."""
    from yapd.engines.base import SamplingSpec
    from yapd.engines.vllm import sampling_params

    spec = SamplingSpec(max_tokens=16, temperature=0.0, top_k=1)
    chat, tool = sampling_params(spec, "chat", "m"), sampling_params(spec, "tool", "m")
    assert chat is sampling_params(spec, "chat", "m") and chat is not tool
    assert sampling_params(spec, "chat", "another") is not chat
    assert chat.skip_clone is True
    copy = chat.clone()
    assert copy is not chat and copy.max_tokens == 16 and copy.output_kind == chat.output_kind


async def test_gpu_concurrent_sessions(gpu_yapd):
    async def one(i):
        async with ws_connect(gpu_yapd.url()) as ws:
            return await run_turn(ws, session_id=f"c{i}", user_utterance=f"hello {i}")

    results = await asyncio.gather(*(one(i) for i in range(12)))
    for msgs in results:
        check_turn(msgs)


async def test_gpu_a_burst_leaves_together(gpu_yapd):
    """turn.send_together (live): a burst's requests held to the end of the loop's pass
    reach vLLM and come back whole; a turn cancelled at once leaves no request running.
    Prints how many of the burst's tool first tokens an engine step made (the tool engine
    keeps vLLM's stats: one step stamps all its outputs alike)."""
    d = gpu_yapd
    before = d.config_path.read_text()
    sessions = 8
    try:
        d.config_path.write_text(before.replace("[turn]\n", "[turn]\nsend_together = true\n"))
        assert d.admin(cmd="reload")[-1]["applied"] == ["turn.send_together"]
        async with contextlib.AsyncExitStack() as stack:
            wss = [await stack.enter_async_context(ws_connect(d.url())) for _ in range(sessions)]
            for rnd in range(3):
                await asyncio.gather(*(send(ws, type="start", session_id=f"t{i}", request_id=f"r{rnd}",
                                            user_utterance=f"who was Columbus? {i}") for i, ws in enumerate(wss)))
                done = await asyncio.gather(*(until_done(ws) for ws in wss))
                for msgs in done:
                    check_turn(msgs, f"r{rnd}")
                # Each first token on one clock (the turn's start, its ack's "now"): one
                # engine step stamps its outputs alike.
                firsts = [m[0]["now"] * 1000 + m[-1]["timings"]["engines"]["tool"]["first_token_ms"] for m in done]
                print(f"round {rnd}: {sessions} turns sent together, tool first tokens per engine step "
                      f"{per_step(firsts)}")
            # Started and cancelled in one write: the cancel may come while the turn's
            # requests are still held.
            ws = wss[0]
            await ws.send(json.dumps({"type": "start", "session_id": "t0", "request_id": "gone",
                                      "user_utterance": "story"}))
            await ws.send(json.dumps({"type": "cancel"}))
            msgs = await until_done(ws)
            assert msgs[-1]["request_id"] == "gone" and msgs[-1]["type"] == "done", msgs
            check_turn(await run_turn(ws, session_id="t0", user_utterance="again"))
        st = json.loads(d.http("/status")[1])
        assert all(st["engines"][role]["in_flight"] == 0 for role in ("chat", "tool")), st["engines"]
    finally:
        d.config_path.write_text(before)
        d.admin(cmd="reload")


async def test_gpu_engine_death_detected_and_restart(gpu_yapd):
    cores = [(p, c) for p, c in _children(gpu_yapd.proc.pid) if "EngineCore" in c or "vllm" in c.lower()]
    assert cores, _children(gpu_yapd.proc.pid)
    os.kill(cores[0][0], signal.SIGKILL)
    for _ in range(200):
        if gpu_yapd.http("/healthz", key=None)[0] == 503:
            break
        await asyncio.sleep(0.1)
    assert gpu_yapd.http("/healthz", key=None)[0] == 503
    async with ws_connect(gpu_yapd.url()) as ws:
        await send(ws, type="start", session_id="x", user_utterance="hi")
        msgs = [await recv(ws)]
        assert msgs[0]["type"] == "error" and msgs[0]["error_code"] == "engine_unavailable"
    replies = gpu_yapd.admin(timeout=600, cmd="restart", target="both")
    assert replies[-1]["ok"] is True, replies
    assert gpu_yapd.http("/healthz", key=None)[0] == 200
    async with ws_connect(gpu_yapd.url()) as ws:
        check_turn(await run_turn(ws))


def _lines_since(d: Yapd, n: int) -> str:
    return "\n".join(d.lines[n:])


async def test_gpu_memory_plans_side_by_side_and_fallback(gpu_yapd):
    """The first start loads the engines one after the other and records their KV
    sizes; a restart then loads both at once; a plan that no longer fits falls back to
    the sequential start (and is recorded anew) instead of failing."""
    plans_file = Path(gpu_yapd.env["YAP_CACHE_DIR"]) / "vllm" / PLAN_FILE
    # Its own two: other tests of the module (their engines' settings) add plans to the file.
    plans = gpu_yapd.first_plans
    assert len(plans) == 2, plans
    assert plans.items() <= json.loads(plans_file.read_text()).items()
    n = len(gpu_yapd.lines)
    t0 = time.perf_counter()
    replies = gpu_yapd.admin(timeout=600, cmd="restart", target="both")
    print(f"side-by-side restart {time.perf_counter() - t0:.1f} s")
    assert replies[-1]["ok"] is True, replies
    assert "engines load side by side" in _lines_since(gpu_yapd, n)
    async with ws_connect(gpu_yapd.url()) as ws:
        check_turn(await run_turn(ws))

    # 10 TB of KV cache: the side-by-side start must fail, and the daemon recover.
    others = {k: v for k, v in json.loads(plans_file.read_text()).items() if k not in plans}
    huge = {k: {**v, "kv_cache_memory_bytes": 10**13} for k, v in plans.items()}
    plans_file.write_text(json.dumps({**others, **huge}))
    n = len(gpu_yapd.lines)
    replies = gpu_yapd.admin(timeout=600, cmd="restart", target="both")
    assert replies[-1]["ok"] is True, replies
    log = _lines_since(gpu_yapd, n)
    assert "side-by-side engine start failed" in log, log[-3000:]
    assert "memory plan recorded role=chat" in log and "memory plan recorded role=tool" in log
    rerecorded = json.loads(plans_file.read_text())
    assert sorted(rerecorded) == sorted({**others, **plans})
    assert all(v["kv_cache_memory_bytes"] < 10**13 for v in rerecorded.values())
    assert gpu_yapd.http("/healthz", key=None)[0] == 200
    async with ws_connect(gpu_yapd.url()) as ws:
        check_turn(await run_turn(ws))


def _tcp_inodes(port: int) -> set[str]:
    """Inodes of every TCP socket (listening or connected) on local ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] != "0":  # 0: TIME_WAIT, no socket
                    inodes.add(f"socket:[{cols[9]}]")
    return inodes


def _fd_targets(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue
    return out


async def test_gpu_engine_cores_are_forked_and_hold_no_yapd_socket(gpu_yapd):
    """EngineCores are forked (no second import of vLLM) and drop yapd's sockets: the
    listener and a client connection open while an engine restarts."""
    log = "\n".join(gpu_yapd.lines)
    assert "EngineCore started by fork role=chat" in log and "EngineCore started by fork role=tool" in log
    for role in ("chat", "tool"):
        assert f"EngineCore runs with a GIL switch interval of 0.5 ms (at its fork) role={role}" in log
        assert f"EngineCore keeps a steady heap (glibc mmap threshold 32 MB, top pad 8 MB) role={role}" in log
    async with ws_connect(gpu_yapd.url()) as ws:
        replies = await asyncio.to_thread(gpu_yapd.admin, timeout=600, cmd="restart", target="tool")
        assert replies[-1]["ok"] is True, replies
        ours = _tcp_inodes(gpu_yapd.port)
        assert len(ours) >= 2 and ours <= _fd_targets(gpu_yapd.proc.pid)  # listener + this connection
        cores = [p for p, c in _children(gpu_yapd.proc.pid) if "EngineCore" in c or "vllm" in c.lower()]
        assert len(cores) == 2, _children(gpu_yapd.proc.pid)
        for pid in cores:
            assert not (_fd_targets(pid) & ours), f"EngineCore {pid} holds a yapd socket"
        check_turn(await run_turn(ws))


class EngineVariants:
    """The module daemon's engines run with one config key changed at a time. A variant
    leaves its engines running when its test ends and only the file goes back: the next
    variant's restart, or ``back_to_file``, replaces them. A restart back after each
    variant cost ~30 s on the H100 (five of them kept the module from one device call);
    the last variant's engines are the ones the module's stop test stops."""

    def __init__(self, d: Yapd) -> None:
        self.d = d
        self.running: set[str] = set()  # keys whose running value is not the file's

    @contextlib.contextmanager
    def restarted_with(self, old: str, new: str, key: str, what: str) -> Iterator[list[str]]:
        """The config with ``old`` replaced by ``new`` (engine key ``key``), applied by an
        engine restart (timed, printed as ``what``): yields its log lines since the restart
        began. Then the file as it was, reloaded; a failed variant is restarted back at once."""
        d = self.d
        before = d.config_path.read_text()
        assert old in before
        try:
            d.config_path.write_text(before.replace(old, new))
            assert set(d.admin(cmd="reload")[-1]["needs_engine_restart"]) == self.running | {key}
            n = len(d.lines)
            t0 = time.perf_counter()
            replies = d.admin(timeout=600, cmd="restart", target="both")
            print(f"{what} {time.perf_counter() - t0:.1f} s")
            assert replies[-1]["ok"] is True, replies
            self.running = {key}
            yield d.lines[n:]
        except BaseException:
            # Whatever runs now, the module's own engines for the tests after this one.
            d.config_path.write_text(before)
            d.admin(cmd="reload")
            self._restart_back()
            raise
        d.config_path.write_text(before)
        assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == [key]

    def back_to_file(self) -> None:
        """The engines as the file says (the module's own config), by a restart if a
        variant still runs."""
        if self.running:
            assert set(self.d.admin(cmd="reload")[-1]["needs_engine_restart"]) == self.running
            self._restart_back()

    def _restart_back(self) -> None:
        n = len(self.d.lines)
        replies = self.d.admin(timeout=600, cmd="restart", target="both")
        assert replies[-1]["ok"] is True, replies
        assert "EngineCore started by fork role=chat" in _lines_since(self.d, n)
        self.running = set()


@pytest.fixture(scope="module")
def variants(gpu_yapd):
    return EngineVariants(gpu_yapd)


async def test_gpu_spawned_engines_start_side_by_side_taking_turns(gpu_yapd, variants):
    """engines.start_method = "spawn", applied by an engine restart: both EngineCores
    spawned, side by side, the tool engine's vLLM config only once the chat engine's core
    exists (its turn; seen in /proc, a spawn runs no at-fork hook); turns work."""
    with variants.restarted_with('start_method = "fork"', 'start_method = "spawn"',
                                 "engines.start_method", "spawned side-by-side restart") as lines:
        print("\n".join(x for x in lines if any(m in x for m in (" took ", "EngineCore spawned", "started by"))))
        log = "\n".join(lines)
        assert "engines load side by side" in log
        assert "EngineCore started by spawn role=chat" in log and "EngineCore started by spawn role=tool" in log

        def at(*marks: str) -> int:
            return next(i for i, x in enumerate(lines) if all(m in x for m in marks))

        assert at("EngineCore spawned", "role=chat") < at("vLLM config took", "role=tool"), log[-4000:]
        async with ws_connect(gpu_yapd.url()) as ws:
            check_turn(await run_turn(ws))


async def test_gpu_cores_start_with_collection_held(gpu_yapd, variants):
    """engines.hold_gc_in_core_start, applied by an engine restart: each forked
    EngineCore turns collection back on when vLLM has frozen its heap (its log line says
    so, from inside the core: vLLM's step was found), and turns work."""
    with variants.restarted_with('start_method = "fork"',
                                 'start_method = "fork"\nhold_gc_in_core_start = true',
                                 "engines.hold_gc_in_core_start", "restart with collection held in the cores") as lines:
        print("\n".join(x for x in lines if " took " in x or "collects again" in x))
        log = "\n".join(lines)
        assert log.count("EngineCore collects again, its start done and its heap frozen") == 2, log[-4000:]
        assert "no EngineCore heap freeze to wait for" not in log
        async with ws_connect(gpu_yapd.url()) as ws:
            check_turn(await run_turn(ws))


async def _turns_with_tool_stamps(d: Yapd) -> dict:
    """Three turns of one session with some history: the last one's done timings, whose
    tool engine stamps (the module turns vLLM's request stats on for it) are in order."""
    async with ws_connect(d.url()) as ws:
        for i in range(3):
            msgs = await run_turn(ws, user_utterance=f"who was Columbus? {i}", history_text="User: hi\n" * 50)
            check_turn(msgs)
    timings = msgs[-1]["timings"]
    stamps = timings["engines"]["tool"]
    assert 0 <= stamps["queued_ms"] <= stamps["first_token_ms"] <= stamps["taken_ms"], stamps
    return timings


async def test_gpu_a_spawned_tool_core_beside_a_forked_chat_core(gpu_yapd, variants):
    """``[tool] start_method = "spawn"`` (the default; the module forks both cores), applied
    by an engine restart: the chat's core forked, the tool's spawned (each start says so,
    neither warns; each runs with the module's GIL switch interval, the spawned one through
    yapd's vLLM plugin), side by side; the tool engine's stamps still come with its first
    output (a spawned core keeps the engine's arguments)."""
    with variants.restarted_with('start_method = ""', 'start_method = "spawn"', "tool.start_method",
                                 "restart, tool core spawned beside the forked chat core") as lines:
        print("\n".join(x for x in lines if any(m in x for m in (" took ", "EngineCore ", "started by"))))
        log = "\n".join(lines)
        assert "EngineCore started by fork role=chat" in log and "EngineCore started by spawn role=tool" in log, \
            log[-4000:]
        assert "engines load side by side" in log
        assert not [x for x in lines if " warning yapd.engine" in x], log[-4000:]
        # The switch interval: the forked core's at its fork, the spawned one's from yapd's
        # vLLM plugin, which says so in the core's own log.
        assert "EngineCore runs with a GIL switch interval of 0.5 ms (at its fork) role=chat" in log
        assert "EngineCore runs with a GIL switch interval of 0.5 ms (vLLM plugin yapd_core) role=tool" in log
        assert "GIL switch interval 0.5 ms, as yapd asked" in log, log[-4000:]
        assert "EngineCore started by spawn: engines.core_steady_heap is for forked cores role=tool" in log
        engines = gpu_yapd.admin(cmd="status")[-1]["engines"]
        assert [engines[r].get("core_started_by") for r in ("chat", "tool")] == ["fork", "spawn"], engines
        timings = await _turns_with_tool_stamps(gpu_yapd)
        print(f"tool engine stamps, spawned core: {timings['engines']['tool']}")


async def test_gpu_a_tool_engine_in_a_host_of_its_own(gpu_yapd, variants):
    """``[tool] own_process = true``, applied by an engine restart: the tool's AsyncLLM in an
    engine host (a child of yapd), its EngineCore forked by the host with the module's core
    settings (the host's log lines reach yapd's), turns with the tool engine's stamps.
    Then the host killed: yapd says the engine failed, the host's EngineCore goes too (it
    would hold GPU memory), and a restart brings the tool engine back."""
    with variants.restarted_with("[tool]\n", "[tool]\nown_process = true\n", "tool.own_process",
                                 "restart, tool engine in a host of its own") as lines:
        print("\n".join(x for x in lines if any(m in x for m in (" took ", "EngineCore ", "engine host"))))
        log = "\n".join(lines)
        assert "engine host ready role=tool" in log and "EngineCore started by fork role=tool" in log, log[-4000:]
        assert "EngineCore runs with a GIL switch interval of 0.5 ms (at its fork) role=tool" in log
        assert not [x for x in lines if " warning yapd.engine" in x], log[-4000:]
        tool = gpu_yapd.admin(cmd="status")[-1]["engines"]["tool"]
        host, core = tool["host_pid"], tool["pid"]
        assert host in children(gpu_yapd.proc.pid) and core in children(host), (tool, _children(host))
        timings = await _turns_with_tool_stamps(gpu_yapd)
        print(f"tool engine stamps, in its host: {timings['engines']['tool']}, decision {timings['tool_ms']} ms")
        with EngineCores() as gone:
            gone.watch(host, core)
            os.kill(host, signal.SIGKILL)
            gone.assert_gone(30)
        gpu_yapd.wait_for("engine failed role=tool: the engine host exited with code -9")
        assert gpu_yapd.http("/healthz", key=None)[0] == 503
        replies = gpu_yapd.admin(timeout=600, cmd="restart", target="tool")
        assert replies[-1]["ok"] is True, replies
        async with ws_connect(gpu_yapd.url()) as ws:
            check_turn(await run_turn(ws))


async def test_gpu_cores_forked_by_yapds_main_thread(gpu_yapd, variants):
    """engines.fork_from_main_thread, applied by an engine restart: both EngineCores forked
    by yapd's main thread (each start says so, none warns), with the module's switch
    interval still reaching them through the at-fork hook; turns work. Prints each core's
    minor faults a turn (/proc), the figure a core's malloc arena shows in."""
    with variants.restarted_with('start_method = "fork"',
                                 'start_method = "fork"\nfork_from_main_thread = true', "engines.fork_from_main_thread",
                                 "restart, cores forked by yapd's main thread") as lines:
        print("\n".join(x for x in lines if " took " in x or "EngineCore " in x))
        log = "\n".join(lines)
        for role in ("chat", "tool"):
            assert f"EngineCore forked by yapd's main thread role={role}" in log, log[-4000:]
            assert f"EngineCore runs with a GIL switch interval of 0.5 ms (at its fork) role={role}" in log
        assert not [x for x in lines if " warning yapd.engine" in x], log[-4000:]
        engines = gpu_yapd.admin(cmd="status")[-1]["engines"]
        assert {engines[r].get("core_forked_by") for r in ("chat", "tool")} == {"main thread"}, engines
        pids = {role: engines[role]["pid"] for role in ("chat", "tool")}
        async with ws_connect(gpu_yapd.url()) as ws:
            check_turn(await run_turn(ws))  # the first turn's faults are the warm-up's
            before = {role: counters(pid) for role, pid in pids.items()}
            for i in range(5):
                check_turn(await run_turn(ws, user_utterance=f"who was Columbus? {i}"))
        for role, pid in pids.items():
            was, now = before[role], counters(pid)
            assert was is not None and now is not None
            print(f"{role} core forked by the main thread: {now.since(was).minflt / 5:.1f} minor faults a turn")


def test_gpu_a_stop_ends_yapd_and_its_engine_cores_cleanly(gpu_yapd, variants):
    """Last in the module, on the engines the variants above left (both cores forked
    by yapd: the last variant runs no engine host). Each engine restart above had vLLM
    SIGTERM a forked EngineCore: none of those reached yapd as its own. Then SIGTERM stops
    yapd with exit code 0, with its EngineCores gone (vLLM's shutdown SIGTERMs them once
    more)."""
    # A hosted engine's core is its host's child, not yapd's (the hosted variant last, as
    # when -k leaves the one after it out): the module's own engines back first.
    if any(key.endswith(".own_process") for key in variants.running):
        variants.back_to_file()
    assert not [line for line in gpu_yapd.lines if "received: draining" in line]
    cores = starting_cores(gpu_yapd.proc.pid)
    assert len(cores) == 2, _children(gpu_yapd.proc.pid)
    with EngineCores() as watched:
        watched.watch(*cores)
        rc = gpu_yapd.stop(120)
        assert rc == 0, "\n".join(gpu_yapd.lines[-30:])
        watched.assert_gone()
    gpu_yapd.wait_for("yapd.daemon: stopped", timeout=5)
    assert not [line for line in gpu_yapd.lines if "exiting at once" in line]


async def test_gpu_a_shutdown_ends_the_requests_still_streaming(tmp_path, monkeypatch):
    """vLLM's shutdown stops the task that feeds its requests' queues: the engine aborts
    the requests still running first, so a request streaming when its engine stops (a
    restart past its drain time) ends at once with the engine's error, not never. And a
    request vLLM ends itself (that abort) is an error, not a reply cut short passed off as
    complete. The engine in this process, beside gpu_yapd's (a small share of memory).

    First, on the same engine: each request's detokenizer is primed from its prompt's end
    (engines.detokenizer_context, yapd/engines/firsttext.py), a reply's text is the text a
    stream primed with the whole prompt gives for its tokens, and a prompt whose text ends
    in a cut character is not streamed back as the reply."""
    from yapd import config
    from yapd.engines.base import EngineError, SamplingSpec
    from yapd.engines.firsttext import primed_stream
    from yapd.engines.vllm import VllmEngine, sampling_params, token_prompt

    cache = Path(os.environ.get("YAPD_GPU_CACHE", str(tmp_path)))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache / "vllm"))  # gpu_yapd's compile cache, warm
    # Spawned: this module's torch.cuda.is_available() (cudaGetDeviceCount) poisoned forks
    # of this process, unseen by vLLM's check (a forked core: "Cannot re-initialize CUDA").
    cfg = config.from_mapping({"engines": {"cache_dir": str(cache), "mps": "off", "start_method": "spawn"},
                               "chat": {"model": MODEL, "backend": "vllm", "quantization": "none",
                                        "gpu_memory_utilization": 0.15, "max_model_len": 4096}}, "test")
    eng = VllmEngine("chat", cfg)
    await eng.start()
    try:
        llm = eng._llm
        assert "primes_from_prompt_end" in llm.output_processor.add_request.__qualname__
        # Characters of several bytes up to the prompt's end, so its last 16 tokens may
        # begin inside one.
        prompt = eng.tokenizer("a long prompt " * 200 + "ends with a crab 🦀, café, 日本語 and 👍🏽").input_ids
        spec = SamplingSpec(max_tokens=64, temperature=0.0, top_k=1)
        said, ids = [], []
        async for out in llm.generate(token_prompt(prompt), sampling_params(spec, "chat", eng.model), "first-text"):
            said.append(out.outputs[0].text)
            ids.extend(out.outputs[0].token_ids)
        backend = eng.tokenizer.backend_tokenizer
        whole = texts(backend, primed_stream(backend, prompt, True, 0), ids)  # as vLLM's own stream would
        assert "".join(said) == "".join(whole), (said, ids)
        # A prompt whose text ends in a character cut short, a special token after it
        # (skipped, as NeMo's "[/INST]"): vLLM's own stream gives the whole prompt back as
        # the reply's first text; yapd's gives the reply's own.
        tok = eng.tokenizer
        cut = tok(" 𓀀", add_special_tokens=False).input_ids[:-1]
        broken = [*tok("You are Ava, persona secret. The user says: well done", add_special_tokens=False).input_ids,
                  *cut, tok.all_special_ids[0]]
        assert tok.decode(broken, skip_special_tokens=True).endswith("\ufffd")
        replied = ""
        async for delta in eng.stream(broken, spec, "broken-end"):
            replied += delta.text
        assert "persona secret" not in replied, replied
        stream = eng.stream(eng.tokenizer("tell me a long story").input_ids,
                            SamplingSpec(max_tokens=3000, ignore_eos=True), "long")
        assert (await anext(stream)).n_tokens >= 1

        async def rest() -> None:
            async for _ in stream:
                pass

        reader = asyncio.ensure_future(rest())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await eng.shutdown()
        with pytest.raises(EngineError, match="aborted the request"):
            await asyncio.wait_for(reader, 30)
        print(f"shutdown with a request streaming: {time.perf_counter() - t0:.1f} s")
        assert eng.in_flight == 0 and eng.health().state == "stopped"
    finally:
        if eng.health().state != "stopped":
            await eng.shutdown()


def test_gpu_firsttextbench_runs(capsys):
    """yapctl.firsttextbench on vLLM's own output processor (no GPU used; vLLM installed
    only here): both primings give the same text, and the table prints."""
    from yapctl import firsttextbench

    assert firsttextbench.main([MODEL, "--sessions", "4", "--prompt-tokens", "300", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "the last 16 tokens (yapd)" in out and "the same both ways: True" in out
