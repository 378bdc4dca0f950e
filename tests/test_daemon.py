"""yapd as a systemd daemon: a real NOTIFY_SOCKET, real signals, the admin socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import KEY, UNENDING, EngineCores, recv, run_turn, send, until_done, ws_connect
from tests.test_protocol_e2e import check_turn


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self._stop = False
        self.on_message = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = data.decode()
            if self.on_message is not None:
                self.on_message(msg)
            with self.cond:
                self.messages.append((time.monotonic(), msg))
                self.cond.notify_all()

    def wait(self, needle: str, timeout: float = 60, after: int = 0) -> int:
        """Index of the first message (from ``after``) containing ``needle``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, (_, msg) in enumerate(self.messages[after:], after):
                    if needle in msg:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {needle!r} in {[m for _, m in self.messages]}")
                self.cond.wait(left)

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def test_ready_only_after_port_answers_and_status_lines(make_yapd, notify):
    d = make_yapd(start=False, env={"NOTIFY_SOCKET": str(notify.path), "YAPD_DEBUG_ENGINE_START_DELAY_S": "1"})
    port_ok_at_ready: list[bool] = []

    def on_message(msg: str) -> None:
        if "READY=1" in msg and not port_ok_at_ready:
            with socket.socket() as s:
                port_ok_at_ready.append(s.connect_ex(("127.0.0.1", d.port)) == 0 if d.port else False)

    notify.on_message = on_message
    d.start(wait=False)
    i = notify.wait("READY=1")
    assert port_ok_at_ready == [True]
    before = notify.texts()[:i]
    assert any("STATUS=loading" in m for m in before), before
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in before), before
    assert "STATUS=serving: 0/16 connections" in notify.texts()[i]
    assert d.http("/healthz", key=None)[0] == 200


def test_reload_and_stop_notifications_exit_zero(make_yapd, notify):
    d = make_yapd(start=False, env={"NOTIFY_SOCKET": str(notify.path)})
    d.start()
    n = notify.wait("READY=1")
    d.signal(signal.SIGHUP)
    r = notify.wait("RELOADING=1", after=n + 1)
    msg = notify.texts()[r]
    usec = int(msg.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
    notify.wait("READY=1", after=r + 1)
    d.signal(signal.SIGTERM)
    s = notify.wait("STOPPING=1", after=r + 1)
    # The stop's longest course asked of systemd (TimeoutStopSec): the drain (10 s by
    # default) and each of the two engines' stops at least.
    e = notify.wait("EXTEND_TIMEOUT_USEC=", after=s + 1)
    assert int(notify.texts()[e].split("EXTEND_TIMEOUT_USEC=")[1].split()[0]) >= 30e6
    assert d.proc.wait(30) == 0


def test_while_the_engines_first_load_a_reload_says_no_ready_and_a_restart_is_refused(make_yapd, notify):
    """Before the first READY=1 (the engines still loading): a reload answers and applies,
    but tells systemd neither RELOADING=1 nor READY=1 (that would end the unit's start
    early); an engine restart is refused (the start owns the engines until it is over)."""
    d = make_yapd(start=False, env={"NOTIFY_SOCKET": str(notify.path), "YAPD_DEBUG_ENGINE_START_DELAY_S": "3"})
    d.start(wait=False)
    d.wait_for("admin socket listening")
    d.write_config("[turn]\nchat_max_out = 20\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is True and reply["applied"] == ["turn.chat_max_out"], reply
    reply = d.admin(cmd="restart", target="chat")[-1]
    assert reply["ok"] is False and "still starting" in reply["error"], reply
    d.wait_for("yapd.daemon: ready port=")
    ready = notify.wait("READY=1")
    assert not any("RELOADING=1" in m for m in notify.texts()[:ready]), notify.texts()
    assert sum("engine started role=chat" in line for line in d.lines) == 1  # no second one beside it
    # once ready, a reload says both
    d.signal(signal.SIGHUP)
    r = notify.wait("RELOADING=1", after=ready + 1)
    notify.wait("READY=1", after=r + 1)


def test_watchdog_pings_and_their_absence(make_yapd, notify):
    d = make_yapd(start=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000",
                                    "YAPD_DEBUG_ADMIN": "1"})
    d.start()
    notify.wait("READY=1")
    time.sleep(1.2)  # observing a rate: pings every 0.2 s
    stamps = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    assert len(stamps) >= 4
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps[1:]) < 0.35, gaps
    # A wedged event loop sends nothing. The block's 2.5 s began after t0 and ended before
    # its reply: a ping may go out while the request is on its way (on a loaded machine,
    # past t0 + 0.1), never after the block began, 2.5 s before the reply at the latest.
    t0 = time.monotonic()
    d.admin(cmd="debug", action="block_loop", seconds=2.5)
    began = max(t0, time.monotonic() - 2.5)
    # Where the loop was surely blocked: wide enough for two pings of a live loop, or
    # the check would pass whatever the daemon did.
    assert t0 + 2.4 - (began + 0.1) >= 0.4, f"the admin round trip took {time.monotonic() - t0 - 2.5:.2f} s"
    during = [t for t, m in notify.messages if m == "WATCHDOG=1" and began + 0.1 < t < t0 + 2.4]
    assert during == []
    # A dead engine stops them too, and /healthz says so.
    d.admin(cmd="debug", action="kill_engine", role="chat")
    assert d.http("/healthz", key=None)[0] == 503
    time.sleep(0.3)
    t1 = time.monotonic()
    time.sleep(0.8)
    assert [t for t, m in notify.messages if m == "WATCHDOG=1" and t > t1] == []
    assert d.admin(cmd="restart", target="chat")[-1]["ok"] is True
    assert d.http("/healthz", key=None)[0] == 200
    n = len(notify.messages)
    notify.wait("WATCHDOG=1", after=n, timeout=5)


def test_no_notify_socket_is_a_noop(make_yapd):
    d = make_yapd()
    assert d.http("/healthz", key=None)[0] == 200
    assert d.stop() == 0


