"""A child forked from yapd (vLLM's EngineCore) must not keep yapd's sockets: with a
copy alive in the child, a connection yapd closes stays open for the peer and a port
yapd gives up stays bound. Real sockets, real fork(), a child that lives on."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from yapd import forking

fork = multiprocessing.get_context("fork")


def _child(fds: list[int], report: multiprocessing.connection.Connection, release: object) -> None:
    # What each descriptor number is in the child: a socket still, or not.
    report.send([stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in fds])
    release.wait(30)  # type: ignore[attr-defined]


class Forked:
    """A forked child that reports which of ``fds`` are sockets in it, then lives until
    released."""

    def __init__(self, fds: list[int]) -> None:
        self.release = fork.Event()
        recv, send = fork.Pipe(duplex=False)
        self.proc = fork.Process(target=_child, args=(fds, send, self.release), daemon=True)
        self.proc.start()
        send.close()
        assert recv.poll(30)
        self.sockets_in_child: list[bool] = recv.recv()

    def end(self) -> None:
        self.release.set()
        self.proc.join(30)


@pytest.fixture(autouse=True)
def _forget_protected() -> Iterator[None]:
    # Ports protected here must not make later forks in this test process drop a
    # socket that happens to get the same port number.
    ports, paths = set(forking._ports), set(forking._paths)
    yield
    forking._ports.intersection_update(ports)
    forking._paths.intersection_update(paths)


@pytest.fixture
def child_ends() -> Iterator[list[Forked]]:
    children: list[Forked] = []
    yield children
    for c in children:
        c.end()


def _tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    conn, _ = listener.accept()
    return listener, client, conn


def _peer_sees_close(client: socket.socket, wait: float = 10) -> bool:
    client.settimeout(wait)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False


def test_protected_tcp_sockets_are_dropped_in_the_child(child_ends):
    listener, client, conn = _tcp_pair()
    other_listener, other_client, other_conn = _tcp_pair()
    forking.protect(listener)
    child = Forked([listener.fileno(), conn.fileno(), other_listener.fileno(), other_conn.fileno()])
    child_ends.append(child)
    assert child.sockets_in_child == [False, False, True, True]

    # yapd closes a client's connection while the child lives: the client sees it.
    conn.close()
    assert _peer_sees_close(client)
    # The unprotected connection (a control for this test): the child's copy holds it open.
    other_conn.close()
    assert not _peer_sees_close(other_client, wait=0.5)

    # yapd gives the port up while the child lives: it can be bound again at once.
    port = listener.getsockname()[1]
    listener.close()
    socket.create_server(("127.0.0.1", port)).close()
    other_port = other_listener.getsockname()[1]
    other_listener.close()
    with pytest.raises(OSError):
        socket.create_server(("127.0.0.1", other_port)).close()
    for s in (client, other_client):
        s.close()


def test_protected_unix_listener_and_its_connections_are_dropped(tmp_path: Path, child_ends):
    path = str(tmp_path / "admin.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    forking.protect(listener)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    conn, _ = listener.accept()
    child = Forked([listener.fileno(), conn.fileno(), client.fileno()])
    child_ends.append(child)
    # The client end is not bound to the path: not yapd's to drop.
    assert child.sockets_in_child == [False, False, True]
    conn.close()
    assert _peer_sees_close(client)
    client.close()
    listener.close()


def test_dropped_descriptors_stay_taken_in_the_child(child_ends):
    # A stale object in the child closing its old number must not close something the
    # child opened since: the number now holds /dev/null, not a free slot.
    listener, client, conn = _tcp_pair()
    forking.protect(listener)
    r, w = fork.Pipe(duplex=False)

    def target() -> None:
        try:
            w.send(os.readlink(f"/proc/self/fd/{conn.fileno()}"))
        except OSError as exc:
            w.send(repr(exc))

    p = fork.Process(target=target, daemon=True)
    p.start()
    assert r.poll(30) and r.recv() == os.devnull
    p.join(30)
    for s in (listener, client, conn):
        s.close()


def test_fork_callbacks_run_in_the_parent():
    seen: list[int] = []
    stop = forking.on_fork(lambda: seen.append(os.getpid()))
    p = fork.Process(target=os._exit, args=(0,))
    p.start()
    p.join(30)
    stop()
    assert seen == [os.getpid()]
    p = fork.Process(target=os._exit, args=(0,))
    p.start()
    p.join(30)
    assert seen == [os.getpid()]


async def test_an_engine_start_gives_up_its_turn_at_the_fork():
    # vLLM's start in a worker thread forks its EngineCore, then waits for it: the next
    # engine may begin once the fork is done, not only when the start is over.
    from yapd.engines.vllm import _until_forked

    release = threading.Event()

    def start() -> str:
        child = fork.Process(target=os._exit, args=(0,))
        child.start()
        child.join(30)
        release.wait(30)  # the EngineCore's load
        return "engine"

    built = await asyncio.wait_for(_until_forked(lambda: asyncio.ensure_future(asyncio.to_thread(start))), 30)
    assert not built.done()
    release.set()
    assert await built == "engine"


async def test_a_start_failing_before_its_fork_gives_up_its_turn_too():
    from yapd.engines.vllm import _until_forked

    def start() -> str:
        raise ValueError("bad engine args")

    built = await asyncio.wait_for(_until_forked(lambda: asyncio.ensure_future(asyncio.to_thread(start))), 30)
    with pytest.raises(ValueError, match="bad engine args"):
        await built


def _stand_in_core(done: Any, report: multiprocessing.connection.Connection) -> None:
    # As a spawned EngineCore starts: vLLM runs the general plugins VLLM_PLUGINS allows
    # (of those installed, yapd's here).
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")
    for plugin in entry_points(group="vllm.general_plugins"):
        if plugin.name == "yapd_core" and (allowed is None or plugin.name in allowed.split(",")):
            plugin.load()()
    _report_settings(report)
    done.wait(60)  # an EngineCore loading, until the stand-in's build is over


class StandInStarts:
    """vLLM's steps in VllmEngine.start stood in: its preparation returns at once, its
    build forks a real child from its worker thread (as vLLM forks the EngineCore), or
    with ``method="spawn"`` spawns one (a fresh interpreter that lives until the build
    ends, as a spawned EngineCore loads), then waits as vLLM waits for the EngineCore's
    load; our tokenizer's load is noted. Every fork or spawn and every load goes into
    ``events`` in the order they happened; what each core started with (its
    YAP_TEST_CHILD_ENV and GIL switch interval) into ``core_settings``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail_build: bool = False,
                 fail_tokenizer: bool = False, method: str = "fork", tool_method: str = "",
                 fork_elsewhere: bool = False, **engines: Any) -> None:
        from yapd import config
        from yapd.engines import vllm as vllm_engine

        self.events: list[str] = []
        self.loaded = threading.Event()  # every engine's tokenizer loaded
        self._engines = 0
        self._second_build = threading.Event()
        self.cfg = config.from_mapping({"engines": {"cache_dir": str(tmp_path), "start_method": method, **engines},
                                        "tool": {"start_method": tool_method}}, "test")
        self.asked: dict[str, str | None] = {}  # what each build found in vLLM's variable
        self.core_settings: dict[str, tuple[str | None, float]] = {}
        self.forked_by: dict[str, int] = {}  # the thread that forked each core (spawned: its own)
        self._roles: dict[int, str] = {}  # the engine each build thread builds
        self._lock = threading.Lock()
        self._fail_build = fail_build
        self._fail_tokenizer = fail_tokenizer
        self._fork_elsewhere = fork_elsewhere
        self._elsewhere_role = ""
        self.built: list[StandInLLM] = []
        # Noted in the forking thread at the fork, before yapd's own hook hands the turn on.
        self._stop_noting = forking.on_fork(lambda: self._note(f"fork {self._forking_role()}"))
        monkeypatch.setattr(vllm_engine.VllmEngine, "_prepare", lambda engine, alongside: (
            {"model": engine.role, "tokenizer": engine.role, "revision": None}, None))
        monkeypatch.setattr(vllm_engine.VllmEngine, "_async_llm", lambda engine, kwargs: self._build(engine))
        monkeypatch.setattr(vllm_engine, "load_tokenizer", self._load_tokenizer)

    def engines(self, *roles: str) -> list[object]:
        from yapd.engines.vllm import VllmEngine

        self._engines = len(roles)
        return [VllmEngine(role, self.cfg) for role in roles]

    def end(self) -> None:
        self._stop_noting()

    def _forking_role(self) -> str:
        # A fork from a thread of the stand-in's own (fork_elsewhere): the engine being built.
        return self._roles.get(forking.forking_for()) or self._elsewhere_role

    def _note(self, what: str) -> None:
        with self._lock:
            self.events.append(what)
            if sum(e.startswith("tokenizer") for e in self.events) == self._engines:
                self.loaded.set()

    def _build(self, engine: object) -> object:
        role = getattr(engine, "role")  # noqa: B009 - a stand-in method: engine is a VllmEngine
        if self._fail_build:
            # Long enough for a tokenizer load begun beside this build to be noted.
            self.loaded.wait(2)
            raise ValueError("bad engine args")
        self._roles[threading.get_ident()] = role
        self.asked[role] = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
        if self.cfg.start_method(role) == "spawn":
            self._spawn(role)
        else:
            recv, send = fork.Pipe(duplex=False)
            child = fork.Process(target=_report_settings, args=(send,))
            if self._fork_elsewhere:  # a vLLM whose start forks its core from a thread of its own
                self._elsewhere_role = role
                starter = threading.Thread(target=child.start)
                starter.start()
                starter.join(30)
            else:
                child.start()
            send.close()
            self._settings_of(role, recv)
            child.join(30)
            self.loaded.wait(30)  # the EngineCore's load
        llm = StandInLLM()
        self.built.append(llm)
        return llm

    def _spawn(self, role: str) -> None:
        with self._lock:
            first = not any(e.startswith("build") for e in self.events)
            self.events.append(f"build {role}")
        if first:
            # vLLM's config and set-up take seconds before the spawn: another engine's
            # build starting meanwhile would be seen here.
            self._second_build.wait(1.0)
        else:
            self._second_build.set()
        spawn = multiprocessing.get_context("spawn")
        done = spawn.Event()
        recv, send = spawn.Pipe(duplex=False)
        child = spawn.Process(target=_stand_in_core, args=(done, send))
        # Noted as the spawn begins, as a fork is at the fork: yapd sees the child in /proc
        # and hands the turn on once it exists, and noted after start() (this thread not
        # run for a moment on a loaded machine) it came after the next build's.
        self._note(f"spawn {role}")
        child.start()  # the process exists when this returns; its interpreter still starts
        send.close()
        try:
            self._settings_of(role, recv)
            self.loaded.wait(30)  # the EngineCore's load
        finally:
            done.set()
            child.join(30)

    def _settings_of(self, role: str, core: multiprocessing.connection.Connection) -> None:
        assert core.poll(30), f"the {role} core said nothing"
        env, interval, self.forked_by[role] = core.recv()
        self.core_settings[role] = (env, interval)

    def _load_tokenizer(self, name: str, revision: str | None) -> str:
        self._note(f"tokenizer {name}")
        if self._fail_tokenizer:
            raise OSError(f"no tokenizer files in {name}")
        return name


