"""Where start time goes: yapd's first and warm starts, an EngineCore's start methods."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from yapctl.client import AdminClient
from yapctl.gpubench.results import Results
from yapctl.gpubench.runsetup import Setup
from yapctl.gpubench.servers import STARTUP_LINES, log_end, start_yapd, startup_lines, stop


async def phase_startup(res: Results, s: Setup) -> None:
    """Where start time goes: a first start (cold caches), then ``warm``; each with
    vLLM's own phase timings."""
    cfg = s.config_file()
    log = s.work / "startup.log"
    offset = log_end(log)
    proc, first = start_yapd(cfg, log)
    res.put("startup", "first_start_s", round(first, 1))
    res.put("startup", "first_start_lines", startup_lines(log, offset))
    stop(proc)
    await phase_warm(res, s)


async def phase_warm(res: Results, s: Setup) -> None:
    """Restarts with every cache warm: the process (start to READY) and both engines over
    the admin socket (``yapctl restart both``)."""
    cfg = s.config_file()
    log = s.work / "startup.log"
    put = functools.partial(res.put, "startup")  # each figure lands as soon as it is taken
    offset = log_end(log)
    proc, warm = start_yapd(cfg, log)
    put("process_restart_s", round(warm, 1))
    put("process_restart_lines", startup_lines(log, offset))
    try:
        offset = log.stat().st_size
        t0 = time.perf_counter()
        async with AdminClient(cfg.parent / "admin.sock", timeout=900) as admin:
            reply = await admin.request("restart", target="both", timeout=900)
        put("engine_restart_s", round(time.perf_counter() - t0, 1))
        put("engine_restart_reply", reply)
        put("engine_restart_lines", startup_lines(log, offset))
    finally:
        stop(proc)


PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - t0, 2)
if os.environ.get("PROBE_PARENT_CUDA") == "1":
    import torch
    torch.cuda.get_device_capability(0)
    mark("parent_cuda_init")
import torch
mark("import_torch")
from vllm import AsyncEngineArgs, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
mark("import_vllm")
from yapd.engines.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
mark("tokenizer")
llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], load_format="dummy", gpu_memory_utilization=0.3,
                                                max_model_len=4096, max_num_seqs=64, disable_log_stats=True))
mark("engine_ready")
import asyncio
async def one():
    async for _ in llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), "p"):
        pass
asyncio.run(one())
mark("first_token")
llm.shutdown()
mark("shutdown")
print("PROBE " + json.dumps(marks), flush=True)
"""


async def phase_spawn(res: Results, s: Setup) -> None:
    """What the EngineCore start method costs: one engine (Hammer-3B shape) started in a
    fresh process with spawn (CUDA touched in the parent first, as yapd did) and with fork."""
    env0 = {**os.environ, "VLLM_CACHE_ROOT": str(s.work / "cache" / "vllm")}
    runs = [("warmup", "spawn", "1"), ("spawn_parent_cuda", "spawn", "1"), ("spawn", "spawn", "0"),
            ("fork", "fork", "0")]
    for name, method, parent_cuda in runs:
        env = {**env0, "VLLM_WORKER_MULTIPROC_METHOD": method, "PROBE_PARENT_CUDA": parent_cuda}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, str(s.models / "hammer-3b")], env=env,  # noqa: ASYNC221
                             capture_output=True, text=True, timeout=600)
        wall = round(time.perf_counter() - t0, 1)
        line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
        timing = [x.strip()[:200] for x in (out.stdout + out.stderr).splitlines() if STARTUP_LINES.search(x)]
        res.put("spawn", name, {"wall_s": wall, "marks": json.loads(line[6:]) if line else None,
                                "rc": out.returncode, "vllm_lines": timing,
                                "tail": None if line else (out.stdout + out.stderr)[-1500:]})
