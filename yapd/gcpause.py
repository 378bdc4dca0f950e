"""The garbage collector: kept out of yapd's start, and timed while it serves.

A collection runs on whichever thread allocates past the collector's threshold, the
event loop's too, and holds the GIL throughout: every turn's starts and tokens wait for
it. While serving, the collector walks only what serving made (:func:`settle` freezes
what the start left); :class:`GcPauses` says whether a collection was why the loop ran
late.

A start imports torch, vLLM and transformers and loads models: millions of objects that
live as long as the process, which the collector would walk again and again (importing
torch and transformers alone spent 0.62-0.67 s of 2.7-2.9 s in collections here). So,
as Python's gc documentation advises for a process that forks children without exec
(vLLM's EngineCores), :func:`hold_for_start` turns automatic collection off from the
process start, each child forked meanwhile gets the parent's objects frozen and
collection back on at once (its collections then never walk, and copy, the parent's
objects: a child of a torch-and-transformers process building 2.4M objects took 0.68-0.75
s instead of 1.84-2.0, with 23k fewer page faults), and :func:`settle` collects once,
freezes and turns it back on when the engines have loaded.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from yapd import forking

log = logging.getLogger("yapd.gcpause")

# Shorter pauses are the collector's everyday young-generation work; from here up a token
# gap can feel one.
LONG_S = 0.0005


class GcPauses:
    """Times each collection of this process (``gc.callbacks``): counts and seconds by
    generation since :meth:`install`, and the pauses of LONG_S or more over the last
    ``window_s`` seconds. ``observe(generation, seconds)`` is called for each one (the
    daemon's histogram)."""

    def __init__(self, window_s: float = 20.0, observe: Callable[[int, float], None] | None = None) -> None:
        self.window_s = window_s
        self.observe = observe
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.long: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=4096)  # (when, gen, s)
        self._pid = os.getpid()
        self._t0 = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            self._pid = os.getpid()
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # A forked EngineCore inherits the callback: it must not touch locks (a histogram's)
        # that a thread of the parent may have held at the fork.
        if os.getpid() != self._pid:
            return
        now = time.perf_counter()
        if phase == "start":
            self._t0 = now
            return
        gen = min(max(info.get("generation", 0), 0), 2)
        took = now - self._t0
        self.counts[gen] += 1
        self.seconds[gen] += took
        if took >= LONG_S:
            self.long.append((now, gen, took))
        if self.observe is not None:
            try:
                self.observe(gen, took)
            except RecursionError:
                # A collection started at the bottom of someone's deep recursion: no frames
                # left for the histogram's code. Counted above; raised, it would be printed
                # as an ignored exception, traceback and all.
                pass

    def snapshot(self, window_s: float | None = None) -> dict[str, Any]:
        """Collections and ms spent in them by generation since install; pauses of LONG_S
        or more in the last ``window_s`` seconds (at most the window kept): how many, the
        longest (ms) and its generation (None where there was none)."""
        span_s = self.window_s if window_s is None else max(0.0, min(window_s, self.window_s))
        since = time.perf_counter() - span_s
        recent = [(gen, took) for when, gen, took in list(self.long) if when >= since]
        longest = max(recent, key=lambda r: r[1], default=None)
        return {"enabled": gc.isenabled(), "frozen": frozen(),
                "collections": {str(g): n for g, n in enumerate(self.counts)},
                "ms": {str(g): round(s * 1000, 2) for g, s in enumerate(self.seconds)},
                "window_s": span_s, "long_ms": LONG_S * 1000, "long": len(recent),
                "max_ms": round(longest[1] * 1000, 2) if longest else None,
                "max_generation": longest[0] if longest else None}


class _StartHold:
    held = False
    hooked = False
    lock = threading.Lock()
    # Threads starting vLLM engines whose forked EngineCores keep collection off through
    # their own start (held_in_cores).
    core_threads: set[int] = set()


def _hook() -> None:
    with _StartHold.lock:
        if not _StartHold.hooked:
            os.register_at_fork(before=_before_fork, after_in_child=_after_in_child)
            _StartHold.hooked = True


