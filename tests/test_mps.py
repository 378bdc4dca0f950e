"""yapd's own CUDA MPS daemon: when it runs, its lifecycle, and a real yapd around it.

MPS needs a GPU, so the control binary is a stand-in (tests/mps_standin.py) serving a
real Unix control socket; the decisions, the processes, the environment the engines
inherit and the order of stops are real. The engines under a real MPS run on the device
(docs/bench/h200-2026-12-02-*).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import yapctl
from yapd import config
from yapd.mps import LOG_ENV, MPS_CONTROL, NO_BINARY, PIPE_ENV, PRIORITY_ENV, Mps, MpsDaemon, MpsError, folder_for, plan


def control_log(folder: Path) -> list[str]:
    path = folder / "log" / "control.log"
    return path.read_text().splitlines() if path.exists() else []


def gpu_config(**engines: object) -> config.Config:
    return config.from_mapping({"engines": {"deploy": "both", **engines}, "chat": {"backend": "vllm"},
                                "tool": {"backend": "vllm"}}, "test")


# --- when ------------------------------------------------------------------------


@pytest.mark.parametrize(("engines", "chat", "env", "want", "why"), [
    ({}, {}, {}, True, "2 GPU engines share the GPU"),
    ({"mps": "off"}, {}, {}, False, "engines.mps is off"),
    ({}, {}, {PIPE_ENV: "/run/nvidia-mps"}, False, "the engines use the MPS daemon at"),
    ({"deploy": "chat"}, {}, {}, False, "one GPU engine"),
    ({"deploy": "chat", "mps": "on"}, {}, {}, True, "1 GPU engine share"),
    ({}, {"tensor_parallel_size": 2}, {}, False, 'only when asked (engines.mps = "on")'),
    ({"mps": "on"}, {"tensor_parallel_size": 2}, {}, True, "2 GPU engines"),
    ({}, {}, {"CUDA_VISIBLE_DEVICES": "1"}, False, "CUDA_VISIBLE_DEVICES=1 is not a GPU UUID"),
    ({"mps": "on"}, {}, {"CUDA_VISIBLE_DEVICES": "GPU-5d2c,0"}, False, "CUDA_VISIBLE_DEVICES=GPU-5d2c,0 is not"),
    ({}, {}, {"CUDA_VISIBLE_DEVICES": "MIG-3e1f"}, False, "is not a GPU UUID"),
    ({}, {}, {"CUDA_VISIBLE_DEVICES": "GPU-5d2c9f3e"}, True, "2 GPU engines"),
    ({}, {"backend": "cpu"}, {}, False, "one GPU engine"),
])
def test_auto_runs_mps_only_where_two_engines_share_one_gpu(engines, chat, env, want, why):
    cfg = gpu_config(**engines)
    for key, value in chat.items():
        setattr(cfg.chat, key, value)
    roles = [r for r in ("chat", "tool") if cfg.deployed(r)]
    got, reason = plan(cfg, roles, env, binary="/usr/bin/" + MPS_CONTROL)
    assert (got, why in reason) == (want, True), reason


def test_without_the_control_binary_auto_says_so_and_on_refuses_to_start(folder, monkeypatch):
    monkeypatch.setenv("PATH", str(folder))  # nothing there
    monkeypatch.delenv(PIPE_ENV, raising=False)
    assert plan(gpu_config(), ["chat", "tool"], {}, binary=None) == (False, NO_BINARY)
    mps = Mps(folder)
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is False
    assert mps.status() == {"mode": "auto", "active": False, "daemon_pid": None, "pipe": None, "reason": NO_BINARY,
                            "priority": "equal"}
    with pytest.raises(MpsError, match=r'engines\.mps is "on" but no nvidia-cuda-mps-control'):
        mps.prepare(gpu_config(mps="on"), ["chat", "tool"], others_running=False)


def test_on_refuses_a_gpu_named_by_index(folder, control_binary, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(MpsError, match=r'engines\.mps is "on" but CUDA_VISIBLE_DEVICES=0 is not a GPU UUID'):
        Mps(folder).prepare(gpu_config(mps="on"), ["chat", "tool"], others_running=False)
    mps = Mps(folder)
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is False  # auto: without
    assert not mps.daemon.running and "nvidia-smi -L" in mps.status()["reason"]


def test_a_demo_config_has_no_gpu_engine():
    cfg = config.from_mapping({"engines": {"mps": "on"}}, "test")
    cfg.demo = True
    assert plan(cfg, ["chat", "tool"], {}, binary="x") == (False, "no GPU engine")


def test_mps_mode_is_checked_like_every_config_key():
    with pytest.raises(config.ConfigError, match=r"engines\.mps"):
        config.from_mapping({"engines": {"mps": "yes"}}, "test")
    assert config.load(None, env={"YAP_ENGINE_MPS": "off"}).engines.mps == "off"
    with pytest.raises(config.ConfigError, match=r"engines\.mps_priority"):
        config.from_mapping({"engines": {"mps_priority": "chat"}}, "test")
    assert config.load(None, env={"YAP_ENGINE_MPS_PRIORITY": "tool"}).engines.mps_priority == "tool"


# --- the daemon ------------------------------------------------------------------


def test_the_daemon_is_a_child_whose_clients_are_every_later_process(folder, control_binary):
    daemon = MpsDaemon(folder)
    daemon.start()
    try:
        assert daemon.running and daemon.pid is not None
        assert os.environ[PIPE_ENV] == str(folder / "pipe")  # inherited by the EngineCores
        assert os.environ[LOG_ENV] == str(folder / "log")
        assert stat.S_IMODE((folder / "pipe").stat().st_mode) == 0o700
        assert os.getpgid(daemon.pid) != os.getpgid(0)  # a Ctrl-C for yapd does not reach it
        daemon.start()  # already running: nothing new
        assert [line.split(" pid=")[0] for line in control_log(folder)] == [f"start pipe={folder / 'pipe'} visible="]
    finally:
        pid = daemon.pid
        daemon.stop()
    assert not daemon.running and PIPE_ENV not in os.environ and LOG_ENV not in os.environ
    assert control_log(folder)[-2:] == [f"command quit pid={pid}", f"quit pid={pid}"]
    daemon.stop()  # twice: nothing to do


def test_a_daemon_that_will_not_start_is_an_error_with_its_words(folder, control_binary, monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    daemon = MpsDaemon(folder)
    with pytest.raises(MpsError, match="exited 3: cannot start: no GPU here"):
        daemon.start()
    assert not daemon.running and PIPE_ENV not in os.environ


def test_a_folder_that_cannot_be_made_is_an_mps_error(tmp_path, control_binary):
    (tmp_path / "file").write_text("")
    with pytest.raises(MpsError, match=r"MPS daemon in .*: .*Not a directory"):
        MpsDaemon(tmp_path / "file" / "mps").start()
    assert PIPE_ENV not in os.environ


def test_a_daemon_left_by_an_earlier_yapd_is_asked_to_quit_first(folder, control_binary):
    old = MpsDaemon(folder)
    old.start()
    old_pid, old_proc = old.pid, old._proc
    # As a yapd killed with SIGKILL leaves it: answering, nobody's child, its lock gone
    # with the dead yapd's open files.
    old._proc = None
    assert old._lock is not None
    old._lock.close()
    old._lock = None
    new = MpsDaemon(folder)
    try:
        new.start()
        assert new.pid != old_pid
        log = control_log(folder)
        assert f"quit pid={old_pid}" in log and log[-1].startswith("start ") and log[-1].endswith(f"pid={new.pid}")
    finally:
        new.stop()
    assert old_proc is not None and old_proc.wait(10) == 0  # it quit when asked


def test_a_second_yapd_on_the_same_folder_leaves_the_first_ones_daemon_alone(folder, control_binary):
    first = MpsDaemon(folder)
    first.start()
    try:
        with pytest.raises(MpsError, match=f"in use by another yapd \\(pid {os.getpid()}\\)"):
            MpsDaemon(folder).start()
        assert first.running and os.environ[PIPE_ENV] == str(folder / "pipe")
        assert not any("quit" in line for line in control_log(folder))
    finally:
        first.stop()
    second = MpsDaemon(folder)  # the lock went with the first one's stop
    second.start()
    second.stop()


def test_forked_children_do_not_keep_the_folder_locked(folder, control_binary):
    """vLLM forks its EngineCores from yapd: one still alive must not hold the folder's
    lock after yapd let it go."""
    first = MpsDaemon(folder)
    first.start()
    r, w = os.pipe()
    up_r, up_w = os.pipe()
    child = os.fork()
    if child == 0:  # an EngineCore stand-in: lives until told
        os.write(up_w, b"u")  # past os.fork(), so past its at-fork hooks
        os.read(r, 1)
        os._exit(0)
    try:
        # A stop before the child has run its hooks would find the lock held for a moment
        # by the child's copy: seen failing on a loaded machine, a race no EngineCore runs.
        assert os.read(up_r, 1) == b"u"
        first.stop()
        second = MpsDaemon(folder)
        second.start()
        second.stop()
    finally:
        os.write(w, b"x")
        os.waitpid(child, 0)
        for fd in (r, w, up_r, up_w):
            os.close(fd)


def test_the_folder_is_named_after_the_admin_socket():
    def folder(sock: str) -> Path:
        return folder_for(config.from_mapping({"admin": {"socket": sock}}, "test"))

    assert folder("/run/yapd/admin.sock") == Path("/run/yapd/mps")
    assert folder("/run/yapd/replica-b.sock") == Path("/run/yapd/mps-replica-b")


def test_a_daemon_deaf_to_quit_is_killed_at_stop(folder, control_binary, monkeypatch):
    monkeypatch.setenv("STANDIN_DEAF", "1")
    daemon = MpsDaemon(folder)
    daemon.start()
    proc = daemon._proc
    daemon.stop(timeout=0.5)
    assert proc is not None and proc.returncode == -signal.SIGKILL
    assert PIPE_ENV not in os.environ


# --- what the daemon does around engine starts -----------------------------------


def test_auto_starts_it_keeps_it_for_engines_joining_and_gives_up_for_good(folder, control_binary):
    mps = Mps(folder)
    try:
        assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is True
        pid = mps.daemon.pid
        assert mps.status() == {"mode": "auto", "active": True, "daemon_pid": pid, "pipe": str(folder / "pipe"),
                                "reason": "2 GPU engines share the GPU", "priority": "equal"}
        # One engine restarts while the other runs in the MPS server: nothing changes,
        # even under a config that now says off (the next full start applies it).
        assert mps.prepare(gpu_config(mps="off"), ["tool"], others_running=True) is False
        assert mps.daemon.pid == pid
        assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is True and mps.daemon.pid == pid
        mps.give_up("EngineError: boom")
        assert not mps.daemon.running and PIPE_ENV not in os.environ
        assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is False
        assert mps.status()["reason"] == "the engines failed to start under MPS (EngineError: boom)"
        # "on" is not "auto": it tries again, and a failure there is not retried without.
        assert mps.prepare(gpu_config(mps="on"), ["chat", "tool"], others_running=False) is False
        assert mps.daemon.running
        assert mps.prepare(gpu_config(mps="off"), ["chat", "tool"], others_running=False) is False
        assert not mps.daemon.running and mps.status()["reason"] == "engines.mps is off"
    finally:
        mps.stop()


def test_under_mps_the_chat_engine_alone_runs_below_normal_priority(folder, control_binary, monkeypatch):
    monkeypatch.delenv(PRIORITY_ENV, raising=False)
    mps = Mps(folder)
    assert mps.client_env("chat") == {}  # no MPS yet
    mps.prepare(gpu_config(mps_priority="tool"), ["chat", "tool"], others_running=False)
    try:
        assert mps.client_env("chat") == {PRIORITY_ENV: "1"} and mps.client_env("tool") == {}
        assert mps.status()["priority"] == "tool"
        # A priority the operator set for yapd reaches both engines as it is.
        monkeypatch.setenv(PRIORITY_ENV, "0")
        assert mps.client_env("chat") == {}
        monkeypatch.delenv(PRIORITY_ENV)
        mps.stop()
        mps.prepare(gpu_config(), ["chat", "tool"], others_running=False)  # "equal", the default
        assert mps.daemon.running and mps.client_env("chat") == {} and mps.status()["priority"] == "equal"
    finally:
        mps.stop()
    # Without MPS the variable means nothing: not set.
    mps.prepare(gpu_config(mps="off"), ["chat", "tool"], others_running=False)
    assert mps.client_env("chat") == {}


def test_status_tells_the_truth_when_our_daemon_dies_on_its_own(folder, control_binary):
    mps = Mps(folder)
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is True
    proc = mps.daemon._proc
    assert proc is not None
    proc.kill()
    proc.wait()
    # Our own settings are still in the environment: they are not a host's MPS.
    assert os.environ[PIPE_ENV] == str(folder / "pipe")
    assert mps.status()["active"] is False and mps.status()["pipe"] is None
    # The next full engine start brings a new one up (the folder's lock is still ours).
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is True
    assert mps.daemon.running and mps.daemon.pid != proc.pid
    mps.stop()
    assert PIPE_ENV not in os.environ and LOG_ENV not in os.environ
    # A host's own MPS, set for yapd, is what status shows then.
    os.environ[PIPE_ENV] = "/srv/nvidia-mps"
    try:
        assert mps.status()["active"] is True and mps.status()["pipe"] == "/srv/nvidia-mps"
        assert mps.host_env()[PIPE_ENV] == "/srv/nvidia-mps"
    finally:
        del os.environ[PIPE_ENV]


def test_a_daemon_that_fails_is_a_warning_under_auto_and_a_failed_start_under_on(folder, control_binary,
                                                                               monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    mps = Mps(folder)
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is False
    assert mps.status()["reason"].startswith("the MPS daemon did not start: ")
    monkeypatch.delenv("STANDIN_FAIL")
    # Not tried again at the next engine restart under "auto": until yapd restarts.
    assert mps.prepare(gpu_config(), ["chat", "tool"], others_running=False) is False
    assert not mps.daemon.running and mps.status()["reason"].startswith("the MPS daemon did not start: ")
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(MpsError, match="exited 3"):
        mps.prepare(gpu_config(mps="on"), ["chat", "tool"], others_running=False)


# --- a real yapd -------------------------------------------------------------------


def test_a_real_yapd_runs_its_daemon_before_its_engines_and_stops_it_after(make_yapd, control_binary):
    """The demo's CPU engines stand for GPU ones (YAPD_DEBUG_MPS_BACKENDS): yapd starts
    the daemon, shows it in /status, and quits it only once its engines have stopped."""
    d = make_yapd(env={"YAPD_DEBUG_MPS_BACKENDS": "cpu", "PATH": os.environ["PATH"]})
    folder = d.workdir / "mps"
    st = json.loads(d.http("/status")[1])["mps"]
    assert st["mode"] == "auto" and st["active"] is True and st["pipe"] == str(folder / "pipe")
    assert st["reason"] == "2 GPU engines share the GPU"
    started = control_log(folder)
    assert len(started) == 1 and started[0].endswith(f"pid={st['daemon_pid']}")
    assert "yapd_mps_active 1.0" in d.http("/metrics")[1].splitlines()
    out = yapctl("status", sock=d.admin_socket)
    # CPU engines have no EngineCore to start below normal priority: none is claimed.
    assert f"mps on (daemon pid {st['daemon_pid']}, 2 GPU engines share the GPU)" in out.stdout.splitlines()
    assert d.stop() == 0
    d.wait_for("yapd.daemon: stopped")
    assert control_log(folder)[-1] == f"quit pid={st['daemon_pid']}"
    text = "\n".join(d.lines)
    assert text.index("MPS control daemon started") < text.index("engine started role=")
    stopped = [text.index(f"engine stopped role={role}") for role in ("chat", "tool")]
    assert max(stopped) < text.index("MPS control daemon stopped") < text.index("yapd.daemon: stopped")


def test_a_stop_while_the_mps_daemon_starts_begins_no_engine_load(make_yapd, control_binary, tmp_path):
    """SIGTERM while yapd waits for its MPS daemon (held here on a FIFO), before any engine
    loads: once the daemon is up, no engine begins to load; yapd exits 0."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    d = make_yapd(start=False, env={"YAPD_DEBUG_MPS_BACKENDS": "cpu", "PATH": os.environ["PATH"],
                                    "STANDIN_GATE": str(gate)})
    d.start(wait=False)
    with open(gate, "wb"):  # opens once the daemon being started waits on it
        d.signal(signal.SIGTERM)
        d.wait_for("SIGTERM received", 10)
    assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
    d.wait_for("stopped while starting: stopping before the engines loaded", 5)
    assert not any("engine started role=" in line for line in d.lines), "\n".join(d.lines[-20:])


