"""Test harness: real yapd processes on loopback, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
KEY = "test_key"


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


class Yapd:
    """A yapd subprocess in demo mode with its own config, port and admin socket."""

    def __init__(self, workdir: Path, cache: Path, config: str = "", env: dict[str, str] | None = None,
                 args: list[str] | None = None, server: dict[str, Any] | None = None, demo: bool = True) -> None:
        self.workdir = workdir
        self.demo = demo
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.toml"
        self.admin_socket = workdir / "admin.sock"
        self.write_config(config, server)
        self.env = {**os.environ, "YAP_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "YAP_API_KEY", "DEPLOY_MODELS",
                    "CONCURRENT_MODEL_CALL", "STREAM_FLUSH_MS", "RUNTIME_DIRECTORY", "JOURNAL_STREAM"):
            self.env.pop(var, None)
        self.env.update(env or {})
        self.args = args or []
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self.port = 0

    def write_config(self, text: str = "", server: dict[str, Any] | None = None) -> None:
        """[server] on loopback with the test key, plus ``server`` keys, plus ``text``."""
        keys: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "api_keys": [KEY], **(server or {})}
        head = "[server]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        self.config_path.write_text(head + "\n" + text)

    def start(self, wait: bool = True, timeout: float = 90) -> Yapd:
        cmd = [sys.executable, "-m", "yapd", *(["--demo"] if self.demo else []), "--config",
               str(self.config_path), "--admin-socket", str(self.admin_socket), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_for("yapd.daemon: ready port=", timeout)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._q.put(line)
            if "yapd.server: listening" in line:
                self.port = int(line.rsplit("port=", 1)[1].split()[0])

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        """Wait for a log line containing ``needle`` (lines seen earlier count too)."""
        for line in list(self.lines):
            if needle in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(self.lines[-30:])
                raise TimeoutError(f"no log line with {needle!r}; last lines:\n{tail}")
            try:
                line = self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None and self._q.empty():
                    tail = "\n".join(self.lines[-40:])
                    raise RuntimeError(f"yapd exited {self.proc.returncode}:\n{tail}") from None
                continue
            if needle in line:
                return line

    def url(self, key: str | None = KEY, path: str = "/ws") -> str:
        q = f"?api_key={key}" if key else ""
        return f"ws://127.0.0.1:{self.port}{path}{q}"

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

    def admin(self, timeout: float = 60, **req: Any) -> list[dict[str, Any]]:
        """Send one admin request; return every reply line up to the one with "ok"."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin_socket))
            s.sendall(json.dumps(req).encode() + b"\n")
            f = s.makefile("r")
            out = []
            for line in f:
                msg = json.loads(line)
                out.append(msg)
                if "ok" in msg:
                    break
            return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
    d = Yapd(tmp_path_factory.mktemp("shared"), cache_dir,
             server={"max_connections": 64, "rate_limit_per_s": 1000.0, "rate_limit_burst": 1000})
    d.start()
    yield d
    d.stop()


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
