"""Faults against a real yapd: an engine raising mid-stream, an engine killed, the admin
socket deleted, the config file gone before SIGHUP, a full disk under the log file, a
client flooding cancels. Each: the affected turn gets its error and done, other sessions
go on, /healthz tells the truth, and the daemon recovers (or says how to)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import UNENDING, Yapd, recv, run_turn, send, until_done, ws_connect
from tests.test_protocol_e2e import check_turn
from yapd import config

DEBUG = {"YAPD_DEBUG_ADMIN": "1"}
# Replies run to chat_max_out: the demo model's random weights sometimes end a reply at
# its first token, and a fault test needs its turn still streaming when it strikes (1,000
# tokens: 1-2 s on the CPU engine, room for an admin call on a loaded machine).
STREAMING = UNENDING + "chat_max_out = 1000\n"


@pytest.fixture(scope="module")
def fault_yapd(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """One daemon with the debug faults on and default limits; each test leaves it serving
    (and its config as it found it: STREAMING)."""
    d = Yapd(tmp_path_factory.mktemp("faults"), cache_dir, config=STREAMING, env=DEBUG)
    d.start()
    yield d
    d.stop()


async def _first_token(ws, request_id: str) -> list[dict]:
    msgs = []
    while True:
        m = await recv(ws)
        msgs.append(m)
        assert m["type"] not in ("error", "done"), msgs
        if m["type"] == "token":
            return msgs


def _counter(d: Yapd, sample: str) -> float:
    """A sample's value on /metrics (0 before it is first counted)."""
    return next((float(line.rsplit(" ", 1)[1]) for line in d.http("/metrics")[1].splitlines()
                 if line.startswith(sample + " ")), 0.0)


async def test_engine_raises_mid_stream_one_turn_fails_others_go_on(fault_yapd):
    d = fault_yapd
    # Read before the fault: the failed turn's error may be counted before fail_steps
    # answers. And before the turns: a /metrics call between their first tokens and the
    # fault took part of the few hundred ms their replies last (on a loaded machine, all).
    errors = 'yapd_errors_total{code="engine_unavailable"}'
    sent_before = _counter(d, errors)
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="start", session_id="a", user_utterance="tell me a long story", request_id="ta")
        await send(b, type="start", session_id="b", user_utterance="tell me a long story", request_id="tb")
        await _first_token(a, "ta")
        await _first_token(b, "tb")
        # Both stream now; the chat engine's next steps fail once, in whichever request.
        assert d.admin(cmd="debug", action="fail_steps", role="chat", steps=2)[-1]["ok"]
        ends = {"ta": await until_done(a, 60), "tb": await until_done(b, 60)}
        failed = [rid for rid, msgs in ends.items() if any(m["type"] == "error" for m in msgs)]
        assert len(failed) == 1, ends
        msgs = ends[failed[0]]
        err = next(m for m in msgs if m["type"] == "error")
        assert err["error_code"] == "engine_unavailable" and err["request_id"] == failed[0]
        assert "injected engine fault" in err["message"]
        assert msgs[-1]["type"] == "done" and msgs[-1]["error"] == "engine_unavailable"
        assert _counter(d, errors) == sent_before + 1  # one error message sent, counted once
        other = ends["tb" if failed[0] == "ta" else "ta"]
        assert other[-1]["type"] == "done" and other[-1]["cancelled"] is False and "error" not in other[-1]
        # One failed request is not a dead engine: health stays 200 and both sessions go on.
        assert d.http("/healthz", key=None)[0] == 200
        check_turn(await run_turn(a))
        check_turn(await run_turn(b))


async def test_engine_killed_turn_ends_health_503_restart_recovers(fault_yapd):
    d = fault_yapd
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="start", session_id="a", user_utterance="tell me a long story", request_id="k1")
        await _first_token(a, "k1")
        # The CPU engine's kill -9: every request fails at once, health says failed.
        assert d.admin(cmd="debug", action="kill_engine", role="chat")[-1]["ok"]
        msgs = await until_done(a)
        err = next(m for m in msgs if m["type"] == "error")
        assert err["error_code"] == "engine_unavailable" and err["request_id"] == "k1"
        assert msgs[-1]["error"] == "engine_unavailable" and msgs[-1]["request_id"] == "k1"
        code, body = d.http("/healthz", key=None)
        assert code == 503 and json.loads(body)["engines"]["chat"] == "failed"
        st = json.loads(d.http("/status")[1])
        assert st["ready"] is False and st["engines"]["chat"]["state"] == "failed"
        # the scrape sees it too (the gauge only changed at starts and stops)
        assert 'yapd_engine_up{role="chat"} 0.0' in d.http("/metrics")[1].splitlines()
        # Other sessions stay connected and are told plainly; nothing hangs.
        await send(b, type="start", session_id="b", user_utterance="hi", request_id="k2")
        refused = await recv(b)
        assert refused["error_code"] == "engine_unavailable" and refused["request_id"] == "k2"
        await send(b, type="ping")
        assert (await recv(b))["type"] == "pong"
        # Recovery: an engine restart (yapctl restart chat); systemd's watchdog restarts
        # the daemon when nobody does (tests/test_daemon.py checks the pings stop).
        assert d.admin(cmd="restart", target="chat")[-1]["ok"] is True
        assert d.http("/healthz", key=None)[0] == 200
        assert 'yapd_engine_up{role="chat"} 1.0' in d.http("/metrics")[1].splitlines()
        check_turn(await run_turn(a))
        check_turn(await run_turn(b))


