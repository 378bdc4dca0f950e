"""yapctl's shell CLI against a real daemon: every subcommand, and its errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY, ROOT, ws_connect
from yapctl.bench import STEP_APART_MS
from yapctl.cli import EXIT_PIPE, main
from yapctl.client import EXIT_DENIED, EXIT_DOWN, EXIT_FAILED, EXIT_OK, EXIT_USAGE, AdminClient, AdminError


def yapctl(*args: str, sock: Path | None = None, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "yapctl", *(["--socket", str(sock)] if sock else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def test_help_lists_every_command():
    out = yapctl("--help")
    assert out.returncode == 0
    for cmd in ("status", "connections", "logs", "reload", "restart", "drain", "awq", "profile", "chat", "bench",
                "tui"):
        assert cmd in out.stdout
    assert "exit codes" in out.stdout
    # Not on a terminal and no subcommand: help, not the TUI.
    assert "usage: yapctl" in yapctl().stdout


def test_bad_usage_exits_2():
    out = yapctl("restart", "gpu")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_status(shared_yapd):
    out = yapctl("status", sock=shared_yapd.admin_socket)
    assert out.returncode == EXIT_OK, out.stderr
    assert "deploy both" in out.stdout and "ready" in out.stdout
    assert "ENGINE" in out.stdout and "chat" in out.stdout and "tool" in out.stdout
    assert "mps off (no GPU engine)" in out.stdout.splitlines()
    assert any(line.startswith("event loop late by p50 ") for line in out.stdout.splitlines()), out.stdout
    assert "yapd_mps_active 0.0" in shared_yapd.http("/metrics")[1].splitlines()
    js = json.loads(yapctl("status", "--json", sock=shared_yapd.admin_socket).stdout)
    assert js["ok"] is True and js["capacity"]["max"] == 64 and set(js["engines"]) == {"chat", "tool"}
    assert KEY not in out.stdout and KEY not in json.dumps(js)


def test_an_engines_backend_cell_says_how_its_core_started_and_where_its_front_end_runs():
    from yapctl import fmt

    assert fmt.backend({"backend": "cpu"}) == "cpu"
    assert fmt.backend({"backend": "vllm", "core_started_by": "fork"}) == "vllm (core forked)"
    assert fmt.backend({"backend": "vllm", "core_started_by": "spawn", "host_pid": 7}) == \
        "vllm (core spawned, own process 7)"
    assert fmt.backend({"backend": "cpu", "host_pid": 7}) == "cpu (own process 7)"


async def test_connections_shows_a_live_session(shared_yapd):
    async with ws_connect(shared_yapd.url()) as ws:
        await ws.send(json.dumps({"type": "start", "session_id": "cli-sess", "user_utterance": "hi"}))
        while json.loads(await ws.recv())["type"] != "done":
            pass
        out = yapctl("connections", sock=shared_yapd.admin_socket)
        assert out.returncode == EXIT_OK, out.stderr
        assert "cli-sess" in out.stdout and "127.0.0.1" in out.stdout
        rows = json.loads(yapctl("connections", "--json", sock=shared_yapd.admin_socket).stdout)
        mine = [r for r in rows if r["session_id"] == "cli-sess"]
        assert mine and mine[0]["turns"] == 1 and mine[0]["last_ttft_ms"] > 0


def test_logs_last_n_level_and_grep(shared_yapd):
    sock = shared_yapd.admin_socket
    out = yapctl("logs", "-n", "3", sock=sock)
    assert out.returncode == EXIT_OK
    assert len(out.stdout.splitlines()) == 3
    out = yapctl("logs", "-n", "1000", "--grep", "ENGINE READY", sock=sock)
    lines = out.stdout.splitlines()
    assert lines and all("engine ready" in line.lower() for line in lines)
    out = yapctl("logs", "-n", "1000", "--level", "warning", "--json", sock=sock)
    assert all(json.loads(line)["level"] in ("warning", "error", "critical") for line in out.stdout.splitlines())
    out = yapctl("logs", "-n", "-1", sock=sock)  # a bad command line, as --help says: 2 (it was 1)
    assert out.returncode == EXIT_USAGE and "-n must be 0 or more" in out.stderr, out


def test_a_reader_that_stops_reading_ends_yapctl_quietly(shared_yapd):
    """`yapctl logs -n 200 | head -1`: the writes after the reader left raised BrokenPipeError,
    a traceback and exit 1. Now yapctl ends as a program SIGPIPE ends, 141, and says nothing;
    output still buffered at the end (a table) too, not in the interpreter's last flush."""
    r, w = os.pipe()
    os.close(r)  # gone before the first line: the same every run, where `| head -1` is a race
    try:
        chat = ["chat", "hi", "--url", shared_yapd.url(key=None), "--key", KEY, "--json"]  # said exit 3
        for args in (["logs", "-n", "200"], ["logs", "-n", "5", "-f", "--json"], ["status"], chat):
            out = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(shared_yapd.admin_socket), *args],
                                 stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
            assert (out.returncode, out.stderr) == (EXIT_PIPE, ""), args
    finally:
        os.close(w)


