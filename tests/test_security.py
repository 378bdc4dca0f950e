"""Security against a real yapd: auth on every route but /healthz (the table in
docs/security.md is read and checked), keys kept out of logs, /status, /metrics, the
admin socket and error messages, the Origin allow-list, the per-key session cap, and
the input limits."""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request

from tests.conftest import KEY, ROOT, Yapd, recv, run_turn, send, ws_connect
from tests.test_protocol_e2e import check_turn
from yapd.config import Config
from yapd.runtime import Runtime

# websockets 17 parses every method (its Request has one); earlier versions GET alone
PARSES_METHODS = "method" in {f.name for f in dataclasses.fields(Request)}
KEY2 = "second-key-4f1c9e"
WRONG = "wrong-key-7d2b8a"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def sec_yapd(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    d = Yapd(tmp_path_factory.mktemp("security"), cache_dir,
             "[turn]\nuser_utt_max_tokens = 16\nhistory_max_tokens = 64\nhistory_trim_step = 16\n",
             server={"api_keys": [KEY, KEY2], "allowed_origins": [ORIGIN], "max_connections_per_key": 2,
                     "max_frame_bytes": 8192})
    d.start()
    yield d
    d.stop()


def http(d: Yapd, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def route_table() -> list[tuple[str, str, str]]:
    """(route, method, auth) rows of the table in docs/security.md."""
    text = (ROOT / "docs" / "security.md").read_text()
    section = text.split("## Routes and authentication", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (cells[0].startswith("`") or cells[0] == "any other path"):
            rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_docs_route_table_lists_every_route() -> None:
    routes = {r for r, _, _ in route_table()}
    assert routes == {"/healthz", "/status", "/metrics", "/ws", "/", "any other path"}


@pytest.mark.parametrize("route,method,auth", route_table())
async def test_route_auth_matches_docs(sec_yapd, route: str, method: str, auth: str) -> None:
    d = sec_yapd
    if route == "any other path":
        route = "/admin/../etc/passwd"
    no_key = [{}, {"X-API-Key": WRONG}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": ""}]
    good = [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY2}"}]
    if method == "WebSocket":
        assert auth == "required"
        for headers in no_key:
            async with ws_connect(f"ws://127.0.0.1:{d.port}{route}", additional_headers=headers) as ws:
                err = await recv(ws)
                assert err["error_code"] == "authentication_failed" and WRONG not in err["message"]
                with pytest.raises(ConnectionClosed) as info:
                    await recv(ws)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        for url in (f"ws://127.0.0.1:{d.port}{route}?api_key={KEY}",):
            async with ws_connect(url) as ws:
                await send(ws, type="ping")
                assert (await recv(ws))["type"] == "pong"
        return
    if auth == "none":
        assert all(http(d, route, h)[0] == 200 for h in no_key)
        return
    assert auth == "required"
    for headers in no_key:
        code, body = http(d, route, headers)
        assert code == 401 and json.loads(body)["error_code"] == "authentication_failed", (route, headers)
        assert WRONG not in body
    for headers in good:
        assert http(d, route, headers)[0] == (404 if route.startswith("/admin") else 200)
    assert http(d, f"{route}?api_key={KEY}")[0] in (200, 404)


def test_key_comparison_is_constant_time_over_every_key(monkeypatch) -> None:
    rt = Runtime(Config())
    rt.cfg.server.api_keys = ["alpha-key", "beta-key", "gamma-key"]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for given, want in (("alpha-key", "alpha-key"), ("gamma-key", "gamma-key"), ("nope", None), ("", None),
                        (None, None), ("alpha-key\0", None)):
        calls.clear()
        assert rt.check_key(given) == want
        # Every configured key is compared, whichever matched (or none): no early exit.
        assert len(calls) == (3 if given else 0)


async def test_keys_absent_from_logs_status_metrics_admin_and_errors(sec_yapd) -> None:
    d = sec_yapd
    # Exercise the paths that could leak: good and bad keys in query and headers, errors,
    # a turn, a refused Origin, an oversized frame.
    async with ws_connect(d.url(key=WRONG)) as ws:
        assert WRONG not in json.dumps(await recv(ws))
    async with ws_connect(d.url(key=KEY2)) as ws:
        check_turn(await run_turn(ws, session_id="leak", user_utterance=f"my key is not {KEY}"))
        await ws.send('{"type": "start", "api_key": "' + KEY2 + '"}')
        err = await recv(ws)
        assert err["error_code"] == "invalid_message" and KEY2 not in err["message"]
    with pytest.raises(InvalidStatus):
        async with ws_connect(d.url(key=KEY), origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    bodies = [http(d, "/status", {"X-API-Key": KEY})[1], http(d, "/metrics", {"X-API-Key": KEY})[1],
              http(d, "/healthz")[1], http(d, f"/nope?api_key={KEY}")[1]]
    for cmd in ("status", "connections", "stats"):
        bodies.append(json.dumps(d.admin(cmd=cmd)))
    bodies.append(json.dumps(d.admin(cmd="logs", n=5000)))
    for text in [*bodies, *d.lines]:
        for secret in (KEY, KEY2, WRONG):
            assert secret not in text, (secret, text[:300])


async def test_origin_allow_list(sec_yapd) -> None:
    d = sec_yapd
    # A listed Origin, and none at all (non-browser clients), are served; scheme and host
    # are not case sensitive.
    for origin in (ORIGIN, None, ORIGIN.upper()):
        async with ws_connect(d.url(), origin=origin) as ws:  # type: ignore[arg-type]
            await send(ws, type="ping")
            assert (await recv(ws))["type"] == "pong"
    # Any other Origin is refused before the upgrade, on every route but /healthz.
    for origin in ("https://evil.example", "null", ORIGIN + ".evil", ORIGIN + ":8443", "http://app.example"):
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(d.url(), origin=origin):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        assert b"origin_not_allowed" in info.value.response.body
        code, body = http(d, "/status", {"X-API-Key": KEY, "Origin": origin})
        assert code == 403 and json.loads(body)["error_code"] == "origin_not_allowed"
        assert http(d, "/healthz", {"Origin": origin})[0] == 200


def _raw_http(d: Yapd, request: bytes) -> bytes:
    """One HTTP request as bytes on a fresh connection; the whole answer."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


async def test_repeated_auth_or_origin_headers_are_refused_plainly(sec_yapd) -> None:
    """Two keys are no one's key, two Origins vouch for neither: refused with the usual
    answers (websockets' get() raised on them: HTTP 500 with a traceback in the log at
    ERROR level for each request, a 1011 on /ws)."""
    d = sec_yapd
    before = len(d.lines)
    for headers in (f"X-API-Key: {KEY}\r\nX-API-Key: {KEY}\r\n", f"Authorization: Bearer {KEY}\r\n" * 2):
        # ... also beside a valid query key: a header given is the key, never the query's instead
        for query in ("", f"?api_key={KEY}"):
            answer = _raw_http(d, f"GET /status{query} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 401") and b"authentication_failed" in answer, answer[:200]
    answer = _raw_http(d, f"GET /status HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nOrigin: {ORIGIN}\r\n"
                          f"Origin: https://evil.example\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"origin_not_allowed" in answer, answer[:200]
    async with ws_connect(d.url(key=None), additional_headers=[("X-API-Key", KEY), ("X-API-Key", KEY)]) as ws:
        assert (await recv(ws))["error_code"] == "authentication_failed"  # then closed 1008, as any bad key
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert not [line for line in d.lines[before:] if "Traceback" in line or "handler failed" in line
                or "process_request failed" in line]


async def test_only_get_is_served(sec_yapd) -> None:
    """Every route is read-only: POST, OPTIONS (and HEAD on the WebSocket paths) get 405
    with Allow: GET, HEAD, not the route's answer. HEAD is a GET without its body (a load
    balancer's health check). (A request with a body websockets drops before yapd sees it.)"""
    d = sec_yapd
    for method, path, extra in (("POST", b"/status", b"Content-Length: 0\r\n"), ("OPTIONS", b"/healthz", b""),
                                ("HEAD", b"/ws", b"")):
        answer = _raw_http(d, method.encode() + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        if not PARSES_METHODS:  # websockets before 17 refuses them itself, before yapd sees them
            assert not answer.startswith(b"HTTP/1.1 2"), (method, answer[:200])
            continue
        allow = b"Allow: GET\r\n" if path == b"/ws" else b"Allow: GET, HEAD\r\n"  # no HEAD where it is refused
        assert answer.startswith(b"HTTP/1.1 405") and allow in answer, (method, answer[:200])
    if not PARSES_METHODS:
        return
    head = _raw_http(d, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = http(d, "/healthz")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head  # no body after the headers
    assert f"Content-Length: {len(got[1].encode())}".encode() in head and got[0] == 200
    head = _raw_http(d, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head  # as GET: a key is needed
    # A path as sent, "//status" too (read as a host and an empty path, it was "no route ")
    answer = _raw_http(d, f"GET //status?api_key={KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404") and b"no route //status" in answer, answer[:300]


async def test_origin_allow_list_reloads_live(make_yapd) -> None:
    d = make_yapd()
    async with ws_connect(d.url(), origin="https://a.example"):  # type: ignore[arg-type]
        pass  # empty list: every Origin
    d.write_config(server={"allowed_origins": ["https://b.example"]})
    assert "server.allowed_origins" in d.admin(cmd="reload")[-1]["applied"]
    with pytest.raises(InvalidStatus):
        async with ws_connect(d.url(), origin="https://a.example"):  # type: ignore[arg-type]
            pass
    async with ws_connect(d.url(), origin="https://b.example"):  # type: ignore[arg-type]
        pass


async def test_sessions_per_key_cap(sec_yapd) -> None:
    d = sec_yapd
    async with ws_connect(d.url(key=KEY)) as a, ws_connect(d.url(key=KEY)) as b:
        for ws in (a, b):
            await send(ws, type="ping")
            assert (await recv(ws))["type"] == "pong"
        async with ws_connect(d.url(key=KEY)) as c:
            err = await recv(c)
            assert err["error_code"] == "server_at_capacity" and "this API key has 2 connections" in err["message"]
            # the key's own capacity, not the server's (which had room: "available" misled)
            assert err["capacity"] == {"active": 2, "max": 2, "available": 0, "at_capacity": True, "per_key": True}
            with pytest.raises(ConnectionClosed) as info:
                await recv(c)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        # The cap is per key: another key still gets in.
        async with ws_connect(d.url(key=KEY2)) as other:
            await send(other, type="ping")
            assert (await recv(other))["type"] == "pong"


def raw_websocket(port: int, receive_buffer: int = 0) -> socket.socket:
    """A WebSocket connection to yapd on a bare socket, upgraded: frames written by hand
    (a client misbehaving as no library lets one)."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /ws?api_key={KEY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_a_client_that_sends_pings_and_never_reads_is_cut_off(make_yapd) -> None:
    """websockets answers each ping with a pong written at once, past write_buffer_bytes:
    a client that sent pings and never read grew the daemon by 3.5 GB in a minute (until
    its idle timeout). Cut off once its unsent answers pass the limit and the slack."""
    d = make_yapd(server={"write_buffer_bytes": 4096})
    flood = raw_websocket(d.port, receive_buffer=4096)
    ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # masked, as a client's must be
    sent = 0
    with pytest.raises(OSError):  # reset by the daemon: the kernel's buffers and the slack, a few MB
        while sent < 256 << 20:
            flood.sendall(ping * 512)
            sent += len(ping) * 512
    flood.close()
    d.wait_for("control frames answered and never read")  # its log line read off the daemon's stderr
    status = json.loads(d.http("/status")[1])
    assert status["capacity"]["active"] == 0, status["capacity"]


def test_a_client_that_closes_and_keeps_its_tcp_side_open_frees_its_slot(make_yapd) -> None:
    """The close handshake done, the client's TCP side left open: websockets enforces its
    close timeout (5 s here) only on its next send, and the session held its capacity slot
    until the keepalive ping (20 s). Aborted once the close timeout is up."""
    d = make_yapd()
    lingering = raw_websocket(d.port)
    try:
        lingering.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))  # close, masked
        assert lingering.recv(4096).startswith(b"\x88")  # the daemon's close answer
        assert lingering.recv(4096) == b""  # and its end of the stream; ours stays open
        # Gone by the close timeout (5 s), well before the keepalive ping's 20 s.
        for _ in range(120):
            if json.loads(d.http("/status")[1])["capacity"]["active"] == 0:
                break
            time.sleep(0.1)
        assert json.loads(d.http("/status")[1])["capacity"]["active"] == 0
    finally:
        lingering.close()


async def test_frame_utterance_history_and_field_limits(sec_yapd) -> None:
    d = sec_yapd
    async with ws_connect(d.url()) as ws:
        # Over max_frame_bytes (8192): refused, the connection stays.
        await send(ws, type="start", session_id="s", user_utterance="x" * 9000)
        err = await recv(ws)
        assert err["error_code"] == "message_too_large" and "8192" in err["message"]
        # Multi-byte text: the limit is in bytes, not characters.
        await send(ws, type="start", session_id="s", user_utterance="é" * 4500)
        assert (await recv(ws))["error_code"] == "message_too_large"
        # Inside the frame limit, long utterance and history are trimmed (16 / 64 tokens).
        words = " ".join(f"w{i}" for i in range(700))
        msgs = await run_turn(ws, user_utterance=words, history_text=words)
        check_turn(msgs)
        base = (await run_turn(ws, user_utterance="w1", history_text="w2"))[-1]["usage"]["prompt_tokens"]
        assert msgs[-1]["usage"]["prompt_tokens"] <= base + 16 + 64 + 8, (msgs[-1]["usage"], base)
        # Ids reach operators' terminals (yapctl's tables, the log): no escape sequences.
        for bad in ("esc\x1b]0;title\x07", "bidi\u202etxt.exe", "nul\x00", "two\nlines"):
            await send(ws, type="start", session_id=bad, user_utterance="hi")
            err = await recv(ws)
            assert err["error_code"] == "invalid_message" and "control characters" in err["message"], err
        # Ordinary text is no control: a ZWJ emoji, Persian's ZWNJ, a no-break space.
        family, persian = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645"
        for good in (family, persian, "a\u00a0b"):
            check_turn(await run_turn(ws, session_id=good, request_id=good))
        await send(ws, type="cancel", request_id="r\x1b[31m")
        assert (await recv(ws))["error_code"] == "invalid_message"
        # Ids are bounded.
        await send(ws, type="start", session_id="s" * 257, user_utterance="hi")
        err = await recv(ws)
        assert err["error_code"] == "invalid_message" and "session_id" in err["message"]
        await send(ws, type="ping")
        assert (await recv(ws))["type"] == "pong"


def test_ruff_security_rules_are_on() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    select = re.search(r"\[tool\.ruff\.lint\]\s*select\s*=\s*\[([^\]]*)\]", text)
    assert select is not None and '"S"' in select.group(1)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="runs yapctl as other users: needs root and setpriv")
def test_the_admin_group_reaches_the_socket_and_no_one_else_does(make_yapd):
    """[admin] group: its members get through the socket's directory (0750, made the
    group's) and the peer check; a user outside it is refused, in so many words."""
    import grp
    import subprocess
    import sys
    import tempfile

    users = grp.getgrnam("users").gr_gid
    top = Path(tempfile.mkdtemp(prefix="yapd-admin-", dir="/tmp"))  # pytest's own tmp is 0700
    try:
        top.chmod(0o755)
        d = make_yapd("[admin]\ngroup = \"users\"\n", start=False)
        d.admin_socket = top / "run" / "admin.sock"  # yapd makes the directory
        d.start()
        folder = d.admin_socket.parent.stat()
        assert folder.st_mode & 0o777 == 0o750 and folder.st_gid == users
        assert d.admin_socket.stat().st_gid == users

        def yapctl_as(gid: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", sys.executable,
                                   "-m", "yapctl", "--socket", str(d.admin_socket), "status", "--json"],
                                  capture_output=True, text=True, timeout=60, cwd=str(ROOT))

        member = yapctl_as(users)
        assert member.returncode == 0 and json.loads(member.stdout)["pid"] == d.pid, member.stderr
        outsider = yapctl_as(65534)
        assert outsider.returncode == 4 and "add yourself to group users" in outsider.stderr, outsider
    finally:
        shutil.rmtree(top, ignore_errors=True)
