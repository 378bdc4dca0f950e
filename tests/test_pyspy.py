"""py-spy's samples as the GPU bench summarizes them (yapctl.pyspy)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from yapctl import pyspy

SITE = "/usr/lib/python3/site-packages/vllm/v1"
LOOP = f"thread (101);run_busy_loop ({SITE}/engine/core.py:900);step ({SITE}/engine/core.py"
COLLAPSED = f"""\
{LOOP}:400);schedule ({SITE}/core/sched/scheduler.py:200) 30
{LOOP}:410) 50
{LOOP}:400);step ({SITE}/engine/core.py:420) 10
thread (102);_bootstrap (/usr/lib/python3.12/threading.py:1030);process_input_sockets (/x/core.py:1100) 10
not a sample line
"""


def test_samples_are_counted_by_thread_and_function():
    """Lines of one function count as one; a function recursing counts once per sample
    in its total; threads get their names; the shares add up as they should."""
    got = pyspy.summarize(COLLAPSED, {"101": "VLLM::EngineCore"})
    assert got["samples"] == 100
    assert got["threads"] == {"VLLM::EngineCore run_busy_loop": 90, "102 process_input_sockets": 10}
    self_pct = dict(got["self_pct"])
    assert self_pct == {"step (vllm/v1/engine/core.py)": 60.0, "schedule (vllm/v1/core/sched/scheduler.py)": 30.0,
                        "process_input_sockets (/x/core.py)": 10.0}
    total = dict(got["total_pct"])
    assert total["run_busy_loop (vllm/v1/engine/core.py)"] == 90.0
    assert total["step (vllm/v1/engine/core.py)"] == 90.0  # 10 samples had it twice: counted once
    assert got["self_pct"][0][0].startswith("step")  # most first
    short = pyspy.summarize(COLLAPSED, top=1, top_total=2)
    assert [len(short["self_pct"]), len(short["total_pct"])] == [1, 2]


def test_a_thread_py_spy_names_keeps_its_name():
    # With --native py-spy writes the thread's name after its id.
    got = pyspy.summarize("thread (7): MainThread;<module> (x.py:1);spin (x.py:3) 3\nthread (8);run (y.py:2) 1\n")
    assert got["threads"] == {"MainThread <module>": 3, "8 run": 1}


def test_nothing_sampled_is_no_share():
    assert pyspy.summarize("") == {"samples": 0, "threads": {}, "self_pct": [], "total_pct": []}


def test_no_process_to_sample_needs_no_py_spy(tmp_path, monkeypatch):
    monkeypatch.setattr(pyspy, "binary", lambda: None)
    into: dict = {}
    with pyspy.profiled({}, tmp_path, into):
        pass
    assert into == {}
    with pyspy.profiled({"me": 1}, tmp_path, into):
        pass
    assert "py-spy is not installed" in into["error"]


@pytest.mark.skipif(pyspy.binary() is None, reason="py-spy is not installed")
@pytest.mark.parametrize("native", [False, True])
def test_a_real_process_is_sampled_while_the_block_runs(tmp_path, native):
    """py-spy on a real busy process: its busy function is in (almost) every sample, on
    the thread named for it; without native frames it is where the samples end."""
    code = ("import threading, time\n"
            "def spin_here():\n"
            "    while True: sum(range(1000))\n"
            "threading.Thread(target=spin_here, name='spinner', daemon=True).start()\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n")
    target = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert target.stdout is not None and target.stdout.readline() == b"up\n"
        into: dict = {}
        done = threading.Event()
        with pyspy.profiled({"target": target.pid}, tmp_path, into, native=native):
            done.wait(1.0)  # sample for a second
        got = into["target"]
        assert "error" not in got, got
        assert got["samples"] > 10, got
        assert dict(got["total_pct"])["spin_here (<string>)"] > 80, got
        if not native:  # with native frames a sample can end in the interpreter's C code
            assert got["self_pct"][0][0].startswith("spin_here"), got
        assert any(name.endswith(" spin_here") for name in got["threads"]), got
    finally:
        target.kill()
        target.wait()
