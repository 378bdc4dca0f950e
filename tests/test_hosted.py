"""Engines in engine hosts (``own_process = true``): a real yapd whose engines' front ends
run in processes of their own (yapd/engines/host.py) with the real CPU engine in them, real
turns through them, a host's faults and its end with yapd's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UNENDING, EngineCores, Yapd, recv, run_turn, send, until_done, ws_connect
from tests.test_cli import yapctl
from tests.test_daemon import STAND_IN_CHAT, loading_yapd
from tests.test_faults import DEBUG, _first_token, wait_new
from tests.test_protocol_e2e import check_turn
from yapctl.gpubench.yapdphase import yapd_processes
from yapd import config, daemon
from yapd.engines import EngineError, SamplingSpec, create_engine
from yapd.engines.hosted import HostedEngine
from yapd.engines.pipe import MAX_MESSAGE, MessagePipe, PipeClosed

HOSTED = UNENDING + "[chat]\nown_process = true\n[tool]\nown_process = true\n"


@pytest.fixture(scope="module")
def hosted_yapd(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """Both engines hosted, the debug faults on; each test leaves both serving."""
    d = Yapd(tmp_path_factory.mktemp("hosted"), cache_dir, config=HOSTED, env=DEBUG)
    d.start()
    yield d
    d.stop()


def status(d: Yapd) -> dict[str, Any]:
    return json.loads(d.http("/status")[1])


def hosts(d: Yapd) -> dict[str, int]:
    return {role: e["host_pid"] for role, e in status(d)["engines"].items() if "host_pid" in e}


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def test_turns_run_through_both_engine_hosts(hosted_yapd):
    d = hosted_yapd
    pids = hosts(d)
    assert set(pids) == {"chat", "tool"} and len(set(pids.values())) == 2, pids
    assert all(parent_of(pid) == d.pid for pid in pids.values())
    for role, pid in pids.items():  # titled for ps and top (setproctitle: a test requirement too)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"yapd {role} engine host".encode()), pid
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        turns = await asyncio.gather(run_turn(a, session_id="a", request_id="ha"),
                                     run_turn(b, session_id="b", request_id="hb"))
        check_turn(turns[0], "ha")
        check_turn(turns[1], "hb")
        # The engines' own timings crossed the pipe with the first deltas.
        assert {"chat", "tool"} <= set(turns[0][-1]["timings"]["engines"])
    # What the hosts logged is in yapd's log (its stderr here, the journal under systemd)
    # and in the ring `yapctl logs` reads.
    assert any("yapd.engine.cpu: engine ready role=tool backend=cpu" in line for line in d.lines)
    logs = d.admin(cmd="logs", n=1000, grep="engine ready role=chat")
    assert any(m.get("event") == "log" and m["logger"] == "yapd.engine.cpu" for m in logs), logs
    st = status(d)
    assert st["engines"]["chat"]["in_flight"] == 0 and st["engines"]["tool"]["in_flight"] == 0
    # The processes whose CPU the GPU bench counts: yapd's, and each host by its role.
    assert await yapd_processes(d.admin_socket) == {"front": d.pid, "chat_front": pids["chat"],
                                                    "tool_front": pids["tool"]}
    # And where an operator looks: yapctl status names each engine's own process.
    out = yapctl("status", sock=d.admin_socket)
    for role, pid in pids.items():
        assert any(line.startswith(role) and f"cpu (own process {pid})" in line for line in out.stdout.splitlines()), \
            out.stdout


async def test_a_cancelled_turn_ends_its_request_in_the_host(hosted_yapd):
    d = hosted_yapd
    host = hosts(d)["chat"]
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="c", user_utterance="tell me a long story", request_id="long")
        await _first_token(ws, "long")
        # The host held (SIGSTOP) until the cancel's done: its reply's 200 tokens take a few
        # hundred ms, and on a loaded machine the /status call and the cancel took longer
        # (the turn ended uncancelled, or in_flight was 0 already).
        os.kill(host, signal.SIGSTOP)
        try:
            assert status(d)["engines"]["chat"]["in_flight"] == 1
            await send(ws, type="cancel")
            done = (await until_done(ws))[-1]
        finally:
            os.kill(host, signal.SIGCONT)
        assert done["request_id"] == "long" and done["cancelled"] is True
        assert status(d)["engines"]["chat"]["in_flight"] == 0
        check_turn(await run_turn(ws, session_id="c", request_id="next"), "next")


async def test_an_engine_crash_in_its_host_fails_its_turn_and_a_restart_recovers(hosted_yapd):
    d = hosted_yapd
    before = hosts(d)
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="start", session_id="a", user_utterance="tell me a long story", request_id="k1")
        await _first_token(a, "k1")
        n = len(d.lines)
        assert d.admin(cmd="debug", action="kill_engine", role="chat")[-1]["ok"]
        msgs = await until_done(a)
        err = next(m for m in msgs if m["type"] == "error")
        assert err["error_code"] == "engine_unavailable" and "engine killed" in err["message"]
        # The host tells yapd its engine's health changed; yapd says so and serves on.
        wait_new(d, n, "engine unhealthy role=chat")
        code, body = d.http("/healthz", key=None)
        assert code == 503 and json.loads(body)["engines"]["chat"] == "failed"
        await send(b, type="start", session_id="b", user_utterance="hi", request_id="k2")
        assert (await recv(b))["error_code"] == "engine_unavailable"
        with EngineCores() as old:
            old.watch(before["chat"])
            assert d.admin(cmd="restart", target="chat")[-1]["ok"] is True
            old.assert_gone()  # the old host stopped with its engine
        after = hosts(d)
        assert after["chat"] != before["chat"] and after["tool"] == before["tool"]
        assert d.http("/healthz", key=None)[0] == 200
        check_turn(await run_turn(a))
        check_turn(await run_turn(b))


async def test_a_host_killed_is_a_failed_engine_and_a_restart_recovers(hosted_yapd):
    d = hosted_yapd
    pid = hosts(d)["tool"]
    n = len(d.lines)
    os.kill(pid, signal.SIGKILL)
    wait_new(d, n, "engine failed role=tool: the engine host")
    code, body = d.http("/healthz", key=None)
    assert code == 503 and json.loads(body)["engines"]["tool"] == "failed"
    st = status(d)["engines"]["tool"]
    assert st["ok"] is False and "the engine host" in st["detail"], st
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="t", user_utterance="hi", request_id="t1")
        assert (await recv(ws))["error_code"] == "engine_unavailable"
        assert d.admin(cmd="restart", target="tool")[-1]["ok"] is True
        assert d.http("/healthz", key=None)[0] == 200
        check_turn(await run_turn(ws, session_id="t", request_id="t2"), "t2")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_engine_hosts_end_with_yapd(make_yapd, how):
    """A yapd stopped stops its hosts; one killed leaves none behind either: each host sees
    its pipe end and stops its engine."""
    d = make_yapd(UNENDING + "[tool]\nown_process = true\n")
    pid = hosts(d)["tool"]
    with EngineCores() as cores:
        cores.watch(pid)
        d.signal(how)
        assert d.proc.wait(30) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
        cores.assert_gone(30)


def test_a_stop_while_a_host_starts_its_engine_ends_both(make_yapd):
    """SIGTERM while the tool's host is still starting (importing, loading its model): the
    host is told, its start ends, it exits, and yapd exits 0."""
    d = make_yapd(UNENDING + "[tool]\nown_process = true\n", start=False)
    d.start(wait=False)
    pid = int(d.wait_for("engine host started role=tool", timeout=60).rsplit("pid=", 1)[1])
    with EngineCores() as host:
        host.watch(pid)
        d.signal(signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
        host.assert_gone(10)
    assert not [line for line in d.lines if "Traceback" in line], "\n".join(d.lines[-20:])


def test_a_stop_while_a_hosted_vllm_engine_loads_ends_its_enginecore(make_yapd):
    """SIGTERM while a hosted vLLM engine loads (tests/loading_core.py's stand-in, whose
    EngineCore "loads" for ten minutes): the host, told by yapd, finds its EngineCore (its
    own child) and ends it as yapd ends its own engines'; the start fails, the host exits,
    and yapd exits 0."""
    # yapd's side loads the engine's tokenizer while the host starts the engine: offline,
    # the stand-in's made-up model fails it at once (the start would end with it later).
    d = loading_yapd(make_yapd, STAND_IN_CHAT + "own_process = true\n", HF_HUB_OFFLINE="1")
    line = d.wait_for("stand-in: Initializing a V1 LLM engine", timeout=120)
    core = int(line.split("pid=")[1].split(")")[0])
    host = hosts(d)["chat"]
    assert parent_of(core) == host
    with EngineCores() as watched:
        watched.watch(core, host)
        d.signal(signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
        watched.assert_gone()
    d.wait_for(f"stopping while engines load: ending their EngineCore pid={core}", timeout=5)
    assert "ended while loading (exit code -15)" in "\n".join(d.lines), "\n".join(d.lines[-20:])


def test_a_host_killed_while_its_vllm_engine_loads_leaves_no_enginecore(make_yapd):
    """The host SIGKILLed while its vLLM engine (loading_core's stand-in) loads: its
    EngineCore, now nobody's child, would load on and hold GPU memory; yapd ends it from
    what the host last said of its start processes, and the start fails."""
    d = loading_yapd(make_yapd, STAND_IN_CHAT + "own_process = true\n", HF_HUB_OFFLINE="1")
    line = d.wait_for("stand-in: Initializing a V1 LLM engine", timeout=120)
    core = int(line.split("pid=")[1].split(")")[0])
    d.wait_for(f"engine host's start processes role=chat pids={core}", timeout=10)
    with EngineCores() as watched:
        watched.watch(core)
        os.kill(hosts(d)["chat"], signal.SIGKILL)
        watched.assert_gone()
        assert d.proc is not None and d.proc.wait(60) == 1, "\n".join(d.lines[-20:])
    d.wait_for(f"ending the engine host's EngineCore role=chat pid={core}", timeout=5)
    d.wait_for("start failed: the engine host exited with code -9", timeout=5)


def test_an_engine_that_fails_to_load_in_its_host_fails_the_start_with_its_reason(make_yapd, tmp_path):
    """The host's engine start fails (no model where the config says): yapd's start fails
    with the engine's own reason, the host ends, and yapd exits 1."""
    missing = tmp_path / "no-such-model"
    d = make_yapd(f'[engines]\ndeploy = "tool"\n[tool]\nbackend = "cpu"\nmodel = "{missing}"\nown_process = true\n',
                  start=False, demo=False, env={"HF_HUB_OFFLINE": "1"})
    d.start(wait=False)
    pid = int(d.wait_for("engine host started role=tool", timeout=60).rsplit("pid=", 1)[1])
    with EngineCores() as host:
        host.watch(pid)
        assert d.proc is not None and d.proc.wait(60) == 1, "\n".join(d.lines[-20:])
        host.assert_gone(10)
    assert f"start failed: tool engine could not load {missing}" in d.wait_for("start failed:", timeout=5)


async def test_own_process_applies_at_an_engine_restart_and_goes_back(make_yapd):
    """Switched on in the config of a running yapd: a reload names it as waiting for an
    engine restart, the restart moves the tool engine into a host, turns work; switched
    off again, the next restart brings it back into yapd and its host ends."""
    d = make_yapd(UNENDING)
    before = d.config_path.read_text()
    assert hosts(d) == {}
    d.config_path.write_text(before + "[tool]\nown_process = true\n")
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["tool.own_process"]
    assert hosts(d) == {}  # not before the restart
    assert d.admin(cmd="restart", target="tool")[-1]["ok"] is True
    pid = hosts(d)["tool"]
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws, request_id="in-host"), "in-host")
    d.config_path.write_text(before)
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["tool.own_process"]
    with EngineCores() as host:
        host.watch(pid)
        assert d.admin(cmd="restart", target="tool")[-1]["ok"] is True
        host.assert_gone()
    assert hosts(d) == {}
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws, request_id="in-yapd"), "in-yapd")


