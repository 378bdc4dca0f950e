"""Which small operations of an EngineCore's step run slower in a forked child than in a
spawned one: a probe for the device.

On an H200 (docs/bench/README.md, runs w-y of 2026-12-04) every forked chat EngineCore,
yapd's and raw vLLM's alike, spent 3-7 times the samples of a spawned one in vLLM's
``prepare_inputs`` and ``async_copy_to_gpu`` (the C calls those make: numpy, tensor
creation on the GPU, pinned host memory, host-to-device copies) and correspondingly less
waiting on the GPU. This program times those calls one by one, in children started each
way from a parent in the state yapd forks from (torch and vLLM imported, NVML asked, no
CUDA context), forked from the main thread, from a worker thread whose malloc arena has
been built up as vLLM's start leaves it in yapd (yapd's starts run in worker threads), by
the main thread for such a worker (yapd's ``engines.fork_from_main_thread``), and spawned,
and prints the medians as JSON::

    python -m yapctl.forkprobe [--iterations N] [--parent torch|vllm] [--mps DIR] [--device cpu]

``--device cpu`` times the CPU calls only (any machine; the tests run it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yapctl.heapprobe import build_up_arena, in_a_worker
from yapd import forking
from yapd.mps import PIPE_ENV

BATCHES = 5
WAYS = ("fork", "fork_thread", "fork_by_main", "spawn")
# Host memory the parent wrote before starting its children: a forked child shares these
# pages with it (copy-on-write) until one of them writes; a spawned child makes its own.
_before_start: list[Any] = []


def prepare(parent: str) -> None:
    """The modules (and NVML's answer) a parent of this kind holds before it starts a
    child: imported here in the parent, and again in a spawned child so both time the
    same code."""
    import numpy
    import torch  # noqa: F401

    if not _before_start:
        _before_start.append(numpy.arange(1 << 16, dtype=numpy.int32))

    if parent == "vllm":
        import vllm.engine.arg_utils
        import vllm.v1.engine.async_llm  # noqa: F401

        from yapd.engines.vllm import gpu_capability

        gpu_capability()  # through NVML, as yapd asks before its engines start


def time_ops(device: str, iterations: int) -> dict[str, float]:
    """Microseconds per call of each operation, the median of BATCHES batches (the GPU
    drained after each batch, so queued kernels do not carry over)."""
    import numpy as np
    import torch

    gpu = device == "cuda"
    a = np.arange(9, dtype=np.int32)
    d = {i: i for i in range(8)}
    keys = list(range(8))
    buf = np.zeros(1024, dtype=np.int32)
    ops: dict[str, Callable[[], object]] = {
        "np_fromiter": lambda: np.fromiter(map(d.get, keys), dtype=np.int32, count=8),
        "np_cumsum_out": lambda: np.cumsum(a, out=buf[1:10]),
        "torch_from_numpy": lambda: torch.from_numpy(a),
    }
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if gpu:
        dev = torch.device("cuda", 0)
        out = torch.empty(9, dtype=torch.int32, device=dev)
        fresh = np.arange(1 << 16, dtype=np.int32)
        big = torch.empty(1 << 16, dtype=torch.int32, device=dev)
        pinned = torch.from_numpy(a).pin_memory()
        event = torch.cuda.Event()
        sync = torch.cuda.synchronize

        def event_round_trip() -> None:
            event.record()
            event.synchronize()

        ops.update({
            "cuda_arange": lambda: torch.arange(9, dtype=torch.int32, device=dev),
            "cuda_zeros": lambda: torch.zeros(9, dtype=torch.int32, device=dev),
            "pin_memory": lambda: torch.from_numpy(a).pin_memory(),
            "h2d_copy_pinned": lambda: out.copy_(pinned, non_blocking=True),
            # vLLM 0.26's async_copy_to_gpu: pin, then copy without waiting
            "async_copy_to_gpu": lambda: out.copy_(torch.from_numpy(a).pin_memory(), non_blocking=True),
            # from pageable memory: made here, and made by the parent before the start
            "h2d_copy_pageable": lambda: big.copy_(torch.from_numpy(fresh), non_blocking=True),
            "h2d_copy_inherited": lambda: big.copy_(torch.from_numpy(_before_start[0]), non_blocking=True),
            "event_round_trip": event_round_trip,
        })
        try:  # vLLM's own, where it is installed (the parent kind "vllm" has it loaded)
            from vllm.v1.worker.gpu.buffer_utils import async_copy_to_gpu
        except ImportError:
            pass
        else:
            ops["vllm_async_copy_to_gpu"] = lambda: async_copy_to_gpu(a, out=out)
    result = {}
    for name, op in ops.items():
        op()
        sync()
        batches = []
        for _ in range(BATCHES):
            t0 = time.perf_counter()
            for _ in range(iterations):
                op()
            sync()
            batches.append((time.perf_counter() - t0) / iterations * 1e6)
        result[name] = round(statistics.median(batches), 3)
    return result


def _child(queue: Any, parent: str, device: str, iterations: int) -> None:
    try:
        prepare(parent)  # a no-op in a forked child: it has them already
        # The thread the child runs on: a child forked from a worker thread runs on (a
        # copy of) that thread, not on a "MainThread".
        queue.put({"pid": os.getpid(), "thread": threading.current_thread().name,
                   "mps_pipe": os.environ.get(PIPE_ENV), "ops": time_ops(device, iterations)})
    except BaseException as exc:  # the parent must hear of it rather than wait
        queue.put({"pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"})


def run_child(way: str, parent: str, device: str, iterations: int, timeout: float = 300) -> dict[str, Any]:
    """One child started ``way`` (fork: from the main thread; fork_thread: from a worker
    thread with a built-up arena; fork_by_main: by the main thread's event loop for such a
    worker; spawn) and what it measured."""
    ctx: Any = mp.get_context("spawn" if way == "spawn" else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, parent, device, iterations))

    def start_in_worker(loop: asyncio.AbstractEventLoop | None) -> None:
        kept = build_up_arena()
        with forking.forks_on(loop):
            proc.start()
        del kept

    if way in ("fork_thread", "fork_by_main"):
        in_a_worker(start_in_worker, by_main=way == "fork_by_main")
    else:
        proc.start()
    try:
        got: dict[str, Any] = queue.get(timeout=timeout)
    except Exception as exc:  # a child that died says nothing: say so
        got = {"error": f"no answer from the child ({type(exc).__name__}), exit code {proc.exitcode}"}
    proc.join(timeout)
    return {"way": way, **got}


def probe(parent: str, device: str, iterations: int, rounds: int) -> dict[str, Any]:
    prepare(parent)
    import torch

    if torch.cuda.is_initialized():  # a parent with a CUDA context is not yapd's case
        raise RuntimeError("the parent holds a CUDA context")
    runs = [run_child(way, parent, device, iterations) for _ in range(rounds) for way in WAYS]
    samples: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for op, us in run.get("ops", {}).items():
            samples.setdefault(op, {}).setdefault(run["way"], []).append(us)
    medians = {op: {way: round(statistics.median(v), 3) for way, v in by_way.items()}
               for op, by_way in samples.items()}
    return {"parent": parent, "device": device, "iterations": iterations, "rounds": rounds,
            "mps": os.environ.get(PIPE_ENV), "median_us": medians, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=2000, help="calls per batch")
    p.add_argument("--rounds", type=int, default=2, help="children of each way, taking turns")
    p.add_argument("--parent", choices=("torch", "vllm"), default="vllm")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--mps", type=Path, metavar="DIR",
                   help="run every child under a private CUDA MPS daemon kept in DIR (as yapd's engines run)")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.rounds < 1:
        p.error("--iterations and --rounds must be at least 1")
    daemon = None
    if args.mps is not None:
        from yapd.mps import MpsDaemon, MpsError

        daemon = MpsDaemon(args.mps)
        try:
            daemon.start()
        except MpsError as exc:
            print(f"forkprobe: --mps: {exc}", file=sys.stderr)
            return 2
    try:
        print(json.dumps(probe(args.parent, args.device, args.iterations, args.rounds), indent=1))
    finally:
        if daemon is not None:
            daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
