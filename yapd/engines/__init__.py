"""Engines: one interface (:mod:`yapd.engines.base`), a vLLM backend for GPUs and a
transformers backend for CPUs. vLLM is imported only when its backend is chosen."""

from __future__ import annotations

import importlib.util
import logging

from yapd.config import Config, EngineConfig
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, SamplingSpec

__all__ = ["Delta", "Engine", "EngineError", "EngineHealth", "SamplingSpec", "can_start_together", "create_engine",
           "create_local_engine", "resolve_backend"]

log = logging.getLogger("yapd.engines")


def cuda_available() -> bool:
    """Whether a CUDA GPU is visible (CUDA_VISIBLE_DEVICES applies), asked of NVML only.
    Not torch.cuda.is_available(): that asks CUDA's runtime (cudaGetDeviceCount), after
    which torch refuses CUDA in every child this process forks, vLLM's EngineCore
    included ("Cannot re-initialize CUDA in forked subprocess"), unseen by vLLM's own
    check. Where NVML cannot tell, no GPU is assumed."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    count = getattr(torch.cuda, "_device_count_nvml", None)  # -1: NVML could not tell
    return bool(torch.backends.cuda.is_built()) and count is not None and int(count()) > 0


def resolve_backend(ecfg: EngineConfig, demo: bool) -> str:
    if demo:
        return "cpu"
    if ecfg.backend != "auto":
        return ecfg.backend
    vllm = importlib.util.find_spec("vllm") is not None
    if vllm and cuda_available():
        return "vllm"
    if vllm:
        # A GPU host whose GPU the service cannot reach (its unit's device rules, a driver
        # mismatch) would otherwise serve a 12B model on the CPU, minutes a reply, unnoticed.
        log.warning("backend auto: vLLM is installed but no GPU is visible; %s runs on the CPU engine "
                    "(backend = \"vllm\" fails instead, backend = \"cpu\" says this is meant)", ecfg.model)
    return "cpu"


def create_engine(role: str, cfg: Config) -> Engine:
    """``role``'s engine as its section says: in this process, or with ``own_process`` in
    an engine host of its own (yapd/engines/hosted.py)."""
    local = create_local_engine(role, cfg)
    if getattr(cfg, role).own_process:
        from yapd.engines.hosted import HostedEngine

        return HostedEngine(role, cfg, local)
    return local


def create_local_engine(role: str, cfg: Config) -> Engine:
    """``role``'s engine, to run in this process."""
    ecfg: EngineConfig = getattr(cfg, role)
    backend = resolve_backend(ecfg, cfg.demo)
    if backend == "vllm":
        from yapd.engines.vllm import VllmEngine

        return VllmEngine(role, cfg)
    from yapd.awq import resolve_model
    from yapd.engines.cpu import CpuEngine

    # In awq mode: the AWQ cache entry (transformers decompresses it to float on load:
    # the CPU engine runs the quantized weights, not the 4-bit kernels) or an AWQ repo.
    model = resolve_model(role, ecfg, cfg)
    return CpuEngine(role, model, revision=ecfg.revision if model == ecfg.model else "",
                     workers=ecfg.cpu_workers, max_model_len=ecfg.max_model_len)


def can_start_together(engines: list[Engine]) -> bool:
    """Whether these engines may load at the same time (blocking: call off the loop)."""
    if len(engines) < 2 or all(e.parallel_start_safe for e in engines):
        return True
    if all(e.backend == "vllm" for e in engines):
        from yapd.engines.hosted import HostedEngine
        from yapd.engines.vllm import VllmEngine, side_by_side_ok

        # A hosted engine's plans are its local twin's (one cache folder on disk).
        local = [e.local if isinstance(e, HostedEngine) else e for e in engines]
        return side_by_side_ok([e for e in local if isinstance(e, VllmEngine)])
    return False