async def test_admin_socket_deleted_serving_goes_on_sighup_recreates(fault_yapd):
    d = fault_yapd
    d.admin_socket.unlink()
    with pytest.raises(OSError):
        d.admin(cmd="ping", timeout=5)
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))
    assert d.http("/healthz", key=None)[0] == 200
    n = len(d.lines)
    d.signal(signal.SIGHUP)
    wait_new(d, n, "was gone; re-created it")
    assert d.admin(cmd="ping")[-1]["ok"] is True
    assert os.stat(d.admin_socket).st_mode & 0o777 == 0o660
    # A second reload with the file in place leaves it alone.
    n = len(d.lines)
    assert d.admin(cmd="reload")[-1]["ok"] is True
    assert not any("re-created" in ln for ln in d.lines[n:])


async def test_config_file_gone_before_sighup_keeps_running_config(fault_yapd):
    d = fault_yapd
    d.write_config(STREAMING, server={"max_connections": 7})
    assert d.admin(cmd="reload")[-1]["ok"] is True
    saved = d.config_path.read_text()
    d.config_path.unlink()
    n = len(d.lines)
    d.signal(signal.SIGHUP)
    line = wait_new(d, n, "reload failed, keeping the running config")
    assert "no such file" in line and str(d.config_path) in line
    assert d.http("/healthz", key=None)[0] == 200
    assert json.loads(d.http("/status")[1])["capacity"]["max"] == 7
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))
    # The file back, a reload applies it again.
    d.config_path.write_text(saved.replace("max_connections = 7", "max_connections = 9"))
    assert d.admin(cmd="reload")[-1]["ok"] is True
    assert json.loads(d.http("/status")[1])["capacity"]["max"] == 9
    d.write_config(STREAMING)
    assert d.admin(cmd="reload")[-1]["ok"] is True