def test_own_process_from_the_environment():
    cfg = config.load(None, env={"TOOL_OWN_PROCESS": "1"})
    assert cfg.tool.own_process is True and cfg.chat.own_process is False
    assert config.load(None, env={"CHAT_OWN_PROCESS": "false"}).chat.own_process is False
    with pytest.raises(config.ConfigError, match="CHAT_OWN_PROCESS"):
        config.load(None, env={"CHAT_OWN_PROCESS": "sometimes"})


def test_a_non_boolean_own_process_is_a_config_error(make_yapd):
    d = make_yapd("[tool]\nown_process = \"yes\"\n", start=False)
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert any("tool.own_process: expected true or false" in line for line in d.lines)


def demo_chat_host(cache_dir: Path) -> HostedEngine:
    """The CPU demo chat engine to run in a real host, not started."""
    cfg = config.load(None, overrides={"demo": True})
    cfg.engines.cache_dir = str(cache_dir)
    cfg.chat.own_process = True
    eng = create_engine("chat", daemon.prepare(cfg))
    assert isinstance(eng, HostedEngine)
    return eng


async def hosted_demo_chat(cache_dir: Path) -> HostedEngine:
    """The CPU demo chat engine in a real host, started, driven from this process."""
    eng = demo_chat_host(cache_dir)
    await eng.start()
    return eng


