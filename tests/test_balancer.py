"""packaging/haproxy/yapd.cfg in front of two real demo daemons: the config checks,
a session_id always reaches the same replica, sessions spread over both, and a draining
replica stops getting new sessions. Skipped where haproxy is not installed (CI installs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from string import Template

import pytest

from tests.conftest import KEY, Yapd, recv, send, ws_connect

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _render(a: Yapd, b: Yapd, port: int, out: Path) -> Path:
    text = Template((ROOT / "packaging/haproxy/yapd.cfg").read_text()).substitute(
        BIND=f"127.0.0.1:{port}", SERVER_A=f"127.0.0.1:{a.port}", SERVER_B=f"127.0.0.1:{b.port}")
    path = out / "haproxy.cfg"
    path.write_text(text)
    return path


def _pid_for(port: int, session: str) -> int | None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/status?session_id={session}",
                                 headers={"X-API-Key": KEY})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.loads(r.read())["instance"].rsplit(":", 1)[1])
    except OSError:
        return None


def _until(cond, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)


@pytest.fixture
def balanced(make_yapd, tmp_path: Path):  # type: ignore[no-untyped-def]
    a, b = make_yapd(), make_yapd()
    port = _free_port()
    cfg = _render(a, b, port, tmp_path)
    assert HAPROXY is not None
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Both replicas up (rise 2): every session id answered by one of the two.
        _until(lambda: len({_pid_for(port, f"s{i}") for i in range(16)} - {None}) == 2)
        yield a, b, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_config_checks_and_affinity_spreads_sessions(balanced) -> None:  # type: ignore[no-untyped-def]
    a, b, port = balanced
    pids = {a.proc.pid, b.proc.pid}
    owner = {f"user-{i}": _pid_for(port, f"user-{i}") for i in range(24)}
    assert set(owner.values()) == pids  # consistent hashing still spreads the sessions
    for _ in range(3):
        for sid, pid in owner.items():
            assert _pid_for(port, sid) == pid  # and each session sticks to its replica


async def test_websocket_turn_through_the_balancer(balanced) -> None:  # type: ignore[no-untyped-def]
    _, _, port = balanced
    async with ws_connect(f"ws://127.0.0.1:{port}/ws?session_id=abc&api_key={KEY}") as ws:
        await send(ws, type="start", session_id="abc", user_utterance="hi")
        types = []
        while not types or types[-1] != "done":
            types.append((await recv(ws))["type"])
        assert types[0] == "ack" and "final" in types


def test_draining_replica_stops_getting_new_sessions(balanced) -> None:  # type: ignore[no-untyped-def]
    a, b, port = balanced
    owned_by_a = [f"user-{i}" for i in range(24) if _pid_for(port, f"user-{i}") == a.proc.pid]
    assert owned_by_a
    assert a.admin(cmd="drain", on=True)[-1]["ok"] is True
    # fall 2 x inter 1 s: a's sessions move to b.
    _until(lambda: all(_pid_for(port, sid) == b.proc.pid for sid in owned_by_a))
    assert a.admin(cmd="drain", on=False)[-1]["ok"] is True
    _until(lambda: all(_pid_for(port, sid) == a.proc.pid for sid in owned_by_a))
