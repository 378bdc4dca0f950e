"""The GPU engine: vLLM's ``AsyncLLM`` in this process, fed token ids.

Defaults come from measurements on an H100 (docs/bench/): CUDA graphs and
torch.compile on (``enforce_eager`` is 7x slower per token), prefix caching and chunked
prefill on, FP8 weights and FP8 KV for float chat models, compile caches under the
daemon's cache directory so a restart skips the minutes of compiling. vLLM is imported
here only, so CPU installs never need it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from yapd.config import Config, EngineConfig
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, EngineState, SamplingSpec
from yapd.engines.tokenizer import load_tokenizer

log = logging.getLogger("yapd.engine.vllm")


def gpu_capability() -> tuple[int, int] | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return int(major), int(minor)
    except Exception:  # noqa: S110 - no GPU or no torch: no capability
        pass
    return None


def resolve_model(role: str, ecfg: EngineConfig, cfg: Config) -> str:
    """The checkpoint to load: a pre-quantized AWQ repo or the AWQ cache in awq mode."""
    if ecfg.quantization == "awq":
        if ecfg.awq_model:
            return ecfg.awq_model
        if "awq" in ecfg.model.lower():
            return ecfg.model
        from yapd.awq import cache_path

        cached = cache_path(cfg.cache_dir(), ecfg.model)
        if (cached / "awq_metadata.json").exists():
            return str(cached)
        raise EngineError(f"{role}: quantization is awq but no AWQ model is cached for {ecfg.model}; "
                          "run `yapctl awq rebuild` or set awq_model (AWQ_CHAT_MODEL / AWQ_TOOL_MODEL)")
    return ecfg.model


def engine_kwargs(role: str, cfg: Config, model: str, capability: tuple[int, int] | None) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one engine (pure: unit-tested on CPUs)."""
    ecfg: EngineConfig = getattr(cfg, role)
    q = ecfg.quantization
    name = model.lower()
    quantization: str | None
    if q == "auto":
        if "gptq" in name or "awq" in name:
            quantization = None  # the checkpoint says how; vLLM picks the Marlin kernels
        else:
            quantization = "fp8" if role == "chat" else None
    elif q in ("none", "gptq", "awq"):
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
        revision=ecfg.revision or None,
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
    kwargs.update(ecfg.extra_engine_args)
    return kwargs


class VllmEngine(Engine):
    backend = "vllm"
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
        self.start_seconds: float | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            raise EngineError(f"{self.role} engine is not started")
        return self._tok

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def health(self) -> EngineHealth:
        if self._state == "ready" and self._llm is not None and self._llm.errored:
            self._state, self._detail = "failed", "EngineCore process died"
            log.error("engine dead role=%s model=%s", self.role, self.model)
        extra = {"start_seconds": self.start_seconds} if self.start_seconds else {}
        return EngineHealth(self._state == "ready", self._state, self._detail, extra)

    async def start(self) -> None:
        # The EngineCore child must not inherit our threads by fork().
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        self._state = "starting"
        t0 = time.perf_counter()
        try:
            model = resolve_model(self.role, self.ecfg, self.cfg)
            kwargs = engine_kwargs(self.role, self.cfg, model, gpu_capability())
            self.model = model
            log.info("starting vLLM engine role=%s %s", self.role,
                     " ".join(f"{k}={v}" for k, v in kwargs.items() if k != "tokenizer"))
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self._tok = await asyncio.to_thread(load_tokenizer, kwargs["tokenizer"], kwargs["revision"])
            args = AsyncEngineArgs(**kwargs)
            # Built off the event loop so /healthz, the watchdog and the other engine keep
            # going during the load; AsyncLLM starts its output task on first use.
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except EngineError:
            self._state = "failed"
            raise
        except Exception as exc:
            self._state, self._detail = "failed", f"start failed: {exc}"
            raise EngineError(f"{self.role} engine failed to start {self.model}: {exc}") from exc
        self.start_seconds = round(time.perf_counter() - t0, 1)
        self._state, self._detail = "ready", ""

    async def stream(self, prompt_ids: Sequence[int], spec: SamplingSpec,
                     request_id: str) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._state != "ready" or self._llm is None:
            raise EngineError(f"{self.role} engine is {self._state}")
        params = SamplingParams(
            max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else 0, repetition_penalty=spec.repetition_penalty,
            seed=spec.seed, stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos,
            min_tokens=spec.max_tokens if spec.ignore_eos else 0,
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
        )
        gen = self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id)
        self._inflight.add(request_id)
        try:
            async for out in gen:
                o = out.outputs[0]
                yield Delta(o.text, len(o.token_ids), out.finished, o.finish_reason,
                            len(out.prompt_token_ids or ()), out.num_cached_tokens)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            self.health()
            raise EngineError(f"{self.role} engine: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.discard(request_id)
            await gen.aclose()  # aborts the request in vLLM if it is still running

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        self._state = "stopping"
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
        self._state = "stopped"

    def engine_pid(self) -> int | None:
        """The EngineCore process id (for fault tests: kill -9 it)."""
        try:
            procs = self._llm.engine_core.resources.engine_manager.processes
            return int(procs[0].pid)
        except Exception:
            return None


def compile_cache_dir(cfg: Config) -> Path:
    return cfg.cache_dir() / "vllm"
