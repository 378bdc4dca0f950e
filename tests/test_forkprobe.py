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
    assert set(runs) == {"fork", "fork_thread", "spawn"}
    assert all("error" not in r for r in runs.values()), runs
    assert len({r["pid"] for r in runs.values()} | {os.getpid()}) == 4  # three children, none of them us
    assert runs["fork"]["thread"] == runs["spawn"]["thread"] == "MainThread"
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