def test_logs_follow_streams_new_lines(shared_yapd):
    sock = shared_yapd.admin_socket
    proc = subprocess.Popen([sys.executable, "-m", "yapctl", "--socket", str(sock), "logs", "-n", "0", "-f",
                             "--grep", "reload"], stdout=subprocess.PIPE, text=True)
    try:
        # The follow is registered once the first request is in: a ping on another
        # connection can't order that, so reload until the follower prints a line.
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        import select

        got = ""
        for _ in range(40):
            assert yapctl("reload", sock=sock).returncode == EXIT_OK
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                got = proc.stdout.read() or ""
                if "reload" in got:
                    break
        assert "reload" in got
    finally:
        proc.terminate()
        proc.wait(10)


def test_reload_restart_and_drain(make_yapd):
    d = make_yapd()
    sock = d.admin_socket
    out = yapctl("reload", sock=sock)
    assert out.returncode == EXIT_OK and "applied now: nothing" in out.stdout, out.stdout
    d.write_config('[turn]\nchat_max_out = 50\n')
    out = yapctl("reload", sock=sock)
    assert out.returncode == EXIT_OK
    assert "turn.chat_max_out" in out.stdout
    out = yapctl("restart", "tool", sock=sock)
    assert out.returncode == EXIT_OK, out.stderr
    assert "restarted tool" in out.stdout
    d.wait_for("engine ready role=tool", 10)
    out = yapctl("drain", sock=sock)
    assert out.returncode == EXIT_OK and "draining" in out.stdout
    assert d.http("/healthz", key=None)[0] == 503
    assert yapctl("drain", "--off", sock=sock).returncode == EXIT_OK
    assert d.http("/healthz", key=None)[0] == 200


def test_a_reloaded_admin_group_that_does_not_exist_is_a_warning_not_applied(make_yapd):
    """The socket stays the daemon's group's, and yapctl says so: it was reported as
    applied while nothing had changed."""
    d = make_yapd()
    gid = os.stat(d.admin_socket).st_gid
    d.write_config('[admin]\ngroup = "yap-no-such-group"\n')
    out = yapctl("reload", sock=d.admin_socket)
    assert out.returncode == EXIT_OK, out.stderr
    assert "yapctl: warning: admin.group 'yap-no-such-group' does not exist" in out.stderr, out
    assert "applied now: nothing" in out.stdout, out
    assert os.stat(d.admin_socket).st_gid == gid
    d.wait_for("reload: admin.group 'yap-no-such-group' does not exist; the admin socket keeps its group")
    # Not taken as the running value: the next reload (the group added meanwhile) tries again.
    out = yapctl("reload", sock=d.admin_socket)
    assert "does not exist" in out.stderr and "applied now: nothing" in out.stdout, out


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the socket to another group: needs root")
def test_a_reload_back_to_the_daemons_group_takes_the_socket_back(make_yapd):
    """admin.group "users", then "" again: the socket stayed the users' while yapctl said
    the key was applied (the peer check used the new group all along)."""
    import grp

    try:
        users = grp.getgrnam("users").gr_gid
    except KeyError:
        pytest.skip("no group named users here")
    d = make_yapd('[admin]\ngroup = "users"\n')
    assert os.stat(d.admin_socket).st_gid == users
    # A group that does not exist changes nothing: the users keep their socket.
    d.write_config('[admin]\ngroup = "yap-no-such-group"\n')
    out = yapctl("reload", sock=d.admin_socket)
    assert "does not exist" in out.stderr and os.stat(d.admin_socket).st_gid == users, out
    d.write_config("")
    out = yapctl("reload", sock=d.admin_socket)
    assert out.returncode == EXIT_OK and "admin.group" in out.stdout, out
    assert os.stat(d.admin_socket).st_gid == os.getgid()


