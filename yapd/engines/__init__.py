"""Engines: one interface (:mod:`yapd.engines.base`), a vLLM backend for GPUs and a
transformers backend for CPUs. vLLM is imported only when its backend is chosen."""

from __future__ import annotations

import importlib.util
import logging

from yapd.config import Config, EngineConfig
from yapd.engines.base import Delta, Engine, EngineError, EngineHealth, SamplingSpec

__all__ = ["Delta", "Engine", "EngineError", "EngineHealth", "SamplingSpec", "create_engine", "resolve_backend"]

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
    ecfg: EngineConfig = getattr(cfg, role)
    backend = resolve_backend(ecfg, cfg.demo)
    if backend == "vllm":
        from yapd.engines.vllm import VllmEngine

        return VllmEngine(role, cfg)
    from yapd.engines.cpu import CpuEngine

    return CpuEngine(role, ecfg.model, revision=ecfg.revision, workers=ecfg.cpu_workers,
                     max_model_len=ecfg.max_model_len)
