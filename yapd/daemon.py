"""The daemon's life: start, tell systemd the truth, reload, restart engines, stop.

Order at start: listen first (so /healthz can say 503 while loading), load engines
(in parallel), then READY=1. SIGHUP reloads, SIGTERM/SIGINT drain and exit 0, a
second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sdnotify

from yapd import __version__, config, gcpause, logs
from yapd.awq.jobs import AwqJobs
from yapd.bytecode import Redirect, engine_packages, uncompiled, write_under
from yapd.config import Config, ConfigError
from yapd.engines import EngineError, can_start_together, create_engine
from yapd.engines.hosted import HostedEngine
from yapd.engines.samplerjit import SamplerBuild
from yapd.mps import Mps, MpsError
from yapd.mps import folder_for as mps_folder
from yapd.runtime import Runtime
from yapd.server import YapServer, frame_cap
from yapd.timeouts import polled

T = TypeVar("T")

log = logging.getLogger("yapd.daemon")


class Notifier:
    """sd_notify through the ``sdnotify`` package; without NOTIFY_SOCKET it does nothing."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self.last_status = ""

    def send(self, *lines: str) -> None:
        if self._n is not None:
            self._n.notify("\n".join(lines))

    def status(self, text: str) -> None:
        self.last_status = text
        self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def watchdog_interval(self) -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def _test_delay(var: str) -> None:
    """A test hook: wait the seconds the environment variable ``var`` names, if any, so a
    test can watch the daemon mid-way through a step that is otherwise too quick to see."""
    delay = float(os.environ.get(var) or 0)
    if delay:
        await asyncio.sleep(delay)


def prepare(cfg: Config) -> Config:
    """Resolve what the config names but does not hold: the demo models' paths."""
    if cfg.demo:
        from yapd import demo

        paths = demo.build(cfg.cache_dir() / "demo")
        cfg.chat.model, cfg.tool.model = str(paths["chat"]), str(paths["tool"])
        cfg.chat.backend = cfg.tool.backend = "cpu"
    return cfg


