"""The servers the bench starts (yapd, `vllm serve`): started, stopped, and their logs read."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def ends_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a server the bench starts: the kernel sends it SIGTERM when the
    bench dies, even by SIGKILL, and the server stops as on any SIGTERM. A device call's
    time limit ends the bench mid-phase; its yapd lived on, holding the port and the GPU,
    and the next call's yapd could not bind (2026-12-03). Linux only (``prctl``)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    bench = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != bench:  # the bench died before that: nobody to serve
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start_yapd(cfg_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    offset = log_end(log)  # the log is appended to: read only this start's lines
    out = log.open("ab")  # vLLM's own lines (phase timings) go to stdout: keep them
    proc = subprocess.Popen([sys.executable, "-m", "yapd", "--config", str(cfg_path), "--admin-socket",
                             str(cfg_path.parent / "admin.sock")], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=ends_with_us())
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"yapd exited {proc.returncode}; see {log}")
        if b"yapd.daemon: ready port=" in log.read_bytes()[offset:]:
            return proc, time.perf_counter() - t0
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# vLLM's own timing lines: where an engine start's seconds go.
# yapd's lines on whether a start imported torch and vLLM from bytecode (yapd/bytecode.py):
# kept with the start's lines, and quoted under the report's table.
BYTECODE_LINES = r"bytecode under |has no bytecode in "
STARTUP_LINES = re.compile(r"(took|takes|finished in|Compiling a graph|Directly load|cache)"
                           r".*?[0-9.]+ ?(s|secs|seconds)\b|engine started role=|ready port=|engines load |"
                           r"Overriding VLLM_WORKER|EngineCore started by|EngineCore (forked|spawned)|yapd\.mps:|"
                           # each engine's prompt tokens per step: an --ab may change it
                           r"max_num_batched_tokens=|"
                           # what each core got of yapd's settings for it (engines.core_*)
                           r"GIL switch interval|steady heap|keeps malloc's defaults|yapd's main thread|"
                           # whether torch.compile's AOT artifact was saved and loaded (else Dynamo reruns)
                           r"AOT compil|Compiling model again|Dynamo bytecode transform|" + BYTECODE_LINES)


# vLLM's scheduler says its per-step prompt token budget as each engine starts.
BUDGET_LINE = re.compile(rb"Chunked prefill is enabled with max_num_batched_tokens=(\d+)")


def step_budgets(log: Path, offset: int = 0) -> list[int]:
    """Each engine's max_num_batched_tokens, in the order they started, from ``log``
    (vLLM picks 2048 from Python and 8192 in `vllm serve` on an H200: run ad)."""
    try:
        text = log.read_bytes()[offset:]
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in BUDGET_LINE.finditer(text)]


def log_end(log: Path) -> int:
    """Where the next start's lines will begin in ``log`` (appended to across starts)."""
    return log.stat().st_size if log.exists() else 0


def startup_lines(log: Path, offset: int) -> list[str]:
    text = log.read_bytes()[offset:].decode(errors="replace")
    return [line.strip()[:240] for line in text.splitlines() if STARTUP_LINES.search(line)]
