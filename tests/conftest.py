"""Test harness: real yapd processes on loopback, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from yapctl.localyapd import LocalYapd
from yapd import mps

ROOT = Path(__file__).resolve().parent.parent
KEY = "test_key"
MPS_STANDIN = Path(__file__).with_name("mps_standin.py")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo models are built once per run (or reused from YAPD_TEST_CACHE)."""
    env = os.environ.get("YAPD_TEST_CACHE")
    if env:
        path = Path(env)
    else:
        path = tmp_path_factory.mktemp("cache")
    from yapd import demo

    demo.build(path / "demo")
    return path


# The demo chat model's weights are random and its replies sampled: about one turn in
# 760 drew its end-of-sequence token first (p = 0.0013 for "a long story please"), a reply
# with no token frame at all, which a test waiting for one waited out. Replies run to
# turn.chat_max_out instead wherever a test needs a reply's tokens.
UNENDING = "[turn]\nignore_eos = true\n"


class Yapd(LocalYapd):
    """A yapd subprocess (demo mode unless ``demo=False``) with the test key, its own
    config, port and admin socket, and the suite's demo models."""

    def __init__(self, workdir: Path, cache: Path, config: str = "", env: dict[str, str] | None = None,
                 args: list[str] | None = None, server: dict[str, Any] | None = None, demo: bool = True) -> None:
        super().__init__(workdir, KEY, config=config, server=server, env=env, cache_dir=cache, args=args,
                         demo=demo)

    def http(self, path: str, key: str | None = KEY) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if key:
            req.add_header("X-API-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


class EngineCores:
    """yapd's EngineCores, which are not the test's children to wait for: watched through
    a pidfd each (readable once the process has ended). ``assert_gone`` checks each has
    ended; leaving the block kills any left, which would hold GPU memory through the
    tests after."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def watch(self, *pids: int) -> None:
        for pid in pids:
            self.fds[pid] = os.pidfd_open(pid)

    def assert_gone(self, timeout: float = 10) -> None:
        for pid, fd in self.fds.items():
            assert select.select([fd], [], [], timeout)[0], f"EngineCore {pid} outlived yapd"

    def __enter__(self) -> EngineCores:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)  # the process itself, even if its pid is reused
            os.close(fd)


@pytest.fixture
def make_yapd(tmp_path: Path, cache_dir: Path) -> Iterator[Any]:
    started: list[Yapd] = []

    def make(config: str = "", *, start: bool = True, env: dict[str, str] | None = None,
             args: list[str] | None = None, server: dict[str, Any] | None = None, name: str = "d",
             demo: bool = True) -> Yapd:
        d = Yapd(tmp_path / f"{name}{len(started)}", cache_dir, config, env, args, server, demo)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def shared_yapd(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Yapd]:
    """One daemon (deploy both, sequential) for the many tests that only talk to it."""
    d = Yapd(tmp_path_factory.mktemp("shared"), cache_dir, UNENDING,
             server={"max_connections": 64, "rate_limit_per_s": 1000.0, "rate_limit_burst": 1000})
    d.start()
    yield d
    d.stop()


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder for an MPS daemon's pipes and log (tests/test_mps.py, the fork probe's),
    short: the control socket's path must fit a Unix socket address."""
    with tempfile.TemporaryDirectory(prefix="mps", dir="/tmp") as d:
        yield Path(d) / "mps"


@pytest.fixture
def control_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in, first on PATH under the real binary's name."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / mps.MPS_CONTROL
    tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{MPS_STANDIN}" "$@"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for var in (mps.PIPE_ENV, mps.LOG_ENV, "STANDIN_FAIL", "STANDIN_DEAF", "STANDIN_GATE"):
        monkeypatch.delenv(var, raising=False)
    return tool


# --- client helpers --------------------------------------------------------------


@contextlib.asynccontextmanager
async def ws_connect(url: str, **kw: Any) -> AsyncIterator[ClientConnection]:
    async with connect(url, open_timeout=10, max_size=None, **kw) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = 20) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)


async def send(ws: ClientConnection, **msg: Any) -> None:
    await ws.send(json.dumps(msg))


def send_in_one_write(ws: ClientConnection, *msgs: dict[str, Any]) -> None:
    """``msgs`` as frames in one write to the socket: the server reads them in one go, as
    it does a client's frames sent back to back under load."""
    for msg in msgs:
        ws.protocol.send_text(json.dumps(msg).encode())
    ws.transport.write(b"".join(ws.protocol.data_to_send()))


async def run_turn(ws: ClientConnection, timeout: float = 30, **start: Any) -> list[dict[str, Any]]:
    """Send a start and collect that turn's messages up to and including its done."""
    start.setdefault("session_id", "s1")
    start.setdefault("user_utterance", "hello there")
    await send(ws, type="start", **start)
    return await until_done(ws, timeout)


async def until_done(ws: ClientConnection, timeout: float = 30) -> list[dict[str, Any]]:
    out = []
    while True:
        m = await recv(ws, timeout)
        out.append(m)
        if m["type"] == "done":
            return out
