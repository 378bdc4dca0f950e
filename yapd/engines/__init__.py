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
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(ecfg: EngineConfig, demo: bool) -> str:
    if demo:
        return "cpu"
    if ecfg.backend != "auto":
        return ecfg.backend
    if importlib.util.find_spec("vllm") is not None and cuda_available():
        return "vllm"
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
