"""The daemon's side of AWQ: run :mod:`yapd.awq.job` processes, relay their progress.

Two callers: the start (and every engine restart) of an engine in awq mode whose
cache entry is missing builds it first (:meth:`AwqJobs.ensure_cached`), telling systemd
what it is doing; ``yapctl awq rebuild`` builds again while the daemon keeps serving
on the old weights, then restarts the engines onto the new ones
(:meth:`AwqJobs.handle`). One job runs at a time. The job is a child process: the
daemon's event loop only reads its JSON lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yapd import awq
from yapd.awq.job import fmt_duration
from yapd.engines.base import EngineError

if TYPE_CHECKING:
    from yapd.config import Config, EngineConfig
    from yapd.daemon import Daemon

log = logging.getLogger("yapd.awq")

Send = Callable[[dict[str, Any]], Awaitable[None]]
ROLES = ("chat", "tool")


def push_settings_error(cfg: Config, role: str) -> str | None:
    """Why a push configured for ``role`` cannot start, or None."""
    if not cfg.awq.push:
        return None
    from yapd.awq.push import check

    try:
        check(role, getattr(cfg.awq, f"{role}_repo"), hf_token(cfg))
    except awq.AwqError as exc:
        return str(exc)
    return None


def hf_token(cfg: Config) -> str:
    return cfg.awq.hf_token or os.environ.get("HF_TOKEN", "")


def job_command(cfg: Config, role: str, source: str, ecfg: EngineConfig) -> list[str]:
    """The job's command line. Paths are made absolute here: the job runs in the cache's
    awq folder, where a path relative to yapd's own folder means something else."""
    a = cfg.awq
    out = awq.cache_path(cfg.cache_dir(), source, ecfg.revision).absolute()
    if Path(source).exists():  # a local checkpoint (not a Hub repo id)
        source = str(Path(source).absolute())
    argv = [a.python or sys.executable, "-m", "yapd.awq.job", "--model", source, "--out", str(out),
            "--role", role, "--bits", str(a.bits), "--group-size", str(a.group_size),
            "--samples", str(a.calibration_samples), "--max-len", str(a.calibration_max_len), "--device", a.device]
    if ecfg.revision:
        argv += ["--revision", ecfg.revision]
    if a.calibration_file:
        argv += ["--calibration-file", str(Path(a.calibration_file).absolute())]
    if a.push:
        argv += ["--push-repo", getattr(a, f"{role}_repo"), "--push-branch", a.branch,
                 "--push-private" if a.private else "--no-push-private",
                 "--push-commit-message", getattr(a, f"commit_message_{role}")]
        if a.allow_create:
            argv.append("--push-allow-create")
        if a.hub_endpoint:
            argv += ["--hub-endpoint", a.hub_endpoint]
    return argv


