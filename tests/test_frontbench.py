"""yapctl.frontbench runs: a real yapd with stand-in engines, real WebSocket sessions."""

from __future__ import annotations

import json

import pytest

from yapctl.frontbench import main


@pytest.mark.parametrize("hosted,fresh,closed", [("", False, False), ("tool", False, False), ("", True, False),
                                                ("", False, True)],
                         ids=["in yapd", "tool engine hosted", "fresh prompts", "closed loop"])
def test_frontbench_times_a_real_front_end_with_stand_in_engines(tmp_path, cache_dir, capsys, hosted, fresh,
                                                                 closed):
    """With ``--own-process tool`` the tool's stand-in runs in an engine host of its own
    (its requests counted there: they crossed the pipe); with ``--fresh-prompts`` every
    turn brings a persona yapd has not tokenized yet; with ``--closed-loop`` each session
    starts its next turn as its last ends (no rounds)."""
    out = tmp_path / "fb.json"
    assert main(["--cache-dir", str(cache_dir), "--levels", "1,3", "--rounds", "2", "--max-out", "3",
                 "--chat-first-ms", "30", "--tool-first-ms", "10", "--itl-ms", "2",
                 "--request-order", "tool_first", "--own-process", hosted, "--json", str(out),
                 *(["--fresh-prompts"] if fresh else []), *(["--closed-loop"] if closed else [])]) == 0
    report = json.loads(out.read_text())
    assert report["setup"]["request_order"] == "tool_first" and report["setup"]["models"] == "demo"
    assert report["setup"]["own_process"] == hosted and report["setup"]["fresh_prompts"] is fresh
    one, three = report["levels"]["c1"], report["levels"]["c3"]
    assert one["turns"] == 2 and three["turns"] == 6
    for s in (one, three):
        # The reply's first token can come no sooner than the stand-in's 30 ms, nor the
        # decision before its 10 ms; both requests were made after the start was sent.
        # Less 1 ms: uvloop's timers (libuv's) count whole milliseconds, so a stand-in's
        # sleep may end up to 1 ms early.
        assert 29 <= s["ttft_ms"]["p50"] <= s["ttft_ms"]["p95"], s
        assert 9 <= s["tool_ms"]["p50"] < s["ttft_ms"]["p50"], s
        assert 0 < s["chat_request_after_send_ms"]["p50"] < s["ttft_ms"]["p50"] - 29, s
        assert 0 < s["tool_request_after_send_ms"]["p50"] < s["tool_ms"]["p50"] - 9, s
        assert s["outside_turn_ms"]["p50"] >= 0, s
        # The turn begins (its ack's "now") before it makes its chat request.
        assert 0 < s["inbound_ms"]["p50"] <= s["chat_request_after_send_ms"]["p50"], s
        # The first token leaves after the chat's first text reached the turn, within the
        # turn's own time to it (the stand-in's first output comes 30 ms in), both on
        # yapd's clock: the client's TTFT can end before yapd's send has returned (less 1
        # ms as above: a fresh clone's run saw 0.15 against 30.0 - 29.9).
        assert 0 <= s["text_to_sent_ms"]["p50"] <= s["server_ttft_ms"]["p50"] - 29, s
    if closed:  # no rounds: no round's requests to spread
        assert three["round_requests_span_ms"]["p50"] is None and three["per_turn_start_ms"] is None
    else:
        assert three["round_requests_span_ms"]["p50"] > 0 and three["per_turn_start_ms"] > 0
    # Every reply's 3 tokens, 2 gaps each, at the client (their lengths are this machine's
    # load's: a frame held up brings the next one's with it)
    assert one["itl_tail"]["gaps"] == 2 * 2 and three["itl_tail"]["gaps"] == 6 * 2, three
    assert three["itl_ms"]["p99"] is not None and three["itl_tail"]["long_pct"] is not None, three
    # ... told by other turns' starts beside them or not; one session's gaps have none beside
    assert one["itl_starts"]["beside_pct"] == 0.0 and three["itl_starts"]["beside_pct"] is not None, three
    assert "c3: TTFT p50/p95" in capsys.readouterr().out


def test_a_stand_in_engines_outputs_fall_on_its_steps():
    """Requests made at any time get their outputs at the engine's steps, one grid from its
    first request on, as an EngineCore's batch."""
    from yapctl.frontbench import Steps

    steps = Steps(0.01)
    assert steps.at_or_after(100.0) == 100.0  # the first request sets the grid
    assert steps.at_or_after(100.004) == pytest.approx(100.01)
    assert steps.at_or_after(100.02) == pytest.approx(100.02)
    assert steps.at_or_after(100.0201) == pytest.approx(100.03)
