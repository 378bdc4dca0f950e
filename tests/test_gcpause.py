"""yapd.gcpause on this interpreter's real collector: collections timed by generation,
long pauses kept for a window, nothing done in a forked child."""

from __future__ import annotations

import gc
import os

import pytest

from yapd.gcpause import LONG_S, GcPauses


@pytest.fixture
def pauses():
    seen: list[tuple[int, float]] = []
    p = GcPauses(window_s=60.0, observe=lambda gen, s: seen.append((gen, s)))
    p.install()
    yield p, seen
    p.uninstall()


def test_a_full_collection_over_a_big_heap_is_a_long_pause(pauses):
    p, seen = pauses
    heap = [[] for _ in range(300_000)]  # live container objects: the collector walks each
    gc.collect()
    del heap
    assert p.counts[2] >= 1 and p.seconds[2] > 0
    assert any(gen == 2 and s >= LONG_S for gen, s in seen), seen
    snap = p.snapshot()
    assert snap["long"] >= 1 and snap["max_generation"] == 2 and snap["max_ms"] >= LONG_S * 1000, snap
    assert int(snap["collections"]["2"]) == p.counts[2] and snap["ms"]["2"] > 0
    p.uninstall()
    before = p.counts[2]
    gc.collect()
    assert p.counts[2] == before  # uninstalled: no longer called


def test_young_collections_are_counted_as_they_happen(pauses):
    p, _ = pauses
    for _ in range(50_000):  # cycles: garbage only the collector frees
        a: list[object] = []
        a.append(a)
    assert p.counts[0] >= 1


def test_a_collection_with_no_frames_left_for_the_histogram_is_counted_not_raised(monkeypatch):
    """A collection can start at the bottom of any deep recursion, where the histogram's code
    finds the recursion limit: a callback that raised would be printed as an ignored
    exception, traceback and all (seen in yapd's log under a fuzzer's deep JSON)."""
    import sys

    def no_frames_left(gen: int, s: float) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    ignored: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    p = GcPauses(observe=no_frames_left)
    p.install()
    try:
        gc.collect()
    finally:
        p.uninstall()
    assert not ignored and p.counts[2] == 1


def test_pauses_leave_the_window_as_it_passes():
    p = GcPauses(window_s=0.0)
    p.long.append((0.0, 2, 0.05))
    assert p.snapshot()["long"] == 0 and p.snapshot()["max_ms"] is None


def test_a_shorter_span_leaves_out_the_pauses_before_it():
    """A benchmark level shorter than the window asks for its own span: the start's full
    collection (just before the level) is not the level's."""
    import time

    p = GcPauses(window_s=20.0)
    now = time.perf_counter()
    p.long.extend([(now - 15.0, 2, 0.023), (now - 1.0, 0, 0.0006)])
    assert p.snapshot()["max_ms"] == 23.0 and p.snapshot()["long"] == 2
    level = p.snapshot(5.0)
    assert (level["long"], level["max_ms"], level["max_generation"], level["window_s"]) == (1, 0.6, 0, 5.0)
    assert p.snapshot(600.0)["window_s"] == 20.0  # never more than the window kept


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_times_nothing(pauses):
    """An EngineCore forked from yapd inherits gc.callbacks: there the callback must do
    nothing (the histogram's lock may have been held by a thread of the parent)."""
    p, seen = pauses
    read, write = os.pipe()
    gc.disable()  # no collection of the parent's between the count and the fork
    counted_before = p.counts[2]
    pid = os.fork()
    gc.enable()
    if pid == 0:  # the child: collect, then say what the callback saw
        try:
            n = len(seen)
            gc.collect()
            os.write(write, b"%d %d" % (len(seen) - n, p.counts[2]))
        finally:
            os._exit(0)
    os.close(write)
    out = os.read(read, 64).split()
    os.close(read)
    os.waitpid(pid, 0)
    assert out[0] == b"0" and int(out[1]) == counted_before


HOLD = r"""
import gc, json, os, sys
from yapd import gcpause

gcpause.hold_for_start()
junk = [[i] for i in range(50_000)]  # what a start's imports and loads leave
seen = {"held": not gc.isenabled()}

def fork_and_ask():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, json.dumps([gc.isenabled(), gc.get_freeze_count()]).encode())
        os._exit(0)
    os.close(write)
    out = json.loads(os.read(read, 256))
    os.close(read)
    os.waitpid(pid, 0)
    return out

seen["child"] = fork_and_ask()
seen["parent_after_fork"] = [gc.isenabled(), gc.get_freeze_count()]
gcpause.settle()
seen["settled"] = [gc.isenabled(), gc.get_freeze_count()]
frozen = gc.get_freeze_count()
seen["child_later"] = fork_and_ask()
seen["frozen_by_later_fork"] = gc.get_freeze_count() - frozen
print(json.dumps(seen))
"""


STATUS = """
import gc, json
from yapd import gcpause

keep = [[i] for i in range(200_000)]
gcpause.settle()
settled = gc.get_freeze_count()
counted = []
real = gc.get_freeze_count
gc.get_freeze_count = lambda: counted.append(1) or real()
snaps = [gcpause.GcPauses().snapshot()["frozen"] for _ in range(5)]
more = [[i] for i in range(50_000)]  # an engine restart's new objects
gcpause.settle()
resettled = gcpause.GcPauses().snapshot()["frozen"]
print(json.dumps({"settled": settled, "snaps": snaps, "counted": len(counted), "resettled": resettled,
                  "real": real()}))
"""


