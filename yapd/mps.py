"""CUDA MPS for the engines: the chat and tool EngineCores share the GPU at once.

Without MPS the GPU time-slices between processes, so at load the tool engine's first
token (which holds every reply back: the decision comes before the tokens) waits behind
the chat engine's work and the other way round. Measured on an H200 with both engines in
one yapd (docs/bench/h200-2026-12-02-b and -mps, 16 rounds per level): TTFT p50 / p95 at
16 sessions 84.6 / 137.1 ms time-sliced, 59.1 / 89.1 ms under MPS; at 1 session 20.6 vs
18.8 ms. The price: each decode step is slower (ITL p50 5.0 vs 5.7 ms at 1 session).

So with ``engines.mps = "auto"`` (the default) yapd runs a private MPS control daemon,
its own child, whenever two vLLM engines share one GPU, and stops it after they stop.
Its pipe and log folders are private to this yapd (beside its admin socket) and set
in this process's environment, which vLLM's EngineCores inherit. When MPS cannot run
(no control binary, the daemon will not start, the engines fail under it) "auto" goes
on without it and says why; ``"on"`` makes that a start failure; ``"off"`` never runs it.
An MPS the host already runs (CUDA_MPS_PIPE_DIRECTORY set for yapd) is used as it is.

Under MPS the two engines' kernels compete for the SMs. With ``engines.mps_priority =
"tool"`` the chat EngineCore starts with MPS's below-normal client priority
(CUDA_MPS_CLIENT_PRIORITY=1, in its environment only): when both have work queued, the GPU
schedules the tool engine's thread blocks first (its decision gates every reply). It is
not the default: measured on one H200 minutes apart (docs/bench, run n, each turn's tool
request first) it costs one session 3.7 ms (TTFT p50 21.09 ms at equal priority, 24.77
below normal) for 2.5 / 5.4 ms gained at 8 / 16 sessions (run k, chat request first:
15.7 ms at 16); on one H100 (runs bc-bf, chat request first) 8 ms gained at 16 sessions,
3.5-4.4 lost at 8 and 8.5 at 24, nothing at one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from yapd import forking
from yapd.config import Config, EngineConfig
from yapd.engines import resolve_backend

log = logging.getLogger("yapd.mps")

MPS_CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
PRIORITY_ENV = "CUDA_MPS_CLIENT_PRIORITY"
BELOW_NORMAL = "1"
# The control socket is a Unix socket in the pipe folder: its path must fit sun_path.
MAX_SOCKET_PATH = 107
NO_BINARY = f"no {MPS_CONTROL} on PATH (it comes with the NVIDIA driver)"


class MpsError(RuntimeError):
    pass


def plan(cfg: Config, roles: Sequence[str], env: Mapping[str, str] | None = None,
         binary: str | None = None) -> tuple[bool, str]:
    """Whether the engines of ``roles`` should start under yapd's own MPS daemon, and
    why (logged, and shown in /status). ``binary``: the control binary found on PATH."""
    env = os.environ if env is None else env
    mode = cfg.engines.mps
    if mode == "off":
        return False, "engines.mps is off"
    if env.get(PIPE_ENV):
        return False, f"the engines use the MPS daemon at {PIPE_ENV}={env[PIPE_ENV]}"
    # Test hook: let CPU engines stand for GPU ones, so a real yapd runs the MPS path.
    backends = set((env.get("YAPD_DEBUG_MPS_BACKENDS") or "vllm").split(","))
    gpu = [r for r in roles if resolve_backend(_engine(cfg, r), cfg.demo) in backends]
    if not gpu:
        return False, "no GPU engine"
    if mode == "auto":
        if len(gpu) < 2:
            return False, "one GPU engine: nothing shares its GPU"
        if any(_engine(cfg, r).tensor_parallel_size * _engine(cfg, r).data_parallel_size > 1 for r in gpu):
            return False, 'engines on several GPUs: MPS runs there only when asked (engines.mps = "on")'
    renumbered = renumbered_devices(env)
    if renumbered:
        return False, renumbered
    if binary is None:
        return False, NO_BINARY
    return True, f"{len(gpu)} GPU engine{'s' if len(gpu) > 1 else ''} share the GPU"


def renumbered_devices(env: Mapping[str, str]) -> str | None:
    """Why CUDA_VISIBLE_DEVICES rules MPS out, if it does: the MPS server renumbers the
    devices it sees, so an index (or a MIG instance) would name another GPU, or none, in
    the engines; a GPU UUID names the same one on both sides."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if any(d.strip() and not d.strip().startswith("GPU-") for d in visible.split(",")):
        return (f"CUDA_VISIBLE_DEVICES={visible} is not a GPU UUID: the MPS server would renumber it "
                "(name the GPU by UUID, from nvidia-smi -L)")
    return None