class StandInLLM:
    """What vLLM's AsyncLLM is to a started engine: something to shut down, alive, with an
    output processor (where yapd primes each request's detokenizer: yapd/engines/firsttext.py)."""

    errored = False

    def __init__(self) -> None:
        self.shut_down = False
        self.output_processor = SimpleNamespace(request_states={}, add_request=lambda *args, **kwargs: None)

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[StandInStarts]:
    starts = StandInStarts(monkeypatch, tmp_path)
    yield starts
    starts.end()


async def test_engines_loading_side_by_side_load_our_tokenizers_after_both_forks(stand_in: StandInStarts):
    # Loading a large vocabulary holds the GIL for seconds: not while the other engine's
    # start is still in vLLM's set-up in this process, before its fork.
    chat, tool = stand_in.engines("chat", "tool")
    await asyncio.wait_for(asyncio.gather(chat.start(alongside=True), tool.start(alongside=True)), 60)  # type: ignore[attr-defined]
    assert stand_in.events[:2] == ["fork chat", "fork tool"]
    assert sorted(stand_in.events[2:]) == ["tokenizer chat", "tokenizer tool"]
    assert chat.tokenizer == "chat" and tool.tokenizer == "tool"  # type: ignore[attr-defined]


async def test_spawned_starts_take_turns_up_to_each_spawn_then_load_our_tokenizers(monkeypatch: pytest.MonkeyPatch,
                                                                                   tmp_path: Path):
    # vLLM's config and set-up hold the GIL for seconds: the tool engine's must not run
    # beside the chat engine's, whose EngineCore would be spawned (and start importing
    # torch and vLLM) that much later. A spawn runs no at-fork hook: yapd sees the new
    # EngineCore in /proc.
    starts = StandInStarts(monkeypatch, tmp_path, method="spawn")
    try:
        chat, tool = starts.engines("chat", "tool")
        await asyncio.wait_for(asyncio.gather(chat.start(alongside=True), tool.start(alongside=True)), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    at = {e: i for i, e in enumerate(starts.events)}
    assert len(at) == 6 and at["build chat"] < at["spawn chat"] < at["build tool"] < at["spawn tool"], at
    # Each after the last build began.
    assert at["tokenizer chat"] > at["build tool"] and at["tokenizer tool"] > at["build tool"], at
    assert chat.tokenizer == "chat" and tool.tokenizer == "tool"  # type: ignore[attr-defined]


async def test_a_forked_chat_core_and_a_spawned_tool_core_start_side_by_side(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path, caplog):
    """``[tool] start_method = "spawn"`` beside the chat's fork: each build finds its own
    method in vLLM's variable (process-wide, set under the start turn), and each engine
    says how its core started, though the tool's start set "spawn" while the chat's core
    was still loading."""
    starts = StandInStarts(monkeypatch, tmp_path, method="fork", tool_method="spawn")
    try:
        chat, tool = starts.engines("chat", "tool")
        with caplog.at_level(logging.INFO, logger="yapd.engine.vllm"):
            await asyncio.wait_for(asyncio.gather(chat.start(alongside=True), tool.start(alongside=True)), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    assert starts.asked == {"chat": "fork", "tool": "spawn"}
    at = {e: i for i, e in enumerate(starts.events)}
    assert at["fork chat"] < at["build tool"] < at["spawn tool"], at
    said = [r.getMessage() for r in caplog.records if "EngineCore started by" in r.getMessage()]
    assert sorted(m.split(" pid=")[0] for m in said) == ["EngineCore started by fork role=chat",
                                                         "EngineCore started by spawn role=tool"], said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    # ... and its status (yapctl status: "vllm (core forked)")
    assert [e.health().extra["core_started_by"] for e in (chat, tool)] == ["fork", "spawn"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("plugins", [None, "another"])
async def test_the_cores_switch_interval_reaches_forked_and_spawned_cores_the_environment_forked_ones(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog, plugins: str | None):
    """``engines.core_switch_interval_ms`` reaches a forked EngineCore through yapd's
    at-fork hook, and a spawned one (a fresh interpreter) through yapd's vLLM plugin,
    which vLLM runs there unless VLLM_PLUGINS leaves it out; ``child_env`` reaches a
    forked one only. Each engine says what its core got."""
    from yapd import vllm_plugin

    assert vllm_plugin.loadable() in (None, "VLLM_PLUGINS=another leaves out yapd_core"), \
        "the package's entry points are not installed: make install (pip install -e .)"
    monkeypatch.delenv("YAP_TEST_CHILD_ENV", raising=False)
    monkeypatch.setenv(vllm_plugin.SWITCH_INTERVAL_ENV, "")  # the start sets it; the test's end removes it
    if plugins is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", plugins)
    starts = StandInStarts(monkeypatch, tmp_path, method="fork", tool_method="spawn", core_switch_interval_ms=0.5,
                           core_steady_heap=True)
    try:
        chat, tool = starts.engines("chat", "tool")
        env = {"YAP_TEST_CHILD_ENV": "1"}
        with caplog.at_level(logging.INFO, logger="yapd.engine.vllm"):
            await asyncio.wait_for(asyncio.gather(chat.start(alongside=True, child_env=env),  # type: ignore[attr-defined]
                                                  tool.start(alongside=True, child_env=env)), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    spawned = 0.0005 if plugins is None else 0.005
    assert starts.core_settings == {"chat": ("1", 0.0005), "tool": (None, spawned)}
    assert sys.getswitchinterval() == 0.005 and "YAP_TEST_CHILD_ENV" not in os.environ
    chat_extra, tool_extra = chat.health().extra, tool.health().extra  # type: ignore[attr-defined]
    assert chat_extra["core_switch_interval_ms"] == 0.5 and chat_extra["child_env"] == env
    assert tool_extra.get("core_switch_interval_ms") == (0.5 if plugins is None else None)
    assert "child_env" not in tool_extra
    # engines.core_steady_heap: for the forked core (glibc), not the spawned one
    assert chat_extra.get("core_steady_heap") is (True if forking.steady_heap_supported() else None)
    assert "core_steady_heap" not in tool_extra
    said = {r.getMessage() for r in caplog.records}
    assert "EngineCore runs with a GIL switch interval of 0.5 ms (at its fork) role=chat" in said
    assert "EngineCore started by spawn: engines.core_steady_heap is for forked cores role=tool" in said
    if forking.steady_heap_supported():
        assert "EngineCore keeps a steady heap (glibc mmap threshold 32 MB, top pad 8 MB) role=chat" in said
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if plugins is None:
        assert "EngineCore runs with a GIL switch interval of 0.5 ms (vLLM plugin yapd_core) role=tool" in said
        assert not any("switch interval" in m for m in warned), warned
    else:
        assert ("EngineCore started by spawn keeps Python's switch interval: VLLM_PLUGINS=another leaves out "
                "yapd_core role=tool") in warned, warned
    assert any("without YAP_TEST_CHILD_ENV=1" in m and "role=tool" in m for m in warned), warned


@pytest.mark.parametrize("tool_method", ["", "spawn"])
async def test_cores_forked_by_the_main_thread_get_their_engines_settings(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path, caplog, tool_method: str):
    """``engines.fork_from_main_thread``: each forked EngineCore is forked by the event
    loop's thread (here the test's main thread, as in yapd) while its start's worker
    thread waits, side by side as before, with its own engine's settings; each engine
    says so. A spawned core is left to its spawn."""
    monkeypatch.delenv("YAP_TEST_CHILD_ENV", raising=False)
    starts = StandInStarts(monkeypatch, tmp_path, method="fork", tool_method=tool_method, fork_from_main_thread=True)
    try:
        chat, tool = starts.engines("chat", "tool")
        with caplog.at_level(logging.INFO, logger="yapd.engine.vllm"):
            await asyncio.wait_for(asyncio.gather(chat.start(alongside=True, child_env={"YAP_TEST_CHILD_ENV": "c"}),  # type: ignore[attr-defined]
                                                  tool.start(alongside=True)), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    main = threading.get_ident()
    assert starts.forked_by["chat"] == main and starts.core_settings["chat"] == ("c", sys.getswitchinterval())
    assert chat.health().extra["core_forked_by"] == "main thread"  # type: ignore[attr-defined]
    said = [m for m in (r.getMessage() for r in caplog.records) if "main thread" in m or "main_thread" in m]
    if tool_method == "spawn":
        assert starts.forked_by["tool"] != main and "core_forked_by" not in tool.health().extra  # type: ignore[attr-defined]
        assert sorted(said) == ["EngineCore forked by yapd's main thread role=chat",
                                "EngineCore started by spawn: engines.fork_from_main_thread is for forked cores "
                                "role=tool"], said
    else:
        assert starts.events[:2] == ["fork chat", "fork tool"]
        assert starts.forked_by["tool"] == main and starts.core_settings["tool"] == (None, sys.getswitchinterval())
        assert tool.health().extra["core_forked_by"] == "main thread"  # type: ignore[attr-defined]
        assert sorted(said) == ["EngineCore forked by yapd's main thread role=chat",
                                "EngineCore forked by yapd's main thread role=tool"], said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


async def test_a_core_forked_outside_yapds_hook_is_not_said_to_have_its_settings(monkeypatch: pytest.MonkeyPatch,
                                                                                  tmp_path: Path, caplog):
    """A vLLM whose start forked its EngineCore from a thread other than the one yapd ran
    it in: the hook's settings do not reach that core, and the engine does not claim they
    did (health, the log's warnings)."""
    monkeypatch.delenv("YAP_TEST_CHILD_ENV", raising=False)
    starts = StandInStarts(monkeypatch, tmp_path, fork_elsewhere=True, core_switch_interval_ms=0.5,
                           core_steady_heap=True, fork_from_main_thread=True)
    try:
        (chat,) = starts.engines("chat")
        with caplog.at_level(logging.INFO, logger="yapd.engine.vllm"):
            await asyncio.wait_for(chat.start(child_env={"YAP_TEST_CHILD_ENV": "1"}), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    assert starts.core_settings == {"chat": (None, 0.005)}
    extra = chat.health().extra  # type: ignore[attr-defined]
    assert not {"core_switch_interval_ms", "child_env", "core_steady_heap", "core_forked_by"} & set(extra)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if forking.steady_heap_supported():
        assert ("EngineCore started by fork keeps malloc's defaults: no fork of vLLM's start went through yapd's "
                "hook role=chat") in warned, warned
    assert ("EngineCore started by fork keeps Python's switch interval: no fork of vLLM's start went through "
            "yapd's hook role=chat") in warned, warned
    assert any("without YAP_TEST_CHILD_ENV=1" in m for m in warned), warned
    assert ("EngineCore not forked by yapd's main thread: no fork of vLLM's start was made in its thread "
            "role=chat") in warned, warned


async def failed_chat_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, match: str, method: str = "fork",
                            **failing: bool) -> tuple[StandInStarts, Any]:
    """A chat engine's start with vLLM's steps stood in and one of them failing
    (``fail_build`` or ``fail_tokenizer``); the start must fail with ``match``."""
    from yapd.engines.base import EngineError

    starts = StandInStarts(monkeypatch, tmp_path, method=method, **failing)
    try:
        (chat,) = starts.engines("chat")
        with pytest.raises(EngineError, match=match):
            await asyncio.wait_for(chat.start(), 60)  # type: ignore[attr-defined]
    finally:
        starts.end()
    assert chat.health().state == "failed"  # type: ignore[attr-defined]
    return starts, chat


@pytest.mark.parametrize("method", ["fork", "spawn"])
async def test_a_start_failing_before_its_core_started_loads_no_tokenizer(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path, method: str):
    # It also ends the start's turn: the wait for the core's fork or spawn ends with it.
    starts, _ = await failed_chat_start(monkeypatch, tmp_path, "bad engine args", method, fail_build=True)
    assert starts.events == []


async def test_a_start_failing_after_its_engine_started_shuts_that_engine_down(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path):
    # vLLM started (its EngineCore holds GPU memory) and then our tokenizer failed: the
    # failed engine must not keep that memory until the next restart or stop.
    starts, chat = await failed_chat_start(monkeypatch, tmp_path, "no tokenizer files in chat", fail_tokenizer=True)
    assert [llm.shut_down for llm in starts.built] == [True]
    assert chat._llm is None


@pytest.mark.parametrize("at", ["fork", "load"])
async def test_a_cancelled_start_shuts_down_the_engine_its_build_goes_on_to_make(stand_in: StandInStarts,
                                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                                 at: str):
    # A restart cancelled while vLLM loads (the admin client's task, at a stop): vLLM's
    # start goes on in its worker thread, and the engine it then builds must not keep GPU
    # memory with nothing left holding it. Cancelled as the core forks, or as it loads
    # (the start waiting on vLLM's: most of a start's time).
    from yapd.engines import vllm as vllm_engine

    (chat,) = stand_in.engines("chat")
    loop, reached = asyncio.get_running_loop(), asyncio.Event()
    stop = forking.on_fork(lambda: loop.call_soon_threadsafe(reached.set)) if at == "fork" else lambda: None
    if at == "load":
        stand_in._engines = 2  # our tokenizer's load does not end the core's
        load = vllm_engine.load_tokenizer

        def loaded_then_told(name: str, revision: str | None) -> Any:
            tok = load(name, revision)
            loop.call_soon_threadsafe(reached.set)
            return tok

        monkeypatch.setattr(vllm_engine, "load_tokenizer", loaded_then_told)
    try:
        start = asyncio.ensure_future(chat.start())  # type: ignore[attr-defined]
        await asyncio.wait_for(reached.wait(), 30)
    finally:
        stop()
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert chat.health().state == "failed" and not stand_in.built  # type: ignore[attr-defined]
    stand_in.loaded.set()  # the EngineCore's load ends: vLLM's start returns its engine
    await asyncio.wait_for(chat.shutdown(), 30)  # type: ignore[attr-defined]
    assert [llm.shut_down for llm in stand_in.built] == [True]
    assert chat._llm is None and chat.health().state == "stopped"  # type: ignore[attr-defined]
    await asyncio.wait_for(chat.shutdown(), 30)  # type: ignore[attr-defined]  # again: nothing left to wait on


def _report_settings(report: multiprocessing.connection.Connection) -> None:
    # A forked child's one thread has the id its forking thread has in the parent.
    report.send((os.environ.get("YAP_TEST_CHILD_ENV"), sys.getswitchinterval(), threading.get_ident()))


def _forked_child() -> tuple[str | None, float, int]:
    """What a child forked by the calling thread (or for it: forking.forks_on) runs with:
    YAP_TEST_CHILD_ENV, its GIL switch interval and the id of the thread that forked it."""
    recv, send = fork.Pipe(duplex=False)
    proc = fork.Process(target=_report_settings, args=(send,), daemon=True)
    proc.start()
    send.close()
    assert recv.poll(30)
    value: tuple[str | None, float, int] = recv.recv()
    proc.join(30)
    return value


def _forked_child_settings() -> tuple[str | None, float]:
    env, interval, _ = _forked_child()
    return env, interval


def test_child_settings_reach_children_forked_inside_the_block_only(monkeypatch):
    monkeypatch.delenv("YAP_TEST_CHILD_ENV", raising=False)
    ours = sys.getswitchinterval()
    assert ours != 0.0005
    with forking.child_settings({"YAP_TEST_CHILD_ENV": "1"}, 0.0005) as settings:
        assert _forked_child_settings() == ("1", 0.0005)
        # Not this process's own: a process some other part of yapd starts meanwhile
        # (subprocess: no at-fork hooks) does not get them either.
        assert "YAP_TEST_CHILD_ENV" not in os.environ and sys.getswitchinterval() == ours
        out = subprocess.run([sys.executable, "-c", "import os, sys; print(os.environ.get('YAP_TEST_CHILD_ENV'), "
                              "sys.getswitchinterval())"], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["None", "0.005"]
        with pytest.raises(RuntimeError, match="do not nest"), forking.child_settings({"X": "1"}):
            pass
        # Another thread's fork (the other engine starting beside this one) does not.
        assert _in_a_thread(_forked_child_settings) == (None, ours)
    # Counted in the parent: the children that got them (this thread's one fork).
    assert settings.forks == 1
    assert _forked_child_settings() == (None, ours)
    for bad in (0, -0.001, float("nan")):
        with pytest.raises(ValueError, match="above 0"), forking.child_settings({}, bad):
            pass

    # As vLLM's start uses it: the block and the fork in one worker thread; either
    # setting alone.
    def build(env: dict[str, str], interval: float | None) -> tuple[str | None, float]:
        with forking.child_settings(env, interval):
            return _forked_child_settings()

    done = _in_a_thread(lambda: [build({"YAP_TEST_CHILD_ENV": "2"}, None), build({}, 0.0002), build({}, None)])
    assert done == [("2", ours), (None, pytest.approx(0.0002)), (None, ours)] and forking._child_settings == {}


def _forks_on_and_settings(loop: asyncio.AbstractEventLoop | None) -> tuple[tuple[str | None, float, int],
                                                                          forking.LoopForks | None,
                                                                          forking.ChildSettings, int]:
    # As VllmEngine._build: both blocks in the thread that runs vLLM's start.
    with forking.forks_on(loop) as on, forking.child_settings({"YAP_TEST_CHILD_ENV": "1"}, 0.0005) as settings:
        child = _forked_child()
    return child, on, settings, threading.get_ident()


def _in_a_thread(work: Any) -> Any:
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(work()))
    thread.start()
    thread.join(60)
    return done[0]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_forks_on_a_loop_are_made_by_its_thread_and_keep_the_starting_threads_settings(
        monkeypatch: pytest.MonkeyPatch, loop_kind: str):
    """``forking.forks_on`` (engines.fork_from_main_thread): a worker thread's fork made by
    the running loop's thread, its child still given the worker's ``child_settings`` and
    counted there; a loop that is not running, or closed, leaves the fork to the worker;
    a fork that fails on the loop's thread fails in the worker."""
    monkeypatch.delenv("YAP_TEST_CHILD_ENV", raising=False)
    monkeypatch.setattr(forking, "LOOP_CHECK_S", 0.05)
    new_loop = pytest.importorskip("uvloop").new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def from_a_worker() -> Any:
        return await asyncio.to_thread(_forks_on_and_settings, asyncio.get_running_loop())

    loop = new_loop()
    try:
        (env, interval, by), on, settings, worker = loop.run_until_complete(from_a_worker())
    finally:
        loop.close()
    assert (env, interval) == ("1", 0.0005) and settings.forks == 1
    assert by == threading.get_ident() != worker and on is not None and (on.forks, on.here) == (1, 0)
    assert forking._loop_forks == {} and forking._child_settings == {}
    assert forking.forking_for() == threading.get_ident()  # the loop's thread acts for no one after

    async def on_the_loops_own_thread() -> Any:  # made there at once, not waited for forever
        return _forks_on_and_settings(asyncio.get_running_loop())

    loop = new_loop()
    try:
        (env, interval, by), on, settings, worker = loop.run_until_complete(on_the_loops_own_thread())
    finally:
        loop.close()
    assert (env, interval, by) == ("1", 0.0005, worker) and on is not None and (on.forks, on.here) == (1, 0)

    idle = new_loop()  # never run: after LOOP_CHECK_S the worker forks itself
    try:
        (env, interval, by), on, settings, worker = _in_a_thread(lambda: _forks_on_and_settings(idle))
        assert (env, interval, by) == ("1", 0.0005, worker) and on is not None and (on.forks, on.here) == (0, 1)
    finally:
        idle.close()
    (env, interval, by), on, settings, worker = _in_a_thread(lambda: _forks_on_and_settings(idle))  # closed
    assert (env, interval, by) == ("1", 0.0005, worker) and on is not None and (on.forks, on.here) == (0, 1)
    # No loop: the block does nothing.
    (env, interval, by), on, settings, worker = _in_a_thread(lambda: _forks_on_and_settings(None))
    assert (env, interval, by) == ("1", 0.0005, worker) and on is None

    async def failing() -> None:
        for error in (errno.EAGAIN, errno.ETIMEDOUT):  # ETIMEDOUT: a TimeoutError, not a wait's end
            def no_fork() -> int:
                raise OSError(error, os.strerror(error))  # noqa: B023 - called in this iteration

            with monkeypatch.context() as m:
                m.setattr(os, "fork", no_fork)
                with pytest.raises(OSError, match=os.strerror(error)):
                    await asyncio.wait_for(asyncio.to_thread(_forks_on_and_settings, asyncio.get_running_loop()), 30)
            await asyncio.sleep(0)  # the loop goes on

    loop = new_loop()
    try:
        loop.run_until_complete(failing())
    finally:
        loop.close()
    assert forking._loop_forks == {}
    with pytest.raises(RuntimeError, match="do not nest"), forking.forks_on(idle), forking.forks_on(idle):
        pass


def _runs_a_loop_of_its_own(report: multiprocessing.connection.Connection) -> None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # no current loop: one is made
            loop = asyncio.get_event_loop()
        loop.run_until_complete(asyncio.sleep(0))
        report.send("ran")
    except RuntimeError as exc:  # Python 3.14: no current loop, none made
        report.send("no current loop" if "no current event loop" in str(exc) else repr(exc))


def test_a_child_forked_by_the_loops_thread_is_not_handed_that_loop():
    """asyncio.run makes its loop the main thread's current one: a child forked by that
    thread (forks_on) must not get it from asyncio.get_event_loop(), a loop running in the
    parent that it cannot run (Python 3.12 and later forget it in a forked child; yapd's
    hook does so before)."""
    recv, send = fork.Pipe(duplex=False)

    def start(loop: asyncio.AbstractEventLoop) -> None:
        proc = fork.Process(target=_runs_a_loop_of_its_own, args=(send,))
        with forking.forks_on(loop) as on:
            proc.start()
        assert on is not None and on.forks == 1
        proc.join(30)

    async def main() -> None:
        await asyncio.to_thread(start, asyncio.get_running_loop())

    asyncio.run(main())
    assert recv.poll(30) and recv.recv() in ("ran", "no current loop")


def _grandchild(report: multiprocessing.connection.Connection) -> None:
    report.send("grandchild")


def _forks_its_own(started: multiprocessing.connection.Connection,
                   report: multiprocessing.connection.Connection) -> None:
    # As an EngineCore with tensor parallelism starts its workers: a multiprocessing fork of
    # its own (through forking's launch, which takes forking's lock).
    started.send("started")
    child = fork.Process(target=_grandchild, args=(report,))
    child.start()
    child.join(30)


def test_a_child_forked_while_another_thread_held_the_lock_can_fork_its_own(monkeypatch: pytest.MonkeyPatch):
    """forking's lock held by another thread as the loop's thread forks: in the child it
    would stay held, and the child's own forks wait for it forever."""
    go = threading.Event()
    started_recv, started_send = fork.Pipe(duplex=False)
    report_recv, report_send = fork.Pipe(duplex=False)
    hand_over = forking._fork_on_loop

    def lock_held_at_the_fork(loop: asyncio.AbstractEventLoop, popen: Any, process_obj: Any) -> Any:
        done = hand_over(loop, popen, process_obj)
        with forking._lock:  # this thread holds it while the loop's thread forks
            go.set()
            assert started_recv.poll(30), "the child did not start"
        return done

    monkeypatch.setattr(forking, "_fork_on_loop", lock_held_at_the_fork)
    proc = fork.Process(target=_forks_its_own, args=(started_send, report_send))

    def start(loop: asyncio.AbstractEventLoop) -> None:
        with forking.forks_on(loop) as on:
            proc.start()
        assert on is not None and on.forks == 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(go.wait, 30)  # the loop's thread forks only once the lock is taken
        await loop.run_in_executor(None, start, loop)

    asyncio.run(main())
    try:
        assert report_recv.poll(30) and report_recv.recv() == "grandchild"
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


# A daemon in miniature: an event loop taking SIGTERM (and SIGUSR1, a marker) through
# its wakeup socket, yapd's fork hooks installed, a child forked from a worker thread as
# vLLM forks an EngineCore. The child is sent SIGTERM, either still "loading" (no handler
# of its own) or after setting one as vLLM's EngineCore does; it must end by it, and the
# parent must not take it for its own. Prints what happened as JSON.
SIGNALLED_CHILD = """
import asyncio, json, multiprocessing, os, signal, sys

from yapd import forking


def child(own_handler, ready):
    hangup = signal.getsignal(signal.SIGHUP)  # yapd's "reload": the child lives through it
    if own_handler:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
    ready.send(getattr(hangup, "name", repr(hangup)))
    signal.sigtimedwait([], 10)  # sleeps; a signal that ends the process ends this too
    os._exit(0)


async def main(own_handler):
    loop = asyncio.get_running_loop()
    heard, marker = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, heard.set)
    loop.add_signal_handler(signal.SIGUSR1, marker.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    forking.keep_out(os.open(os.devnull, os.O_RDONLY))  # installs the hooks, as the server's start does
    fork = multiprocessing.get_context("fork")
    recv, send = fork.Pipe(duplex=False)
    proc = fork.Process(target=child, args=(own_handler, send))

    def start():
        with forking.forks_on(loop if sys.argv[3] == "main" else None) as on:
            proc.start()
        return on.forks if on else 0

    forked_by_main = await asyncio.to_thread(start)
    assert await asyncio.to_thread(recv.poll, 30)
    hangup = recv.recv()
    os.kill(proc.pid, signal.SIGTERM)
    await asyncio.to_thread(proc.join, 30)
    # A byte the child wrote to the shared wakeup socket came before this one.
    os.kill(os.getpid(), signal.SIGUSR1)
    await asyncio.wait_for(marker.wait(), 30)
    print(json.dumps({"exitcode": proc.exitcode, "parent_heard": heard.is_set(), "child_sighup": hangup,
                      "forked_by_main": forked_by_main}))


if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.install()
asyncio.run(main(sys.argv[2] == "own"))
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("handler", ["loading", "own"])
@pytest.mark.parametrize("forked_by", ["worker", "main"])
def test_a_signal_sent_to_a_forked_child_is_the_childs(loop: str, handler: str, forked_by: str):
    # forked_by "main": the worker's fork made by the loop's thread, inside a callback of
    # the running loop (engines.fork_from_main_thread).
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    out = subprocess.run([sys.executable, "-c", SIGNALLED_CHILD, loop, handler, forked_by], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    expected = -15 if handler == "loading" else 3
    assert json.loads(out.stdout) == {"exitcode": expected, "parent_heard": False, "child_sighup": "SIG_IGN",
                                      "forked_by_main": int(forked_by == "main")}


def _plugin_in_spawned_child(report: multiprocessing.connection.Connection) -> None:
    from yapd import vllm_plugin

    vllm_plugin.in_engine_core()
    report.send(sys.getswitchinterval())


def test_the_vllm_plugin_acts_only_in_a_direct_child_of_the_process_that_offered(monkeypatch: pytest.MonkeyPatch):
    from importlib import metadata

    from yapd import vllm_plugin

    spawn = multiprocessing.get_context("spawn")

    def spawned_interval() -> float:
        recv, send = spawn.Pipe(duplex=False)
        child = spawn.Process(target=_plugin_in_spawned_child, args=(send,))
        child.start()
        send.close()
        assert recv.poll(60)
        value: float = recv.recv()
        child.join(30)
        return value

    monkeypatch.setenv(vllm_plugin.SWITCH_INTERVAL_ENV, "")  # removed at the test's end whatever happens
    vllm_plugin.offer(0.25)
    assert os.environ[vllm_plugin.SWITCH_INTERVAL_ENV] == f"0.25@{os.getpid()}"
    assert spawned_interval() == pytest.approx(0.00025)
    vllm_plugin.in_engine_core()  # the offering process itself: left alone
    assert sys.getswitchinterval() == 0.005
    # Not ours to judge: a value of another process (a core's own children, a vLLM that
    # yapd did not start) or of another form is left alone, and never raises.
    for value in (f"0.25@{os.getppid()}", "0.25", "soon@1", "0.25@x", "nan@" + str(os.getpid()),
                  f"1000@{os.getpid()}", f"0@{os.getpid()}"):
        monkeypatch.setenv(vllm_plugin.SWITCH_INTERVAL_ENV, value)
        assert spawned_interval() == 0.005, value
    vllm_plugin.offer(0)
    assert vllm_plugin.SWITCH_INTERVAL_ENV not in os.environ and spawned_interval() == 0.005

    # What would keep vLLM from running it: VLLM_PLUGINS without it, no entry point.
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert vllm_plugin.loadable() is None, "the package's entry points are not installed: make install"
    monkeypatch.setenv("VLLM_PLUGINS", "a,yapd_core")
    assert vllm_plugin.loadable() is None
    monkeypatch.setenv("VLLM_PLUGINS", "a")
    assert vllm_plugin.loadable() == "VLLM_PLUGINS=a leaves out yapd_core"
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [])
    assert "no vllm.general_plugins entry point yapd_core" in (vllm_plugin.loadable() or "")


def test_the_device_registers_the_plugin_of_an_uninstalled_tree(tmp_path: Path):
    """On the device the project runs from its tree on PYTHONPATH; the kit's install
    writes its entry points beside vLLM (docs/bench/device/register_plugin.py), where a
    spawned EngineCore's vLLM finds the plugin."""
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "docs/bench/device/register_plugin.py"), str(tmp_path)], cwd=root,
                   check=True, capture_output=True)
    (dist,) = metadata.distributions(path=[str(tmp_path)])
    assert dist.metadata["Name"] == "yap"
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [
        ("vllm.general_plugins", "yapd_core", "yapd.vllm_plugin:in_engine_core")]


@pytest.mark.skipif(not forking.steady_heap_supported(), reason="glibc's mallopt only")
def test_a_child_forked_from_a_worker_thread_faults_every_step_unless_kept_steady_or_forked_by_the_main_thread():
    """What engines.core_steady_heap and engines.fork_from_main_thread mend (yapctl.heapprobe,
    each child from a fresh process): forked from a worker thread that built up its
    arena, a child that makes and drops ~1.4 MB of buffers a step maps a fresh heap for
    them every step and faults on each of its pages (~245 a step on glibc 2.36). Kept
    steady, it reuses its heap; forked by the main thread (for that worker), it allocates
    from glibc's main arena, as one forked by the main thread itself does."""
    import platform

    from yapctl import heapprobe

    got = {way: heapprobe.measure(way, steps=100) for way in heapprobe.WAYS}
    assert all("error" not in r for r in got.values()), got
    assert got["worker_steady"]["steady_heap"] and not got["worker_steady"]["by_main"]
    assert got["by_main"]["by_main"] and not got["by_main"]["steady_heap"]
    assert not any(got[way]["steady_heap"] or got[way]["by_main"] for way in ("worker", "main"))
    for way in ("worker_steady", "by_main", "main"):
        assert got[way]["minflt_per_step"] < 10, got
    libc, version = platform.libc_ver()
    if libc == "glibc" and version.startswith("2.3"):  # where it was seen (this machine's 2.36)
        assert got["worker"]["minflt_per_step"] >= 100, got  # a page fault for most of the MB, every step


def test_the_heap_probe_refuses_bad_arguments():
    from yapctl import heapprobe

    for bad in (["--steps", "0"], ["--rounds", "0"], ["--one", "spawn"]):
        with pytest.raises(SystemExit) as exc:
            heapprobe.main(bad)
        assert exc.value.code == 2


def test_another_allocator_is_found_by_the_libraries_mapped_and_glibcs_own_is_not():
    """The steady heap is glibc's mallopt: left out where another malloc was preloaded or
    linked in, and kept where only glibc's is there, also when the program's own malloc
    symbol is its PLT entry (a non-PIE python3, as the device's: an address comparison
    took glibc's malloc for another one there, run ab of 2026-12-05)."""
    glibc_only = ("00400000-00420000 r--p 00000000 08:01 123 /usr/bin/python3.12\n"
                  "7f0000000000-7f0000200000 r-xp 00028000 08:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                  "7fff00000000-7fff00021000 rw-p 00000000 00:00 0                          [stack]\n"
                  "7f1000000000-7f1000001000 rw-p 00000000 00:00 0 \n")
    assert forking.other_allocator(glibc_only) is None
    preloaded = glibc_only + ("7f2000000000-7f2000040000 r-xp 00000000 08:01 789 "
                              "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.16\n")
    assert forking.other_allocator(preloaded) == "libtcmalloc_minimal.so.4.5.16"
    assert forking.other_allocator("7f3-7f4 r-xp 0 08:01 1 /opt/lib/libjemalloc.so.2 (deleted)\n") is not None
    # This process: glibc's malloc alone (the suite's Python), so the steady heap applies.
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert forking.other_allocator(Path("/proc/self/maps").read_text()) is None
        assert forking.steady_heap_supported()