def test_chat_prints_ack_tokens_metrics_and_final(shared_yapd):
    out = yapctl("chat", "who was Columbus?", "--url", shared_yapd.url(key=None), "--key", KEY, "--gender", "man")
    assert out.returncode == EXIT_OK, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ack request_id=")
    assert any(line.startswith("toolcall ") for line in lines)
    metrics = next(line for line in lines if line.startswith("metrics "))
    fields = dict(kv.split("=") for kv in metrics.split()[1:])
    assert set(fields) >= {"ttfb_ms", "total_ms", "stream_ms", "chunks", "chars"}
    assert float(fields["total_ms"]) >= float(fields["ttfb_ms"]) > 0
    final = json.loads(lines[-1].removeprefix("final "))
    assert len(final) == int(fields["chars"])


def test_chat_errors(shared_yapd):
    """The exit code says who answered: a refused key is 4 (denied), a wrong path 1 (yapd
    answered, the operation failed), nothing listening 3 (not running)."""
    out = yapctl("chat", "hi", "--url", shared_yapd.url(key=None), "--key", "wrong")
    assert out.returncode == EXIT_DENIED, (out.returncode, out.stderr)
    assert "refused the connection: authentication_failed" in out.stderr, out.stderr
    assert "wrong" not in out.stdout
    out = yapctl("chat", "hi", "--url", shared_yapd.url(key=None, path="/nowhere"), "--key", KEY)
    assert out.returncode == EXIT_FAILED and "answered HTTP" in out.stderr, (out.returncode, out.stderr)
    out = yapctl("chat", "hi", "--url", "ws://127.0.0.1:9/ws", "--timeout", "5")
    assert out.returncode == EXIT_DOWN and "cannot reach yapd" in out.stderr
    # A start yapd refuses ends the chat at once, failed (it waited out its 60 s for a done
    # that never comes, then said "cannot reach yapd", exit 3)
    out = yapctl("chat", "hi", "--url", shared_yapd.url(key=None), "--key", KEY, "--style", "nosuchstyle",
                 timeout=30)
    assert out.returncode == EXIT_FAILED and "invalid_persona_style" in out.stdout + out.stderr, out
    # -n 0 is a bad command line (2), as the epilog says
    assert yapctl("bench", "-n", "0", "--url", shared_yapd.url(key=None)).returncode == 2


async def test_a_chat_turn_that_outlasts_its_timeout_failed_it_did_not_miss_yapd(make_yapd):
    """yapd answered (the ack, tokens) but sent no done within --timeout: exit 1 with "no
    done within", as the help says; it said "cannot reach yapd" and exit 3."""
    d = make_yapd(env={"YAPD_DEBUG_ADMIN": "1"})
    # Nothing comes as the time runs out (the chat's step held): the wait itself timed out.
    assert d.admin(cmd="debug", action="stall_step", role="chat", seconds=5)[-1]["ok"]
    out = yapctl("chat", "hi", "--url", d.url(key=None), "--key", KEY, "--timeout", "1", timeout=60)
    assert out.returncode == EXIT_FAILED and "no done within 1 s" in out.stderr, out
    assert out.stdout.startswith("ack request_id="), out
    # The turn after one that timed out on the same connection reads its own frames, not
    # the cut turn's done (taken as its own: a failed, cancelled turn).
    from yapctl.bench import run_turn as bench_turn

    assert d.admin(cmd="debug", action="stall_step", role="chat", seconds=5)[-1]["ok"]
    async with ws_connect(d.url()) as ws:
        late = await bench_turn(ws, {"type": "start", "session_id": "b", "user_utterance": "hi",
                                     "request_id": "late"}, timeout=1)
        assert late.error == "timeout", late
        after = await bench_turn(ws, {"type": "start", "session_id": "b", "user_utterance": "hi",
                                      "request_id": "after"}, timeout=30)
        assert after.ok and after.done is not None and after.done["request_id"] == "after", after
    # A benchmark session whose warm-up turn timed out measures nothing (it went on, its
    # first measured turn barging in on the warm-up still streaming).
    from yapctl.bench import BenchConfig, bench

    assert d.admin(cmd="debug", action="stall_step", role="chat", seconds=5)[-1]["ok"]
    report = await bench(BenchConfig(d.url(key=None), KEY, n=2, concurrency=1, timeout=1))
    assert [r.error for r in report.results] == ["connect: RuntimeError: the warm-up turn failed: timeout"], \
        report.results