def hold_for_start() -> None:
    """Turn automatic collection off until :func:`settle`; children forked meanwhile
    start with the parent's objects frozen and collection on."""
    _hook()
    with _StartHold.lock:
        _StartHold.held = True
    gc.disable()


@contextlib.contextmanager
def held_in_cores(enabled: bool = True) -> Iterator[None]:
    """Children this thread forks inside the block (vLLM's EngineCores) run their own start
    with automatic collection off too, and turn it on once vLLM has frozen their heap
    (``freeze_gc_heap``, the last step of an EngineCore's start): the compile and model
    load build millions of objects that the collector would walk again and again. Where
    this vLLM has no such step, on at once, as without the block."""
    if not enabled:
        yield
        return
    if _vllm_core_freeze() is None:
        log.warning("this vLLM has no EngineCore heap freeze to wait for: its cores collect from their start "
                    "(engines.hold_gc_in_core_start)")
        yield
        return
    _hook()
    me = threading.get_ident()
    with _StartHold.lock:
        _StartHold.core_threads.add(me)
    try:
        yield
    finally:
        with _StartHold.lock:
            _StartHold.core_threads.discard(me)


class _Frozen:
    count: int | None = None


def frozen() -> int:
    """How many objects the collector leaves out of its walks, as of the last
    :func:`settle`. ``gc.get_freeze_count()`` counts them one by one: 41-45 ms of the event
    loop for the demo's 383k (this project's CPU machine; a vLLM start freezes 1.2M), asked
    by every /status and admin status (yapctl's dashboard: each second), so it is counted
    once, and then carried on where yapd freezes."""
    if _Frozen.count is None:
        _Frozen.count = gc.get_freeze_count()
    return _Frozen.count


def settle() -> None:
    """After the engines have loaded (a start or a restart): collect what loading left
    for garbage, freeze the rest (it lives as long as the process), and turn automatic
    collection back on if the start had it off."""
    gc.collect()
    # The count goes on by what this freeze moves (the objects the collection just walked,
    # gc.get_objects() leaves the frozen out), not by walking the whole frozen heap again
    # at an engine restart, while the other engine serves.
    before, moving = frozen(), len(gc.get_objects())
    gc.freeze()
    _Frozen.count = before + moving
    with _StartHold.lock:
        held, _StartHold.held = _StartHold.held, False
    if held:
        gc.enable()


def _before_fork() -> None:
    # No collection first: it would walk everything, and what is frozen stays in the
    # parent too (settle's collection never frees it: import-time garbage, a few MB).
    if _StartHold.held:
        gc.freeze()


def _after_in_child() -> None:
    # The lock may have been held by another thread of the parent at the fork: not taken.
    # The child's one thread is the one that forked, with the same id (or the loop's
    # thread forking for it: forking.forks_on).
    held, _StartHold.held = _StartHold.held, False
    if forking.forking_for() in _StartHold.core_threads and _until_vllm_freezes():
        gc.disable()
    elif held:
        gc.enable()
    _StartHold.core_threads = set()


def _until_vllm_freezes() -> bool:
    """In a forked EngineCore: collection back on right after vLLM's EngineCore freezes its
    heap; False where this vLLM has no such step to follow (held_in_cores said so)."""
    found = _vllm_core_freeze()
    if found is None:
        return False
    core, freeze = found

    def freeze_then_collect() -> None:
        try:
            freeze()
        finally:
            setattr(core, "freeze_gc_heap", freeze)  # noqa: B010 -- a module mypy cannot see
            gc.enable()
            log.info("EngineCore collects again, its start done and its heap frozen pid=%d", os.getpid())

    setattr(core, "freeze_gc_heap", freeze_then_collect)  # noqa: B010
    return True


def _vllm_core_freeze() -> tuple[types.ModuleType, Callable[[], None]] | None:
    # vLLM's EngineCore calls its module's freeze_gc_heap as the last step of its start
    # (vllm/v1/engine/core.py); AsyncLLM's import has loaded that module before any fork.
    core = sys.modules.get("vllm.v1.engine.core")
    freeze = getattr(core, "freeze_gc_heap", None)
    if core is None or not callable(freeze):
        return None
    return core, freeze
