"""Where other processes spend their CPU time, by function, from py-spy's samples: the
GPU bench runs it on yapd's and raw vLLM's processes (an EngineCore each) during a level,
without stopping them (``--nonblocking``; with C and C++ frames py-spy must stop each
process per sample), so that an EngineCore slower than another one can be looked into
function by function.

py-spy is a separate program (``pip install py-spy``; it reads the target's memory, which
needs ptrace rights over it: root, or the same user with ptrace_scope 0). Where it is
missing the bench says so and goes on without profiles.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RATE = 200  # samples a second: one every 5 ms, finer than an engine step
# With native frames py-spy stops the process for each sample (it cannot read C stacks
# without): fewer samples, and the level's timings are not the undisturbed ones.
NATIVE_RATE = 50
TOP = 25
TOP_TOTAL = 60  # the first ~25 by total are the stack's roots, shared by every sample
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_THREAD = re.compile(r"^thread \((?P<tid>\w+)\)(?:: (?P<name>.+))?$")
_PY_FRAME = re.compile(r"(\.py|<string>)\)$")  # a Python frame, not a native one (lib.so, 0x... address)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def binary() -> str | None:
    """py-spy's program: on PATH, beside this Python (a virtual environment's bin), or in
    the bin folder of a ``pip install --target`` folder on sys.path."""
    found = shutil.which("py-spy")
    if found:
        return found
    for folder in (Path(sys.executable).parent, *(Path(p) / "bin" for p in sys.path if p)):
        exe = folder / "py-spy"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def frame_name(frame: str) -> str:
    """``func (file:line)`` as ``func (file)``, the file from its package on (the part
    after site-packages), so that one function's lines count as one."""
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(text: str, thread_names: Mapping[str, str] | None = None, top: int = TOP,
              top_total: int = TOP_TOTAL) -> dict[str, Any]:
    """py-spy's raw (collapsed) output with ``--threads`` as figures: samples in all, by
    thread, and the functions by share of the samples: ``self`` (the ``top`` first) where
    the sample was in the function itself, ``total`` (the ``top_total`` first) where the
    function was anywhere on the stack (once per sample). A thread is named by
    ``thread_names`` (thread id -> name) and by the function it runs (its first frame
    outside threading's own)."""
    names = dict(thread_names or {})
    entry: dict[str, str] = {}
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        count = int(m["count"])
        frames = m["stack"].split(";")
        tid = "?"
        if frames and (t := _THREAD.match(frames[0])):
            tid = t["tid"]
            if t["name"]:  # py-spy names a thread where it can (with --native)
                names[tid] = t["name"]
            frames = frames[1:]
        named = [frame_name(f) for f in frames]
        if tid not in entry:
            python = (f for f in named if _PY_FRAME.search(f) and not f.endswith("threading.py)"))
            runs = next((f.split(" (")[0] for f in python), "")
            entry[tid] = " ".join(x for x in (names.get(tid, tid), runs) if x)
        samples += count
        threads[entry[tid]] += count
        if not named:
            continue
        own[named[-1]] += count
        for fn in set(named):
            total[fn] += count

    def shares(counter: Counter[str], n_top: int = top) -> list[tuple[str, float]]:
        return [(fn, round(100 * n / samples, 1)) for fn, n in counter.most_common(n_top)] if samples else []

    return {"samples": samples, "threads": dict(threads.most_common()), "self_pct": shares(own),
            "total_pct": shares(total, top_total)}


def thread_names(pid: int) -> dict[str, str]:
    """Thread id -> thread name (its comm) of process ``pid``, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            out[task.name] = (task / "comm").read_text().strip()
    return out


@contextlib.contextmanager
def profiled(pids: Mapping[str, int], work: Path, into: dict[str, Any], native: bool = False) -> Iterator[None]:
    """Sample each of ``pids`` (name -> pid) while the block runs; on leaving, ``into``
    gets a :func:`summarize` of each by name (or why there is none). ``native``: C and
    C++ frames too (where in torch or the CUDA driver a call spends its time), at the
    price of stopping each process for every sample (NATIVE_RATE)."""
    exe = binary()
    if not pids:
        yield
        return
    if exe is None:
        into["error"] = "py-spy is not installed (pip install py-spy)"
        yield
        return
    work.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen[bytes], Path, int]] = {}
    for name, pid in pids.items():
        out = work / f"pyspy-{name}-{pid}.txt"
        out.unlink(missing_ok=True)
        how = ["--native", "--rate", str(NATIVE_RATE)] if native else ["--nonblocking", "--rate", str(RATE)]
        proc = subprocess.Popen([exe, "record", "--pid", str(pid), *how, "--format", "raw", "--threads",
                                 "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running[name] = (proc, out, pid)
    try:
        yield
    finally:
        for name, (proc, out, pid) in running.items():
            names = thread_names(pid)  # before py-spy ends: threads are named while the process lives
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if out.exists() and out.stat().st_size:
                into[name] = summarize(out.read_text(errors="replace"), names)
            else:
                into[name] = {"error": f"py-spy exited {proc.returncode}: "
                                       f"{err.decode(errors='replace').strip()[-300:]}"}
