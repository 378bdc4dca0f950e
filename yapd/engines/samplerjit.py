"""FlashInfer's sampling kernels, built beside a cold start's model loading.

vLLM samples top-p / top-k with FlashInfer, whose wheel ships these kernels as CUDA
sources: the first engine to sample on a new cache dir JIT-compiles them (nvcc on
``sampling.cu`` alone took 70 s) in the sampler's warm-up, after its model has loaded,
compiled and captured its CUDA graphs. A cold start waited 109-114 s there with the GPU
idle (runs u, v and ay, docs/bench/README.md). Built in a process of its own as the engines
begin to load, the kernels are ready, or nearly, when the warm-up asks: FlashInfer takes a
file lock per kernel module, so a core that gets there first waits for the build under way
(no second compile), and its ninja then finds the build current.

The builder sees no GPU (``CUDA_VISIBLE_DEVICES=""``): a CUDA context there would take GPU
memory from under the engines' memory plans. FlashInfer builds for the architectures
``FLASHINFER_CUDA_ARCH_LIST`` names, so yapd names the visible GPUs' (from NVML, as the
cores' own FlashInfer, asking CUDA, would find them): the build lands in the folder the
cores look in.

Run as ``python -m yapd.engines.samplerjit``: builds the module unless built, and prints
what it did on its last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("yapd.engines.samplerjit")

# FlashInfer's JIT module for top-p / top-k sampling (flashinfer.jit.sampling), as it
# lays its builds out under FLASHINFER_WORKSPACE_BASE: .cache/flashinfer/<version>/<archs>/
# cached_ops/sampling/sampling.so (flashinfer 0.6.14).
MODULE = "sampling"
STOP_GRACE_S = 5.0


def built(workspace_base: Path) -> bool:
    """Whether a sampling module is built under this FLASHINFER_WORKSPACE_BASE, for any
    version and architectures: a cache dir moved to another GPU type may leave the
    engines' own JIT build to do, as it did before this module."""
    root = workspace_base / ".cache" / "flashinfer"
    return any(root.glob(f"*/*/cached_ops/{MODULE}/{MODULE}.so"))


def visible_archs() -> str | None:
    """The visible GPUs' compute capabilities as FLASHINFER_CUDA_ARCH_LIST takes them
    ("9.0"), from NVML (no CUDA context in this process, which forks EngineCores); None
    where NVML cannot tell."""
    try:
        import torch

        from yapd.engines.vllm import gpu_capability

        count = int(torch.cuda._device_count_nvml())  # -1: NVML could not tell
    except Exception as exc:
        log.debug("GPU architectures from NVML: %s", exc)
        return None
    caps = [gpu_capability(i) for i in range(count)]
    if not caps or any(c is None for c in caps):
        return None
    return " ".join(sorted({f"{c[0]}.{c[1]}" for c in caps if c is not None}))


class SamplerBuild:
    """The builder process of one daemon: started once, where the kernels are missing."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self.outcome: str = ""  # the builder's last line, once it has ended
        self._stopping = False

    async def start(self, env: Mapping[str, str], archs: Callable[[], str | None] = visible_archs) -> bool:
        """Start the builder unless the kernels are built, a builder runs already, vLLM
        is told not to sample with FlashInfer, or the GPUs' architectures are unknown
        (``archs``, asked off the event loop only where a build is wanted: a warm start
        globs the cache dir, nothing more). ``env``: the engines' environment (yapd's,
        with cache_env's FLASHINFER_WORKSPACE_BASE)."""
        if self.proc is not None and self.proc.returncode is None:
            return False
        base = env.get("FLASHINFER_WORKSPACE_BASE")
        if not base or env.get("VLLM_USE_FLASHINFER_SAMPLER", "1") == "0" or built(Path(base)):
            return False
        gpus = env.get("FLASHINFER_CUDA_ARCH_LIST") or await asyncio.to_thread(archs)
        if not gpus:
            log.info("FlashInfer's sampler: the GPUs' architectures unknown, left to the engines' own build")
            return False
        child = {**env, "CUDA_VISIBLE_DEVICES": "", "FLASHINFER_CUDA_ARCH_LIST": gpus}
        # A session of its own: a stop ends ninja and its nvcc processes with it.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "yapd.engines.samplerjit", env=child, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        log.info("FlashInfer's sampler: not built under %s; building it beside the engines' start "
                 "(pid %d, for %s)", base, self.proc.pid, gpus)
        self._watch = asyncio.create_task(self._report(self.proc, time.perf_counter()))
        return True

    async def _report(self, proc: asyncio.subprocess.Process, t0: float) -> None:
        assert proc.stdout is not None
        out = (await proc.stdout.read()).decode(errors="replace").strip().splitlines()
        code = await proc.wait()
        self.outcome = out[-1] if out else f"exit status {code}"
        took = time.perf_counter() - t0
        if self._stopping:
            log.info("FlashInfer's sampler: its build stopped with the daemon after %.1f s", took)
        elif code == 0:
            log.info("FlashInfer's sampler: %s (%.1f s after its start)", self.outcome, took)
        else:
            # The engines build it themselves then, as without this process.
            log.warning("FlashInfer's sampler: its build beside the start failed after %.1f s (%s); "
                        "the engines build it at their first sampling", took, self.outcome)

    async def wait(self) -> None:
        if self._watch is not None:
            await asyncio.shield(self._watch)

    async def stop(self) -> None:
        """End a build still running (the daemon's stop), its compilers included."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._stopping = True
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(self.wait(), grace)
                break
            except asyncio.TimeoutError:
                continue


def main() -> int:
    try:
        from flashinfer.jit.sampling import gen_sampling_module

        spec = gen_sampling_module()
        if spec.is_compiled:  # a property of FlashInfer's JitSpec (0.6.14)
            print(f"{spec.name} built already", flush=True)
            return 0
        t0 = time.perf_counter()
        spec.build(verbose=False)  # under FlashInfer's lock for the module
        print(f"{spec.name} built in {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        print(f"{type(exc).__name__}: {lines[-1] if lines else ''}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