async def test_sigterm_lets_the_turn_in_flight_end_refuses_new_ones_closes_1001(make_yapd):
    # A stop for an upgrade: the reply being spoken ends whole; a new turn is refused.
    d = make_yapd(UNENDING + "chat_max_out = 1000\n")  # 1-2 s: still streaming at the signal
    async with ws_connect(d.url()) as ws, ws_connect(d.url()) as other:
        await send(ws, type="start", session_id="s", user_utterance="a long story please", request_id="t1")
        while (await recv(ws))["type"] != "token":
            pass
        d.signal(signal.SIGTERM)
        await asyncio.to_thread(d.wait_for, "SIGTERM received: draining and stopping")  # the signal is async
        await send(other, type="start", session_id="o", user_utterance="hello", request_id="late")
        refused = await recv(other)
        assert refused["type"] == "error" and refused["error_code"] == "shutting_down", refused
        msgs = await until_done(ws)
        assert msgs[-1]["request_id"] == "t1" and msgs[-1]["cancelled"] is False
        assert msgs[-2]["type"] == "final" and msgs[-1]["usage"]["completion_tokens"] == 1000
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert d.proc.wait(30) == 0


async def test_sigterm_cancels_what_still_runs_after_drain_timeout(make_yapd):
    d = make_yapd(UNENDING + "chat_max_out = 1500\n", server={"drain_timeout_s": 0.5})
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="a long story please", request_id="t1")
        while (await recv(ws))["type"] != "token":
            pass
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        msgs = await until_done(ws)
        assert msgs[-1]["request_id"] == "t1" and msgs[-1]["cancelled"] is True
        assert time.monotonic() - t0 >= 0.4  # not before the drain's time was up
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert d.proc.wait(30) == 0


async def test_a_restart_takes_no_new_turns_and_ends_the_ones_it_cuts(make_yapd):
    """A restart's drain refuses new turns on the restarting engine (one that kept admitting
    them never ran dry under steady load), and a turn still streaming when the engine stops
    ends with its error and done (the CPU engine's cut streams waited for the idle timeout)."""
    d = make_yapd(UNENDING + "chat_max_out = 1500\n", server={"drain_timeout_s": 0.5})
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        await send(a, type="start", session_id="a", user_utterance="a long story please", request_id="cut")
        while (await recv(a))["type"] != "token":
            pass
        restart = asyncio.ensure_future(asyncio.to_thread(d.admin, cmd="restart", target="chat", timeout=120))
        while d.http("/healthz", key=None)[0] == 200:  # the restart has begun: its drain answers 503
            await asyncio.sleep(0.01)
        assert json.loads(d.http("/status")[1])["restarting"] == ["chat"]  # what the dashboard shows meanwhile
        await send(b, type="start", session_id="b", user_utterance="hi", request_id="new")
        refused = await recv(b)
        assert refused["error_code"] == "engine_unavailable" and refused["request_id"] == "new", refused
        assert "the chat engine is restarting" in refused["message"], refused
        msgs = await until_done(a, 60)  # long before the idle timeout
        err = next(m for m in msgs if m["type"] == "error")
        assert err["error_code"] == "engine_unavailable" and "stopping or restarting" in err["message"], msgs
        assert msgs[-1]["request_id"] == "cut" and msgs[-1]["error"] == "engine_unavailable"
        reply = (await restart)[-1]
        assert reply["ok"] is True and reply["drained"] is False, reply
        assert d.http("/healthz", key=None)[0] == 200
        check_turn(await run_turn(a))
        check_turn(await run_turn(b))


def test_an_engine_a_restart_has_stopped_reads_restarting_not_gone(make_yapd):
    """Between a restart's stop of an engine and its successor's making, /healthz and
    /status still name the role ("restarting") and yapd_engine_up says 0: an alert on it
    saw no series at all."""
    d = make_yapd(env={"YAPD_DEBUG_ENGINE_STOP_DELAY_S": "6"})  # three requests' time, on a busy machine too
    restart = threading.Thread(target=d.admin, kwargs={"cmd": "restart", "target": "tool", "timeout": 120})
    restart.start()
    d.wait_for("engine stopping for the restart role=tool")
    code, body = d.http("/healthz", key=None)
    assert code == 503 and json.loads(body)["engines"] == {"chat": "ready", "tool": "restarting"}, body
    assert json.loads(d.http("/status")[1])["engines"]["tool"]["state"] == "restarting"
    metrics = d.http("/metrics")[1]
    assert 'yapd_engine_up{role="tool"} 0.0' in metrics and 'yapd_engine_up{role="chat"} 1.0' in metrics, metrics
    restart.join(120)
    assert 'yapd_engine_up{role="tool"} 1.0' in d.http("/metrics")[1]


def test_a_sighup_before_the_event_loop_runs_is_a_reload_once_it_does(make_yapd):
    """SIGHUP's default action ends a process: one that came while yapd prepared (a first
    demo start builds its models) stopped it for good (systemd counts a SIGHUP death as
    clean: no Restart=on-failure)."""
    d = make_yapd(start=False, env={"YAPD_DEBUG_BEFORE_LOOP_DELAY_S": "60"})  # until the SIGHUP
    d.start(wait=False)
    d.wait_for("waiting before the event loop")
    d.write_config("[turn]\nchat_max_out = 20\n")  # after the start read the file
    d.signal(signal.SIGHUP)
    d.wait_for("yapd.daemon: ready port=")
    d.wait_for("SIGHUP before the event loop ran: reloading")
    d.wait_for("reload applied live keys: turn.chat_max_out")
    assert d.proc.poll() is None


async def test_a_reload_while_stopping_is_ignored_and_tells_systemd_nothing(make_yapd, notify):
    """After STOPPING=1 a SIGHUP (logrotate's, say) sent RELOADING=1 and READY=1 and
    applied the file mid-drain."""
    d = make_yapd(UNENDING + "chat_max_out = 1500\n", start=False, env={"NOTIFY_SOCKET": str(notify.path)},
                  server={"drain_timeout_s": 3.0})
    d.start()
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="a long story please")
        while (await recv(ws))["type"] != "token":
            pass
        d.signal(signal.SIGTERM)
        s = notify.wait("STOPPING=1")
        d.signal(signal.SIGHUP)
        d.wait_for("reload ignored: yapd is stopping")
        await until_done(ws, 30)
    assert d.proc.wait(30) == 0
    after = notify.texts()[s + 1:]
    assert not any("RELOADING=1" in m or "READY=1" in m or "STATUS=serving" in m for m in after), after


