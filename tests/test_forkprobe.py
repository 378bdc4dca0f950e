"""The device's fork probe (yapctl.forkprobe) on this machine's CPU: real children
started each way, each timing the same calls."""

from __future__ import annotations

import json
import os

import pytest

from yapctl import forkprobe


def test_children_of_each_way_time_every_call(capsys):
    assert forkprobe.main(["--device", "cpu", "--parent", "torch", "--iterations", "20", "--rounds", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    runs = {r["way"]: r for r in got["runs"]}
    assert set(runs) == {"fork", "fork_thread", "fork_by_main", "spawn"}
    assert all("error" not in r for r in runs.values()), runs
    assert len({r["pid"] for r in runs.values()} | {os.getpid()}) == 5  # four children, none of them us
    assert runs["fork"]["thread"] == runs["spawn"]["thread"] == runs["fork_by_main"]["thread"] == "MainThread"
    assert runs["fork_thread"]["thread"] != "MainThread"  # forked from a worker thread, as yapd's starts are
    for op in ("np_fromiter", "np_cumsum_out", "torch_from_numpy"):
        assert set(got["median_us"][op]) == set(forkprobe.WAYS)
        assert all(0 < us < 1000 for us in got["median_us"][op].values()), got["median_us"]
    assert "cuda_arange" not in got["median_us"]  # --device cpu: no GPU calls


@pytest.mark.parametrize("bad", [["--iterations", "0"], ["--rounds", "0"], ["--device", "tpu"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as exc:
        forkprobe.main(bad)
    assert exc.value.code == 2


def test_under_mps_every_child_is_a_client_of_a_daemon_stopped_after(folder, control_binary, capsys):
    """--mps: a private MPS daemon (the stand-in control binary here) runs while the
    children do, each of them has its pipe folder, and it is gone after."""
    from yapd.mps import PIPE_ENV

    assert forkprobe.main(["--device", "cpu", "--parent", "torch", "--iterations", "5", "--rounds", "1",
                           "--mps", str(folder)]) == 0
    got = json.loads(capsys.readouterr().out)
    pipe = str(folder / "pipe")
    assert got["mps"] == pipe
    assert [r["mps_pipe"] for r in got["runs"]] == [pipe] * 4
    assert PIPE_ENV not in os.environ
    assert not (folder / "pipe" / "control").exists() or not _answers(folder / "pipe" / "control")


def test_an_mps_daemon_that_will_not_start_is_a_clear_error(folder, control_binary, monkeypatch, capsys):
    monkeypatch.setenv("STANDIN_FAIL", "1")
    assert forkprobe.main(["--device", "cpu", "--parent", "torch", "--mps", str(folder)]) == 2
    assert "forkprobe: --mps:" in capsys.readouterr().err


def _answers(sock):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True
