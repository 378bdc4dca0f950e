"""`vllm serve`: the OpenAI streaming endpoint with the same prompts, beside a tool server."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yapctl.bench import gap_tail, gaps, pct
from yapctl.gpubench.measure import at_level
from yapctl.gpubench.prompts import TurnPrompts
from yapctl.gpubench.results import Results
from yapctl.gpubench.runsetup import SERVE_PORT, Setup
from yapctl.gpubench.servers import ends_with_us, log_end, step_budgets, stop


async def _post_stream(body: dict[str, Any], port: int = SERVE_PORT,
                       until: Callable[[str], bool] | None = None) -> tuple[float | None, list[float], float]:
    """POST /v1/completions with stream=true over plain asyncio; client-side timings: the
    first output with text, the gaps after it, and when the stream ended or ``until``
    (fed each text) said to stop reading, which closes the connection (vLLM aborts)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
    await writer.drain()
    first = None
    stamps: list[float] = []
    buf = b""
    stop_reading = False
    while not stop_reading:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and not stop_reading:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                d = json.loads(line[5:])
                text = d["choices"][0].get("text") if d.get("choices") else None
                if text:
                    now = time.perf_counter()
                    if first is None:
                        first = (now - t0) * 1000
                    stamps.append(now)
                    stop_reading = until is not None and until(text)
    end = (time.perf_counter() - t0) * 1000
    writer.close()
    return first, gaps(stamps), end


async def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}; see {log}")
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await w.drain()
            head = await r.read(64)
            w.close()
            if b" 200 " in head:
                return
        except OSError:
            pass
        await asyncio.sleep(1)


def serve_args(kw: dict[str, Any], port: int) -> list[str]:
    """``vllm serve``'s command line with yapd's own engine settings for one role, so the
    comparison is like for like (and vLLM's compile cache, keyed on them, may already be
    warm)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", kw["model"],
            "--load-format", kw["load_format"], "--kv-cache-dtype", kw["kv_cache_dtype"],
            "--gpu-memory-utilization", str(kw["gpu_memory_utilization"]),
            "--max-model-len", str(kw["max_model_len"]), "--max-num-seqs", str(kw["max_num_seqs"]),
            "--enable-prefix-caching", "--enable-chunked-prefill",
            "--tensor-parallel-size", str(kw["tensor_parallel_size"]),
            "--port", str(port), "--host", "127.0.0.1", "--disable-log-stats"]
    if kw.get("quantization"):
        args += ["--quantization", kw["quantization"]]
    if kw.get("max_num_batched_tokens"):  # yapd's where it sets one; else serve's own default
        args += ["--max-num-batched-tokens", str(kw["max_num_batched_tokens"])]
    return args


def _serve(kw: dict[str, Any], port: int, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(serve_args(kw, port), stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=ends_with_us())


async def phase_serve(res: Results, s: Setup) -> None:
    from yapd.daemon import cache_vars
    from yapd.engines.vllm import engine_kwargs, gpu_capability
    from yapd.toolcall import DecisionReader

    tp = TurnPrompts(s)
    tp.all(s.levels, s.rounds)
    log = s.work / "serve.log"
    cfg = s.config()
    # The caches yapd's start used (compile, Triton, FlashInfer's JIT modules; one set in
    # the environment wins, as in cache_env): serve's start then builds none of what yapd's
    # built, as a user's second start of it wouldn't.
    env = {**cache_vars(cfg), **os.environ}
    kw = engine_kwargs("chat", cfg, cfg.chat.model, gpu_capability())
    tool_kw = engine_kwargs("tool", cfg, cfg.tool.model, gpu_capability())
    procs = []
    serve_offset = log_end(log)
    try:
        t0 = time.perf_counter()
        procs.append(_serve(kw, SERVE_PORT, log, env))
        await _wait_healthy(procs[0], SERVE_PORT, log)
        res.put("serve", "start_s", round(time.perf_counter() - t0, 1))
        res.put("serve", "step_budgets", step_budgets(log, serve_offset))
        chat_ids, tool_ids = tp.turn(0)
        res.put("serve", "prompt_tokens", {"chat": len(chat_ids), "tool": len(tool_ids)})

        def chat_body(ids: bool, i: int) -> dict[str, Any]:
            # As users call it: the prompt as text (the server tokenizes it every time);
            # and fed yapd's token ids, which spares it that work.
            prompt: Any = tp.turn(i)[0] if ids else tp.chat_text(i)
            return {"model": kw["model"], "prompt": prompt, "add_special_tokens": False, "max_tokens": 200,
                    "min_tokens": 200, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95, "stream": True}

        async def post(ids: bool, i: int) -> tuple[float | None, list[float], float]:
            return await _post_stream(chat_body(ids, i))

        def summary(rows: list[tuple[float | None, list[float], float]]) -> dict[str, Any]:
            ttft = [r[0] for r in rows if r[0] is not None]
            itl = [g for r in rows for g in r[1]]
            return {"turns": len(rows), "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
                    "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)}, "itl_tail": gap_tail(itl)}

        for c in s.levels:
            figures: dict[str, Any] = {}
            if "text" in s.serve_passes:
                tp.level(s, c)
                figures = {"prompt": "text", **summary(await at_level(c, functools.partial(post, False), s.rounds))}
            if "ids" in s.serve_passes:
                tp.level(s, c)  # not the text pass's prompts: the server holds those cached
                figures["token_ids"] = summary(await at_level(c, functools.partial(post, True), s.rounds))
            if figures:
                res.put("serve", f"c{c}", figures)
        if "tool" not in s.serve_passes:
            return

        # What a user would run instead of yapd's two engines: a second `vllm serve` for
        # the tool model on the same GPU, both asked each turn (token ids, as yapd's).
        t0 = time.perf_counter()
        tool_log = s.work / "serve-tool.log"
        tool_offset = log_end(tool_log)
        procs.append(_serve(tool_kw, SERVE_PORT + 1, tool_log, env))
        await _wait_healthy(procs[1], SERVE_PORT + 1, tool_log)
        res.put("serve", "tool_start_s", round(time.perf_counter() - t0, 1))
        res.put("serve", "tool_step_budgets", step_budgets(tool_log, tool_offset))

        async def both(i: int) -> tuple[float | None, list[float], float]:
            reader = DecisionReader([x.name for x in cfg.tools])
            tool = asyncio.ensure_future(_post_stream(
                {"model": tool_kw["model"], "prompt": tp.turn(i)[1], "add_special_tokens": False,
                 "max_tokens": 96, "temperature": 0.0, "top_k": 1, "stream": True},
                SERVE_PORT + 1, lambda text: reader.feed(text) is not None))
            chat = await _post_stream(chat_body(True, i))
            return chat[0], chat[1], (await tool)[2]

        for c in s.levels:
            tp.level(s, c)
            rows = await at_level(c, both, s.rounds)
            gated = [max(r[0], r[2]) for r in rows if r[0] is not None]
            tool_ms = [r[2] for r in rows]
            res.put("serve", f"c{c}_with_tool", {**summary([(r[0], r[1], r[2]) for r in rows]),
                                                 "tool_ms": {"p50": pct(tool_ms, 50), "p95": pct(tool_ms, 95)},
                                                 "ttft_gated_ms": {"p50": pct(gated, 50), "p95": pct(gated, 95)}})
    finally:
        for proc in reversed(procs):
            stop(proc)
