"""The GIL probe (yapctl.gilprobe) runs and prints its table; its figures are not judged
here (a program that prints figures, not a timed test)."""

from __future__ import annotations

import sys

import pytest

from yapctl import gilprobe


def test_the_probe_prints_a_row_per_work_time_and_interval(capsys):
    before = sys.getswitchinterval()
    assert gilprobe.main(["--steps", "5", "--gpu-ms", "0.5", "--work-ms", "0.2,0.4", "--intervals-ms", "5,0.5"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 0.2", "5"], ["| 0.2", "0.5"], ["| 0.4", "5"],
                                                      ["| 0.4", "0.5"]]
    assert all(cell.count(" / ") == 1 for row in rows for cell in row.strip("| ").split(" | ")[2:])
    assert sys.getswitchinterval() == before  # the probe's own intervals end with it


def test_the_sender_sees_every_hand_over():
    waits, took = gilprobe.sender_waits(0.0005, 0.2, 0.2, 7, gilprobe.rounds_per_ms())
    assert len(waits) == len(took) == 7 and min(waits) >= 0


@pytest.mark.parametrize("bad", [["--work-ms", "x"], ["--intervals-ms", "0"], ["--steps", "0"], ["--gpu-ms", "-1"]])
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        gilprobe.main(bad)
    assert "error" in capsys.readouterr().err
