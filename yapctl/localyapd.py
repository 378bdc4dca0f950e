"""A yapd of our own: ``python -m yapd`` on 127.0.0.1 with its own config, port and
admin socket. The soak and fuzz programs load one; the test suite runs its daemons so.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# The daemon's own environment decides nothing here: the config file does.
INHERITED_NOT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "YAP_API_KEY", "DEPLOY_MODELS",
                 "CONCURRENT_MODEL_CALL", "STREAM_FLUSH_MS", "RUNTIME_DIRECTORY", "JOURNAL_STREAM")


class LocalYapd:
    """``python -m yapd`` (``--demo`` by default) in ``workdir`` with its own config,
    port (0: any free one) and admin socket; its stderr lines are kept in ``lines``."""

    def __init__(self, workdir: Path, key: str, *, config: str = "", server: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, cache_dir: str | Path | None = None,
                 args: list[str] | None = None, demo: bool = True, entry: list[str] | None = None) -> None:
        self.workdir = workdir
        self.key = key
        self.demo = demo
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.toml"
        self.admin_socket = workdir / "admin.sock"
        self.write_config(config, server)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in INHERITED_NOT:
            self.env.pop(var, None)
        if cache_dir:
            self.env["YAP_CACHE_DIR"] = str(cache_dir)
        self.env.update(env or {})
        self.args = args or []
        # What runs the daemon: yapd itself, or a program that runs yapd's main (frontbench).
        self.entry = entry or [sys.executable, "-m", "yapd"]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self, text: str = "", server: dict[str, Any] | None = None) -> None:
        """[server] on loopback with this daemon's key, plus ``server`` keys, plus ``text``."""
        keys: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "api_keys": [self.key], **(server or {})}
        head = "[server]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        self.config_path.write_text(head + "\n" + text)

    def start(self, wait: bool = True, timeout: float = 90) -> LocalYapd:
        cmd = [*self.entry, *(["--demo"] if self.demo else []), "--config",
               str(self.config_path), "--admin-socket", str(self.admin_socket), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            try:
                self.wait_for("yapd.daemon: ready port=", timeout)
            except BaseException:
                self.stop()  # nobody else holds it yet
                raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._q.put(line)
            if "yapd.server: listening" in line:
                self.port = int(line.rsplit("port=", 1)[1].split()[0])

    def wait_for(self, needle: str, timeout: float = 30, count: int = 1) -> str:
        """Wait until ``count`` log lines contain ``needle`` (lines seen earlier count too);
        the ``count``-th of them. The log is read by a thread of its own: a line the daemon
        wrote before it answered a request can still be on its way here."""
        deadline = time.monotonic() + timeout
        found: list[str] = []
        seen = 0  # each line is looked at once, however long the log
        while True:
            new = self.lines[seen:]
            seen += len(new)
            found += [line for line in new if needle in line]
            if len(found) >= count:
                return found[count - 1]
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(self.lines[-30:])
                raise TimeoutError(f"{len(found)} of {count} log lines with {needle!r}; last lines:\n{tail}")
            try:
                self._q.get(timeout=min(left, 0.5))  # a new line: look again
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None and self._q.empty():
                    tail = "\n".join(self.lines[-40:])
                    raise RuntimeError(f"yapd exited {self.proc.returncode}:\n{tail}") from None

    def url(self, key: str | None = "", path: str = "/ws") -> str:
        """This daemon's WebSocket URL with ``key`` (default: its own; None: none)."""
        key = self.key if key == "" else key
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?api_key={key}" if key else "")

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
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
