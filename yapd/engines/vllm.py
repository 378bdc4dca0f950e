"""The GPU engine: vLLM's ``AsyncLLM`` in this process, fed token ids.

Defaults come from measurements on an H100 (docs/bench/): CUDA graphs and
torch.compile on (``enforce_eager`` is 7x slower per token), prefix caching and chunked
prefill on, FP8 weights and FP8 KV for float chat models, compile caches under the
daemon's cache directory so a restart skips the minutes of compiling. vLLM is imported
here only, so CPU installs never need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import signal
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from yapd import awq, forking, gcpause, procfs, vllm_plugin
from yapd.config import Config, EngineConfig
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, EngineStamps, EngineState, SamplingSpec
from yapd.engines.firsttext import primes_from_prompt_end
from yapd.engines.memplan import MemoryPlans, Plan, plan_key, side_by_side
from yapd.engines.memplan import now as memplan_now
from yapd.engines.receipts import Receipts
from yapd.engines.together import Together
from yapd.engines.tokenizer import load_tokenizer

log = logging.getLogger("yapd.engine.vllm")

# How long a shutdown waits for the EngineCore process to exit, and a side-by-side
# start for GPU memory to show up free again.
SHUTDOWN_WAIT_S = 20.0
MEMORY_SETTLE_S = 10.0


def gpu_capability(device_id: int = 0) -> tuple[int, int] | None:
    """A visible GPU's compute capability (the first's by default), read through NVML:
    asking torch would create a CUDA context in this process, which costs GPU memory and
    forces vLLM to spawn (not fork) its EngineCore processes."""
    try:
        from vllm.platforms import current_platform

        cap = current_platform.get_device_capability(device_id)
        return (int(cap.major), int(cap.minor)) if cap is not None else None
    except Exception:  # noqa: S110 - no GPU, no NVML or no vLLM: no capability
        pass
    return None


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first visible GPU, from NVML (no CUDA context)."""
    try:
        from vllm.platforms import current_platform
        from vllm.utils.import_utils import import_pynvml

        pynvml = import_pynvml()
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(current_platform.device_id_to_physical_device_id(0))
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def device_identity() -> dict[str, Any]:
    """What a recorded memory plan is valid for besides the engine's own settings."""
    try:
        import vllm
        from vllm.platforms import current_platform

        return {"vllm": vllm.__version__, "gpu": current_platform.get_device_name(),
                "total": current_platform.get_device_total_memory(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    except Exception:
        return {}


def checkpoint_quantization(model: str, revision: str | None, fetch: bool = False) -> str | None:
    """How a checkpoint is quantized, as its config.json's ``quantization_config`` says
    (``quant_method``: "gptq", "awq", "compressed-tensors", "fp8", ...); None for a float
    checkpoint or a config.json not read. A local folder's is read; a Hub repo's from the
    Hub cache, fetched into it first with ``fetch`` (a worker thread's: it may go to the
    network, as vLLM's own config step would a moment later)."""
    path: str | None = str(Path(model) / "config.json") if Path(model).is_dir() else None
    if path is None:
        try:
            import huggingface_hub

            if fetch:
                with contextlib.suppress(Exception):  # offline, no such repo: vLLM's start says so
                    huggingface_hub.hf_hub_download(model, "config.json", revision=revision)
            found = huggingface_hub.try_to_load_from_cache(model, "config.json", revision=revision)
        except Exception:
            return None
        path = found if isinstance(found, str) else None
    if path is None:
        return None
    try:
        qc = json.loads(Path(path).read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict):
        return None
    return str(qc.get("quant_method") or "unknown")


def engine_kwargs(role: str, cfg: Config, model: str, capability: tuple[int, int] | None,
                  checkpoint_quant: str | None = None) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one engine (pure: unit-tested on CPUs).
    ``checkpoint_quant``: how the checkpoint itself is quantized (checkpoint_quantization)."""
    ecfg: EngineConfig = getattr(cfg, role)
    q = ecfg.quantization
    name = model.lower()
    quantization: str | None
    if q == "auto":
        if checkpoint_quant or "gptq" in name or "awq" in name:
            # The checkpoint says how (GPTQ, AWQ, compressed-tensors, FP8 ...): vLLM reads it
            # and picks the kernels (Marlin for GPTQ / AWQ); quantization="fp8" would be
            # refused as not matching a checkpoint's own method.
            quantization = None
        else:
            quantization = "fp8" if role == "chat" else None
    elif q in ("none", "gptq", "awq"):
        # awq: the yapd cache holds compressed-tensors checkpoints, Hub AWQ repos say
        # "awq" in config.json; vLLM reads either from there (quantization="awq" would
        # refuse a compressed-tensors checkpoint) and picks the Marlin kernels.
        quantization = None
    else:
        quantization = q
    kv = ecfg.kv_cache_dtype
    if kv == "auto":
        # FP8 KV halves cache memory; Ada and Hopper (sm89+) run it natively.
        kv = "fp8" if quantization == "fp8" and capability is not None and capability >= (8, 9) else "auto"
    kwargs: dict[str, Any] = dict(
        model=model,
        tokenizer=ecfg.tokenizer or model,
        # The configured revision is the float model's: not the AWQ cache's or an AWQ repo's.
        revision=(ecfg.revision or None) if model == ecfg.model else None,
        quantization=quantization,
        kv_cache_dtype=kv,
        gpu_memory_utilization=cfg.gpu_fraction(role),  # type: ignore[arg-type]
        max_model_len=ecfg.max_model_len,
        max_num_seqs=ecfg.max_num_seqs,
        enable_prefix_caching=ecfg.enable_prefix_caching,
        enable_chunked_prefill=ecfg.enable_chunked_prefill,
        enforce_eager=ecfg.enforce_eager,
        tensor_parallel_size=ecfg.tensor_parallel_size,
        data_parallel_size=ecfg.data_parallel_size,
        load_format=ecfg.load_format,
        disable_log_stats=True,
    )
    if ecfg.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = ecfg.max_num_batched_tokens
    kwargs.update(ecfg.extra_engine_args)
    return kwargs


class VllmEngine(Engine):
    backend = "vllm"
    # Side by side only with a recorded memory plan: see side_by_side_ok().
    parallel_start_safe = False

    def __init__(self, role: str, cfg: Config) -> None:
        self.role = role
        self.cfg = cfg
        self.ecfg: EngineConfig = getattr(cfg, role)
        self.model = self.ecfg.model
        self._llm: Any = None
        self._tok: Any = None
        self._state: EngineState = "stopped"
        self._detail = ""
        self._inflight: set[str] = set()
        self._aborted: set[str] = set()  # requests abort() ended: their "abort" finish was asked for
        self.start_seconds: float | None = None
        self._kwargs: dict[str, Any] | None = None
        self.child_env: dict[str, str] = {}  # what its EngineCore was started with on top
        self.core_switch_interval_ms: float | None = None  # its EngineCore's, where yapd set it
        self.core_steady_heap = False  # its EngineCore's malloc set to keep its heap
        self._forked_with: forking.ChildSettings | None = None  # this start's, once vLLM's start ran
        self._forked_on: forking.LoopForks | None = None  # engines.fork_from_main_thread: this start's
        self.core_forked_by_main = False  # its EngineCore forked by yapd's main thread
        self.core_started_by: str | None = None  # "fork" or "spawn", as vLLM started its EngineCore
        self._ending: asyncio.Task[None] | None = None  # a cancelled start's engine, being shut down
        self._together: Together[Any] | None = None  # this engine's held sends (turn.send_together)
        self._receipts: Receipts | None = None  # when its first outputs reached this process (stats on)

    def settings(self, fetch: bool = False) -> dict[str, Any]:
        """The AsyncEngineArgs this engine starts with (resolved once per start; ``fetch``:
        in a worker thread, the checkpoint's config.json may come from the Hub)."""
        if self._kwargs is None:
            model = awq.resolve_model(self.role, self.ecfg, self.cfg)
            revision = (self.ecfg.revision or None) if model == self.ecfg.model else None
            self._kwargs = engine_kwargs(self.role, self.cfg, model, gpu_capability(),
                                         checkpoint_quantization(model, revision, fetch))
        return self._kwargs

    @property
    def plans(self) -> MemoryPlans:
        # Where vLLM writes its startup plans: the daemon points it into its cache dir
        # unless the environment says otherwise.
        return MemoryPlans(Path(os.environ.get("VLLM_CACHE_ROOT") or compile_cache_dir(self.cfg)))

    def plan_key(self) -> str:
        return plan_key(self.settings(), device_identity())

    def memory_plan(self) -> Plan | None:
        try:
            return self.plans.get(self.plan_key())
        except EngineError:
            return None

    def forget_memory_plan(self) -> None:
        with contextlib.suppress(EngineError, OSError):
            self.plans.drop(self.plan_key())

    def tokenizer_source(self) -> tuple[str, str | None]:
        kwargs = self.settings()
        return kwargs["tokenizer"], kwargs["revision"]

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def health(self) -> EngineHealth:
        if self._state == "ready" and self._llm is not None and self._llm.errored:
            self._state, self._detail = "failed", "EngineCore process died"
            log.error("engine dead role=%s model=%s", self.role, self.model)
        extra: dict[str, Any] = {"start_seconds": self.start_seconds} if self.start_seconds else {}
        if self._state == "ready" and (pid := self.engine_pid()) is not None:
            extra["pid"] = pid  # the EngineCore's: its CPU time, its threads, a kill -9 test
        if self.child_env:
            extra["child_env"] = self.child_env
        if self.core_switch_interval_ms:
            extra["core_switch_interval_ms"] = self.core_switch_interval_ms
        if self.core_steady_heap:
            extra["core_steady_heap"] = True
        if self.core_forked_by_main:
            extra["core_forked_by"] = "main thread"
        if self.core_started_by:
            extra["core_started_by"] = self.core_started_by
        return EngineHealth(self._state == "ready", self._state, self._detail, extra)

    async def start(self, alongside: bool = False, child_env: Mapping[str, str] | None = None) -> None:
        """Load the engine. ``alongside``: another engine loads at the same time, so the
        KV cache size comes from this engine's memory plan instead of profiling.
        ``child_env``: added to the EngineCore's environment (fork only: a spawned one
        starts from a fresh environment, which no at-fork hook reaches)."""
        await self._ended()  # a cancelled start before this one: its engine is gone first
        self._state = "starting"
        self._kwargs = None  # config may have been reloaded since the last start
        self.child_env, self.core_switch_interval_ms, self._forked_with = {}, None, None
        self.core_steady_heap = self.core_forked_by_main = False
        self.core_started_by = None
        self._forked_on = None
        env = dict(child_env or {})
        tok: asyncio.Future[Any] | None = None
        work: asyncio.Future[Any] | None = None
        t0 = time.perf_counter()
        try:
            async with _start_turn():
                # Importing vLLM takes seconds: never on the event loop (/healthz, the
                # watchdog and the other engine's stream keep going).
                kwargs, plan = await asyncio.to_thread(self._prepare, alongside)
            self.model = kwargs["model"]
            method = self.cfg.start_method(self.role)
            log.info("starting vLLM engine role=%s start_method=%s %s", self.role, method,
                     " ".join(f"{k}={v}" for k, v in kwargs.items() if k != "tokenizer"))
            record = not alongside and plan is None
            before, since = (await asyncio.to_thread(gpu_memory), memplan_now()) if record else (None, 0.0)
            with self.plans.vllm_recording(record):
                # The turn ends once the EngineCore's process exists: vLLM then only waits on
                # it, and the next engine's config and set-up (which hold this process's GIL
                # for seconds) no longer slow this one's down.
                async with _start_turn():
                    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = method
                    vllm_plugin.offer(self.cfg.engines.core_switch_interval_ms)  # to a spawned core
                    loop = asyncio.get_running_loop()

                    def begin() -> asyncio.Future[Any]:
                        nonlocal work  # kept here: a cancelled start shuts down what it builds
                        work = asyncio.ensure_future(asyncio.to_thread(self._build, kwargs, env, loop))
                        return work

                    building = time.perf_counter()
                    built = await (_until_forked(begin) if method == "fork" else _until_spawned(begin))
                    # Read before the turn passes on: the next start sets its own (one
                    # engine may fork and the other spawn), and vLLM switches to spawn by
                    # itself where it must (a CUDA context in this process).
                    used = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
                    if not built.done():
                        log.info("EngineCore %s %.1f s into vLLM's start role=%s",
                                 "forked" if method == "fork" else "spawned", time.perf_counter() - building,
                                 self.role)
                # Our tokenizer loads while the EngineCore does, once no engine is in its
                # set-up before its EngineCore's start any more (see _load_tokenizer).
                tok = asyncio.ensure_future(self._load_tokenizer(kwargs["tokenizer"], kwargs["revision"]))
                tok.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failed start may not await it
                # Shielded: a cancel here (most of a start's time) must leave vLLM's start
                # to its end, whose engine _end_cancelled_start then shuts down.
                self._llm = await asyncio.shield(built)
                self._hook_client(self._llm)
                self.core_started_by = used
                log.log(logging.INFO if used == method else logging.WARNING,
                        "EngineCore started by %s role=%s pid=%s", used, self.role, self.engine_pid())
                interval = self.cfg.engines.core_switch_interval_ms
                missing = (await asyncio.to_thread(vllm_plugin.loadable)) if interval and used != "fork" else None
                self._child_env_note(env, used, missing)
                if record:
                    await asyncio.to_thread(self._record_plan, before, since)
            self._tok = await tok
        except EngineError:
            self._state = "failed"
            await self._end_failed_start()
            raise
        except Exception as exc:
            self._state, self._detail = "failed", f"start failed: {exc}"
            await self._end_failed_start()
            raise self.start_error(exc) from exc
        except asyncio.CancelledError:
            # vLLM's start goes on in its worker thread (nothing stops one there): what it
            # builds is shut down once built, never left holding GPU memory unreached.
            self._state, self._detail = "failed", "start cancelled"
            self._ending = asyncio.ensure_future(self._end_cancelled_start(work))
            raise
        finally:
            if tok is not None:
                tok.cancel()  # after a failed start: no tokenizer for an engine that is not there
        self.start_seconds = round(time.perf_counter() - t0, 1)
        self._state, self._detail = "ready", ""

    async def _end_failed_start(self) -> None:
        """A start that failed after vLLM's own start (our tokenizer, say) leaves an
        EngineCore holding GPU memory, which a failed engine must not keep until the next
        restart or stop."""
        try:
            await self._end_llm()
        except Exception as exc:  # the start's own error is the one to report
            log.warning("ending the failed start's engine role=%s: %s", self.role, exc)

    async def _end_cancelled_start(self, work: asyncio.Future[Any] | None) -> None:
        if self._llm is None and work is not None:
            try:
                self._llm = await work
            except BaseException:
                return  # a build that failed left no engine behind
        await self._end_failed_start()

    async def _ended(self) -> None:
        """Once a cancelled start's engine is shut down (see start)."""
        ending, self._ending = self._ending, None
        if ending is not None:
            await asyncio.wait([ending])  # not cancelled with the caller; its outcome is its own

    async def _load_tokenizer(self, name: str, revision: str | None) -> Any:
        """yapd's own tokenizer for this engine, loaded once every engine starting beside
        this one is past its EngineCore's fork. Loading a large vocabulary holds the GIL
        for seconds (NeMo's Tekken: 2.4-2.9 s, a busy thread beside it kept 7 % of its
        pace), and before the fork vLLM's own set-up runs in this process: its config and
        tokenizer, which the other engine's start waits for. After the fork, vLLM only
        waits on its EngineCore, in another process (forked or spawned)."""
        t0 = time.perf_counter()
        await after_the_setups()
        waited = time.perf_counter() - t0
        tok = await asyncio.to_thread(load_tokenizer, name, revision)
        log.info("our tokenizer took %.1f s, after %.1f s waiting for its turn role=%s",
                 time.perf_counter() - t0 - waited, waited, self.role)
        return tok

    def _prepare(self, alongside: bool) -> tuple[dict[str, Any], Plan | None]:
        """Everything before vLLM's own start, in a worker thread."""
        t0 = time.perf_counter()
        kwargs = dict(self.settings(fetch=True))
        require_gpus(self.role, kwargs, gpu_count())
        plan = self.memory_plan()
        if alongside and plan is not None:
            kwargs["kv_cache_memory_bytes"] = plan.kv_cache_memory_bytes
        import vllm.engine.arg_utils  # here, off the event loop
        import vllm.v1.engine.async_llm  # noqa: F401

        log.info("loading vLLM took %.1f s role=%s", time.perf_counter() - t0, self.role)
        self.go_on("loading vLLM")
        return kwargs, plan

    def _build(self, kwargs: dict[str, Any], child_env: dict[str, str], loop: asyncio.AbstractEventLoop) -> Any:
        """vLLM's start (``_async_llm``), with what yapd gives the EngineCore it forks."""
        # Every process this thread forks while vLLM starts (the EngineCore; with data
        # parallelism, each of them) gets ``child_env``, the cores' switch interval and
        # their steady heap, and is forked by the loop's thread where so configured.
        e = self.cfg.engines
        with forking.forks_on(loop if e.fork_from_main_thread else None) as self._forked_on, \
                forking.child_settings(child_env, e.core_switch_interval_ms / 1000 or None,
                                       e.core_steady_heap) as self._forked_with, \
                gcpause.held_in_cores(e.hold_gc_in_core_start):
            return self._async_llm(kwargs)

    def _async_llm(self, kwargs: dict[str, Any]) -> Any:
        """AsyncLLM.from_engine_args in its two steps, so that a stop between them ends
        the start before any EngineCore exists."""
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        args = AsyncEngineArgs(**kwargs)
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        log.info("vLLM config took %.1f s role=%s", time.perf_counter() - t0, self.role)
        self.go_on("vLLM's config")
        return AsyncLLM.from_vllm_config(config, usage_context=UsageContext.ENGINE_CONTEXT,
                                         enable_log_requests=args.enable_log_requests,
                                         disable_log_stats=args.disable_log_stats)

    def _child_env_note(self, child_env: dict[str, str], used: str | None, plugin_missing: str | None) -> None:
        """Say whether the EngineCore got ``child_env`` and the cores' switch interval. A
        core forked from vLLM's start in our thread gets both from the at-fork hook; a
        spawned one (a fresh interpreter) no ``child_env``, and the switch interval only
        through yapd's vLLM plugin, where vLLM loads it (``plugin_missing``: why not)."""
        # the settings of this start's fork, where the EngineCore's fork went through our hook
        hooked = self._forked_with if used == "fork" and self._forked_with and self._forked_with.forks else None
        interval = self.cfg.engines.core_switch_interval_ms
        self.child_env = child_env if hooked is not None else {}
        got = hooked is not None if used == "fork" else plugin_missing is None
        self.core_switch_interval_ms = interval if interval and got else None
        if self.core_switch_interval_ms:
            log.info("EngineCore runs with a GIL switch interval of %g ms (%s) role=%s", interval,
                     "at its fork" if used == "fork" else f"vLLM plugin {vllm_plugin.NAME}", self.role)
        elif interval:
            why = plugin_missing if used != "fork" else "no fork of vLLM's start went through yapd's hook"
            log.warning("EngineCore started by %s keeps Python's switch interval: %s role=%s", used, why, self.role)
        self._steady_heap_note(used, hooked)
        self._fork_thread_note(used)
        if not child_env:
            return
        settings = " ".join(f"{k}={v}" for k, v in child_env.items())
        if hooked is not None:
            log.info("EngineCore started with %s role=%s", settings, self.role)
        else:
            log.warning("EngineCore started by %s without %s (only a core forked in yapd's hook gets it) role=%s",
                        used, settings, self.role)

    def _steady_heap_note(self, used: str | None, hooked: forking.ChildSettings | None) -> None:
        """engines.core_steady_heap: a forked core's only (a spawned one's main thread has
        glibc's main arena, whose heap does not come and go), and glibc's only."""
        if not self.cfg.engines.core_steady_heap:
            return
        self.core_steady_heap = hooked is not None and hooked.steady_heap
        if self.core_steady_heap:
            log.info("EngineCore keeps a steady heap (glibc mmap threshold %d MB, top pad %d MB) role=%s",
                     forking.STEADY_MMAP_THRESHOLD >> 20, forking.STEADY_TOP_PAD >> 20, self.role)
        elif used == "fork":
            why = "this process's malloc is not glibc's" if not forking.steady_heap_supported() else \
                "no fork of vLLM's start went through yapd's hook"
            log.warning("EngineCore started by fork keeps malloc's defaults: %s role=%s", why, self.role)
        else:
            log.info("EngineCore started by %s: engines.core_steady_heap is for forked cores role=%s", used, self.role)

    def _fork_thread_note(self, used: str | None) -> None:
        """engines.fork_from_main_thread: which thread forked the EngineCore."""
        on = self._forked_on
        if on is None or used != "fork":
            if on is not None:
                log.info("EngineCore started by %s: engines.fork_from_main_thread is for forked cores role=%s",
                         used, self.role)
            return
        self.core_forked_by_main = on.forks > 0 and not on.here
        if self.core_forked_by_main:
            log.info("EngineCore forked by yapd's main thread role=%s", self.role)
        else:
            why = f"yapd's event loop had stopped ({on.here} of {on.here + on.forks} forks)" if on.here else \
                "no fork of vLLM's start was made in its thread"
            log.warning("EngineCore not forked by yapd's main thread: %s role=%s", why, self.role)

    def _hook_client(self, llm: Any) -> None:
        """yapd's hooks on ``llm``: receipts of its first outputs (request stats on), the
        held sends of turn.send_together and each request's detokenizer primed from its
        prompt's end (engines.detokenizer_context)."""
        self._receipts = takes_receipts(llm)
        self._together = sends_together(llm, self._receipts)
        tokens = self.cfg.engines.detokenizer_context
        if tokens and not primes_from_prompt_end(llm, tokens):
            log.warning("this vLLM's output processor is not the one engines.detokenizer_context knows: "
                        "each first output decodes its whole prompt role=%s", self.role)

    def _record_plan(self, before: tuple[int, int] | None, since: float) -> None:
        """After a start with nothing else loading: file vLLM's profiled KV size with
        the memory this engine took, for side-by-side starts later."""
        after = gpu_memory()
        kv = self.plans.vllm_plan_since(since)
        if before is None or after is None or kv is None:
            return
        free_before, total = before
        fraction = float(self.settings()["gpu_memory_utilization"])
        plan = Plan(kv_cache_memory_bytes=kv, free_before=free_before, used=max(0, free_before - after[0]),
                    requested=math.ceil(total * fraction),
                    recorded=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        try:
            self.plans.put(self.plan_key(), plan)
        except OSError as exc:
            log.warning("cannot record memory plan role=%s: %s", self.role, exc)
            return
        log.info("memory plan recorded role=%s kv_cache_memory_bytes=%d used=%d", self.role, kv, plan.used)

    async def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec,
                     request_id: str, together: bool = False) -> AsyncIterator[Delta]:
        if self._state != "ready" or self._llm is None:
            raise EngineError(f"{self.role} engine is {self._state}")
        llm = self._llm
        self._inflight.add(request_id)
        gen = None
        first = True
        if together and self._together is not None:
            self._together.hold(request_id)
        try:
            # vLLM checks the sampling settings here: a ValueError is this request's error
            gen = llm.generate(token_prompt(list(prompt_ids)), sampling_params(spec, self.role, self.model),
                               request_id)
            async for out in gen:
                o = out.outputs[0]
                if out.finished and o.finish_reason in ENDED_BY_ENGINE and request_id not in self._aborted:
                    # vLLM ends a request it failed (or one its shutdown aborted) as a finished
                    # output: a reply cut short, not one that came to its end.
                    raise EngineError(f"{self.role} engine {ENDED_BY_ENGINE[o.finish_reason]}")
                stamps = None
                if first:
                    taken = self._receipts.first(request_id) if self._receipts is not None else None
                    stamps = request_stamps(getattr(out, "metrics", None), taken)
                yield Delta(o.text, len(o.token_ids), out.finished, o.finish_reason,
                            len(out.prompt_token_ids or ()), out.num_cached_tokens, stamps)
                first = False
        except (asyncio.CancelledError, GeneratorExit, EngineError):
            raise
        except Exception as exc:
            self.health()
            raise EngineError(f"{self.role} engine: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.discard(request_id)
            self._aborted.discard(request_id)
            if self._together is not None:
                self._together.forget(request_id)  # ended before its request was made
            if self._receipts is not None:
                self._receipts.forget(request_id)
            if gen is not None:
                await gen.aclose()  # aborts the request in vLLM if it is still running

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and request_id in self._inflight:
            self._aborted.add(request_id)  # its stream ends with "abort" as asked, not as an error
            await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        self._state = "stopping"
        await self._ended()
        await self._end_llm()
        self._state = "stopped"

    async def _end_llm(self) -> None:
        """Shut the AsyncLLM down and wait for its EngineCore to exit."""
        pids = core_pids(self._llm)
        llm, self._llm = self._llm, None
        if llm is not None:
            if self._inflight:
                # Each request still running ends now (its stream: an EngineError). vLLM's
                # shutdown cancels the task that feeds their queues, and a request its
                # EngineCore never answers before going would be waited on for ever.
                with contextlib.suppress(Exception):
                    await llm.abort(list(self._inflight))
            await asyncio.to_thread(llm.shutdown)
        if pids:
            # The GPU memory comes back only when every EngineCore process is gone; a
            # restart measures free memory right after this (side-by-side gate).
            await asyncio.to_thread(wait_all_gone, pids, SHUTDOWN_WAIT_S)

    def engine_pid(self) -> int | None:
        """The EngineCore process id (for fault tests: kill -9 it)."""
        return core_pid(self._llm)


# vLLM's own processes while an engine starts, by what their command lines hold. vLLM
# titles each EngineCore VLLM::EngineCore (_DPn with data parallelism) as it starts, long
# before it is ready; a spawned one gets its title only after its interpreter has imported
# torch and vLLM (10-20 s), and until then multiprocessing's command line names it. Before
# any core, vLLM's config inspects the model's class in a fresh interpreter when its cache
# (VLLM_CACHE_ROOT/modelinfos) has no entry for it: 20 s from source on the H200.
START_CHILDREN = {
    b"::EngineCore": "EngineCore",
    b"from multiprocessing.spawn import spawn_main": "EngineCore",
    b"vllm.model_executor.models.registry": "model inspection",
}


def start_children(parent: int | None = None) -> dict[int, str]:
    """vLLM's start processes among ``parent``'s children (default: this process's), each
    with what it is: "EngineCore" (also one still loading, which no AsyncLLM names yet) or
    "model inspection"."""
    kids = procfs.children(os.getpid() if parent is None else parent)
    return {pid: what for pid, cmdline in kids.items() if (what := _start_child_kind(cmdline)) is not None}


def is_start_child(pid: int) -> bool:
    """Whether process ``pid`` is one of vLLM's start processes still (see start_children),
    whoever its parent is now: a pid kept a while may have ended and been given to another
    process since."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _start_child_kind(cmdline) is not None


def _start_child_kind(cmdline: bytes) -> str | None:
    return next((what for mark, what in START_CHILDREN.items() if mark in cmdline), None)


def starting_cores(parent: int | None = None) -> set[int]:
    """The vLLM EngineCore processes among ``parent``'s children (see start_children)."""
    return {pid for pid, what in start_children(parent).items() if what == "EngineCore"}


def core_pids(llm: Any) -> list[int]:
    """An AsyncLLM's EngineCore process ids (one per data-parallel rank); none in-process
    or where this vLLM keeps them elsewhere."""
    try:
        return [int(p.pid) for p in llm.engine_core.resources.engine_manager.processes]
    except Exception:
        return []


def core_pid(llm: Any) -> int | None:
    """An AsyncLLM's first EngineCore process id (see core_pids)."""
    return next(iter(core_pids(llm)), None)


# How vLLM ends a request yapd did not end, by the finish reason it gives: failed (an error
# while adding or scheduling it), or aborted by the engine itself (its shutdown).
ENDED_BY_ENGINE = {"error": "failed the request", "abort": "aborted the request (stopping or restarting)"}


@functools.lru_cache(maxsize=64)
def sampling_params(spec: SamplingSpec, role: str, model: str = "") -> Any:
    """vLLM's SamplingParams for ``spec`` on ``role``'s engine. Built once per distinct
    spec (its checks cost tens of microseconds, paid on every turn's start otherwise).
    vLLM clones what it is given for each request, by default with a deep copy (19 us on
    this project's CPU machine, twice per turn, on the event loop); ``skip_clone`` makes
    that a shallow copy, as vllm serve's own per-request params do. What vLLM then
    changes in place is the set of stop token ids, to which it adds the engine's EOS ids:
    the same ids on every request of one engine, so one object per role and model serves
    them all (another model, after a restart, has other EOS ids)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = dict(
        max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
        top_k=spec.top_k if spec.top_k > 0 else 0, repetition_penalty=spec.repetition_penalty,
        seed=spec.seed, stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos,
        min_tokens=spec.max_tokens if spec.ignore_eos else 0,
        output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
    )
    try:
        return SamplingParams(**kwargs, skip_clone=True)
    except TypeError:  # a vLLM before skip_clone: it deep-copies
        return SamplingParams(**kwargs)


def sends_together(llm: Any, receipts: Receipts | None = None) -> Together[Any] | None:
    """Held sends (yapd.engines.together) on ``llm``'s way to its EngineCore: its client's
    ``add_request_async``, wrapped on this AsyncLLM alone; None where a vLLM has no such
    client (its requests then leave as they always did). Each request sent is expected
    in ``receipts`` (see takes_receipts)."""
    client = getattr(llm, "engine_core", None)
    send = getattr(client, "add_request_async", None)
    if client is None or send is None:
        return None
    states = getattr(getattr(llm, "output_processor", None), "request_states", None)

    # AsyncLLM gives its requests internal ids (the caller's id and 8 random characters)
    # and keeps the caller's in external_req_id; an abort by the caller's id drops the
    # request's state from the output processor.
    def caller(request: Any) -> str:
        return getattr(request, "external_req_id", None) or request.request_id

    together: Together[Any] = Together(send, caller, lambda request: states is None or request.request_id in states)

    async def add_request_async(request: Any) -> None:
        if receipts is not None:
            receipts.expect(request.request_id, caller(request))
        try:
            await together.send(request)
        except asyncio.CancelledError:
            # Cancelled before AsyncLLM.add_request returned, generate() aborts nothing: the
            # request would stay in the output processor, and, if it left, run in the core.
            with contextlib.suppress(Exception):
                await llm.abort(request.request_id, internal=True)
            raise

    client.add_request_async = add_request_async
    return together


def takes_receipts(llm: Any) -> Receipts | None:
    """Receipts (yapd.engines.receipts) of ``llm``'s first outputs, stamped as its output
    handler takes each batch from the EngineCore's client (``get_output_async``, wrapped on
    this AsyncLLM alone); None where it keeps no request stats (nothing to split) or a
    vLLM has no such client."""
    client = getattr(llm, "engine_core", None)
    take = getattr(client, "get_output_async", None)
    if client is None or take is None or not getattr(llm, "log_stats", False):
        return None
    receipts = Receipts()

    async def get_output_async() -> Any:
        outputs = await take()
        receipts.took(o.request_id for o in getattr(outputs, "outputs", ()))
        return outputs

    client.get_output_async = get_output_async
    return receipts


def request_stamps(metrics: Any, taken: float | None = None) -> EngineStamps | None:
    """A first output's engine stamps from vLLM's request stats (``RequestOutput.metrics``,
    there only while the engine logs stats; its EngineCore stamps with time.monotonic),
    with ``taken``, when this process's output handler took it from the core."""
    queued = getattr(metrics, "queued_ts", 0.0)
    if not queued:
        return None
    return EngineStamps(queued, metrics.scheduled_ts, metrics.first_token_ts, taken)


def token_prompt(ids: list[int]) -> Any:
    """The prompt as vLLM's own engine input (what its renderer hands the engine), so
    AsyncLLM skips its deprecated path for raw prompts; older vLLMs get a TokensPrompt."""
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:
        return {"prompt_token_ids": ids}
    return tokens_input(ids)


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _start_turn() -> asyncio.Lock:
    """Engines loading side by side take turns up to their EngineCore's start: a fork
    while another thread is inside vLLM's set-up could copy a lock that thread holds
    into the child, two threads importing vLLM at once can trip importlib's deadlock
    detection, and vLLM's config and set-up hold this process's GIL: run one at a time,
    the first engine's EngineCore starts (and, spawned, imports torch and vLLM) seconds
    sooner. On an H200 two spawned starts without turns took 10.5 s for the chat
    engine's config, 0.7-4.3 s forked with them (docs/bench/README.md, runs w-y)."""
    loop = asyncio.get_running_loop()
    if loop not in _turns:
        _turns[loop] = asyncio.Lock()
    return _turns[loop]


async def after_the_setups() -> None:
    """Once the engine starts queued before now in this process are past their set-ups (up
    to each EngineCore's fork): a tokenizer loaded then leaves their GIL alone (see
    VllmEngine._load_tokenizer)."""
    async with _start_turn():
        pass


async def _until_forked(begin: Callable[[], asyncio.Future[Any]]) -> asyncio.Future[Any]:
    """Start vLLM's start in a worker thread (``begin``) and return once this process has
    forked (the EngineCore child exists; vLLM now only waits for it) or the start is done.
    Returns the start's future."""
    loop = asyncio.get_running_loop()
    forked = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(forked.set)

    stop = forking.on_fork(wake)
    try:
        return await _until(begin, forked.wait())
    finally:
        stop()


SPAWN_POLL_S = 0.1


async def _until_spawned(begin: Callable[[], asyncio.Future[Any]]) -> asyncio.Future[Any]:
    """Start vLLM's start in a worker thread (``begin``; its EngineCore spawned) and
    return once a new EngineCore child of this process exists (seen in /proc: a spawn
    runs no at-fork hook) or the start is done. Returns the start's future."""
    # Every child before the start begins, titled or not: another engine's core forked a
    # moment ago still has this process's command line until vLLM titles it, and counted
    # new then, it ended this start's turn before its own core was spawned (the tool's
    # spawn beside a forked chat core: "spawned 0.0 s into vLLM's start" on an H100, its
    # config then 3.9 s against 0.1 forked, sharing the GIL with both tokenizers' loads).
    before = set(await asyncio.to_thread(procfs.children, os.getpid()))

    async def spawned() -> None:
        while True:  # nothing tells of a new child: /proc is read until it shows one
            if (await asyncio.to_thread(starting_cores)) - before:
                return
            # A child can show an empty command line in the middle of its exec: look again.
            await asyncio.sleep(SPAWN_POLL_S)

    return await _until(begin, spawned())


async def _until(begin: Callable[[], asyncio.Future[Any]], started: Awaitable[Any]) -> asyncio.Future[Any]:
    """Start the work ``begin`` starts and return its future once ``started`` (its
    EngineCore exists) or the work itself is done; ``started`` is cancelled if still waiting."""
    task = begin()
    waiter = asyncio.ensure_future(started)
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return task


def gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES applies). torch counts them
    through NVML, without a CUDA context (which would force vLLM to spawn)."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def require_gpus(role: str, kwargs: dict[str, Any], count: int) -> None:
    """Refuse a start that needs more GPUs than are visible, with the reason, before
    vLLM spends a minute finding out."""
    tp, dp = int(kwargs.get("tensor_parallel_size") or 1), int(kwargs.get("data_parallel_size") or 1)
    need = tp * dp
    if need > count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise EngineError(f"{role} engine needs {need} GPU{'s' if need > 1 else ''} (tensor_parallel_size={tp} x "
                          f"data_parallel_size={dp}); {count} visible{where}")


def compile_cache_dir(cfg: Config) -> Path:
    return cfg.cache_dir() / "vllm"


def side_by_side_ok(engines: list[VllmEngine], settle_s: float = MEMORY_SETTLE_S) -> bool:
    """Whether these engines may load at once now: each has a memory plan recorded on
    this GPU with these settings, and the GPU has room for all of them. Free memory that
    falls short is read again for up to ``settle_s`` (the driver returns a finished
    process's memory with a lag)."""
    plans = [e.memory_plan() for e in engines]
    have = ", ".join(f"{e.role}={'yes' if p else 'no'}" for e, p in zip(engines, plans, strict=True))
    t0 = time.monotonic()
    deadline = t0 + settle_s
    while True:
        mem = gpu_memory()
        ok = side_by_side(plans, mem[0] if mem else None)
        if ok or any(p is None for p in plans) or mem is None or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    free = f"{mem[0] / 2**30:.2f}" if mem else "unknown"
    need = max((p.free_before for p in plans if p is not None), default=0) / 2**30
    log.info("engines load %s (plans: %s; free %s GiB, recorded start %.2f GiB, waited %.1f s)",
             "side by side" if ok else "one after the other", have, free, need, time.monotonic() - t0)
    return ok


# A stop while engines load: how often to look for their EngineCores, and how long one
# gets for SIGTERM before SIGKILL.
CORE_CHECK_S = 0.25
CORE_KILL_AFTER_S = 5.0


async def end_loading_starts(engines: Sequence[Engine]) -> None:
    """A stop while vLLM engines load: end their EngineCores and model inspections, this
    process's children (SIGTERM, SIGKILL if one is still there CORE_KILL_AFTER_S later). A
    cold load takes minutes, more than systemd's stop timeout; with its EngineCore gone a
    start fails at once, and the daemon, stopping, exits as after any failed start. Looked
    for until no engine is loading: a core may be forked after the stop (vLLM's import
    comes first). A start that has no core yet ends after the step it is in
    (abandon_start), or, in vLLM's config, as its model inspection is ended. An engine in
    an engine host is ended by its host, which runs this for it."""

    def vllm_loading() -> bool:
        return any(e.backend == "vllm" and e.health().state == "starting" for e in engines)

    for eng in engines:
        eng.abandon_start()
    if vllm_loading():
        log.info("stopping while engines load: each start ends after the step it is in")
    ended: dict[int, float] = {}
    while vllm_loading():
        serving = {e.describe().get("pid") for e in engines}
        now = time.monotonic()
        for pid, what in sorted(start_children().items()):
            if pid in serving:
                continue
            if pid not in ended:
                log.info("stopping while engines load: ending their %s pid=%d", what, pid)
                sig = signal.SIGTERM
            elif now - ended[pid] > CORE_KILL_AFTER_S:
                sig = signal.SIGKILL  # busy in a CUDA call, it has not got to its handler
            else:
                continue
            ended.setdefault(pid, now)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        await asyncio.sleep(CORE_CHECK_S)


def wait_all_gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait until each of ``pids`` has exited, all within ``timeout``."""
    deadline = time.monotonic() + timeout
    return all([wait_gone(pid, max(0.0, deadline - time.monotonic())) for pid in pids])


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (or is a zombie: its GPU memory is freed)."""
    deadline = time.monotonic() + timeout
    while True:  # looked at once at least, however little time is left
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (OSError, IndexError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
