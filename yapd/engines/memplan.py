"""KV cache sizes remembered across starts, so two vLLM engines can load side by side.

A vLLM engine sizes its KV cache by profiling: it measures how much GPU memory its
own load took from what it saw free at the start. Two engines loading at once see each
other's allocations and size their caches wrong, so the first start loads them one
after the other and records each engine's result; later starts with the same
settings, GPU and vLLM hand each engine its recorded ``kv_cache_memory_bytes`` (no
profiling to mislead) and load both at once.

The figure is vLLM's own: with ``VLLM_ENABLE_STARTUP_PLAN=1`` each worker writes the
profiled value to ``$VLLM_CACHE_ROOT/startup_plan/``. yapd turns that on only for a
recording start, reads the file and removes it, and files the value under a key of its
own (the engine's settings, device and vLLM version). vLLM's own reuse of those files
stays off: its fingerprint leaves out ``gpu_memory_utilization``, so after a change of
CHAT_GPU_FRAC it would size the cache for the old fraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("yapd.engine.memplan")

PLAN_FILE = "yapd_memory_plans.json"
ENV = "VLLM_ENABLE_STARTUP_PLAN"
# Free memory may fall this short of the recorded figure before a side-by-side start
# is refused: CUDA contexts and allocator slack vary by a few hundred MiB between boots.
FREE_SLACK_BYTES = 512 << 20


@dataclass(frozen=True)
class Plan:
    kv_cache_memory_bytes: int
    # GPU memory free when this engine's recorded (sequential) start began.
    free_before: int
    # Memory the engine held once loaded: what the other engine must leave room for.
    used: int
    # What vLLM demands free when the engine starts (gpu_memory_utilization x total).
    requested: int
    recorded: str


def plan_key(kwargs: dict[str, Any], device: dict[str, Any]) -> str:
    """Everything the KV size depends on: the engine's settings, the GPU, the vLLM."""
    settings = {k: v for k, v in kwargs.items() if k != "kv_cache_memory_bytes"}
    blob = json.dumps({"settings": settings, "device": device}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class MemoryPlans:
    """The JSON file of recorded plans, one per engine key."""

    def __init__(self, vllm_cache_root: Path) -> None:
        self.root = vllm_cache_root
        self.path = vllm_cache_root / PLAN_FILE

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Plan | None:
        raw = self._load().get(key)
        try:
            plan = Plan(**raw) if isinstance(raw, dict) else None
        except TypeError:
            return None
        if plan is None or plan.kv_cache_memory_bytes <= 0:
            return None
        return plan

    def put(self, key: str, plan: Plan) -> None:
        data = self._load()
        data[key] = asdict(plan)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    def drop(self, key: str) -> None:
        data = self._load()
        if data.pop(key, None) is not None:
            self.path.write_text(json.dumps(data, indent=1))

    def _vllm_files(self) -> list[Path]:
        return list((self.root / "startup_plan").glob("startup_plan_*.json"))

    def clear_vllm_plans(self) -> None:
        for f in self._vllm_files():
            with contextlib.suppress(OSError):
                f.unlink()

    def vllm_plan_since(self, since: float) -> int | None:
        """The KV bytes vLLM's workers recorded in files written after ``since`` (the
        smallest, where tensor-parallel ranks wrote one each); None if none was."""
        values = []
        for f in self._vllm_files():
            with contextlib.suppress(OSError, ValueError):
                if f.stat().st_mtime >= since:
                    value = json.loads(f.read_text()).get("kv_cache_memory_bytes")
                    if isinstance(value, int) and value > 0:
                        values.append(value)
        return min(values) if values else None

    @contextlib.contextmanager
    def vllm_recording(self, on: bool) -> Iterator[None]:
        """Within: engines started in this process (spawned workers read the variable
        at their start) write their profiled KV size, if ``on``; no plan file of vLLM's
        is there to be reused, and none is left behind for a later start to reuse."""
        previous = os.environ.get(ENV)
        self.clear_vllm_plans()
        os.environ[ENV] = "1" if on else "0"
        try:
            yield
        finally:
            self.clear_vllm_plans()
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous


def side_by_side(plans: list[Plan | None], free_now: int | None) -> bool:
    """Whether engines with these plans can load at once with ``free_now`` bytes of GPU
    memory free: every engine has a plan, the GPU has at least as much free as when the
    first recorded start began (vLLM's own rule for reusing a profile), and each engine
    finds its requested share free even after all the others have loaded."""
    if not plans or free_now is None:
        return False
    known = [p for p in plans if p is not None]
    if len(known) != len(plans):
        return False
    if free_now + FREE_SLACK_BYTES < max(p.free_before for p in known):
        return False
    total_used = sum(p.used for p in known)
    return all(free_now - (total_used - p.used) >= p.requested for p in known)


def now() -> float:
    # File mtimes have coarse resolution on some filesystems: look a little back.
    return time.time() - 2.0