def test_chat_json_is_one_object_a_line_and_the_global_timeout_reaches_turns(shared_yapd):
    out = yapctl("chat", "hi", "--url", shared_yapd.url(key=None), "--key", KEY, "--json")
    assert out.returncode == EXIT_OK, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["type"] == "ack" and lines[-2]["type"] == "done" and lines[-1]["type"] == "summary"
    assert lines[-1]["final"] == next(m["text"] for m in lines if m["type"] == "final")
    # A port that takes the connection and never answers: yapctl's --timeout (1 s) bounds
    # the wait, not the turn's own default of 60 s (the run's own timeout would end it).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        out = yapctl("--timeout", "1", "chat", "hi", "--url", f"ws://127.0.0.1:{silent.getsockname()[1]}/ws",
                     timeout=30)
    assert out.returncode == EXIT_DOWN and "cannot reach yapd" in out.stderr, out.stderr
    assert "timed out" in out.stderr and "(after 1 s)" in out.stderr, out.stderr


async def test_profile_shows_where_the_loop_spends_its_time_while_turns_run(shared_yapd):
    """A real daemon profiled over a window in which a client runs turns: the window's
    time lands in the daemon's own code and in websockets', and the reply stays usable
    JSON. Bad arguments are refused."""
    sock = shared_yapd.admin_socket
    profile = asyncio.create_task(asyncio.to_thread(yapctl, "profile", "--seconds", "3", "--top", "5", "--json",
                                                    sock=sock))
    while not profile.done():  # turns until the window closes, so it sees serving work
        async with ws_connect(shared_yapd.url()) as ws:
            await ws.send(json.dumps({"type": "start", "session_id": "prof", "user_utterance": "hi"}))
            while json.loads(await ws.recv())["type"] != "done":
                pass
    out = await profile
    assert out.returncode == EXIT_OK, out.stderr
    reply = json.loads(out.stdout)
    shares = {g["package"]: g["share"] for g in reply["by_package"]}
    assert shares.get("yapd", 0) > 0 and shares.get("websockets", 0) > 0, shares
    assert abs(sum(shares.values()) - 1) < 0.01 and len(reply["top"]) == 5
    assert 3 <= reply["wall_s"] < 10
    table = yapctl("profile", "--seconds", "0.2", sock=sock)
    assert table.returncode == EXIT_OK and "package" in table.stdout and "function" in table.stdout
    for bad in (["--seconds", "0"], ["--seconds", "301"], ["--top", "0"]):
        refused = yapctl("profile", *bad, sock=sock)
        assert refused.returncode == EXIT_FAILED and ("seconds must" in refused.stderr or "top must" in refused.stderr)


def test_bench_against_nothing_counts_every_turn_asked():
    """No daemon: 2 turns asked over 1 connection that never opens are 0 of 2 completed
    (it said 0/1: one failed result for the connection)."""
    out = yapctl("bench", "-n", "2", "-c", "1", "--url", "ws://127.0.0.1:9/ws", "--timeout", "5")
    assert out.returncode == EXIT_FAILED and out.stdout.startswith("0/2 turns completed"), out.stdout