async def off_the_exit_path(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread of its own: unlike asyncio's executor threads, which
    the interpreter joins at exit, one stuck (a config file on a hung network mount) does
    not keep a stopped daemon alive until systemd's SIGKILL."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.done():  # the waiter gave up (a stop)
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # handed to the waiter as raised
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="yapd-off-exit", daemon=True).start()
    return await done


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, overrides: Mapping[str, Any],
                 early_hup: threading.Event | None = None, bytecode: Redirect | None = None) -> None:
        self.config_path = config_path
        self.bytecode = bytecode  # cache_env's: where this process writes the bytecode an install lacks
        self.overrides = dict(overrides)
        # Set by a SIGHUP that came before the event loop took the signal (yapd.cli).
        self._early_hup = early_hup
        self.notifier = Notifier()
        self.ring = logs.setup(cfg.logging)
        self.rt = Runtime(cfg, version=__version__)
        # As the capacity says it: a restart that changes engines.deploy changes its default.
        self.rt.metrics.max_connections.set_function(lambda: float(self.rt.cfg.max_connections))
        self.rt.metrics.watch_engines(self.rt.engines_up)
        self.server = YapServer(self.rt)
        self.admin: Any = None
        self.pending: Config | None = None  # a reloaded config whose engine keys wait for a restart
        self.pending_keys: list[str] = []
        self._file_cfg = copy.deepcopy(cfg)  # the config file as last read: what pending is against
        self._stop = asyncio.Event()
        self.awq_jobs = AwqJobs(self, self._stop)
        self._signals = 0
        self._reloading = self._reload_due = False
        self._engine_lock = asyncio.Lock()
        self._ready = False  # READY=1 sent: the first start is over
        self._tasks: list[asyncio.Task[Any]] = []
        self.exit_code = 0
        self.mps = Mps(mps_folder(cfg))
        self.sampler_build = SamplerBuild()
        self.rt.mps_status = self.mps.status
        self.rt.metrics.mps_active.set_function(lambda: float(self.mps.status()["active"]))

    @property
    def cfg(self) -> Config:
        return self.rt.cfg

    # --- start ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if self._early_hup is not None and self._early_hup.is_set():
            # The file may have changed after it was read for this start.
            log.info("SIGHUP before the event loop ran: reloading")
            self._spawn(self.reload())
        s = self.cfg.server
        log.info("yapd %s starting deploy=%s config=%s", __version__, self.cfg.engines.deploy, self.cfg.source)
        if (bc := self.bytecode) is not None:
            # What the start's time depends on first: the bench keeps 240 characters of it.
            log.info("bytecode under %s (engines.bytecode_cache): %s; the install has none this process "
                     "may load or write for %s (%s)", bc.folder,
                     f"this start compiles {', '.join(bc.fresh)} from source, later ones load it" if bc.fresh
                     else "loaded, written by a start before this one",
                     ", ".join(m.package for m in bc.missing), "; ".join(sorted({m.why for m in bc.missing})))
        for item in uncompiled(engine_packages(self.cfg)):
            log.warning("%s", item.advice())
        self._spawn(self.rt.loop_lag.run(self.rt.metrics.loop_lag.observe))
        pauses = [self.rt.metrics.gc_pause.labels(str(g)) for g in range(3)]
        self.rt.gc_pauses.observe = lambda gen, seconds: pauses[gen].observe(seconds)
        self.rt.gc_pauses.install()
        try:
            await self.server.start(s.host, s.port)
            await self._start_admin()
            await self._start_engines(self._deployed_roles())
        except (OSError, EngineError, ConfigError) as exc:
            if self._stop.is_set():  # SIGTERM while quantizing or loading: a stop, not a failure
                log.info("stopped while starting: %s", exc)
                await self._shutdown()
                return self.exit_code
            log.error("start failed: %s", exc)
            self.notifier.status(f"start failed: {exc}")
            await self._shutdown()
            return 1
        if not self._stop.is_set():
            self._ready = True
            self.notifier.ready(self._serving_status())
            log.info("ready port=%d loop=%s", self.server.port,
                     type(asyncio.get_running_loop()).__module__.split(".")[0])
            self._spawn(self._status_loop())
            interval = self.notifier.watchdog_interval()
            if interval:
                self._spawn(self._watchdog(interval))
        await self._stop.wait()
        await self._shutdown()
        return self.exit_code

    def _deployed_roles(self) -> list[str]:
        return [r for r in ("chat", "tool") if self.cfg.deployed(r)]

    async def _start_admin(self) -> None:
        if not self.cfg.admin.enabled:
            return
        from yapd.admin import AdminServer

        self.admin = AdminServer(self)
        await self.admin.start()

    async def _start_engines(self, roles: list[str]) -> None:
        # A cold vLLM start compiles for minutes, and a first start in awq mode quantizes
        # for longer: keep pushing systemd's start timeout out.
        extender = asyncio.create_task(self._extend_timeout())
        try:
            await self.awq_jobs.ensure_cached(roles)
            others = any(r not in roles and e.health().state in ("starting", "ready", "stopping")
                         for r, e in self.rt.engines.items())
            try:
                # Over every deployed role: a restart of one engine beside a failed one
                # must not decide that nothing shares the GPU.
                under_auto_mps = await asyncio.to_thread(self.mps.prepare, self.cfg, self._deployed_roles(), others)
            except MpsError as exc:
                raise EngineError(str(exc)) from exc
            try:
                await self._load_engines(roles)
            except EngineError as exc:
                if not under_auto_mps or self._stop.is_set():
                    raise
                log.warning("engines failed to start under MPS (%s); starting them without MPS", exc)
                # No time limit: MPS may only go once their EngineCores are gone (each
                # engine's own shutdown is bounded).
                await self._shutdown_engines(roles, timeout=None)
                # The failed engines' cycles (their sockets, say) go now, not at settle():
                # collection is held through the first start.
                gc.collect()
                await asyncio.to_thread(self.mps.give_up, str(exc))
                await self._load_engines(roles)
        finally:
            extender.cancel()
            # Model loads leave millions of long-lived objects; moving them out of the
            # collector's view keeps gen-2 collections (pauses of 10+ ms mid-stream)
            # short. A failed start too: the daemon serves on (the other engine, a retry).
            gcpause.settle()

    async def _load_engines(self, roles: list[str]) -> None:
        engines = {role: create_engine(role, self.cfg) for role in roles}
        for role, eng in engines.items():
            self.rt.engines[role] = eng
        if self._stop.is_set():  # stopped while it made ready (an AWQ build, MPS)
            raise EngineError("stopping before the engines loaded")
        if self.cfg.engines.sampler_prebuild and any(e.backend == "vllm" for e in engines.values()):
            try:
                await self.sampler_build.start(os.environ)
            except OSError as exc:  # the engines build it themselves, as without it
                log.warning("FlashInfer's sampler: could not start its build: %s", exc)
        self.notifier.status(f"loading engines: {', '.join(f'{r}={e.model}' for r, e in engines.items())}")
        parallel = self.cfg.engines.start_in_parallel and await asyncio.to_thread(
            can_start_together, list(engines.values()))
        if parallel:
            results = await asyncio.gather(*(self._start_one(r, e, alongside=True) for r, e in engines.items()),
                                           return_exceptions=True)
            failed = [res for res in results if isinstance(res, BaseException)]
            if failed and len(engines) > 1 and not self._stop.is_set():
                # A plan that no longer fits (another tenant on the GPU, a driver
                # update): forget it and load the safe way rather than fail the start.
                log.warning("side-by-side engine start failed (%s); loading one after the other", failed[0])
                await self._stop_engines(engines, timeout=None, why=" after the failed side-by-side start")
                for eng in engines.values():
                    eng.forget_memory_plan()
                parallel = False
            elif failed:
                raise failed[0] if isinstance(failed[0], EngineError) else EngineError(str(failed[0]))
        if not parallel:
            for role, eng in engines.items():
                if self._stop.is_set():  # a stop between two loads: none begins after it
                    raise EngineError(f"stopping before the {role} engine loaded")
                await self._start_one(role, eng)

    async def _shutdown_engines(self, roles: list[str], timeout: float | None) -> None:
        engines = {role: eng for role in roles if (eng := self.rt.engines.get(role)) is not None}
        await self._stop_engines(engines, timeout)

    @classmethod
    async def _stop_engines(cls, engines: Mapping[str, Any], timeout: float | None, why: str = "") -> None:
        """Stop ``engines`` side by side: each vLLM engine's stop (its EngineCore's exit)
        takes 1.5-2 s, and a stop or a restart of both waits for the slower one, not for
        the sum. A stop that fails or runs past ``timeout`` is logged, not raised: the
        others stop still."""
        await asyncio.gather(*(cls._shutdown_one(role, eng, timeout, why) for role, eng in engines.items()))

    @staticmethod
    async def _shutdown_one(role: str, eng: Any, timeout: float | None, why: str) -> None:
        t0 = time.perf_counter()
        log.info("engine stopping%s role=%s", why, role)
        await _test_delay("YAPD_DEBUG_ENGINE_STOP_DELAY_S")  # tests see two engines' stops overlap
        try:
            await asyncio.wait_for(eng.shutdown(), timeout)
        except Exception as exc:
            log.warning("engine %s shutdown: %s", role, exc)
        else:
            log.info("engine stopped%s role=%s seconds=%.1f", why, role, time.perf_counter() - t0)

    async def _start_one(self, role: str, eng: Any, alongside: bool = False) -> None:
        t0 = time.perf_counter()
        self.notifier.status(f"loading {role} engine: {eng.model}")
        await _test_delay("YAPD_DEBUG_ENGINE_START_DELAY_S")  # tests see the daemon's state while loading
        await eng.start(alongside=alongside, child_env=self.mps.client_env(role))
        log.info("engine started role=%s backend=%s model=%s seconds=%.1f", role, eng.backend, eng.model,
                 time.perf_counter() - t0)

    async def _extend_timeout(self) -> None:
        while True:
            self.notifier.send("EXTEND_TIMEOUT_USEC=60000000")
            await asyncio.sleep(20)

    # --- running -------------------------------------------------------------------

    def _serving_status(self) -> str:
        cap = self.rt.capacity()
        engines = ",".join(f"{r}={e.health().state}" for r, e in self.rt.engines.items())
        extra = f"; pending restart for {', '.join(self.pending_keys)}" if self.pending_keys else ""
        if self.awq_jobs.running:
            extra += f"; {self.awq_jobs.summary()}"
        mode = ("stopping" if self.rt.stopping else "starting" if not self._ready
                else "draining" if self.rt.draining else "serving")
        return f"{mode}: {cap.active}/{cap.max} connections, {engines}{extra}"

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            text = self._serving_status()
            if text != self.notifier.last_status:
                self.notifier.status(text)

    async def _watchdog(self, interval: float) -> None:
        """Ping only while this loop runs and every engine is healthy: a wedged loop
        or a dead engine stops the pings, and systemd restarts us."""
        while True:
            if self.rt.engines_ready() or self._engine_lock.locked():
                self.notifier.send("WATCHDOG=1")
            else:
                log.error("engine unhealthy: withholding watchdog ping")
            await asyncio.sleep(interval)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # --- reload --------------------------------------------------------------------

    def load_config(self) -> Config:
        return prepare(config.load(self.config_path, overrides=self.overrides))

    def _reloaded(self, status: str) -> None:
        """A reload's end for systemd: READY=1 once the daemon has been ready (a reload
        while the engines first load must not tell it the start is over)."""
        if self._ready:
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config. Live keys apply now; engine keys wait for a restart. One at
        a time: a reload asked for while one runs (a SIGHUP storm, a read stuck on a hung
        mount) runs once after it, with the file as it is then."""
        if self._reloading:
            self._reload_due = True
            return {"ok": False, "error": "a reload is running; another follows it"}
        self._reloading = True
        try:
            reply = await self._reload()
            while self._reload_due and not self.rt.stopping:
                self._reload_due = False
                reply = await self._reload()
            return reply
        finally:
            self._reloading = self._reload_due = False

    def _stopping_refusal(self) -> dict[str, Any] | None:
        """A reload's answer once a stop has begun: STOPPING=1 was said, a RELOADING=1 /
        READY=1 pair now would tell systemd otherwise, and keys applied mid-drain serve
        nobody. None while serving."""
        if not self.rt.stopping:
            return None
        log.info("reload ignored: yapd is stopping")
        return {"ok": False, "error": "yapd is stopping"}

    async def _reload(self) -> dict[str, Any]:
        if refused := self._stopping_refusal():
            return refused
        if self._ready:
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        if self.admin is not None:
            try:
                await self.admin.ensure()
            except OSError as exc:
                log.error("admin socket could not be re-created: %s", exc)
        try:
            new = await off_the_exit_path(self.load_config)
        except Exception as exc:  # ConfigError above all; whatever else, the running config stays
            log.error("reload failed, keeping the running config: %s", exc,
                      exc_info=not isinstance(exc, (ConfigError, OSError)))
            self._reloaded(f"reload failed, running config kept: {exc}")
            return {"ok": False, "error": str(exc)}
        if refused := self._stopping_refusal():  # a stop began while the file was read
            return refused
        old = self.cfg
        live, engine, restart = config.diff_keys(old, new)
        if "server.max_frame_bytes" in live and frame_cap(new.server.max_frame_bytes) > self.server.hard_cap:
            # Connections read frames up to the cap set at start: a larger limit needs a new one.
            live.remove("server.max_frame_bytes")
            restart.append("server.max_frame_bytes")
            new.server.max_frame_bytes = old.server.max_frame_bytes
        # The [turn] keys apply now, the engines' max_model_len at their restart: checked
        # against the one running (turn limits beside a raised max_model_len passed the file's
        # check, then failed every turn until a restart).
        running = copy.copy(new)
        for section in config.ENGINE_SECTIONS:
            setattr(running, section, getattr(old, section))
        try:
            config.check_prompt_room(running, "the running ")
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self._reloaded(f"reload refused, running config kept: {exc}")
            return {"ok": False, "error": f"{exc}: raise max_model_len and restart the engine first (or restart "
                    "yapd to apply both)"}
        self._file_cfg = copy.deepcopy(new)
        self._pending_from_file()
        # Engine sections stay as running until an engine restart applies them.
        for section in config.ENGINE_SECTIONS:
            setattr(new, section, getattr(old, section))
        config.keep_restart_keys(new, old)
        self.rt.cfg = new
        if any(key.startswith("logging.") for key in live):
            logs.setup(new.logging, self.ring)
            for eng in self.rt.engines.values():  # engine hosts log in processes of their own
                if isinstance(eng, HostedEngine):
                    eng.set_log_level(logging.getLogger().getEffectiveLevel())
        warnings: list[str] = []
        if self.admin is not None and {"admin.mode", "admin.group"} & set(live):
            warnings += self.admin.apply(new.admin)
            if warnings and "admin.group" in live:
                # What apply could not do is the group's: as it runs, so the next reload
                # (the group added meanwhile) finds it changed and tries again.
                live.remove("admin.group")
                new.admin.group = old.admin.group
        if any(key.startswith("server.") for key in live):
            self.server.config_changed()
        if live:
            log.info("reload applied live keys: %s", ", ".join(live))
        if engine:
            log.warning("reload: these keys need an engine restart (yapctl restart): %s", ", ".join(engine))
        if restart:
            log.warning("reload: these keys need a daemon restart: %s", ", ".join(restart))
        if not (live or engine or restart):
            log.info("reload: no changes")
        for warning in warnings:
            log.warning("reload: %s", warning)
        self._reloaded(self._serving_status())
        return {"ok": True, "applied": live, "needs_engine_restart": engine, "needs_daemon_restart": restart,
                "warnings": warnings}

    # --- engine restart and drain ------------------------------------------------------

    async def wait_idle(self, roles: list[str], timeout: float) -> bool:
        """Wait until no request runs on ``roles`` (True) or ``timeout`` passes (False)."""
        return await polled(lambda: all((e := self.rt.engines.get(r)) is None or e.in_flight == 0 for r in roles),
                            timeout)

    def _apply_pending(self, roles: list[str]) -> None:
        """A reload's engine keys for the engines restarting: a role's own section, and
        the sections all engines share ([engines], [awq]) only when both restart. What
        stays pending is what the running config still lacks."""
        if self.pending is None:
            return
        both = {"chat", "tool"} <= set(roles)
        sections = [section for section in config.ENGINE_SECTIONS if section in roles or both]
        running = copy.copy(self.rt.cfg)  # the sections as they run (replaced below, not changed)
        for section in sections:
            setattr(self.rt.cfg, section, copy.deepcopy(getattr(self.pending, section)))
        config.keep_restart_keys(self.rt.cfg, running, sections)  # engines.cache_dir: a daemon restart's
        self._pending_from_file()

    def _pending_from_file(self) -> None:
        """The engine keys the running config lacks of the file as last read."""
        engine = config.diff_keys(self.rt.cfg, self._file_cfg)[1]
        self.pending = copy.deepcopy(self._file_cfg) if engine else None
        self.pending_keys = engine

    async def restart_engines(self, roles: list[str]) -> dict[str, Any]:
        if not self._ready:
            # The first start owns the engines until it is over (its own may still be
            # loading): a restart now would leave one running outside the daemon's reach.
            return {"ok": False, "error": "yapd is still starting its engines; restart once it is ready",
                    "roles": roles}
        async with self._engine_lock:
            ran = {section: copy.deepcopy(getattr(self.rt.cfg, section)) for section in config.ENGINE_SECTIONS}
            self._apply_pending(roles)
            asked, roles = roles, [r for r in roles if self.cfg.deployed(r)]
            # Engines no longer deployed ([engines] deploy changed) stop: their GPU share
            # is what the deployed ones now ask for.
            undeployed = [r for r in list(self.rt.engines) if not self.cfg.deployed(r)]
            if not roles and not undeployed:
                # An engine not deployed: said so, not "ok" with nothing done (a script's
                # `yapctl restart tool` exited 0 having restarted nothing).
                self._restore(ran)
                return {"ok": False, "roles": [], "error": f"{' and '.join(asked)} not deployed (engines.deploy = "
                        f"{self.cfg.engines.deploy!r}): nothing to restart"}
            try:
                # Quantize first (awq mode, nothing cached) while the old engines still serve.
                await self.awq_jobs.ensure_cached(roles)
            except EngineError as exc:
                log.error("engine restart: %s", exc)
                # Nothing was stopped: the engines go on as they ran, the reloaded keys pending.
                self._restore(ran)
                return {"ok": False, "error": str(exc), "roles": roles}
            for role in undeployed:
                log.info("engine no longer deployed, stopping it role=%s", role)
                await self._shutdown_engines([role], timeout=None)
                self.rt.engines.pop(role, None)
            # From here the roles take no new turns: the ones in flight get the drain's time.
            self.rt.restarting = set(roles)
            try:
                drained = await self.wait_idle(roles, self.cfg.server.drain_timeout_s)
                self.notifier.status(f"restarting engines: {', '.join(roles)}")
                # A restart's time: its stop is part of it.
                old = {role: eng for role in roles if (eng := self.rt.engines.pop(role, None)) is not None}
                await self._stop_engines(old, timeout=None, why=" for the restart")
                try:
                    await self._start_engines(roles)
                except EngineError as exc:
                    log.error("engine restart failed: %s", exc)
                    if self._stop.is_set() or all(getattr(self.rt.cfg, s) == v for s, v in ran.items()):
                        self.notifier.status(f"engine restart failed: {exc}")
                        return {"ok": False, "error": str(exc), "roles": roles}
                    return await self._roll_back(ran, exc)
            finally:
                self.rt.restarting = set()
            self.notifier.status(self._serving_status())
            return {"ok": True, "roles": roles, "drained": drained, **({"stopped": undeployed} if undeployed else {})}

    def _restore(self, ran: dict[str, Any]) -> None:
        """The engine sections as they ran; pending again what the file (as last read, a
        reload during the restart included) says beyond them."""
        for section, value in ran.items():
            setattr(self.rt.cfg, section, value)
        self._pending_from_file()

    async def _roll_back(self, ran: dict[str, Any], exc: EngineError) -> dict[str, Any]:
        """A restart that failed with reloaded engine keys (a model path mistyped, say):
        the engines start again with the settings they ran with, and the reloaded keys
        stay pending, rather than a failed engine that stops the watchdog's pings and has
        systemd restart the daemon into the same config again and again."""
        self._restore(ran)
        down = [r for r in self._deployed_roles() if (e := self.rt.engines.get(r)) is None or not e.health().ok]
        log.warning("engine restart failed with the reloaded settings; starting %s again with the settings "
                    "they ran with (the reloaded keys stay pending)", ", ".join(down))
        gone = [r for r in list(self.rt.engines) if not self.cfg.deployed(r)]  # deployed by the failed keys only
        await self._shutdown_engines(down + gone, timeout=None)
        for role in gone:
            self.rt.engines.pop(role, None)
        try:
            await self._start_engines(down)
        except EngineError as again:
            log.error("engine restart with the settings they ran with failed too: %s", again)
            self.notifier.status(f"engine restart failed: {again}")
            return {"ok": False, "error": f"{exc}; starting again as before failed too: {again}", "roles": down}
        self.notifier.status(self._serving_status())
        return {"ok": False, "error": f"{exc} (rolled back: {', '.join(down)} running with the settings they ran "
                f"with; the reloaded keys stay pending: {', '.join(self.pending_keys)})", "roles": down,
                "rolled_back": True}

    async def drain(self, on: bool = True) -> dict[str, Any]:
        """Refuse new turns and answer 503 on /healthz so a balancer sends new sessions
        elsewhere; turns in flight finish."""
        self.rt.draining = on
        self.notifier.status(self._serving_status())
        return {"ok": True, "draining": on, "active": self.rt.capacity().active}

    # --- stop ----------------------------------------------------------------------

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", sig.name)
            os._exit(1)
        log.info("%s received: draining and stopping", sig.name)
        self.request_stop()

    def request_stop(self) -> None:
        self.rt.stopping = True
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        self._stop.set()
        self._spawn(self._end_engine_starts())

    async def _end_engine_starts(self) -> None:
        """A stop while vLLM engines load: see yapd.engines.vllm.end_loading_starts (an
        engine host does the same for its own engine)."""
        from yapd.engines.vllm import end_loading_starts

        await end_loading_starts(list(self.rt.engines.values()))

    async def _shutdown(self) -> None:
        self.rt.stopping = True
        self.server.stop_accepting()
        timeout = self.cfg.server.drain_timeout_s
        # The stop's longest course, for systemd's TimeoutStopSec (60 s in the unit) not to
        # SIGKILL the engines mid-stop where drain_timeout_s was raised (reloadable): the
        # AWQ job's end, the drain, the close-out, 5 s for the connections, the engines'
        # stop (side by side), MPS's 20 s (its quit command's 10, then its exit's 10).
        longest = 10 + 2 * timeout + 5 + timeout + 20
        self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(longest * 1e6)}")
        await self.awq_jobs.close()
        # The turns in flight end as they would (a reply cut mid-sentence is what a stop
        # for an upgrade must not do); what still runs after drain_timeout_s is cancelled.
        if not await self.server.drain(timeout):
            log.warning("drain: %d turns still running after %.1fs; cancelling them",
                        self.server.turns_in_flight(), timeout)
        try:
            await asyncio.wait_for(self.server.close_all(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain took over %.1fs; closing the rest", timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()
        if self.admin is not None:
            await self.admin.close()
        await self._shutdown_engines(list(self.rt.engines), timeout)
        await self.sampler_build.stop()
        await asyncio.to_thread(self.mps.stop)  # after the engines: their contexts live in its server
        self.rt.gc_pauses.uninstall()
        log.info("stopped")


# The caches a restart reuses, each in its folder of the daemon's cache dir: weights, and
# what vLLM, Triton, inductor, FlashInfer (its JIT-built sampling and attention ops) and
# CUDA (PTX compiled for this GPU) build at a first start. The last two default to the
# home directory, which a container may not keep. systemd/yapd.service names the same.
CACHE_VARS = {"HF_HOME": "huggingface", "VLLM_CACHE_ROOT": "vllm", "TRITON_CACHE_DIR": "triton",
              "TORCHINDUCTOR_CACHE_DIR": "inductor", "FLASHINFER_WORKSPACE_BASE": "flashinfer",
              "CUDA_CACHE_PATH": "cuda"}


def cache_env(cfg: Config) -> Redirect | None:
    """Point the caches of CACHE_VARS at the daemon's cache dir unless set already, and
    with engines.bytecode_cache, the bytecode its engines' packages lack there too (before
    anything imports them: yapd/bytecode.py write_under)."""
    for var, path in cache_vars(cfg).items():
        os.environ.setdefault(var, path)
    return write_under(cfg.cache_dir() / "pycache", engine_packages(cfg)) if cfg.engines.bytecode_cache else None


def cache_vars(cfg: Config) -> dict[str, str]:
    """CACHE_VARS under the daemon's cache dir, for it and for what it runs beside (the
    benchmark's `vllm serve`, which then builds nothing yapd has built already)."""
    return {var: str(cfg.cache_dir() / sub) for var, sub in CACHE_VARS.items()}
