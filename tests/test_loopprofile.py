"""The event-loop profiler on its own: grouping by package, one window at a time."""

from __future__ import annotations

import asyncio
import cProfile
import json
import multiprocessing
import multiprocessing.connection
import pstats
import selectors
import socket
import time

import pytest

from yapd.loopprofile import LoopProfiler, Packages, ProfileError, summarize

PACKAGES = Packages({"/venv/lib/python3.12/site-packages/vllm/__init__.py": "vllm",
                     "/tmp/site/websockets/__init__.py": "websockets",
                     "/venv/lib/python3.12/site-packages/six.py": "six",
                     "/srv/yap/yapd/__init__.py": "yapd"})


@pytest.mark.parametrize(("filename", "package"), [
    ("/venv/lib/python3.12/site-packages/vllm/v1/engine/async_llm.py", "vllm"),
    ("/tmp/site/websockets/asyncio/connection.py", "websockets"),  # the device kit's folder on PYTHONPATH
    ("/venv/lib/python3.12/site-packages/six.py", "six"),
    ("/srv/yap/yapd/turn.py", "yapd"),
    ("/srv/yap/tests/test_x.py", "other"),
    ("/venv/lib/python3.12/site-packages/never_imported/x.py", "other"),
])
def test_each_file_counts_for_its_package(filename, package):
    assert PACKAGES.of(filename) == package


def test_this_processs_own_imports_name_real_packages():
    import asyncio.base_events

    import websockets.asyncio.connection

    import yapd.turn

    pk = Packages.imported()
    assert pk.of(websockets.asyncio.connection.__file__) == "websockets"
    assert pk.of(yapd.turn.__file__) == "yapd"  # an editable install: not under site-packages
    assert pk.of(asyncio.base_events.__file__) == "asyncio"
    assert pk.of(json.__file__) == "json"


def test_a_c_functions_time_counts_for_the_package_that_called_it():
    # Built once: the loop's own time (this test's package) stays small beside json's, which
    # a profile under load once put at 0.44 of the whole when each call built its list.
    payload = {"a": list(range(500))}

    def own_work() -> None:
        for _ in range(2000):
            json.dumps(payload)  # stdlib json, which calls its C encoder

    prof = cProfile.Profile()
    prof.enable()
    own_work()
    prof.disable()
    summary = summarize(pstats.Stats(prof), wall_s=1.0, top=3)
    shares = {g["package"]: g["share"] for g in summary["by_package"]}
    # json's C encoder is called from json's own Python code: its time is json's.
    assert shares["json"] > 0.5, shares
    assert "builtins" not in shares or shares["builtins"] < shares["json"]
    assert abs(sum(shares.values()) - 1) < 0.01
    assert len(summary["top"]) == 3 and summary["top"][0]["own_ms"] >= summary["top"][-1]["own_ms"]


async def test_one_window_at_a_time_and_bounds_checked():
    profiler = LoopProfiler()
    first = asyncio.create_task(profiler.run(0.2))
    await asyncio.sleep(0)  # the first window is open now
    with pytest.raises(ProfileError, match="already running"):
        await profiler.run(0.1)
    reply = await first
    assert 0.2 <= reply["wall_s"] < 2
    again = await profiler.run(0.05)  # the window closed: the next one may open
    assert again["wall_s"] >= 0.05
    for seconds, top in ((0, 5), (301, 5), (1, 0), (1, 201)):
        with pytest.raises(ProfileError):
            await profiler.run(seconds, top)


async def test_a_cancelled_window_leaves_the_profiler_free():
    profiler = LoopProfiler()
    task = asyncio.create_task(profiler.run(30))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await profiler.run(0.01))["wall_s"] >= 0.01


def test_waits_are_set_apart_from_busy_time():
    """A selector's poll and a sleep are idle time (on Python 3.12+ cProfile sees every
    thread's, the loop's own wait under asyncio included): not busy, not a package's."""
    prof = cProfile.Profile()
    prof.enable()
    time.sleep(0.05)
    with selectors.DefaultSelector() as sel:
        r, w = socket.socketpair()
        with r, w:
            sel.register(r, selectors.EVENT_READ)
            sel.select(0.05)
    for _ in range(200):
        json.dumps({"a": list(range(50))})
    prof.disable()
    summary = summarize(pstats.Stats(prof), wall_s=1.0, top=50)
    assert summary["waiting_s"] >= 0.09, summary
    assert summary["busy_s"] < 0.09, summary
    assert not [r for r in summary["top"] if "sleep" in r["function"] or "'poll'" in r["function"]
                or "'select'" in r["function"]], summary["top"]


def test_top_total_ranks_a_path_of_small_calls_by_what_it_holds():
    """A turn's start is many small functions: by own time none stands out, by total time
    the function they run under comes first; a selector's wait, whose total holds idle
    time, is left out."""

    def small() -> str:
        return json.dumps({"a": list(range(20))})

    def a_start() -> None:
        for _ in range(3000):
            small()

    # The thread's CPU time: on wall time a preemption (the suite runs more workers than
    # this machine has CPUs) lands on whichever frame runs, once a_start's own time.
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    a_start()
    with selectors.DefaultSelector() as sel:
        r, w = socket.socketpair()
        with r, w:
            sel.register(r, selectors.EVENT_READ)
            sel.select(0.05)
    a, b = multiprocessing.Pipe()
    with a, b:
        multiprocessing.connection.wait([a], timeout=0.05)  # as vLLM's threads wait on their pipes
    prof.disable()
    summary = summarize(pstats.Stats(prof), wall_s=1.0, top=50)
    assert not [r for r in summary["top_total"] if r["function"].startswith("multiprocessing: connection.py")
                and r["function"].endswith("(wait)")]
    assert "a_start" in summary["top_total"][0]["function"], summary["top_total"][:3]
    assert "a_start" not in summary["top"][0]["function"]
    assert not [r for r in summary["top_total"] if r["function"].startswith("selectors: ")], summary["top_total"]
    totals = [r["total_ms"] for r in summary["top_total"]]
    assert totals == sorted(totals, reverse=True)