def test_a_status_reports_the_frozen_count_without_walking_the_frozen_heap():
    """gc.get_freeze_count() walks every frozen object (41-45 ms of the event loop for
    the demo's 383k, each /status and each second of yapctl's dashboard): the snapshot says
    the count settle() took when it froze them, and walks nothing; a later settle (an
    engine restart) carries the count on by what it freezes, without walking them all."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["settled"] >= 200_000 and seen["snaps"] == [seen["settled"]] * 5, seen
    assert seen["counted"] == 0, seen
    assert seen["resettled"] == seen["real"] >= seen["settled"] + 50_000, seen


def test_a_start_holds_collection_and_a_child_forked_meanwhile_gets_it_back():
    """Python's recipe for a parent that forks without exec, in a process of its own:
    collection off from the start; a child forked then starts with the parent's objects
    frozen and collection on; settle turns it back on in the parent with everything
    frozen; a later fork freezes nothing and its child collects."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HOLD], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["held"] is True
    child_enabled, child_frozen = seen["child"]
    assert child_enabled is True and child_frozen >= 50_000, seen
    assert seen["parent_after_fork"][0] is False and seen["parent_after_fork"][1] >= 50_000, seen
    assert seen["settled"][0] is True and seen["settled"][1] >= seen["parent_after_fork"][1], seen
    assert seen["child_later"][0] is True and seen["frozen_by_later_fork"] == 0, seen


CORES = r"""
import asyncio, gc, json, multiprocessing, os, sys, threading, types
from yapd import forking, gcpause

def freeze_gc_heap():  # as vLLM's (vllm/utils/gc_utils.py): collect, then freeze
    gc.collect(0); gc.collect(1); gc.collect(2); gc.freeze()

if sys.argv[1] == "vllm":
    for name in ("vllm", "vllm.v1", "vllm.v1.engine"):
        sys.modules[name] = types.ModuleType(name)
    core = types.ModuleType("vllm.v1.engine.core")
    core.freeze_gc_heap = freeze_gc_heap
    sys.modules["vllm.v1.engine.core"] = core
if sys.argv[2] == "held":
    gcpause.hold_for_start()

def fork_and_ask(out, hold):
    # From a worker thread, as yapd's engine starts fork
    with gcpause.held_in_cores(hold):
        read, write = os.pipe()
        pid = os.fork()
    if pid == 0:
        seen = [gc.isenabled()]
        core = sys.modules.get("vllm.v1.engine.core")
        if core is not None:
            core.freeze_gc_heap()  # the EngineCore's start ends so
            seen += [gc.isenabled(), core.freeze_gc_heap is freeze_gc_heap]
        os.write(write, json.dumps(seen).encode())
        os._exit(0)
    os.close(write)
    out.append(json.loads(os.read(read, 256)))
    os.close(read)
    os.waitpid(pid, 0)

def ask(write):
    seen = [gc.isenabled()]
    core = sys.modules.get("vllm.v1.engine.core")
    if core is not None:
        core.freeze_gc_heap()
        seen += [gc.isenabled(), core.freeze_gc_heap is freeze_gc_heap]
    write.send(seen)

def fork_by_main_and_ask(out, hold, loop):
    # The fork made by the loop's thread for the worker (engines.fork_from_main_thread)
    fork = multiprocessing.get_context("fork")
    read, write = fork.Pipe(duplex=False)
    proc = fork.Process(target=ask, args=(write,))
    with gcpause.held_in_cores(hold), forking.forks_on(loop) as on:
        proc.start()
    assert on.forks == 1
    out.append(read.recv())
    proc.join(30)

async def by_main(out):
    for hold in (True, False):
        await asyncio.to_thread(fork_by_main_and_ask, out, hold, asyncio.get_running_loop())

out = []
if sys.argv[3] == "by_main":
    asyncio.run(by_main(out))
else:
    for hold in (True, False):
        t = threading.Thread(target=fork_and_ask, args=(out, hold))
        t.start(); t.join()
print(json.dumps({"children": out, "parent": gc.isenabled()}))
"""


@pytest.mark.parametrize("parent", ["held", "on"])
@pytest.mark.parametrize("module", ["vllm", "none"])
@pytest.mark.parametrize("forked_by", ["worker", "by_main"])
def test_a_core_forked_in_the_block_collects_only_once_vllm_froze_its_heap(parent, module, forked_by):
    """engines.hold_gc_in_core_start: an EngineCore forked inside held_in_cores starts with
    collection off, on again once vLLM's own freeze_gc_heap has run (put back as it was);
    a fork outside the block, or where no vLLM core module is loaded, has it as without.
    by_main: the worker's fork made by the loop's thread (engines.fork_from_main_thread)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CORES, module, parent, forked_by], capture_output=True, text=True,
                         timeout=60, check=True)
    seen = json.loads(out.stdout)
    in_block, outside = seen["children"]
    assert seen["parent"] is (parent == "on")
    if module == "vllm":
        assert in_block == [False, True, True], seen
        assert outside == [True, True, True], seen  # on from the fork: the start's hold or not
    else:
        assert in_block == [True] and outside == [True], seen
        assert out.stderr.count("no EngineCore heap freeze to wait for") == 1, out.stderr