def test_bench_counts_turns_a_daemon_gone_mid_turn_cut_as_closed(make_yapd):
    """The daemon killed mid-turn: the turn cut is a "closed" error, not a connect failure
    (its worker died with ConnectionClosed and said "connect"), and the turns asked are all
    accounted: completed or not."""
    from tests.conftest import UNENDING
    from yapctl.bench import BenchConfig, bench

    d = make_yapd(UNENDING + "chat_max_out = 1500\n")
    cfg = BenchConfig(url=d.url(key=None), key=KEY, n=4, concurrency=1, timeout=60, utterance="a long story",
                      warmup=False)

    def streaming() -> bool:
        st = json.loads(d.http("/status")[1])
        return any(e["in_flight"] for e in st["engines"].values())

    async def run() -> Any:
        job = asyncio.ensure_future(bench(cfg))
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(streaming):  # the first turn is in the engines
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        d.proc.kill()
        return await job

    report = asyncio.run(run())
    s = report.summary()
    assert s["completed"] == 0 and "closed" in s["errors"] and "connect" not in s["errors"], s


def test_bench_completes_every_session(shared_yapd):
    out = yapctl("bench", "-n", "6", "-c", "3", "--url", shared_yapd.url(key=None), "--key", KEY, "--json")
    assert out.returncode == EXIT_OK, out.stderr
    s = json.loads(out.stdout)
    assert s["turns"] == 6 and s["completed"] == 6 and not s["errors"]
    for key in ("ttft_ms", "tool_ms", "itl_ms", "total_ms"):
        assert s[key]["p50"] is not None
    assert s["itl_tail"]["gaps"] > 0 and s["itl_tail"]["long_pct"] is not None, s  # the gaps' tail, told apart
    assert s["itl_starts"]["beside_pct"] is not None, s  # ... and by the other sessions' starts beside them
    # The daemon's own times (done.timings): each turn's decision is sent after the tool
    # engine's first output and reaches the client later still, so their quantiles keep
    # that order too.
    assert s["server_engine_ttft_ms"]["p50"] is not None
    assert 0 < s["prompt_tokens"]["p50"] <= s["prompt_tokens"]["max"], s  # the chat prompt yapd built
    for q in ("p50", "p95"):
        assert s["server_tool_first_ms"][q] <= s["server_tool_ms"][q] <= s["tool_ms"][q], s
        # The first token leaves after the decision, and the client's clock started first.
        assert s["server_tool_ms"][q] <= s["server_ttft_ms"][q] <= s["ttft_ms"][q], s
        assert 0 < s["outside_turn_ms"][q] < s["ttft_ms"][q], s
        # ... made of the start's way in (to the ack's "now", on this host's wall clock)
        # and the token's way back.
        assert 0 < s["inbound_ms"][q] < s["outside_turn_ms"][q] + 0.5, s
        assert -0.5 < s["outbound_ms"][q] < s["outside_turn_ms"][q], s
        # The first text comes with or after the first output; the token leaves after it.
        assert s["server_engine_ttft_ms"][q] <= s["server_engine_text_ms"][q] <= s["server_ttft_ms"][q], s
        assert 0 <= s["first_token_after_ready_ms"][q] < s["server_ttft_ms"][q], s
        # The engines' own stamps: queued, taken up, first token, before yapd had it.
        for role, first in (("chat", "server_engine_ttft_ms"), ("tool", "server_tool_first_ms")):
            assert (0 <= s[f"server_{role}_queued_ms"][q] <= s[f"server_{role}_scheduled_ms"][q]
                    <= s[f"server_{role}_first_token_ms"][q] <= s[first][q] + 0.01), s
            assert s[f"server_{role}_cached_tokens"][q] == 0, s  # the CPU engine keeps no prefix cache
            # ... and per turn, the first token's way from that stamp to the turn, and that
            # way in two: up to the engine's side on yapd's loop taking it, then to the turn.
            assert -0.01 <= s[f"server_{role}_core_to_front_ms"][q] <= s[first][q], s
            assert s[f"server_{role}_first_token_ms"][q] <= s[f"server_{role}_taken_ms"][q] <= s[first][q] + 0.01, s
            for part in ("core_to_taken", "taken_to_front"):
                assert -0.01 <= s[f"server_{role}_{part}_ms"][q] <= s[f"server_{role}_core_to_front_ms"][q] + 0.01, s
    # A turn's first token comes from one engine step; one step makes at most one per session.
    assert all(1 <= s[f"server_{role}_first_tokens_per_step"] <= 3 for role in ("chat", "tool")), s
    # ... and the steps that made each burst's first tokens, timed from its first start.
    for role in ("chat", "tool"):
        b = s[f"server_{role}_burst_steps"]
        assert 1 <= b["bursts"] <= s["completed"] and 1 <= b["steps"]["p50"] <= b["steps"]["max"] <= 6, b
        # (a burst's starts need not leave together here: its last step can come later after
        # the burst's first start than any one turn's TTFT, but within the level)
        assert 0 < b["first_ms"] <= b["last_ms"]["p50"] <= b["last_ms"]["p95"] < 1000 * s["wall_s"], b
        assert b["between_ms"]["p50"] is None or b["between_ms"]["p50"] > STEP_APART_MS, b
    # Every completed turn is weighed for the slow tail, and a slow one lies in some burst.
    slow = s["ttft_slow"]
    # (over twice the median: pct's p50 is the upper middle of an even count)
    assert slow["of"] == s["completed"] and 0 < slow["over_ms"] <= 2 * s["ttft_ms"]["p50"] + 0.01, slow
    assert (slow["bursts"] == 0) == (slow["turns"] == 0) and slow["bursts"] <= slow["turns"], slow
    table = yapctl("bench", "-n", "2", "-c", "2", "--url", shared_yapd.url(key=None), "--key", KEY)
    assert table.returncode == EXIT_OK
    assert "2/2 turns completed" in table.stdout and "ttft" in table.stdout and "P99" in table.stdout