class AwqJobs:
    def __init__(self, daemon: Daemon, stop: asyncio.Event) -> None:
        self.daemon = daemon
        self._stop = stop
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._terminated: set[int] = set()
        self._cancelled = False  # the running rebuild was cancelled (yapctl awq cancel)
        self.running: dict[str, Any] | None = None
        self._started = 0.0  # the running job's start, time.monotonic()
        self.last: dict[str, dict[str, Any]] = {}

    @property
    def cfg(self) -> Config:
        return self.daemon.cfg

    # --- admin socket ------------------------------------------------------------------

    async def handle(self, action: str, req: dict[str, Any], send: Send) -> None:
        if action == "status":
            await send({"ok": True, **self.status()})
        elif action == "rebuild":
            await self._rebuild(req, send)
        elif action == "cancel":
            await send(await self.cancel())
        else:
            await send({"ok": False, "error": f"unknown awq action {str(action)[:40]!r} "
                                              "(known: status, rebuild, cancel)"})

    async def cancel(self) -> dict[str, Any]:
        """End the running job (SIGTERM: it removes its temporary directory; the cache
        entry it would replace stays), and the rebuild's roles still to come. A rebuild
        could be ended only by stopping the daemon: an hour of GPU time for a 12B model."""
        proc, running = self._proc, self.running
        if proc is None or running is None or proc.returncode is not None:
            return {"ok": False, "error": "no AWQ job is running"}
        self._cancelled = True
        log.warning("AWQ job cancelled by an admin request role=%s pid=%d", running["role"], proc.pid)
        await self._terminate(proc)
        return {"ok": True, "cancelled": running["role"], "model": running["model"]}

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        models = []
        for role in ROLES:
            ecfg: EngineConfig = getattr(cfg, role)
            info: dict[str, Any] = {"role": role, "deployed": cfg.deployed(role), "quantization": ecfg.quantization,
                                    "model": ecfg.model}
            source = awq.source_for(ecfg)
            if source is None:
                info["prequantized"] = ecfg.awq_model or ecfg.model
            else:
                path = awq.cache_path(cfg.cache_dir(), source, ecfg.revision)
                meta = awq.read_metadata(path) if awq.is_complete(path) else None
                info["cache"] = str(path) if meta else None
                if meta:
                    q, lib = awq.section(meta, "quantization"), awq.section(meta, "library")
                    info.update(created=meta.get("created"), group_size=q.get("group_size"), bits=q.get("bits"),
                                library=f"{lib.get('name')} {lib.get('version')}")
            models.append(info)
        return {"cache_dir": str(awq.cache_root(cfg.cache_dir())), "models": models, "job": self._running_now(),
                "last": self.last, "push": cfg.awq.push}

    def _running_now(self) -> dict[str, Any] | None:
        """The job running, its elapsed time as of now (the job says it only with its
        progress lines, none for the minutes of a Hub download)."""
        if self.running is None:
            return None
        return {**self.running, "elapsed_s": round(time.monotonic() - self._started, 1)}

    def summary(self) -> str:
        """One line for systemd's STATUS while a job runs."""
        r = self._running_now()
        if r is None:
            return ""
        where = f"layer {r['layer']}/{r['layers']}" if r.get("layers") else r.get("stage", "starting")
        return (f"quantizing {r['role']} model (AWQ W4A16): {where}, {fmt_duration(r.get('elapsed_s'))} elapsed, "
                f"ETA {fmt_duration(r.get('eta_s'))}")

    def _plan(self, target: Any) -> tuple[list[str], list[str]]:
        """(roles to build, notes about roles skipped), or AwqError."""
        if target not in ("chat", "tool", "both"):
            raise awq.AwqError("rebuild target must be chat, tool or both")
        roles = list(ROLES) if target == "both" else [target]
        build, notes = [], []
        for role in roles:
            ecfg: EngineConfig = getattr(self.cfg, role)
            if awq.source_for(ecfg) is None:
                name = ecfg.awq_model or ecfg.model or "(none)"
                notes.append(f"{role}: uses the pre-quantized {name}; nothing to build")
                continue
            if target == "both" and not self.cfg.deployed(role):
                continue  # "both" means the models this daemon runs, not every default in the config
            build.append(role)
        if not build:
            raise awq.AwqError("nothing to rebuild: " + ("; ".join(notes) or f"no {target} model configured"))
        for role in build:
            problem = push_settings_error(self.cfg, role)
            if problem:
                raise awq.AwqError(problem)
        return build, notes

    async def _rebuild(self, req: dict[str, Any], send: Send) -> None:
        if (self._task is not None and not self._task.done()) or self._lock.locked():
            await send({"ok": False, "error": f"an AWQ job is already running ({self.summary() or 'starting'}); "
                                              "`yapctl awq status` shows it"})
            return
        try:
            roles, notes = self._plan(req.get("target", "both"))
        except awq.AwqError as exc:
            await send({"ok": False, "error": str(exc)})
            return
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.add(queue)
        # The job belongs to the daemon, not to this connection: a yapctl that goes away
        # (Ctrl-C) stops watching, and the rebuild carries on. Created before any await,
        # so a second request cannot slip past the check above.
        self._task = asyncio.create_task(self._rebuild_task(roles))
        try:
            for note in notes:
                await send({"event": "progress", "role": "awq", "stage": "skipped", "message": note})
            while True:
                msg = await queue.get()
                await send(msg)
                if "event" not in msg:
                    return
        finally:
            self._listeners.discard(queue)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for q in list(self._listeners):
            q.put_nowait(msg)

    async def _rebuild_task(self, roles: list[str]) -> None:
        final: dict[str, Any] = {"ok": True, "built": {}, "pushed": {}, "restarted": []}
        errors: list[str] = []
        self._cancelled = False
        try:
            for role in roles:
                if self._cancelled:
                    errors.append(f"{role}: not built (cancelled)")
                    continue
                res = await self.build(role)
                if "path" not in res:
                    errors.append(f"{role}: {res.get('error', 'quantization failed')}")
                    continue  # the other role may still build; this one keeps its old entry
                final["built"][role] = res["path"]
                if res.get("push"):
                    final["pushed"][role] = res["push"]
                if res.get("push_error"):
                    errors.append(f"{role}: built and cached, but {res['push_error']}")
            switch = [r for r in final["built"] if self.cfg.deployed(r) and getattr(self.cfg, r).quantization == "awq"]
            if switch:
                self._broadcast({"event": "progress", "role": "awq", "stage": "restarting",
                                 "message": f"{' and '.join(switch)} onto the new weights"})
                restart = await self.daemon.restart_engines(switch)
                final["restarted"] = restart.get("roles", switch) if restart.get("ok") else []
                if not restart.get("ok"):
                    errors.append(f"engine restart failed: {restart.get('error')}")
            elif final["built"]:
                unused = [r for r in final["built"] if getattr(self.cfg, r).quantization != "awq"]
                final["note"] = ("built; the engines are not in awq mode (quantization = \"awq\" / QUANTIZATION=awq "
                                 "and `yapctl restart` put it to use)" if unused else
                                 f"built; {' and '.join(final['built'])} not deployed (engines.deploy): it is used "
                                 "once deployed")
        except asyncio.CancelledError:
            errors.append("the daemon is stopping")
            raise
        except Exception as exc:
            log.exception("AWQ rebuild failed")
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if errors:
                final["ok"] = False
                final["error"] = "; ".join(errors)
                log.error("AWQ rebuild: %s", final["error"])
            else:
                log.info("AWQ rebuild done: built %s, restarted %s", ", ".join(final["built"]) or "nothing",
                         ", ".join(final["restarted"]) or "nothing")
            self._broadcast(final)

    # --- start and restart -------------------------------------------------------------

    async def ensure_cached(self, roles: list[str]) -> None:
        """Build the AWQ cache entry of every engine in ``roles`` that runs in awq mode
        and has none: the first start of an awq deployment. Raises EngineError."""
        for role in roles:
            ecfg: EngineConfig = getattr(self.cfg, role)
            if not awq.needs_build(ecfg, self.cfg):
                continue
            problem = push_settings_error(self.cfg, role)
            if problem:
                raise EngineError(f"{role}: {problem}")
            async with self._lock:
                # A rebuild running when this began may have built it meanwhile: an hour
                # of quantizing the same model again otherwise.
                if not awq.needs_build(ecfg, self.cfg):
                    continue
                log.warning("%s: quantization is awq and no AWQ model is cached for %s: quantizing it now "
                            "(minutes to an hour; the engine starts when it is done)", role, ecfg.model)
                res = await self._build(role)
            if "path" not in res:
                raise EngineError(f"{role}: AWQ quantization of {ecfg.model} failed: {res.get('error')}")
            if res.get("push_error"):
                log.error("%s: AWQ model built and cached, but %s", role, res["push_error"])

    # --- one job -------------------------------------------------------------------------

    async def build(self, role: str) -> dict[str, Any]:
        """Run one job for ``role``; returns its result event (``path`` when built) or
        {"ok": False, "error"}."""
        async with self._lock:
            return await self._build(role)

    async def _build(self, role: str) -> dict[str, Any]:
        cfg = self.cfg
        ecfg: EngineConfig = getattr(cfg, role)
        source = awq.source_for(ecfg)
        if source is None:
            return {"ok": False, "error": f"{role} uses a pre-quantized model; nothing to build"}
        if self._stop.is_set():
            return {"ok": False, "error": "stopped: the daemon is shutting down"}
        argv = job_command(cfg, role, source, ecfg)
        out_parent = awq.cache_root(cfg.cache_dir())
        try:
            out_parent.mkdir(parents=True, exist_ok=True)
            # Written to now, not after the quantization: a read-only folder (a mount, its
            # owner) was found out at the save, after all of the calibration's GPU time.
            with tempfile.TemporaryFile(dir=out_parent):
                pass
        except OSError as exc:  # read-only, full, or a file in its place: this job's error, not the daemon's
            return {"ok": False, "error": f"cannot write to the AWQ cache folder {out_parent}: {exc}"}
        # Not a client of yapd's MPS daemon: that one is the engines' alone.
        env = {**self.daemon.mps.host_env(), "YAPD_AWQ_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        token = hf_token(cfg)
        if token:
            env["HF_TOKEN"] = token  # the environment, never the command line (ps shows it)
        if cfg.awq.hub_endpoint:
            env["HF_ENDPOINT"] = cfg.awq.hub_endpoint
        t0 = time.monotonic()
        self._started = t0
        self._cancelled = False
        self.running = {"role": role, "model": source, "stage": "starting", "layer": 0, "layers": 0,
                        "elapsed_s": 0.0, "eta_s": None, "message": "starting", "pid": None}
        self._notify_status()
        self._broadcast({"event": "progress", "role": role, "stage": "starting", "message": f"quantizing {source}"})
        log.info("AWQ job starting role=%s model=%s out=%s", role, source, argv[argv.index("--out") + 1])
        result: dict[str, Any] | None = None
        n_layers = 0
        tail: collections.deque[str] = collections.deque(maxlen=30)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                env=env, cwd=str(out_parent), limit=4 * 1024 * 1024)
        except OSError as exc:
            self.running = None
            return {"ok": False, "error": f"cannot start the AWQ job with {argv[0]}: {exc}"}
        self._proc = proc
        self.running["pid"] = proc.pid
        stopper = asyncio.create_task(self._stop_on_shutdown(proc))
        err_task = asyncio.create_task(self._read_stderr(proc, tail, token))
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    tail.append(raw.decode(errors="replace").rstrip())
                    continue
                if not isinstance(msg, dict):
                    continue
                kind = msg.get("event")
                if kind == "progress":
                    self.running.update({k: msg[k] for k in ("stage", "layer", "layers", "elapsed_s", "eta_s",
                                                            "message") if k in msg})
                    self._notify_status()
                    self._broadcast(msg)
                    n_layers = int(msg.get("layers") or n_layers)
                    if msg.get("stage") == "calibrating":
                        log.info("AWQ %s: %s", role, msg.get("message"))
                elif kind in ("result", "error"):
                    result = msg
            rc = await proc.wait()
            await err_task
        finally:
            stopper.cancel()
            if proc.returncode is None:
                await self._terminate(proc)
            err_task.cancel()
            self._proc = None
            self.running = None
            # While serving, the daemon's status loop puts its own line back within seconds.
            self.daemon.notifier.status(f"AWQ job for the {role} model ended")
        seconds = round(time.monotonic() - t0, 1)
        if result is not None and result.get("event") == "result":
            out = {k: v for k, v in result.items() if k not in ("event", "role")}
            self.last[role] = {"ok": not out.get("push_error"), "path": out.get("path"), "seconds": seconds,
                               **({"push_error": out["push_error"]} if out.get("push_error") else {})}
            log.info("AWQ job done role=%s path=%s seconds=%.1f", role, out.get("path"), seconds)
            done: dict[str, Any] = {"layer": n_layers, "layers": n_layers} if n_layers else {}
            self._broadcast({"event": "progress", "role": role, "stage": "done",
                             "message": f"cached in {out.get('path')}", **done})
            return out
        if self._stop.is_set():
            error = "stopped: the daemon is shutting down"
        elif self._cancelled:
            error = "cancelled (yapctl awq cancel); the cache entry it would have replaced is kept"
        elif result is not None:
            error = str(result.get("error"))
        else:
            error = f"the job exited with status {rc}: " + " | ".join(list(tail)[-5:])
        error = awq.scrub(error, token)
        self.last[role] = {"ok": False, "error": error, "seconds": seconds}
        log.error("AWQ job failed role=%s: %s", role, error)
        return {"ok": False, "error": error}

    def _notify_status(self) -> None:
        text = self.summary()
        if text:
            self.daemon.notifier.status(text)

    async def _read_stderr(self, proc: asyncio.subprocess.Process, tail: collections.deque[str], token: str) -> None:
        """The libraries' own output: kept for errors, logged at debug. tqdm redraws with
        carriage returns, so lines are split on those too."""
        assert proc.stderr is not None
        buf = b""
        while chunk := await proc.stderr.read(65536):
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                text = awq.scrub(line.decode(errors="replace").strip(), token)
                if text:
                    tail.append(text)
                    log.debug("awq job: %s", text)

    async def _stop_on_shutdown(self, proc: asyncio.subprocess.Process) -> None:
        await self._stop.wait()
        log.warning("stopping: ending the AWQ job (pid %d); its partial output is discarded", proc.pid)
        await self._terminate(proc)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        # Shutdown reaches here twice (the stop watcher and the cancelled task): one
        # SIGTERM only, so the job's cleanup runs undisturbed.
        if proc.pid not in self._terminated:
            self._terminated.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Daemon shutdown: end a running job (SIGTERM: it removes its temporary files)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._terminate(proc)
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