def wait_new(d: Yapd, after: int, needle: str, timeout: float = 30) -> str:
    """A log line containing ``needle`` among those after the first ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in d.lines[after:]:
            if needle in line:
                return line
        time.sleep(0.05)
    raise TimeoutError(f"no new log line with {needle!r}")


@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: str = "48k"):
    """A real full disk: a tmpfs of a few KiB (needs root and mount rights)."""
    if os.geteuid() != 0:
        pytest.skip("a tiny tmpfs needs root; the /dev/full case covers the same path")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("where", ["dev_full", "tiny_tmpfs"])
async def test_log_file_on_full_disk_daemon_serves_and_stops_cleanly(make_yapd, tmp_path, where):
    with contextlib.ExitStack() as stack:
        if where == "dev_full":
            log_file = "/dev/full"  # every write fails with ENOSPC
        else:
            mnt = stack.enter_context(_tiny_tmpfs(tmp_path / "full"))
            filler = mnt / "filler"
            # Fill the disk to the last block: the log file's first write fails.
            with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 1024)
            log_file = str(mnt / "yapd.log")
        d = make_yapd(f'[logging]\nfile = "{log_file}"\nlevel = "debug"\n')
        d.wait_for(f"log file {log_file} unwritable; continuing on stderr only")
        async with ws_connect(d.url()) as ws:
            for _ in range(3):
                check_turn(await run_turn(ws))
        assert d.http("/healthz", key=None)[0] == 200
        assert d.admin(cmd="logs", n=5)[-1]["ok"] is True  # the in-memory ring still has everything
        assert sum("unwritable" in ln for ln in d.lines) == 1  # said once, not once a line
        if where == "dev_full":
            # A reload of a [logging] key closes the file's handler, whose flush fails: the
            # reload broke off there (no answer, no stderr handler left, no READY=1).
            d.write_config(f'[logging]\nfile = "{log_file}"\nlevel = "info"\n')
            reply = d.admin(cmd="reload")[-1]
            assert reply["ok"] is True and reply["applied"] == ["logging.level"], reply
            d.wait_for("reload applied live keys: logging.level")  # on stderr still
        if where == "tiny_tmpfs":
            # Space again: file lines resume.
            os.unlink(mnt / "filler")
            marker = uuid.uuid4().hex
            d.write_config(f'[logging]\nfile = "{log_file}"\nlevel = "debug"\n[personas]\n{marker} = "x"\n')
            assert d.admin(cmd="reload")[-1]["ok"] is True
            for _ in range(100):
                if "reload applied live keys" in Path(log_file).read_text(errors="replace"):
                    break
                await asyncio.sleep(0.05)
            assert "reload applied live keys" in Path(log_file).read_text(errors="replace")
        assert d.stop() == 0


async def test_ten_thousand_cancels(fault_yapd):
    # The default rate limit (20/s, bursts of 40) applies.
    d = fault_yapd
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="start", session_id="a", user_utterance="tell me a long story", request_id="c1")
        await _first_token(a, "c1")
        other = asyncio.create_task(run_turn(b, timeout=60, request_id="other"))
        frame = '{"type":"cancel","request_id":"c1"}'
        t0 = time.monotonic()
        for _ in range(10_000):
            await a.send(frame)
        dones, tokens_after, limited, other_msgs, last = 0, 0, 0, [], t0
        # Read until the limiter's replies stop: every reply is the one done or rate_limited.
        while True:
            try:
                m = await recv(a, timeout=3)
            except asyncio.TimeoutError:
                break
            last = time.monotonic()
            if m["type"] == "done":
                dones += 1
                assert m["request_id"] == "c1" and m["cancelled"] is True
            elif m["type"] == "token":
                tokens_after += dones
            elif m["type"] == "error":
                assert m["error_code"] == "rate_limited", m
                limited += 1
            else:
                other_msgs.append(m)
        assert dones == 1 and tokens_after == 0 and other_msgs == []
        # The bucket let through its burst plus its refill (20/s) while the flood lasted;
        # every other cancel was answered rate_limited, none dropped silently.
        allowed = 10_000 - limited
        assert 40 <= allowed <= 40 + 20 * (last - t0) + 2, (allowed, last - t0)
        # The flooder keeps its connection; the other session was served meanwhile.
        check_turn(await other, "other")
        await send(a, type="ping")
        assert (await recv(a))["type"] == "pong"
    assert d.http("/healthz", key=None)[0] == 200
    st = json.loads(d.http("/status")[1])
    assert st["capacity"]["active"] == 0 and all(e["in_flight"] == 0 for e in st["engines"].values())


async def test_slow_reader_cut_off_with_clear_close_others_unaffected(make_yapd):
    import socket as socketmod

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    d = make_yapd(server={"write_buffer_bytes": 64 * 1024, "send_timeout_s": 3.0,
                          "rate_limit_per_s": 1000.0, "rate_limit_burst": 1000})
    # A small receive window, so the daemon's send buffer fills after kilobytes, not megabytes.
    sock = socketmod.socket()
    sock.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.port))
    slow = await connect(d.url(), sock=sock, max_queue=1, max_size=None, ping_interval=None)
    try:
        async with ws_connect(d.url()) as probe:
            big = "y" * 16 * 1024

            async def flood() -> None:
                # set_persona's ack echoes user_identity: 16 KiB back per message, never read.
                with contextlib.suppress(ConnectionClosed):
                    for i in range(200):
                        await slow.send(json.dumps({"type": "set_persona", "user_identity": f"{i}{big}"}))

            flooding = asyncio.create_task(flood())
            # The other session streams whole turns while the slow one fills its buffer.
            for _ in range(3):
                check_turn(await run_turn(probe))
            line = await asyncio.to_thread(d.wait_for, "slow client cut off", 30)
            assert "buffered=" in line
            await asyncio.wait_for(flooding, 30)
            # Reading now, within the grace period: the replies, then a close 1008 saying why.
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(slow.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008, info.value
            assert "too slow" in info.value.rcvd.reason
            check_turn(await run_turn(probe))
        st = json.loads(d.http("/status")[1])
        assert st["capacity"]["active"] == 0
        assert 'outcome="slow_client"} 1.0' in d.http("/metrics")[1]
    finally:
        slow.transport.abort()


@pytest.mark.parametrize("concurrent", [True, False])
async def test_a_stalled_tool_engine_times_out_into_no_and_the_reply_goes_on(make_yapd, concurrent):
    """The tool engine hangs (a wedged kernel): after turn.tool_timeout_s the turn
    decides "no" and the reply streams; the hung request is aborted, so the tool engine
    answers the next turn at once."""
    d = make_yapd(f"[turn]\ntool_timeout_s = 0.5\nconcurrent = {str(concurrent).lower()}\n", env=DEBUG)
    for bad in (0, -1, 61, "5", True):
        reply = d.admin(cmd="debug", action="stall_step", role="tool", seconds=bad)[-1]
        assert reply["ok"] is False and "seconds must be a number" in reply["error"], reply
    assert d.admin(cmd="debug", action="stall_step", role="tool", seconds=60)[-1]["ok"]
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws, user_utterance="what's the weather in Paris?")
        check_turn(msgs)
        call = next(m for m in msgs if m["type"] == "toolcall")
        assert call["status"] == "no" and call["calls"] == []
        d.wait_for("tool decision timed out after 0.5s")
        timeouts = 'yapd_tool_decisions_total{reason="timeout",status="no"}'
        assert f"{timeouts} 1.0" in d.http("/metrics")[1].splitlines()
        # The hung step's request was aborted: the step ended at once.
        d.wait_for("injected stall ended by an abort request=")
        st = json.loads(d.http("/status")[1])
        assert st["engines"]["tool"]["in_flight"] == 0 and st["engines"]["tool"]["ok"] is True
        # The next turn's decision gets 30 s (live): a 0.5 s one failed on a loaded CI
        # machine's CPU engine. A step still stalled would outlast it (the stall is 60 s).
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace("tool_timeout_s = 0.5", "tool_timeout_s = 30"))
        assert d.admin(cmd="reload")[-1]["applied"] == ["turn.tool_timeout_s"]
        check_turn(await run_turn(ws, user_utterance="and in Rome?"))
        assert f"{timeouts} 1.0" in d.http("/metrics")[1].splitlines()  # no second timeout


async def test_a_client_gone_while_the_decision_is_awaited_leaves_no_chat_request_running(make_yapd):
    """Concurrent mode: the chat's first output read, the tool still deciding (its step
    stalled), the chat's next step stalled too, and the client's TCP connection dropped.
    Both engine requests are aborted at once; the chat's was left suspended (running to
    its end, in flight for a restart's drain) until a garbage collection."""
    # A reply of 1,000 tokens, end of sequence ignored: one that ended early (the random
    # model's end token, or 200 tokens on a loaded machine) was over before the chat's
    # stall below was set, and a clean clone's `make test` saw only the tool's abort.
    d = make_yapd(STREAMING + "concurrent = true\ntool_timeout_s = 30\n", env=DEBUG)
    assert d.admin(cmd="debug", action="stall_step", role="tool", seconds=60)[-1]["ok"]
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="what's the weather in Paris?")
        assert (await recv(ws))["type"] == "ack"
        chat_read = 'yapd_prompt_tokens_total{role="chat"}'
        deadline = time.monotonic() + 30
        while not any(line.startswith(chat_read) and not line.endswith(" 0.0")
                      for line in d.http("/metrics")[1].splitlines()):  # the chat's first output read
            assert time.monotonic() < deadline, "the chat's first output never came"
            await asyncio.sleep(0.02)
        assert d.admin(cmd="debug", action="stall_step", role="chat", seconds=60)[-1]["ok"]
        after = len(d.lines)
        ws.transport.abort()
    wait_new(d, after, "injected stall ended by an abort request=", timeout=10)
    stalls = [line for line in d.lines[after:] if "injected stall ended by an abort" in line]
    deadline = time.monotonic() + 10
    while len(stalls) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        stalls = [line for line in d.lines[after:] if "injected stall ended by an abort" in line]
    assert {":chat" in line for line in stalls} == {True, False}, stalls  # both engines' requests
    engines = json.loads(d.http("/status")[1])["engines"]
    assert engines["chat"]["in_flight"] == 0 and engines["tool"]["in_flight"] == 0