def test_awq_status_answers(shared_yapd):
    out = yapctl("awq", "status", sock=shared_yapd.admin_socket)
    # With no AWQ job support compiled in this is a clear refusal, never a traceback.
    assert out.returncode in (EXIT_OK, EXIT_FAILED)
    assert "Traceback" not in out.stderr
    if out.returncode == EXIT_OK:
        assert json.loads(out.stdout)["ok"] is True


def test_daemon_down(tmp_path):
    out = yapctl("status", sock=tmp_path / "none.sock")
    assert out.returncode == EXIT_DOWN
    assert out.stderr.strip() == f"yapctl: yapd is not running: no socket at {tmp_path / 'none.sock'}"
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    out = yapctl("logs", sock=stale)
    assert out.returncode == EXIT_DOWN and "stale socket" in out.stderr
    # The socket from the environment, as an operator's shell would set it.
    assert yapctl("status", env={"YAP_ADMIN_SOCKET": str(stale)}).returncode == EXIT_DOWN


def test_a_socket_path_that_is_no_socket_says_so(tmp_path):
    """A directory or a file given as the socket was called "nothing listens (stale socket)"."""
    regular = tmp_path / "admin.conf"
    regular.write_text("")
    for path, what in ((tmp_path, "a directory"), (regular, "a regular file")):
        out = yapctl("status", sock=path)
        assert out.returncode == EXIT_DOWN, out.stderr
        assert out.stderr.startswith(f"yapctl: {path} is {what}, not a socket"), out.stderr


def test_a_daemon_that_does_not_take_the_connection_timed_out_is_not_called_down(tmp_path):
    """A socket whose accept queue is full, as a daemon's whose loop is stuck: the connect
    waits out --timeout and says so, exit 1 as any wait for yapd that ran out. It said "yapd
    went away: Invalid argument", exit 3 (asyncio takes the kernel's "queue full" for a
    connect in progress and hands back a socket never connected)."""
    sock = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as queued:
        server.bind(str(sock))
        server.listen(0)
        queued.connect(str(sock))  # the one place a backlog of 0 has
        out = yapctl("--timeout", "1", "status", sock=sock, timeout=30)
        assert out.returncode == EXIT_FAILED, (out.returncode, out.stderr)
        assert "timed out" in out.stderr and "within 1 s" in out.stderr and "not running" not in out.stderr
        server.accept()[0].close()  # room again, taken by nobody: the connect goes in, no reply comes
        out = yapctl("--timeout", "1", "status", sock=sock, timeout=30)
        assert out.returncode == EXIT_FAILED and "yapd did not answer within 1 s" in out.stderr, out.stderr