async def test_a_request_id_used_again_after_an_abort_gets_only_its_own_deltas(cache_dir):
    """The engine itself, in this process, with the CPU demo chat engine in a real host: a
    stream closed early (its abort on its way to the host, its next deltas already on
    theirs) and the same request id at once again, as a client reusing its request id
    makes it: the second stream reads its own tokens only, and nothing is left in flight."""
    eng = await hosted_demo_chat(cache_dir)
    try:
        spec = SamplingSpec(max_tokens=40, ignore_eos=True)
        prompt = eng.tokenizer("tell me a long story").input_ids
        for _ in range(5):
            first = eng.stream(prompt, spec, "again")
            assert (await anext(first)).n_tokens >= 1
            # yapd's loop busy: the host's next deltas wait unread in the socket, to be
            # read only after the same request id is running again.
            time.sleep(0.05)
            await first.aclose()
            n, finished = 0, False
            async for delta in eng.stream(prompt, replace(spec, max_tokens=7), "again"):
                n += delta.n_tokens
                finished = delta.finished
            assert (n, finished) == (7, True)
        assert eng.in_flight == 0
    finally:
        await eng.shutdown()
    assert eng.health().state == "stopped"


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[int]:
    """Process ``pid`` stopped (SIGSTOP) for the block; yields a pidfd, readable once the
    process has ended (reaped or not); killed after the block whatever it did."""
    exited = os.pidfd_open(pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield exited
    finally:
        os.close(exited)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


async def test_a_host_that_cannot_be_started_leaves_no_descriptor_behind(cache_dir, monkeypatch):
    """The host's program cannot be run (a broken venv): the start fails with the reason,
    and yapd's end of the socketpair is closed and no longer kept out of forks (each
    failed start leaked one)."""
    from yapd import forking
    from yapd.engines import hosted

    monkeypatch.setattr(hosted, "command", lambda fd, loop: ["/nonexistent/python", "-m", "yapd.engines.host"])
    cfg = config.load(None, overrides={"demo": True})
    cfg.engines.cache_dir = str(cache_dir)
    cfg.chat.own_process = True
    eng = create_engine("chat", daemon.prepare(cfg))
    kept = set(forking._descriptors_out)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(EngineError, match="nonexistent"):
        await eng.start()
    assert set(forking._descriptors_out) == kept and set(os.listdir("/proc/self/fd")) <= fds
    assert eng.health().state == "failed"


async def test_a_host_stop_cut_short_kills_the_host(cache_dir):
    """yapd's stop waits on its engines for its drain time only: when that wait gives up
    first (here on a host that cannot answer: stopped by SIGSTOP), the host is killed
    instead of outliving yapd with its engine (on a GPU: its memory)."""
    eng = await hosted_demo_chat(cache_dir)
    pid = eng.host_pid
    assert pid is not None
    with stopped(pid) as exited:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(eng.shutdown(), 0.5)
        assert select.select([exited], [], [], 10)[0], "the host lives on after its stop was cut short"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_host_logs_at_yapds_level_and_follows_its_reload(make_yapd, loop):
    """yapd at debug: the host's debug lines reach yapd's log (under uvloop the start's
    level was overwritten as the host opened its pipe); reloaded to info, they stop."""
    text = UNENDING + '[chat]\nown_process = true\n[logging]\nlevel = "debug"\n'
    d = make_yapd(text, server={"event_loop": loop})
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws, request_id="seen"))
        d.wait_for("yapd.engine.host: request ")
        d.write_config(text.replace('"debug"', '"info"'), server={"event_loop": loop})
        assert "logging.level" in d.admin(cmd="reload")[-1]["applied"]
        after = len(d.lines)
        check_turn(await run_turn(ws, request_id="unseen"))
    assert not [line for line in d.lines[after:] if "yapd.engine.host: request " in line]