def test_a_real_yapd_whose_engines_fail_under_mps_starts_them_without(make_yapd, control_binary, tmp_path):
    """A start that fails under the daemon "auto" started is tried once more without it
    (here the model is missing, so that fails too: the start fails, the daemon is gone)."""
    missing = tmp_path / "missing"
    d = make_yapd(f'[engines]\ncache_dir = "{tmp_path / "c"}"\n[chat]\nbackend = "cpu"\nmodel = "{missing}"\n'
                  f'[tool]\nbackend = "cpu"\nmodel = "{missing}"\n', start=False, demo=False,
                  env={"YAPD_DEBUG_MPS_BACKENDS": "cpu", "PATH": os.environ["PATH"]})
    d.start(wait=False)
    d.wait_for("start failed", 60)
    assert d.proc is not None and d.proc.wait(30) == 1
    text = "\n".join(d.lines)
    assert "MPS control daemon started" in text
    assert "engines failed to start under MPS" in text and "starting them without MPS" in text
    assert "start failed" in text
    assert control_log(d.workdir / "mps")[-1].startswith("quit ")


async def test_the_dashboard_marks_a_daemon_whose_engines_run_under_mps(make_yapd, control_binary, shared_yapd):
    from tests.test_tui import dashboard, text
    from tests.tui_screenshots import SIZE, until

    d = make_yapd(env={"YAPD_DEBUG_MPS_BACKENDS": "cpu", "PATH": os.environ["PATH"]})
    for daemon, marked in ((d, True), (shared_yapd, False)):
        app = dashboard(daemon.admin_socket)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda app=app: app.link == "connected", what="the first status")
            assert ("  MPS" in text(app.link_bar)) is marked, text(app.link_bar)


def test_a_real_yapd_refuses_a_bad_mps_mode_and_on_without_its_binary(make_yapd, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[engines]\nmps = "yes"\n')
    r = subprocess.run([sys.executable, "-m", "yapd", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "engines.mps: 'yes' is not one of 'auto', 'on', 'off'" in r.stderr
    bad.write_text('[engines]\nmps_priority = "chat"\n')
    r = subprocess.run([sys.executable, "-m", "yapd", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "engines.mps_priority: 'chat' is not one of 'tool', 'equal'" in r.stderr
    (tmp_path / "empty").mkdir()
    d = make_yapd('[engines]\nmps = "on"\n', start=False,
                  env={"YAPD_DEBUG_MPS_BACKENDS": "cpu", "PATH": str(tmp_path / "empty")})
    d.start(wait=False)
    d.wait_for('start failed: engines.mps is "on" but no nvidia-cuda-mps-control on PATH', 60)
    assert d.proc is not None and d.proc.wait(30) == 1