def folder_for(cfg: Config) -> Path:
    """Beside the admin socket and named after it: replicas on one host, each with its
    own admin socket, each get their own MPS folder."""
    sock = cfg.admin_socket_path()
    return sock.parent / ("mps" if sock.stem == "admin" else f"mps-{sock.stem}")


def _engine(cfg: Config, role: str) -> EngineConfig:
    ecfg: EngineConfig = getattr(cfg, role)
    return ecfg


class MpsDaemon:
    """``nvidia-cuda-mps-control -f``: a control daemon run as this process's child, so
    its liveness is known and it never outlives yapd's stop. Blocking calls: the daemon
    runs them in a thread."""

    def __init__(self, folder: Path, binary: str | None = None) -> None:
        self.folder = folder
        self.binary = binary or shutil.which(MPS_CONTROL)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._unhold: Callable[[], None] = lambda: None
        self._env_set = False

    @property
    def env(self) -> dict[str, str]:
        return {PIPE_ENV: str(self.folder / "pipe"), LOG_ENV: str(self.folder / "log")}

    @property
    def control_socket(self) -> Path:
        return self.folder / "pipe" / "control"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 15.0) -> None:
        """Start the daemon and wait until its control socket answers; then every
        process started from here on (vLLM's EngineCores) is its client."""
        if self.running:
            return
        if self.binary is None:
            raise MpsError(NO_BINARY)
        if len(str(self.control_socket)) > MAX_SOCKET_PATH:
            raise MpsError(f"MPS pipe folder {self.folder / 'pipe'} is too long for a Unix socket path")
        try:
            self._start(timeout)
        except OSError as exc:
            self.stop()
            raise MpsError(f"MPS daemon in {self.folder}: {exc}") from exc
        except MpsError:
            self.stop()
            raise
        os.environ.update(self.env)
        self._env_set = True

    def _start(self, timeout: float) -> None:
        assert self.binary is not None
        for path in self.env.values():
            Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._take_lock()
        if _answers(self.control_socket):
            # Ours by the lock, yet answering: a yapd before this one left it running
            # (killed without its stop). It serves no engine of ours, and ours must be
            # the one whose life we manage.
            log.warning("an MPS control daemon already answers at %s: asking it to quit", self.control_socket)
            self._command("quit")
            _wait(lambda: not _answers(self.control_socket), timeout)
        with (self.folder / "log" / "yapd-control.out").open("ab") as out:
            # A session of its own: a Ctrl-C meant for yapd must not kill the GPU's MPS
            # server under engines that are still finishing their turns.
            self._proc = subprocess.Popen([self.binary, "-f"], env={**os.environ, **self.env},
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        proc = self._proc
        if not _wait(lambda: proc.poll() is not None or _answers(self.control_socket), timeout) or \
                proc.poll() is not None:
            code = proc.poll()
            raise MpsError(f"{MPS_CONTROL} -f " + (f"exited {code}" if code is not None else
                                                   f"did not answer within {timeout:.0f} s")
                           + self._log_hint())

    def _take_lock(self) -> None:
        """One yapd per MPS folder: a second one (two replicas whose admin sockets share
        a folder and a name) would otherwise quit the first one's daemon under its engines."""
        if self._lock is not None:  # ours still: the daemon died on its own, no stop since
            return
        lock = (self.folder / "yapd.lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise MpsError(f"{self.folder} is in use by another yapd (pid {owner}): give each yapd an admin socket "
                           'of its own name or folder, or set engines.mps = "off"') from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        # vLLM forks its EngineCores from yapd: one holding a copy would keep the folder
        # locked after yapd has let it go (or died).
        self._unhold = forking.keep_out(lock.fileno())
        self._lock = lock

    def stop(self, timeout: float = 10.0) -> None:
        """Quit the daemon (and with it the MPS server) and take its settings out of this
        process's environment. Call once no engine of ours runs: their GPU contexts live
        in that server."""
        proc, self._proc = self._proc, None
        if self._env_set:  # only what this daemon's start put there
            self._env_set = False
            for key, value in self.env.items():
                if os.environ.get(key) == value:
                    del os.environ[key]
        try:
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(MpsError):
                self._command("quit")
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("MPS control daemon pid=%d did not quit in %.0f s: killing it and its server",
                            proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: the MPS server too
                proc.wait()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                self._unhold()
                lock.close()  # releases the folder for the next yapd

    def log_tail(self, lines: int = 40) -> list[str]:
        """The control daemon's own log: the servers it started for which clients."""
        try:
            text = (self.folder / "log" / "control.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def _command(self, command: str, timeout: float = 10.0) -> str:
        assert self.binary is not None
        try:
            out = subprocess.run([self.binary], input=command + "\n", env={**os.environ, **self.env},
                                 capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MpsError(f"{MPS_CONTROL} {command!r}: {exc}") from exc
        if out.returncode != 0:
            raise MpsError(f"{MPS_CONTROL} {command!r} exited {out.returncode}: {(out.stdout + out.stderr).strip()}")
        return out.stdout

    def _log_hint(self) -> str:
        tail = self.log_tail(3)
        try:
            tail += (self.folder / "log" / "yapd-control.out").read_text(errors="replace").splitlines()[-3:]
        except OSError:
            pass
        return f": {' | '.join(tail)}" if tail else ""


def _answers(path: Path) -> bool:
    """Whether a daemon listens on the control socket (the real one is a seqpacket
    socket: a stream connect to it fails with EPROTOTYPE)."""
    if not path.exists():
        return False
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(str(path))
            except OSError:
                continue
        return True
    return False


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class Mps:
    """What the daemon does about MPS around each engine start and at its stop."""

    def __init__(self, folder: Path) -> None:
        self.daemon = MpsDaemon(folder)
        self.mode = "off"
        self.reason = "no engine started yet"
        self.failed: str | None = None  # "auto" gave up on MPS here: until yapd restarts
        self.priority = "tool"

    def prepare(self, cfg: Config, roles: Sequence[str], others_running: bool) -> bool:
        """Before engines start (blocking). ``roles``: every deployed role, also those
        that are not restarting (whether two engines share the GPU is decided over all of
        them). Returns whether the engines start under a daemon that "auto" started,
        which :meth:`give_up` may take away if they fail under it. While other engines
        run, nothing changes: their GPU contexts live in the MPS server (or outside one),
        and the new engines join them as they are."""
        # The priority is each client's own: an engine joining the others takes the
        # current one too.
        self.priority = cfg.engines.mps_priority
        if others_running:
            return False
        self.mode = cfg.engines.mps
        env = self.host_env()
        want, reason = plan(cfg, roles, env, binary=self.daemon.binary)
        if want and self.failed and self.mode == "auto":
            want, reason = False, self.failed
        if not want:
            self.reason = reason
            if self.mode == "on" and reason in (NO_BINARY, renumbered_devices(env)):
                raise MpsError(f'engines.mps is "on" but {reason}')
            self.stop()
            if reason != "no GPU engine":
                log.info("engines start without yapd's MPS daemon: %s", reason)
            return False
        if self.daemon.running:
            return self.mode == "auto"
        try:
            self.daemon.start()
        except MpsError as exc:
            self.reason = f"the MPS daemon did not start: {exc}"
            if self.mode == "on":
                raise
            self.failed = self.reason  # not tried again at every engine restart
            log.warning("engines start without MPS until yapd restarts: %s", self.reason)
            return False
        self.reason = reason
        log.info("MPS control daemon started pid=%s pipe=%s (%s)", self.daemon.pid, self.daemon.env[PIPE_ENV], reason)
        return self.mode == "auto"

    def client_env(self, role: str) -> dict[str, str]:
        """What ``role``'s EngineCore adds to its environment: under MPS with
        ``mps_priority = "tool"``, the chat engine runs below normal priority. A priority
        set for yapd itself is left to every engine as it is."""
        if role != "chat" or self.priority != "tool" or PRIORITY_ENV in os.environ or not self.status()["active"]:
            return {}
        return {PRIORITY_ENV: BELOW_NORMAL}

    def give_up(self, why: str) -> None:
        """The engines failed to start under the daemon "auto" started: stop it and run
        without MPS until yapd restarts (call once those engines are shut down)."""
        self.failed = f"the engines failed to start under MPS ({why})"
        self.reason = self.failed
        self.stop()

    def stop(self) -> None:
        was = self.daemon.running
        self.daemon.stop()  # also when it died on its own: its settings leave the environment
        if was:
            log.info("MPS control daemon stopped")

    def status(self) -> dict[str, Any]:
        pid = self.daemon.pid  # None unless our daemon runs: then a host's MPS, if any
        pipe = self.daemon.env[PIPE_ENV] if pid is not None else self.host_env().get(PIPE_ENV)
        return {"mode": self.mode, "active": bool(pipe), "daemon_pid": pid, "pipe": pipe, "reason": self.reason,
                "priority": self.priority}

    def host_env(self) -> dict[str, str]:
        """The environment without our own daemon's settings: what is the host's (our
        settings stay behind if our daemon dies on its own), and what a process that is
        not an engine (an AWQ job) is started with."""
        return {k: v for k, v in os.environ.items() if self.daemon.env.get(k) != v}