async def test_request_orders_serve_turns_and_a_bad_value_is_refused(make_yapd, tmp_path):
    """turn.request_order as a user sets it: turns run whole in every order (the order
    itself: tests/test_units.py), a reload changes it live, an unknown order is refused."""
    d = make_yapd('[turn]\nconcurrent = true\nrequest_order = "tool_first"\n')
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws, user_utterance="what's the weather in Paris?"))
        d.write_config('[turn]\nconcurrent = true\nrequest_order = "chat_first"\n')
        d.signal(signal.SIGHUP)
        d.wait_for("reload applied live keys: turn.request_order")
        check_turn(await run_turn(ws, user_utterance="and in Rome?"))
        d.write_config('[turn]\nconcurrent = true\nrequest_order = "chats_then_tools"\n')
        assert "turn.request_order" in d.admin(cmd="reload")[-1]["applied"]
        check_turn(await run_turn(ws, user_utterance="and in Oslo?"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[turn]\nrequest_order = "tools_first"\n')
    r = subprocess.run([sys.executable, "-m", "yapd", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "turn.request_order: 'tools_first' is not one of" in r.stderr, r.stderr
    from_env = config.load(None, env={"YAP_TURN_REQUEST_ORDER": "tool_first"})
    assert from_env.turn.request_order == "tool_first"  # not the default