def test_a_stop_during_a_reload_stuck_reading_the_file_still_exits(make_yapd, notify):
    """The config file on a hung mount (a FIFO with no writer stands in): the reload's
    read never returns, and the stopped daemon waited for it before exiting (asyncio's
    executor threads are joined at exit) until systemd's SIGKILL."""
    d = make_yapd(start=False, env={"NOTIFY_SOCKET": str(notify.path)})
    d.start()
    ready = notify.wait("READY=1")
    with config_on_a_hung_mount(d):
        d.signal(signal.SIGHUP)
        notify.wait("RELOADING=1", after=ready + 1)  # the read comes next, and blocks
        # One reload at a time: another asked for meanwhile follows it (a thread a SIGHUP
        # piled up on the hung mount).
        reply = d.admin(cmd="reload")[-1]
        assert reply["ok"] is False and reply["error"] == "a reload is running; another follows it", reply
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0


@contextlib.contextmanager
def config_on_a_hung_mount(d: Any) -> Iterator[str]:
    """``d``'s config file a FIFO with no writer, as on a hung mount: a read of it blocks
    until someone writes it. Yields the file's text; the file is back afterwards."""
    text = d.config_path.read_text()
    d.config_path.unlink()
    os.mkfifo(d.config_path)
    try:
        yield text
    finally:
        d.config_path.unlink()
        d.config_path.write_text(text)


async def test_a_reload_whose_read_ends_after_the_stop_began_applies_nothing(make_yapd, notify):
    """A slow read (the file on a slow mount) that returned mid-drain applied its keys and
    sent READY=1 after STOPPING=1."""
    d = make_yapd(UNENDING + "chat_max_out = 1500\n", start=False, env={"NOTIFY_SOCKET": str(notify.path)},
                  server={"drain_timeout_s": 5.0})
    d.start()
    ready = notify.wait("READY=1")
    with config_on_a_hung_mount(d) as text:
        async with ws_connect(d.url()) as ws:
            await send(ws, type="start", session_id="s", user_utterance="a long story please")
            while (await recv(ws))["type"] != "token":
                pass
            d.signal(signal.SIGHUP)
            notify.wait("RELOADING=1", after=ready + 1)
            d.signal(signal.SIGTERM)
            stopping = notify.wait("STOPPING=1")
            with open(d.config_path, "w") as fifo:  # the read returns, the drain still on
                fifo.write(text.replace("chat_max_out = 1500", "chat_max_out = 20"))
            d.wait_for("reload ignored: yapd is stopping")
            await until_done(ws, 30)
        assert d.proc.wait(30) == 0
        assert not any("READY=1" in m for m in notify.texts()[stopping:]), notify.texts()
        assert not any("reload applied" in line for line in d.lines)


def test_second_signal_exits_at_once(make_yapd):
    d = make_yapd(server={"drain_timeout_s": 30.0})
    # A client in a turn keeps the drain busy; the second signal must not wait for it.
    with socket.create_connection(("127.0.0.1", d.port)):
        d.signal(signal.SIGTERM)
        d.signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = d.proc.wait(30)
    assert rc in (0, 1) and time.monotonic() - t0 < 10


async def test_reload_rotates_keys_live_and_keeps_connections(make_yapd):
    d = make_yapd()
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))
        d.write_config(server={"api_keys": ["new_key"], "max_connections": 5})
        replies = d.admin(cmd="reload")
        assert replies[-1]["ok"] is True and "server.api_keys" in replies[-1]["applied"]
        # The open connection keeps working.
        check_turn(await run_turn(ws))
        async with ws_connect(d.url()) as old:
            assert (await recv(old))["error_code"] == "authentication_failed"
        async with ws_connect(d.url(key="new_key")) as new:
            check_turn(await run_turn(new))
    st = json.loads(d.http("/status", key="new_key")[1])
    assert st["capacity"]["max"] == 5
    assert not any("new_key" in line for line in d.lines)


async def test_a_reloads_server_keys_reach_the_connections_already_open(make_yapd):
    """server.idle_timeout_s, max_frame_bytes and the rate limit are [live]: a reload that
    tightens them reaches the connections already open (they read the config as it was at
    their start: a long voice session kept the old limits), the idle wait in progress too."""
    d = make_yapd(server={"idle_timeout_s": 600.0, "max_frame_bytes": 65536})
    async with ws_connect(d.url()) as quiet, ws_connect(d.url()) as busy:
        for ws in (quiet, busy):
            await send(ws, type="ping")
            assert (await recv(ws))["type"] == "pong"
        d.write_config(server={"idle_timeout_s": 2.0, "max_frame_bytes": 2048, "rate_limit_per_s": 0.01,
                               "rate_limit_burst": 2})
        reply = d.admin(cmd="reload")[-1]
        assert {"server.idle_timeout_s", "server.max_frame_bytes", "server.rate_limit_per_s",
                "server.rate_limit_burst"} <= set(reply["applied"]), reply
        await busy.send(json.dumps({"type": "ping", "pad": "x" * 5000}))
        assert (await recv(busy))["error_code"] == "message_too_large"
        replies = []
        for _ in range(3):
            await send(busy, type="ping")
            replies.append((await recv(busy)).get("error_code"))
        assert replies == [None, None, "rate_limited"], replies  # the bucket now holds 2
        # The quiet one's wait began under 600 s; it ends 2 s after it began, not 10 min.
        err = await recv(quiet, 30)
        assert err["error_code"] == "idle_timeout" and "no message for 2 s" in err["message"], err
        with pytest.raises(ConnectionClosed):
            await recv(quiet, 10)


async def test_a_reloads_persona_styles_reach_the_sessions_already_open(make_yapd):
    """A reloaded default style reaches the open sessions that never chose one (each
    copied the old default at its connect), and a session whose chosen style the reload
    removed speaks, and is told it speaks, the default (its ack kept naming the removed
    style while the default voice spoke)."""
    d = make_yapd('[personas]\npirate = "You are a pirate. Speak like one."\n')
    async with ws_connect(d.url()) as chose, ws_connect(d.url()) as default:
        assert (await run_turn(chose, persona_style="pirate"))[0]["persona_style"] == "pirate"
        assert (await run_turn(default))[0]["persona_style"] == "wholesome"
        d.write_config('[turn]\ndefault_persona_style = "savage"\n')
        applied = d.admin(cmd="reload")[-1]["applied"]
        assert {"personas", "turn.default_persona_style"} <= set(applied), applied
        for ws in (chose, default):
            ack = (await run_turn(ws))[0]
            assert ack["persona_style"] == "savage", ack
        await send(chose, type="set_persona", assistant_gender="male")
        assert (await recv(chose))["persona_style"] == "savage"


