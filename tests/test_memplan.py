"""Memory plans: when two vLLM engines may load side by side (pure logic; the GPU path
runs in tests/test_gpu_vllm.py on the device)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from yapd.engines.memplan import FREE_SLACK_BYTES, MemoryPlans, Plan, plan_key, side_by_side

GIB = 1 << 30


def plan(kv: float, free_before: float, used: float, requested: float) -> Plan:
    return Plan(int(kv * GIB), int(free_before * GIB), int(used * GIB), int(requested * GIB), "2026-11-25T00:00:00")


# The H100 figures: chat at 0.70 recorded first, tool at 0.20 recorded after it.
CHAT = plan(kv=36.0, free_before=79.0, used=56.5, requested=55.7)
TOOL = plan(kv=9.5, free_before=22.4, used=16.4, requested=15.9)


def test_side_by_side_needs_every_plan_and_room() -> None:
    assert side_by_side([CHAT, TOOL], int(79.0 * GIB))
    assert side_by_side([CHAT, TOOL], int(79.0 * GIB) - FREE_SLACK_BYTES + 1)
    assert not side_by_side([CHAT, None], int(79.0 * GIB))
    assert not side_by_side([], int(79.0 * GIB))
    assert not side_by_side([CHAT, TOOL], None)  # no NVML reading: never guess
    # Someone else holds 4 GiB now: less free than the chat's recorded start saw.
    assert not side_by_side([CHAT, TOOL], int(75.0 * GIB))


def test_each_engine_must_find_its_share_after_the_others() -> None:
    # Plans whose footprints leave the chat less than it requests once the tool is in.
    greedy_tool = plan(kv=20.0, free_before=22.4, used=30.0, requested=15.9)
    assert not side_by_side([CHAT, greedy_tool], int(79.0 * GIB))


def test_key_ignores_the_kv_size_but_not_settings_or_device() -> None:
    kw = {"model": "m", "gpu_memory_utilization": 0.7}
    dev = {"gpu": "H100", "total": 80 * GIB, "vllm": "0.26.0"}
    assert plan_key(kw, dev) == plan_key({**kw, "kv_cache_memory_bytes": 5}, dev)
    assert plan_key(kw, dev) != plan_key({**kw, "gpu_memory_utilization": 0.6}, dev)
    assert plan_key(kw, dev) != plan_key(kw, {**dev, "vllm": "0.27.0"})


def test_plans_file_roundtrip_and_drop(tmp_path: Path) -> None:
    plans = MemoryPlans(tmp_path)
    assert plans.get("k") is None
    plans.put("k", CHAT)
    plans.put("t", TOOL)
    assert MemoryPlans(tmp_path).get("k") == CHAT
    plans.drop("k")
    assert plans.get("k") is None and plans.get("t") == TOOL
    # A damaged file or entry means "no plan", never a crash.
    plans.path.write_text("{not json")
    assert plans.get("t") is None
    plans.path.write_text(json.dumps({"t": {"kv_cache_memory_bytes": 1}}))
    assert plans.get("t") is None
    plans.path.write_text(json.dumps({"t": {**TOOL.__dict__, "kv_cache_memory_bytes": 0}}))
    assert plans.get("t") is None


def test_vllm_plan_files_written_since(tmp_path: Path) -> None:
    plans = MemoryPlans(tmp_path)
    d = tmp_path / "startup_plan"
    d.mkdir()
    old = d / "startup_plan_aaaa.json"
    old.write_text(json.dumps({"kv_cache_memory_bytes": 111}))
    past = time.time() - 600
    os.utime(old, (past, past))
    since = time.time() - 5
    assert plans.vllm_plan_since(since) is None
    (d / "startup_plan_bbbb.json").write_text(json.dumps({"kv_cache_memory_bytes": 300}))
    (d / "startup_plan_cccc.json").write_text(json.dumps({"kv_cache_memory_bytes": 200}))  # another TP rank
    (d / "startup_plan_dddd.json").write_text("garbage")
    assert plans.vllm_plan_since(since) == 200


def test_vllm_recording_is_scoped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_ENABLE_STARTUP_PLAN", raising=False)
    plans = MemoryPlans(tmp_path)
    d = tmp_path / "startup_plan"
    d.mkdir()
    stale = d / "startup_plan_old.json"
    stale.write_text(json.dumps({"kv_cache_memory_bytes": 999}))
    since = time.time() - 5
    with plans.vllm_recording(True):
        assert os.environ["VLLM_ENABLE_STARTUP_PLAN"] == "1"
        assert not stale.exists()  # an older file of vLLM's is never reused or misread
        (d / "startup_plan_new.json").write_text(json.dumps({"kv_cache_memory_bytes": 42}))
        assert plans.vllm_plan_since(since) == 42
    assert "VLLM_ENABLE_STARTUP_PLAN" not in os.environ
    assert list(d.iterdir()) == []
    monkeypatch.setenv("VLLM_ENABLE_STARTUP_PLAN", "1")
    with plans.vllm_recording(False):
        assert os.environ["VLLM_ENABLE_STARTUP_PLAN"] == "0"
    assert os.environ["VLLM_ENABLE_STARTUP_PLAN"] == "1"


def test_wait_gone_sees_exit_and_zombies() -> None:
    import subprocess
    import sys

    from yapd.engines.vllm import wait_gone

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wait_gone(proc.pid, 0.2) is False  # still running
    finally:
        proc.kill()
    # Killed but not yet reaped: a zombie holds no GPU memory any more.
    assert wait_gone(proc.pid, 5) is True
    proc.wait()
    assert wait_gone(proc.pid, 0.1) is True


def test_a_shutdown_waits_for_every_data_parallel_core() -> None:
    # With data_parallel_size > 1 vLLM runs one EngineCore per rank: the GPU memory is
    # back only once all of them are gone, not the first alone.
    import subprocess
    import sys
    from types import SimpleNamespace

    from yapd.engines.vllm import core_pid, core_pids, wait_all_gone

    done, running = (subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({s})"]) for s in (0, 30))
    try:
        done.wait()
        llm = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(
            engine_manager=SimpleNamespace(processes=[done, running]))))
        assert core_pids(llm) == [done.pid, running.pid] and core_pid(llm) == done.pid
        assert wait_all_gone(core_pids(llm), 0.2) is False  # the second rank still runs
    finally:
        running.kill()
    assert wait_all_gone([done.pid, running.pid], 5) is True
    running.wait()
    assert core_pids(object()) == [] and core_pid(object()) is None  # in-process: no core to wait for


async def test_an_engines_shutdown_returns_once_each_of_its_cores_is_gone(tmp_path) -> None:
    # vLLM's shutdown has ended rank 0; rank 1 goes a moment later. The engine's shutdown
    # (a restart reads free GPU memory right after it) must wait for that one too.
    import subprocess
    import sys
    import threading
    from types import SimpleNamespace

    from yapd import config
    from yapd.engines.vllm import VllmEngine, wait_gone

    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2)]
    try:
        eng = VllmEngine("chat", config.from_mapping({"engines": {"cache_dir": str(tmp_path)}}, "test"))
        eng._llm = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(
            engine_manager=SimpleNamespace(processes=ranks))), shutdown=ranks[0].kill)
        later = threading.Timer(0.5, ranks[1].kill)
        later.start()
        await eng.shutdown()
        assert wait_gone(ranks[1].pid, 0), "shutdown returned with a core still running"
        later.join()
    finally:
        for p in ranks:
            p.kill()
            p.wait()