async def test_a_hung_host_fails_its_streams_and_its_health(cache_dir, monkeypatch):
    """A host that stops answering (SIGSTOP: a wedged loop looks the same) while a stream
    waits on it: within HOST_SILENT_S the engine is failed, the stream ends with an
    error, and the host is killed, instead of a turn waiting for ever on a host whose last
    health said ready."""
    from yapd.engines import hosted

    monkeypatch.setattr(hosted, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(hosted, "HOST_SILENT_S", 1.0)
    eng = await hosted_demo_chat(cache_dir)
    pid = eng.host_pid
    assert pid is not None
    try:
        stream = eng.stream(eng.tokenizer("tell me a long story").input_ids,
                            SamplingSpec(max_tokens=400, ignore_eos=True), "hung")
        assert (await anext(stream)).n_tokens >= 1
        with stopped(pid) as exited:
            with pytest.raises(EngineError, match="has not answered"):
                async with asyncio.timeout(30):
                    async for _ in stream:
                        pass
            assert eng.health().state == "failed" and eng.in_flight == 0
            assert select.select([exited], [], [], 10)[0], "the hung host was not ended"
    finally:
        await eng.shutdown()


async def test_yapd_held_up_itself_does_not_fail_a_healthy_host(cache_dir, monkeypatch):
    """yapd's own loop held (stopped by SIGSTOP, a debugger, a long pause) for longer than
    HOST_SILENT_S: the host, answering all along, is not taken for hung (both engines
    were failed and killed after `kill -STOP yapd; sleep 30; kill -CONT`)."""
    from yapd.engines import hosted

    monkeypatch.setattr(hosted, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(hosted, "HOST_SILENT_S", 1.0)
    eng = await hosted_demo_chat(cache_dir)
    try:
        await asyncio.sleep(0.3)  # a few heartbeats answered
        time.sleep(2.5)  # this loop held, as a stopped yapd's is
        await asyncio.sleep(0.5)
        assert eng.health().ok, eng.health()
        n = 0
        async for delta in eng.stream(eng.tokenizer("hi").input_ids, SamplingSpec(max_tokens=3, ignore_eos=True),
                                      "after"):
            n += delta.n_tokens
        assert n == 3
    finally:
        await eng.shutdown()


async def test_an_abort_ends_the_hosted_stream_and_a_request_too_large_fails_alone(cache_dir, monkeypatch):
    """engine.abort(): the stream ends as an in-process one does (finished, "abort"),
    not waiting for deltas the host no longer sends. A request over the pipe's message
    limit is that request's error; the host serves the next one."""
    from yapd.engines import pipe

    eng = await hosted_demo_chat(cache_dir)
    try:
        prompt = eng.tokenizer("tell me a long story").input_ids
        stream = eng.stream(prompt, SamplingSpec(max_tokens=400, ignore_eos=True), "aborted")
        assert (await anext(stream)).n_tokens >= 1
        await eng.abort("aborted")
        async with asyncio.timeout(10):
            last = [d async for d in stream][-1]
        assert last.finished and last.finish_reason == "abort" and eng.in_flight == 0
        monkeypatch.setattr(pipe, "MAX_MESSAGE", 1000)
        with pytest.raises(EngineError, match="too large to hand to its host"):
            await anext(eng.stream(list(range(5000)), SamplingSpec(max_tokens=4), "huge"))
        monkeypatch.undo()
        n = 0
        async for delta in eng.stream(prompt, SamplingSpec(max_tokens=3, ignore_eos=True), "after"):
            n += delta.n_tokens
        assert n == 3 and eng.health().ok
    finally:
        await eng.shutdown()


# --- the pipe itself -------------------------------------------------------------------


async def _pipe_pair() -> tuple[MessagePipe, list[Any], list[Exception | None], socket.socket]:
    ours, theirs = socket.socketpair()
    got: list[Any] = []
    closed: list[Exception | None] = []
    pipe = await MessagePipe.open(ours, got.append, closed.append)
    return pipe, got, closed, theirs


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)


async def test_messages_split_and_joined_across_reads_arrive_whole():
    pipe, got, closed, theirs = await _pipe_pair()
    frames = b"".join(struct.pack("!I", len(p)) + p
                      for p in (pickle.dumps(("delta", "r", i, "x" * i * 100)) for i in range(20)))

    def write() -> None:  # from a thread: the loop reads as it goes
        for i in range(0, len(frames), 37):  # every message split, several in one read
            theirs.sendall(frames[i:i + 37])

    await asyncio.wait_for(asyncio.gather(asyncio.to_thread(write), _until(lambda: len(got) == 20)), 10)
    assert [m[2] for m in got] == list(range(20)) and closed == []
    pipe.close()
    theirs.close()


@pytest.mark.parametrize("frame", [struct.pack("!I", MAX_MESSAGE + 1), struct.pack("!I", 3) + b"abc"],
                         ids=["too long", "not a pickle"])
async def test_a_broken_message_closes_the_pipe_with_its_reason(frame):
    pipe, got, closed, theirs = await _pipe_pair()
    theirs.sendall(frame)
    await asyncio.wait_for(_until(lambda: closed), 5)
    assert got == [] and len(closed) == 1 and isinstance(closed[0], PipeClosed), closed
    with pytest.raises(PipeClosed):
        pipe.send("stream", "r")
    assert theirs.recv(10) == b""  # our end was closed
    theirs.close()


async def test_a_host_hung_in_its_start_fails_the_start(cache_dir, monkeypatch):
    """A host that stops answering while its engine starts (stopped, or wedged in an
    import): the start fails within HOST_SILENT_STARTING_S and the host is killed, where
    yapd's start (or the restart holding the engine lock) waited for ever."""
    from yapd.engines import hosted

    monkeypatch.setattr(hosted, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(hosted, "HOST_SILENT_STARTING_S", 1.0)
    eng = demo_chat_host(cache_dir)
    start = asyncio.ensure_future(eng.start())
    while eng.host_pid is None:  # spawned: its start (imports, the model's load) takes seconds
        await asyncio.sleep(0.005)
    with stopped(eng.host_pid) as exited:
        with pytest.raises(EngineError, match="has not answered"):
            async with asyncio.timeout(30):
                await start
        assert eng.health().state == "failed"
        assert select.select([exited], [], [], 10)[0], "the hung host was not ended"


async def test_a_host_gone_while_our_tokenizer_loads_fails_the_start(cache_dir, monkeypatch):
    """The host's engine started and the host died before yapd's own tokenizer for it had
    loaded: the start fails, where it went on to call the dead engine ready (/healthz 200
    and every turn failing until the heartbeat called it hung)."""
    gate = asyncio.Event()
    load = HostedEngine._load_tokenizer

    async def slow(self: HostedEngine, name: str, revision: str | None) -> Any:
        await gate.wait()  # a slow disk, a Hub download
        return await load(self, name, revision)

    monkeypatch.setattr(HostedEngine, "_load_tokenizer", slow)
    eng = demo_chat_host(cache_dir)
    start = asyncio.ensure_future(eng.start())
    try:
        while eng._started is None or not eng._started.done():  # the host said "started"
            await asyncio.sleep(0.005)
        assert eng.host_pid is not None
        os.kill(eng.host_pid, signal.SIGKILL)
        while eng.health().state != "failed":  # the reaper saw it
            await asyncio.sleep(0.005)
        gate.set()
        with pytest.raises(EngineError, match="exited with code -9"):
            await start
        assert eng.health().state == "failed" and not eng.health().ok
    finally:
        gate.set()
        await eng.shutdown()