async def test_a_reload_whose_turn_limits_fit_only_the_reloaded_engines_is_refused(make_yapd):
    """turn.chat_max_out applies at the reload, chat.max_model_len at the engine's restart:
    checked against the running one, a reload raising both is refused (accepted, every
    turn failed until a restart), and the running config stays."""
    d = make_yapd()
    d.write_config("[turn]\nchat_max_out = 6000\n[chat]\nmax_model_len = 8192\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "running chat.max_model_len (5760)" in reply["error"], reply
    st = d.admin(cmd="status")[-1]
    assert st["pending_restart_keys"] == [], st
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))


async def test_reload_applies_the_logging_and_admin_keys_it_says_it_applied(make_yapd):
    """What a reload reports as applied is in force: the admin socket's mode, the log
    ring's size, stderr's timestamps; a larger max_frame_bytes than connections read
    (their cap is set at start) is reported as needing a restart and not half-applied."""
    d = make_yapd(server={"max_frame_bytes": 65536})
    assert os.stat(d.admin_socket).st_mode & 0o777 == 0o660
    d.write_config("[admin]\nmode = 0o600\n[logging]\nring_lines = 3\ntimestamps = \"on\"\n",
                   server={"max_frame_bytes": 1 << 20})
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is True and set(reply["applied"]) == {"admin.mode", "logging.ring_lines",
                                                             "logging.timestamps"}, reply
    assert reply["needs_daemon_restart"] == ["server.max_frame_bytes"], reply
    assert os.stat(d.admin_socket).st_mode & 0o777 == 0o600
    logs = d.admin(cmd="logs", n=100)
    assert logs[-1]["count"] == 3, logs[-1]
    line = d.wait_for("reload: these keys need a daemon restart: server.max_frame_bytes")
    assert line[:4].isdigit() and line[4] == "-", line  # 2026-...: a timestamp first
    async with ws_connect(d.url()) as ws:  # the limit in force is still the one connections read
        await send(ws, type="start", session_id="s", user_utterance="x" * 70000)
        assert (await recv(ws))["error_code"] == "message_too_large"
    d.write_config(server={"max_frame_bytes": 32768})  # lower: applied at once
    reply = d.admin(cmd="reload")[-1]
    assert "server.max_frame_bytes" in reply["applied"] and reply["needs_daemon_restart"] == [], reply
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="s", user_utterance="x" * 40000)
        assert (await recv(ws))["error_code"] == "message_too_large"


