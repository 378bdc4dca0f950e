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
