"""Where the event loop's time goes: cProfile over a window, summed by package.

Under load every engine output, WebSocket frame and turn start runs on one event loop
thread, and a busy loop delays them all (the loop-lag gauge says how late it runs, not
why). ``yapctl profile`` asks the daemon for this over the admin socket; it needs no
ptrace, so it works where py-spy cannot attach (containers without CAP_SYS_PTRACE).
cProfile slows Python code while it runs: read the shares, not the absolute times. On
Python 3.12+ cProfile runs on sys.monitoring and sees every thread, not only the loop's:
time spent waiting (a selector's poll, a lock, a sleep: the loop's own idle wait under
asyncio, another thread's anywhere) is set apart as ``waiting_s``, not counted as busy.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import re
import sys
import time
from typing import Any

MAX_SECONDS = 300.0
# C functions that block until something happens: idle time, whichever thread it is on.
WAITS = re.compile(r"<method '(poll|select|control|acquire|acquire_lock|wait)' of "
                   r"'(select|_thread|selectors)\.\w+' objects>|<built-in method (time\.sleep|select\.select)>")

# The loop's own machinery and the Python wrappers of waits (a selector's, a process
# pipe's in vLLM's threads): in ``top_total`` their time holds everything else's, or idle.
LOOP_ROWS = re.compile(r"^selectors: |^asyncio: (base_events|events|runners)\.py:\d+\((run_forever|_run_once|_run|"
                       r"run_until_complete|run)\)$|^threading: |^multiprocessing: connection\.py:\d+\(wait\)$")


class ProfileError(RuntimeError):
    pass


class Packages:
    """Which top-level package a source file belongs to, from the modules this process
    has imported (so a kit's folder on PYTHONPATH or an editable install count as well as
    site-packages)."""

    def __init__(self, files: dict[str, str]) -> None:
        # files: a top-level module's __file__ -> its name
        self._dirs: dict[str, str] = {}
        self._files: dict[str, str] = {}
        for file, name in files.items():
            path = os.path.abspath(file)
            if os.path.basename(path) == "__init__.py":
                self._dirs[os.path.dirname(path)] = name
            else:
                self._files[path] = name

    @classmethod
    def imported(cls) -> Packages:
        return cls({f: name for name, mod in list(sys.modules.items())
                    if "." not in name and isinstance(f := getattr(mod, "__file__", None), str)})

    def of(self, filename: str) -> str:
        path = os.path.abspath(filename)
        if path in self._files:
            return self._files[path]
        # The outermost imported package above the file: a subpackage is its parent's.
        found = "other"
        folder = os.path.dirname(path)
        while True:
            found = self._dirs.get(folder, found)
            parent = os.path.dirname(folder)
            if parent == folder:
                return found
            folder = parent


def summarize(stats: pstats.Stats, wall_s: float, top: int = 25, packages: Packages | None = None) -> dict[str, Any]:
    """Own time by package (a C function's time goes to the package that called it: a
    socket send made by websockets is websockets' time), the ``top`` functions by own
    time, waits (:data:`WAITS`) apart, and the ``top`` by time with what they call
    (``top_total``: a path such as a turn's start, made of many small functions, shows
    there as one line)."""
    pk = packages or Packages.imported()
    groups: dict[str, float] = {}
    rows = []
    waiting = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, calls, own, total, callers) in raw.items():
        if filename == "~" and WAITS.fullmatch(func):
            waiting += own
            continue
        if filename == "~":  # a built-in: charge its callers, by the time spent under each
            for (cfile, _cline, _cfunc), (*_, c_own, _c_total) in callers.items():
                key = pk.of(cfile) if cfile != "~" else "builtins"
                groups[key] = groups.get(key, 0.0) + c_own
            where = func
        else:
            key = pk.of(filename)
            groups[key] = groups.get(key, 0.0) + own
            where = f"{key}: {os.path.basename(filename)}:{line}({func})"
        rows.append({"function": where, "calls": calls, "own_ms": round(own * 1000, 2),
                     "total_ms": round(total * 1000, 2)})
    by_total = sorted((r for r in rows if not LOOP_ROWS.search(r["function"])), key=lambda r: r["total_ms"],
                      reverse=True)
    rows.sort(key=lambda r: r["own_ms"], reverse=True)
    busy = sum(groups.values())
    return {
        "wall_s": round(wall_s, 2),
        "busy_s": round(busy, 3),
        "waiting_s": round(waiting, 3),
        "by_package": [{"package": k, "own_ms": round(v * 1000, 1), "share": round(v / busy, 3) if busy else 0.0}
                       for k, v in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)],
        "top": rows[:top],
        "top_total": by_total[:top],
    }


class LoopProfiler:
    """One profile at a time: a second request while one runs is refused (cProfile
    cannot nest, and two windows would measure each other)."""

    def __init__(self) -> None:
        self._running = False

    async def run(self, seconds: float, top: int = 25) -> dict[str, Any]:
        if not 0 < seconds <= MAX_SECONDS:
            raise ProfileError(f"seconds must be more than 0 and at most {MAX_SECONDS:g}")
        if not 1 <= top <= 200:
            raise ProfileError("top must be from 1 to 200")
        if self._running:
            raise ProfileError("a profile is already running")
        self._running = True
        prof = cProfile.Profile()
        try:
            try:
                prof.enable()
            except ValueError as exc:  # another profiler (a debugger, say) holds the hook
                raise ProfileError(f"cannot profile: {exc}") from exc
            t0 = time.perf_counter()
            try:
                await asyncio.sleep(seconds)
            finally:
                prof.disable()
            wall = time.perf_counter() - t0
        finally:
            self._running = False
        stats = pstats.Stats(prof, stream=sys.stderr)
        return {**summarize(stats, wall, top), "python": sys.version.split()[0]}
