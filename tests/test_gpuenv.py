"""The GPU benchmark's run conditions, on this machine: bytecode counted and compiled for
real; the MPS daemon's lifecycle against a stand-in control binary (MPS needs a GPU)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from yapctl import gpuenv
from yapctl.gpubench import main, markdown, run_conditions


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An importable package of two modules, never imported, with no bytecode."""
    root = tmp_path / "site" / "yap_bytecode_probe"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("X = 1\n")
    (root / "sub" / "__init__.py").write_text("def f():\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return "yap_bytecode_probe"


def test_bytecode_is_counted_then_compiled_as_pip_would(package):
    before = gpuenv.bytecode_state([package, "no_such_package_here"])
    assert before[package] == {"modules": 2, "bytecode": 0}
    assert before["no_such_package_here"] is None
    assert before["dont_write_bytecode"] is sys.dont_write_bytecode
    done = gpuenv.compile_packages([package, "no_such_package_here"])
    assert done["ok"] is True and done["seconds"] >= 0
    assert done["folders"] == [str(Path(importlib.util.find_spec(package).origin).parent.parent)]
    assert gpuenv.bytecode_state([package])[package] == {"modules": 2, "bytecode": 2}
    assert package not in sys.modules  # counted and compiled, never imported


def test_a_module_that_does_not_compile_is_reported(package, tmp_path):
    (tmp_path / "site" / package / "broken.py").write_text("def (:\n")
    assert gpuenv.compile_packages([package])["ok"] is False
    assert gpuenv.bytecode_state([package])[package] == {"modules": 3, "bytecode": 2}


def test_mps_without_its_control_binary_is_a_clear_error_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    rc = main([str(tmp_path / "models"), "--out", str(out), "--work", str(tmp_path / "work"), "--name", "t",
               "--mps", "--phases", "yapd"])
    assert rc == 2
    assert "nvidia-cuda-mps-control on PATH" in capsys.readouterr().err
    data = json.loads((out / "t.json").read_text())
    assert "nvidia-cuda-mps-control" in data["setup"]["mps_error"] and "mps" not in data["setup"]
    assert "yapd" not in data  # no phase ran without the MPS it was asked for
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ


STAND_IN = """#!/bin/sh
# Records how it was called; "-d" starts, "quit" on stdin stops (as the real one).
if [ "$1" = "-d" ]; then
  echo "start pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
  exit ${FAIL:-0}
fi
echo "command $(cat) pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
"""


@pytest.fixture
def control_binary(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / gpuenv.MPS_CONTROL
    tool.write_text(STAND_IN)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return tool


def test_mps_daemon_is_private_to_the_run_and_every_later_process_is_its_client(tmp_path, control_binary):
    daemon = gpuenv.MpsDaemon(tmp_path / "work" / "mps")
    pipe = str(tmp_path / "work" / "mps" / "pipe")
    daemon.start()
    try:
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == pipe  # inherited by yapd, vllm serve, EngineCores
        assert Path(pipe).is_dir()
    finally:
        daemon.stop()
    assert daemon.log_tail() == [f"start pipe={pipe}", f"command quit pipe={pipe}"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    daemon.stop()  # a second stop sends nothing
    assert len(daemon.log_tail()) == 2


def test_mps_daemon_that_fails_to_start_leaves_the_environment_alone(tmp_path, control_binary, monkeypatch):
    monkeypatch.setenv("FAIL", "3")
    daemon = gpuenv.MpsDaemon(tmp_path / "mps")
    with pytest.raises(RuntimeError, match="-d failed \\(3\\)"):
        daemon.start()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not daemon.started


def test_run_conditions_head_the_table():
    setup = {"rounds": 24, "mps": True, "bytecode": {"dont_write_bytecode": True,
                                                     "torch": {"modules": 10, "bytecode": 10}, "vllm": None},
             "bytecode_compile": {"seconds": 31.5, "ok": True}}
    line = run_conditions(setup)[0]
    assert line == ("Run conditions: 24 lockstep rounds per level (after one warm-up round); under a private CUDA "
                    "MPS daemon; torch bytecode for 10 of 10 modules; byte-compiled first in 31.5 s.")
    assert line in markdown({"setup": setup, "yapd": {"c1": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}}})
    assert run_conditions({}) == []  # runs before these were recorded


def test_an_empty_phase_list_runs_only_the_set_up(tmp_path, package, monkeypatch):
    """`--phases "" --compile-bytecode`: the device's first call compiles and records, and
    the phases come in later calls (each call has a time limit)."""
    monkeypatch.setattr(gpuenv, "PACKAGES", (package,))
    out = tmp_path / "out"
    rc = main([str(tmp_path / "models"), "--out", str(out), "--work", str(tmp_path / "work"), "--name", "t",
               "--phases", "", "--compile-bytecode", "--rounds", "16"])
    assert rc == 0
    setup = json.loads((out / "t.json").read_text())["setup"]
    assert setup["bytecode_compile"]["ok"] is True
    assert "rounds" not in setup and "mps" not in setup  # no phase ran: later calls set them
    assert setup["bytecode"][package] == {"modules": 2, "bytecode": 2}
    assert "byte-compiled first in" in (out / "t.md").read_text()


def test_an_unknown_phase_or_no_rounds_is_refused_before_anything_runs(tmp_path, capsys):
    for argv, why in ((["--phases", "yapd,rwa"], "unknown phase(s) rwa"), (["--rounds", "0"], "at least 1")):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "models"), "--out", str(tmp_path / "out"), *argv])
        assert exc.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_phases_added_to_a_file_must_run_alike(tmp_path, package, monkeypatch, capsys):
    """A file's phases are compared with each other: a later call with other rounds or
    MPS would mix unlike figures, so it is refused and the file is left as it was."""
    monkeypatch.setattr(gpuenv, "PACKAGES", (package,))
    base = [str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--name", "t", "--phases", ""]
    assert main([*base, "--rounds", "16"]) == 0
    assert "rounds" not in json.loads((tmp_path / "out" / "t.json").read_text())["setup"]
    # What a phase would record (a phase needs a GPU here): the file as the device leaves it.
    data = json.loads((tmp_path / "out" / "t.json").read_text())
    data["setup"].update(rounds=16, mps=False)
    (tmp_path / "out" / "t.json").write_text(json.dumps(data))
    base[-1] = "spawn"
    before = (tmp_path / "out" / "t.json").read_text()
    assert main([*base, "--rounds", "8"]) == 2
    assert "rounds=16, not 8" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main([*base, "--rounds", "16", "--mps"]) == 2
    assert "mps=False, not True" in capsys.readouterr().err
    assert (tmp_path / "out" / "t.json").read_text() == before