async def test_a_connect_timeout_says_it_timed_out(tmp_path):
    """The timeout's message was "cannot reach yapd at ...: " with no reason (a TimeoutError
    has no text, and is true), exit 3, as if no daemon ran."""
    sock = tmp_path / "slow.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock))
        server.listen()
        with pytest.raises(AdminError) as refused:
            await AdminClient(sock, timeout=0).connect()
    assert refused.value.exit_code == EXIT_FAILED
    assert str(refused.value) == (f"timed out: yapd did not accept a connection on {sock} within 0 s "
                                  "(it listens, but is busy or stuck)")


async def test_a_reply_over_the_line_limit_is_an_error_not_a_traceback(tmp_path):
    """asyncio's readline raised ValueError past the reader's limit: a traceback from
    every CLI command and the dashboard closed (WorkerFailed)."""
    from yapctl.client import LINE_LIMIT

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"ok": true, "pad": "' + b"x" * LINE_LIMIT + b'"}\n')
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    sock = tmp_path / "huge.sock"
    server = await asyncio.start_unix_server(huge, path=str(sock))
    try:
        async with AdminClient(sock, timeout=30) as c:
            with pytest.raises(AdminError) as err:
                await c.request("status")
            assert c._writer is None  # closed: the rest of that line is nothing to read on from
    finally:
        server.close()
    assert err.value.exit_code == EXIT_FAILED and "longer than 16 MiB" in str(err.value)


async def test_awq_progress_text_is_not_read_as_markup(tmp_path):
    """A model path with "[/x]" in its progress line: rich read it as markup, and the
    rebuild's progress printed a MarkupError traceback instead of its bar."""
    lines = [{"event": "progress", "role": "chat", "stage": "calibrating", "message": "m[/x]/chat layer 1/2",
              "layer": 1, "layers": 2},
             {"ok": True, "built": {"chat": "/cache/awq/chat"}, "pushed": {}, "restarted": ["chat"]}]

    async def daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for line in lines:
            writer.write(json.dumps(line).encode() + b"\n")
        await writer.drain()
        writer.close()

    sock = tmp_path / "awq.sock"
    server = await asyncio.start_unix_server(daemon, path=str(sock))
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "yapctl", "--socket", str(sock), "awq",
                                                    "rebuild", "chat", stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, cwd=str(ROOT))
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        server.close()
    assert proc.returncode == EXIT_OK and b"Traceback" not in err, err.decode()
    assert b"m[/x]/chat layer 1/2" in err and b'"built"' in out, (out, err)


def test_time_limits_that_are_no_positive_finite_number_are_refused(capsys):
    """--timeout 0 or nan timed out at once, reported as "not running"; profile's nan too."""
    for argv, says in ((["--timeout", "0", "status"], "argument --timeout: must be more than 0 seconds, not '0'"),
                       (["--timeout", "-1", "status"], "argument --timeout: must be more than 0 seconds"),
                       (["--timeout", "nan", "status"], "argument --timeout: must be a finite number, not 'nan'"),
                       (["--timeout", "inf", "logs"], "argument --timeout: must be a finite number, not 'inf'"),
                       (["--timeout", "soon", "status"], "argument --timeout: not a number: 'soon'"),
                       (["profile", "--seconds", "nan"], "argument --seconds: must be a finite number, not 'nan'"),
                       (["chat", "hi", "--timeout", "nan"], "argument --timeout: must be a finite number")):
        with pytest.raises(SystemExit) as exited:
            main(["--socket", "/nonexistent/admin.sock", *argv])
        assert exited.value.code == 2, argv
        assert says in capsys.readouterr().err, argv


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """yapctl's own main() in a forked child running as uid/gid 65534."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sys.stderr = os.fdopen(w, "w", buffering=1)  # pytest has replaced sys.stderr
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            from yapctl.cli import main

            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return os.waitstatus_to_exitcode(status), f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_permission_denied(make_yapd):
    d = make_yapd()
    sock = d.admin_socket
    for parent in sock.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    # The socket file's mode keeps others out...
    code, err = _as_nobody(["--socket", str(sock), "status"])
    assert code == EXIT_DENIED, err
    assert "permission denied: add yourself to group" in err
    # ...and the daemon's peer check refuses them even when the mode lets them connect.
    os.chmod(sock, 0o666)
    code, err = _as_nobody(["--socket", str(sock), "status"])
    assert code == EXIT_DENIED, err
    assert "permission denied" in err

