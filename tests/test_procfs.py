"""yapd.procfs on this machine's real /proc: a process's children, found through each
thread's children list or, where the kernel has none, by every process's parent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from yapd import procfs


@pytest.fixture
def kids() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Three sleeping children of this process: two started by this thread, one by a
    thread that has ended since (the kernel hands its children to another thread)."""
    started = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    thread = threading.Thread(target=lambda: started.append(
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])))
    thread.start()
    thread.join()
    yield started
    for k in started:
        k.kill()
        k.wait()


@pytest.mark.parametrize("lists", [True, False])
def test_children_are_found_with_their_command_lines(kids, monkeypatch, lists):
    monkeypatch.setattr(procfs, "_has_children_lists", lambda: lists)
    found = procfs.children(os.getpid())
    assert {k.pid for k in kids} <= set(found), found
    # Each one's command line, NUL-separated (empty only in the middle of its exec)
    assert all(found[k.pid] in (b"", b"\0".join([sys.executable.encode(), b"-c",
                                                 b"import time; time.sleep(60)", b""])) for k in kids)


def test_the_two_ways_agree_and_a_gone_parent_has_none(kids):
    if not procfs._has_children_lists():
        pytest.skip("this kernel has no /proc/PID/task/TID/children")
    assert procfs._child_pids(os.getpid()) == procfs._child_pids_by_scan(os.getpid())
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert procfs.children(gone.pid) == {}


BURN = """
import os, sys, time
os.sched_setaffinity(0, {%d})
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="this kernel keeps no schedstat")
def test_two_busy_processes_on_one_cpu_each_wait_for_it():
    """Two processes that each need 0.3 s of one CPU, pinned to the same CPU: each is
    ready while the other runs, and /proc's run-queue wait counts that (a third of a
    second each, about), named by thread."""
    cpu = min(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", BURN % cpu], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(2)]
    try:
        for p in busy:
            assert p.stdout is not None and p.stdout.readline() == b"burnt\n"
        seen = [procfs.counters(p.pid) for p in busy]
    finally:
        for p in busy:
            p.communicate(b"")
    assert all(c is not None for c in seen)
    waits = [c.runq_s for c in seen if c is not None]
    assert sum(waits) >= 0.2, waits
    for c in seen:
        assert c is not None and c.cpu_s >= 0.25
        assert sum(c.threads_runq.values()) == pytest.approx(c.runq_s)
        assert set(c.threads_runq) == set(c.threads)
        assert c.migrations >= 0


@pytest.mark.skipif(not os.path.exists("/proc/self/sched"), reason="this kernel has no CONFIG_SCHED_DEBUG")
def test_a_process_moved_between_cpus_counts_its_migrations():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU here")
    hop = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
for _ in range(20):
    for cpu in {cpus[:2]}:
        os.sched_setaffinity(0, {{cpu}})
        sum(range(1000))
print("moved", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert hop.stdout is not None and hop.stdout.readline() == b"moved\n"
        seen = procfs.counters(hop.pid)
    finally:
        hop.communicate(b"")
    assert seen is not None and seen.migrations >= 20, seen


def test_the_machine_cpu_time_grows_as_this_process_works():
    before = procfs.host_cpu()
    assert before is not None and before.cpus >= len(os.sched_getaffinity(0))
    t = os.times()
    while os.times().user - t.user < 0.1:  # 100 ms of CPU: /proc/stat counts in ticks
        sum(range(10_000))
    after = procfs.host_cpu()
    assert after is not None
    d = after.since(before)
    assert d.busy_s >= 0.05 and d.idle_s >= 0 and d.steal_s >= 0
    shares = d.shares()
    assert 0 < shares["busy_pct"] <= 100 and 0 <= shares["steal_pct"] <= 100


def test_shares_of_the_machine_cpu_time():
    assert procfs.HostCpu(4, busy_s=3.0, idle_s=5.0, steal_s=2.0).shares() == {"busy_pct": 30.0, "steal_pct": 20.0}
    assert procfs.HostCpu(4, 0.0, 0.0, 0.0).shares() == {"busy_pct": 0.0, "steal_pct": 0.0}