async def test_reload_bad_file_keeps_running_config(make_yapd):
    d = make_yapd()
    good = d.config_path.read_text()
    d.config_path.write_text(good + "\n[server\nbroken")
    d.signal(signal.SIGHUP)
    d.wait_for("reload failed, keeping the running config")
    d.config_path.write_text(good + "\n[turn]\nchat_max_out = 'lots'\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "turn.chat_max_out: expected an integer" in reply["error"]
    # the EngineCores' settings: out of range, or of the wrong type
    d.config_path.write_text(good + "\n[engines]\ncore_switch_interval_ms = 0.001\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "engines.core_switch_interval_ms: must be 0" in reply["error"], reply
    d.config_path.write_text(good + "\n[engines]\ncore_steady_heap = 'yes'\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "engines.core_steady_heap: expected" in reply["error"], reply
    d.config_path.write_text(good + "\n[engines]\nfork_from_main_thread = 1\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "engines.fork_from_main_thread: expected true or false" in reply["error"], reply
    # a step budget vLLM would refuse minutes later, at the engine's start
    d.config_path.write_text(good + "\n[chat]\nmax_num_batched_tokens = 1024\nenable_chunked_prefill = false\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "chat.max_num_batched_tokens: 1024 is below max_model_len" in reply["error"], reply
    # nested deeper than the TOML parser goes: an error like any other, READY=1 after it
    d.config_path.write_text(good + "\n[turn]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "nested too deeply" in reply["error"], reply
    d.config_path.unlink()
    reply = d.admin(cmd="reload")[-1]
    assert reply["ok"] is False and "no such file" in reply["error"]
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))


def test_both_engines_stop_side_by_side_at_a_restart_and_a_stop(make_yapd):
    """Each engine's stop stretched to 0.5 s: at a restart of both and at SIGTERM the
    second engine's stop begins before the first's ends, in yapd's own log."""
    d = make_yapd(env={"YAPD_DEBUG_ENGINE_STOP_DELAY_S": "0.5"})

    def overlap(why: str) -> None:
        lines = [line for line in d.lines if f"engine stopping{why} role=" in line
                 or f"engine stopped{why} role=" in line]
        kinds = ["stopping" if "stopping" in line else "stopped" for line in lines[-4:]]
        assert kinds == ["stopping", "stopping", "stopped", "stopped"], lines

    assert d.admin(cmd="restart", target="both")[-1]["ok"] is True
    overlap(" for the restart")
    assert d.stop() == 0
    d.wait_for("yapd.daemon: stopped")
    overlap("")
    assert not [line for line in d.lines if "shutdown:" in line], d.lines[-20:]


def test_reload_reports_engine_keys(make_yapd):
    d = make_yapd()
    d.write_config("[chat]\nmax_num_seqs = 8\n[turn]\nchat_max_out = 20\n")
    reply = d.admin(cmd="reload")[-1]
    assert reply["needs_engine_restart"] == ["chat.max_num_seqs"] and "turn.chat_max_out" in reply["applied"]
    st = d.admin(cmd="status")[-1]
    assert st["pending_restart_keys"] == ["chat.max_num_seqs"] and "pending restart" in st["systemd_status"]
    d.wait_for("need an engine restart")
    assert d.admin(cmd="restart", target="both")[-1]["ok"] is True
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == []
    # the EngineCores' own settings take an engine restart too
    d.write_config("[chat]\nmax_num_seqs = 8\n[turn]\nchat_max_out = 20\n"
                   "[engines]\ncore_switch_interval_ms = 0.5\ncore_steady_heap = true\nfork_from_main_thread = true\n")
    reply = d.admin(cmd="reload")[-1]
    assert sorted(reply["needs_engine_restart"]) == ["engines.core_steady_heap", "engines.core_switch_interval_ms",
                                                     "engines.fork_from_main_thread"], reply


def test_a_restart_of_one_engine_applies_its_own_keys_and_keeps_the_rest_pending(make_yapd):
    """Reloaded keys of both engines and of [engines]: a restart of the chat engine applies
    the chat's only; the tool's and the shared ones wait for theirs (both)."""
    d = make_yapd()
    d.write_config("[chat]\nmax_num_seqs = 8\n[tool]\nmax_num_seqs = 4\n[engines]\ncore_steady_heap = true\n")
    reply = d.admin(cmd="reload")[-1]
    assert sorted(reply["needs_engine_restart"]) == ["chat.max_num_seqs", "engines.core_steady_heap",
                                                     "tool.max_num_seqs"], reply
    assert d.admin(cmd="restart", target="chat")[-1]["ok"] is True
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == ["engines.core_steady_heap", "tool.max_num_seqs"]
    assert d.admin(cmd="restart", target="tool")[-1]["ok"] is True
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == ["engines.core_steady_heap"]
    assert d.admin(cmd="restart", target="both")[-1]["ok"] is True
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == []


def _cpu_models(cache_dir: Path) -> str:
    """Both engines on the CPU with the demo models, named as a config names real ones."""
    return f'''
[chat]
backend = "cpu"
model = "{cache_dir / "demo" / "chat"}"
[tool]
backend = "cpu"
model = "{cache_dir / "demo" / "tool"}"
'''


async def test_a_restart_that_fails_on_reloaded_keys_rolls_back_and_keeps_serving(make_yapd, cache_dir):
    """A reloaded model path that does not load: the restart fails with its reason, the
    engine starts again as it ran, the keys stay pending (a corrected file and another
    restart apply them), and the daemon serves on with its watchdog pinging, instead of a
    failed engine that has systemd restart it into the same config in a loop."""
    models = _cpu_models(cache_dir)
    d = make_yapd(models, demo=False)
    d.write_config(models.replace(str(cache_dir / "demo" / "chat"), "/nonexistent/chat"))
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["chat.model"]
    reply = d.admin(cmd="restart", target="chat")[-1]
    assert reply["ok"] is False and reply.get("rolled_back") is True, reply
    assert "/nonexistent/chat" in reply["error"] and "stay pending: chat.model" in reply["error"], reply
    st = d.admin(cmd="status")[-1]
    assert st["pending_restart_keys"] == ["chat.model"] and st["engines"]["chat"]["state"] == "ready", st
    assert d.http("/healthz", key=None)[0] == 200
    async with ws_connect(d.url()) as ws:
        check_turn(await run_turn(ws))
    d.write_config(models)  # corrected: nothing left to apply
    d.admin(cmd="reload")
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == []


def test_a_reload_during_a_failing_restart_is_what_stays_pending(make_yapd, cache_dir):
    """A restart failing on a bad model path, and the file corrected (and reloaded) while
    it runs: after the rollback nothing is pending (the stale bad path was pending again,
    and the next restart loaded it)."""
    models = _cpu_models(cache_dir)
    d = make_yapd(models, demo=False, env={"YAPD_DEBUG_ENGINE_START_DELAY_S": "2"}, start=False)
    d.start(timeout=90)
    d.write_config(models.replace(str(cache_dir / "demo" / "chat"), "/nonexistent/chat"))
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["chat.model"]
    replies: list[dict[str, Any]] = []
    restart = threading.Thread(target=lambda: replies.extend(d.admin(cmd="restart", target="chat")))
    restart.start()
    deadline = time.monotonic() + 30
    while d.admin(cmd="status")[-1]["engines"].get("chat", {}).get("state") == "ready":  # its restart began
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.write_config(models)  # corrected while the restart runs
    d.admin(cmd="reload")
    restart.join(60)
    assert replies[-1]["ok"] is False and replies[-1].get("rolled_back") is True, replies[-1]
    assert d.admin(cmd="status")[-1]["pending_restart_keys"] == []


async def test_a_restart_after_deploy_changed_stops_the_engine_no_longer_deployed(make_yapd):
    both = UNENDING + '[engines]\ndeploy = "both"\n'
    d = make_yapd(both)
    d.write_config(both.replace('deploy = "both"', 'deploy = "chat"'))
    assert d.admin(cmd="reload")[-1]["needs_engine_restart"] == ["engines.deploy"]
    reply = d.admin(cmd="restart", target="both")[-1]
    assert reply["ok"] is True and reply["roles"] == ["chat"] and reply["stopped"] == ["tool"], reply
    assert json.loads(d.http("/healthz", key=None)[1])["engines"] == {"chat": "ready"}
    assert "tool" not in d.admin(cmd="status")[-1]["engines"]
    # The cap's default follows the deploy (chat alone: 24); the gauge said 16 until a reload.
    assert d.admin(cmd="status")[-1]["capacity"]["max"] == 24
    assert "yapd_max_connections 24.0" in d.http("/metrics")[1]
    # An engine not deployed is not restarted, and the reply says so (it said ok)
    reply = d.admin(cmd="restart", target="tool")[-1]
    assert reply["ok"] is False and "tool not deployed (engines.deploy = 'chat')" in reply["error"], reply
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws)
        assert msgs[-1]["type"] == "done" and not any(m["type"] == "toolcall" for m in msgs)
    d.write_config(both)  # and back: the tool engine starts again
    d.admin(cmd="reload")
    reply = d.admin(cmd="restart", target="both")[-1]
    assert reply["ok"] is True and reply["roles"] == ["chat", "tool"] and "stopped" not in reply, reply
    assert json.loads(d.http("/healthz", key=None)[1])["engines"] == {"chat": "ready", "tool": "ready"}


async def test_admin_requests(make_yapd):
    d = make_yapd()
    mode = os.stat(d.admin_socket).st_mode & 0o777
    assert mode == 0o660
    st = d.admin(cmd="status")[-1]
    assert st["ok"] and st["ready"] and st["pid"] == d.proc.pid and st["port"] == d.port
    async with ws_connect(d.url()) as ws:
        msgs = await run_turn(ws, session_id="who")
        check_turn(msgs)
        conns = d.admin(cmd="connections")[-1]["connections"]
        assert len(conns) == 1 and conns[0]["session_id"] == "who" and conns[0]["turns"] == 1
        # The turn's own TTFT (None only when the random demo model said nothing at all).
        ttft = msgs[-1]["timings"]["ttft_ms"]
        assert conns[0]["last_ttft_ms"] == ttft and conns[0]["state"] == "idle"
        assert (ttft is not None) == any(m["type"] == "token" for m in msgs)
        assert conns[0]["remote"].startswith("127.0.0.1:")
    logs = d.admin(cmd="logs", n=5)
    assert logs[-1]["ok"] and 0 < logs[-1]["count"] <= 5 and all(m["event"] == "log" for m in logs[:-1])
    errors_only = d.admin(cmd="logs", n=100, level="error")
    assert all(m["level"] == "error" for m in errors_only[:-1])
    grep = d.admin(cmd="logs", n=100, grep="admin socket listening")
    assert len(grep) == 2 and "admin socket" in grep[0]["message"]
    # Follow: a new line reaches the follower.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(d.admin_socket))
        s.sendall(b'{"cmd": "logs", "n": 0, "follow": true}\n')
        time.sleep(0.2)
        d.admin(cmd="reload")
        f = s.makefile("r")
        line = json.loads(f.readline())
        assert line["event"] == "log" and "reload" in line["message"]
    assert d.admin(cmd="drain")[-1]["draining"] is True
    assert d.http("/healthz", key=None)[0] == 503
    async with ws_connect(d.url()) as ws:
        await send(ws, type="start", session_id="x", user_utterance="hi")
        assert (await recv(ws))["error_code"] == "shutting_down"
    assert d.admin(cmd="drain", on=False)[-1]["draining"] is False
    assert d.http("/healthz", key=None)[0] == 200
    restart = d.admin(cmd="restart", target="tool")
    assert restart[0]["event"] == "progress" and restart[-1]["ok"] and restart[-1]["roles"] == ["tool"]
    awq = d.admin(cmd="awq", action="status")[-1]
    assert awq["ok"] and {m["role"] for m in awq["models"]} == {"chat", "tool"} and awq["job"] is None


@pytest.mark.parametrize("raw,needle", [
    (b"not json\n", "not valid JSON"),
    (b"[1,2]\n", '"cmd"'),
    (b'{"cmd": "explode"}\n', "unknown command"),
    (b'{"cmd": "restart", "target": "gpu"}\n', "chat, tool or both"),
    (b'{"cmd": "logs", "n": -1}\n', '"n"'),
    (b'{"cmd": "logs", "level": "loud"}\n', '"level"'),
    (b'{"cmd": "status", "window_s": "soon"}\n', '"window_s"'),
    (b'{"cmd": "status", "window_s": 0}\n', '"window_s"'),
    (b'{"cmd": "debug", "action": "block_loop"}\n', "unknown command"),
    (b'{"cmd": "logs", "n": 1, "follow": "false"}\n', '"follow" must be true or false'),  # it followed forever
])
def test_admin_bad_requests(shared_yapd, raw, needle):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(shared_yapd.admin_socket))
        s.sendall(raw)
        reply = json.loads(s.makefile("r").readline())
        assert reply["ok"] is False and needle in reply["error"]
        # The same connection still answers.
        s.sendall(b'{"cmd": "ping"}\n')
        assert json.loads(s.makefile("r").readline())["ok"] is True
    assert shared_yapd.http("/healthz", key=None)[0] == 200


def _until(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_follower_or_profile_whose_client_hung_up_ends_at_once(make_yapd):
    """A log follower whose filter matches nothing, and a profile window, end when their
    client closes, not at a write that never comes (each Ctrl-C of `yapctl logs -f --level
    error` on a healthy daemon left a connection, a task and a fed queue behind; an
    abandoned profile refused the next one for its whole window). A client that only shut
    its write side, as `nc -U` does at the end of its input, still follows. A daemon of its
    own: its admin clients are counted (status's admin_clients, the asking one with them)."""
    d = make_yapd()

    def clients() -> int:
        return d.admin(cmd="status")[-1]["admin_clients"] - 1

    assert _until(lambda: clients() == 0)
    followers = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(d.admin_socket))
        s.sendall(b'{"cmd": "logs", "n": 0, "follow": true, "grep": "zzzz-never-logged"}\n')
        followers.append(s)
    assert _until(lambda: clients() == 5)
    for s in followers:
        s.close()
    assert _until(lambda: clients() == 0), clients()  # with no log line written
    with socket.socket(socket.AF_UNIX) as profiler:
        profiler.connect(str(d.admin_socket))
        profiler.sendall(b'{"cmd": "profile", "seconds": 120}\n')
        assert _until(lambda: "already running" in d.admin(cmd="profile", seconds=0.05)[-1].get("error", ""))
    assert _until(lambda: d.admin(cmd="profile", seconds=0.05)[-1]["ok"] is True)
    # Profiles back to back on one connection: the hang-up watcher of one is out of the
    # reader before the next request is read (the second failed: "readuntil() called while
    # another coroutine is already waiting for incoming data")
    with socket.socket(socket.AF_UNIX) as again:
        again.settimeout(20)
        again.connect(str(d.admin_socket))
        replies = again.makefile("r")
        for _ in range(5):
            again.sendall(b'{"cmd": "profile", "seconds": 0.01}\n')
            assert json.loads(replies.readline())["ok"] is True
    with socket.socket(socket.AF_UNIX) as half:
        half.settimeout(20)
        half.connect(str(d.admin_socket))
        half.sendall(b'{"cmd": "logs", "n": 0, "follow": true}\n')
        half.shutdown(socket.SHUT_WR)
        lines = half.makefile("r")
        # The follow is registered once its request is read: reload until a line comes.
        got = threading.Event()

        def reload_until_read() -> None:
            while not got.wait(0.1):
                d.admin(cmd="reload")

        reloading = threading.Thread(target=reload_until_read)
        reloading.start()
        try:
            line = json.loads(lines.readline())
        finally:
            got.set()
            reloading.join()
        assert line["event"] == "log" and "reload" in line["message"], line


def as_nobody(path: Path) -> str:
    """Talk to the admin socket from a forked child running as uid/gid 65534."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, try, report through the pipe, exit at once
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b'{"cmd": "status"}\n')
            out = s.makefile().readline()
        except OSError as exc:
            out = f"OSError: {exc}"
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_admin_refuses_other_uids(make_yapd):
    d = make_yapd()
    # The socket's 0660 mode keeps "nobody" out at connect time...
    assert "Permission denied" in as_nobody(d.admin_socket)
    # ...and with the mode opened up, the SO_PEERCRED check still refuses it.
    os.chmod(d.admin_socket, 0o666)
    for parent in (d.admin_socket.parent, *d.admin_socket.parents):
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    reply = as_nobody(d.admin_socket)
    assert "permission denied" in reply, reply
    d.wait_for("admin connection refused uid=65534")


def test_stale_admin_socket_is_replaced(make_yapd):
    d = make_yapd(start=False)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d.admin_socket))
    stale.close()  # a socket file nobody listens on, as a crash leaves it
    d.start()
    assert d.admin(cmd="ping")[-1]["ok"] is True


def test_bad_config_at_start_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 'x'\n")
    r = subprocess.run([sys.executable, "-m", "yapd", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "server.port: expected an integer" in r.stderr and str(cfg) in r.stderr


def test_tensor_parallel_beyond_the_visible_gpus_is_refused_at_start(make_yapd):
    # No GPU visible (whatever the host has); the check is the same on a one-GPU host.
    config = ('[engines]\ndeploy = "chat"\n[chat]\nbackend = "vllm"\n'
              'model = "mistralai/Mistral-Nemo-Instruct-2407"\ntensor_parallel_size = 2\n')
    d = make_yapd(config, start=False, demo=False, env={"CUDA_VISIBLE_DEVICES": ""})
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(60) == 1
    d.wait_for("chat engine needs 2 GPUs (tensor_parallel_size=2 x data_parallel_size=1); 0 visible")


async def test_engine_fault_mid_stream_other_sessions_continue(make_yapd):
    d = make_yapd(env={"YAPD_DEBUG_ADMIN": "1"})
    async with ws_connect(d.url()) as a, ws_connect(d.url()) as b:
        # The next chat step fails: turn a's, whatever length the random model's reply
        # would have had (a fault set some steps ahead could miss a short reply and hit b).
        d.admin(cmd="debug", action="fail_steps", role="chat", steps=0)
        msgs = await run_turn(a, user_utterance="this one breaks")
        err = next(m for m in msgs if m["type"] == "error")
        assert err["error_code"] == "engine_unavailable" and err["request_id"] == msgs[0]["request_id"]
        assert msgs[-1]["type"] == "done" and msgs[-1]["error"] == "engine_unavailable"
        check_turn(await run_turn(b))
        check_turn(await run_turn(a))
    assert d.http("/healthz", key=None)[0] == 200
    assert KEY


def test_a_wedged_event_loop_shows_in_status_and_metrics(make_yapd):
    """Whatever holds the loop delays every turn's tokens: yapd measures it (a 50 ms
    timer and how late it fires) and shows it in /status and /metrics."""
    d = make_yapd(env={"YAPD_DEBUG_ADMIN": "1"})

    # The timer runs from the daemon's start: the block holds back its next firing.
    d.admin(cmd="debug", action="block_loop", seconds=0.4)
    st = json.loads(d.http("/status")[1])["loop_lag_ms"]
    assert st["max_ms"] >= 350 and st["window_s"] > 0, st
    # Read over a span of its own (a benchmark level's), never more than the window kept.
    for asked, span in ((5, 5.0), (600, 20.0)):
        gcp = d.admin(cmd="status", window_s=asked)[-1]["gc_pauses"]
        assert gcp["window_s"] == span, gcp
    metrics = d.http("/metrics")[1].splitlines()
    late = [line for line in metrics if line.startswith('yapd_event_loop_lag_seconds_bucket{le="0.25"}')]
    count = [line for line in metrics if line.startswith("yapd_event_loop_lag_seconds_count")]
    assert float(late[0].split()[-1]) < float(count[0].split()[-1])  # one sample above 0.25 s


def test_a_long_garbage_collection_shows_in_status_and_metrics(make_yapd):
    """A full collection over a big live heap holds the loop as a wedge does: yapd times
    each collection, shows the long ones in /status and every one in /metrics."""
    d = make_yapd(env={"YAPD_DEBUG_ADMIN": "1"})
    # Held off through the start (yapd/gcpause.py), back on once the engines loaded, with
    # what the start left (torch, transformers, the models) frozen out of its walks.
    ready = json.loads(d.http("/status")[1])["gc_pauses"]
    assert ready["enabled"] is True and ready["frozen"] > 100_000, ready
    # One full collection through the whole start: the one after the engines loaded (with
    # collection on, loading the demo models ran seven).
    assert ready["collections"]["2"] == 1, ready
    held = d.admin(cmd="debug", action="gc_heap", objects=300_000)[-1]
    assert held["collect_ms"] > 0.5, held
    st = json.loads(d.http("/status")[1])["gc_pauses"]
    assert st["long"] >= 1 and st["max_generation"] == 2 and st["max_ms"] >= held["collect_ms"] * 0.9, st
    assert int(st["collections"]["2"]) >= 1 and st["ms"]["2"] >= st["max_ms"]
    metrics = d.http("/metrics")[1].splitlines()
    count = [line for line in metrics if line.startswith('yapd_gc_pause_seconds_count{generation="2"}')]
    assert count and float(count[0].split()[-1]) >= 1, count
    out = subprocess.run([sys.executable, "-m", "yapctl", "--socket", str(d.admin_socket), "status"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert any(line.startswith("garbage collection held it ") and "(generation 2;" in line
               for line in out.splitlines()), out


def test_stopping_with_admin_clients_connected_logs_no_error(make_yapd):
    """A logs follower (what the TUI keeps open) and a running profile when yapd stops:
    their connections end, yapd exits 0, and its log has no error (before Python 3.12
    asyncio's stream server logged a handler ended by the stop as an error, traceback
    and all)."""
    d = make_yapd()
    with socket.socket(socket.AF_UNIX) as follower, socket.socket(socket.AF_UNIX) as profiler:
        for s, req in ((follower, b'{"cmd": "logs", "n": 0, "follow": true}\n'),
                       (profiler, b'{"cmd": "profile", "seconds": 60}\n')):
            s.settimeout(30)
            s.connect(str(d.admin_socket))
            s.sendall(req)
        d.admin(cmd="reload")  # a line the follower gets: its follow is registered
        assert "reload" in json.loads(follower.makefile("r").readline())["message"]
        assert d.stop() == 0
        assert profiler.recv(1) == b""  # closed, with no reply to the cut-off profile
    errors = [line for line in d.lines if " error " in line or "Traceback" in line]
    assert not errors, errors


# One vLLM chat engine, a stand-in of tests/loading_core.py.
STAND_IN_CHAT = '''
[engines]
deploy = "chat"
mps = "off"
[chat]
backend = "vllm"
model = "stand-in/chat"
'''


def loading_yapd(make_yapd: Any, config: str, **env: str) -> Any:
    """yapd with tests/loading_core.py's stand-in vLLM engines (``env``: its knobs),
    started without waiting for READY: its engines never finish loading."""
    d = make_yapd(config, start=False, demo=False,
                  env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), **env})
    d.entry = [sys.executable, "-m", "tests.loading_core"]
    d.start(wait=False)
    return d


# Both forked, the default (the chat's forked, the tool's spawned), both spawned.
@pytest.mark.parametrize("method,tool_method", [("fork", ""), ("fork", "spawn"), ("spawn", "")])
def test_a_stop_while_vllm_engines_load_ends_their_enginecores(make_yapd, method, tool_method):
    """SIGTERM while two vLLM engines load (stand-ins: tests/loading_core.py, whose
    EngineCores "load" for ten minutes): yapd finds both EngineCores, by their title when
    forked, by multiprocessing's command line when spawned and not yet titled, and ends
    them with SIGTERM; the starts fail, and yapd exits 0. Without yapd's at-fork signal
    reset a forked core ignored that SIGTERM (ended by the SIGKILL 5 s later) and, before
    Python 3.12, passed it on to yapd's loop as a second SIGTERM: exit 1 at once."""
    d = loading_yapd(make_yapd, f'''
[engines]
deploy = "both"
mps = "off"
start_method = "{method}"
[chat]
backend = "vllm"
model = "stand-in/chat"
[tool]
backend = "vllm"
model = "stand-in/tool"
start_method = "{tool_method}"
''')
    d.wait_for("stand-in: Initializing a V1 LLM engine", timeout=120, count=2)
    cores = [int(line.split("pid=")[1].split(")")[0]) for line in d.lines if "stand-in: Initializing" in line]
    with EngineCores() as watched:
        watched.watch(*cores)
        d.signal(signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
        watched.assert_gone()
    for pid in cores:
        d.wait_for(f"stopping while engines load: ending their EngineCore pid={pid}", timeout=5)
    # Ended by that SIGTERM (exit code -15), not by the SIGKILL that follows 5 s later.
    d.wait_for("stopped while starting:", timeout=5)
    assert "ended while loading (exit code -15)" in "\n".join(d.lines), "\n".join(d.lines[-20:])


def test_a_stop_before_the_enginecore_exists_ends_the_start_after_its_step(make_yapd, tmp_path):
    """SIGTERM while a vLLM start is still in yapd's own thread (importing vLLM, building
    its config: steps nothing can cut short, 20-30 s from source on the H200): the start
    ends after the step it is in, and no EngineCore is ever started. Without that, yapd
    waited for vLLM to start the core before it could end it. The stand-in's config step
    holds until the test opens a FIFO."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    d = loading_yapd(make_yapd, STAND_IN_CHAT, LOADING_CORE_GATE=str(gate))
    d.wait_for("stand-in: chat config step", timeout=120)
    d.signal(signal.SIGTERM)
    d.wait_for("stopping while engines load: each start ends after the step it is in", timeout=10)
    with open(gate, "wb"):
        pass  # the step ends
    assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
    d.wait_for("stopped while starting: chat engine start abandoned after the config step", timeout=5)
    assert not any("stand-in: Initializing" in line for line in d.lines), "\n".join(d.lines[-20:])


def test_a_stop_while_vllm_inspects_the_model_ends_the_inspection(make_yapd):
    """SIGTERM while vLLM's config inspects the model class in a fresh interpreter (on a
    miss of its cache: 20 s from source on the H200, before any EngineCore): yapd ends
    that process too, the start fails at once as abandoned, and yapd exits 0 with no core
    started. Without it yapd waited out the inspection (here: ten minutes)."""
    d = loading_yapd(make_yapd, STAND_IN_CHAT, LOADING_CORE_INSPECT="1")
    pid = int(d.wait_for("stand-in: chat model inspection pid=", timeout=120).rsplit("=", 1)[1])
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(60) == 0, "\n".join(d.lines[-20:])
    d.wait_for(f"stopping while engines load: ending their model inspection pid={pid}", timeout=5)
    d.wait_for("stopped while starting: chat engine start abandoned: the daemon is stopping "
               "(Error raised in subprocess: exit code -15)", timeout=5)
    assert not any("stand-in: Initializing" in line for line in d.lines), "\n".join(d.lines[-20:])


def test_a_stop_between_two_engine_loads_begins_no_second_one(make_yapd, notify):
    """Engines loading one after the other: a SIGTERM during the first load lets it end
    (a CPU engine's load cannot be cut short) but begins no second one; exit 0."""
    d = make_yapd("[engines]\nstart_in_parallel = false\n", start=False,
                  env={"NOTIFY_SOCKET": str(notify.path), "YAPD_DEBUG_ENGINE_START_DELAY_S": "1.5"})
    d.start(wait=False)
    notify.wait("STATUS=loading chat engine")
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(60) == 0
    d.wait_for("stopped while starting: stopping before the tool engine loaded", timeout=5)
    assert not any("loading tool engine" in m for m in notify.texts())
    assert not any("engine started role=tool" in line for line in d.lines)
