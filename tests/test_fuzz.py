"""Fuzzing with hypothesis: the protocol parser (many inputs, no socket), every client
message type against a live daemon and its admin socket (fewer, to keep the suite fast),
and the config loader with random TOML and environment overrides.

The strategies and checks are yapctl.fuzz's, which also runs them for as long as one
likes (``python -m yapctl.fuzz``); the ``@example``s are inputs that once broke yapd.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import run_turn, ws_connect
from tests.test_protocol_e2e import check_turn
from yapctl import fuzz
from yapd import config, protocol, unseen

# No example database: the suite leaves nothing behind in the checkout.
FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])

# What an id may hold: any character but half of one and those of yapd.unseen.
ID_CHARS = st.characters(exclude_categories=("Cs",)).filter(lambda c: not unseen.ANY.match(c))
HUGE_INT = "7" * 5000  # past Python's 4300-digit limit for int(): json.loads raises ValueError


# --- the parser ---------------------------------------------------------------------


@settings(FAST, max_examples=2500)
@given(fuzz.client_frames())
@example('{"type":"cancel","request_id":' + HUGE_INT + "}")
@example('{"type":"ping","x":' + HUGE_INT + "}")
@example("[" * 100_000)
@example('{"type": "start", "session_id": "s", "user_utterance": "x", "request_id": 12}')
def test_parser_accepts_or_refuses_clearly(frame: str) -> None:
    fuzz.check_parse(frame)


@settings(FAST, max_examples=500)
@given(session_id=st.text(ID_CHARS, min_size=1, max_size=protocol.MAX_ID_CHARS).filter(str.strip),
       utterance=st.text(min_size=1).filter(str.strip), history=st.none() | st.text(),
       request_id=st.none() | st.integers(0, 10**30) | st.text(ID_CHARS, max_size=protocol.MAX_ID_CHARS),
       gender=st.sampled_from(sorted(protocol.GENDER_ALIASES)))
def test_parser_keeps_valid_start_fields(session_id: str, utterance: str, history: str | None,
                                         request_id: int | str | None, gender: str) -> None:
    frame = json.dumps({"type": "start", "session_id": session_id, "user_utterance": utterance,
                        "history_text": history, "request_id": request_id, "assistant_gender": gender})
    msg = protocol.parse_client_message(frame)
    assert isinstance(msg, protocol.Start)
    assert (msg.session_id, msg.user_utterance, msg.history_text) == (session_id, utterance, history)
    assert msg.request_id == (None if request_id is None else str(request_id))
    assert msg.persona.assistant_gender == protocol.GENDER_ALIASES[gender]


def test_huge_integer_is_invalid_json_not_a_crash() -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_client_message('{"type":"ping","n":' + HUGE_INT + "}")
    assert info.value.code == protocol.INVALID_JSON and len(info.value.message) < 300


# --- a live daemon --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(fuzz.MESSAGE_FIELDS))
def test_live_daemon_fuzz_each_message_type(shared_yapd, kind: str) -> None:
    with fuzz.LiveClient(shared_yapd.url()) as client:

        @settings(FAST, max_examples=40)
        @given(fuzz.client_frames(kinds=(kind,)))
        def one(frame: str) -> None:
            client.check(frame)

        one()
        assert client.tried >= 40
    bad = [ln for ln in shared_yapd.lines if "Traceback" in ln or "internal error" in ln or " error " in ln]
    assert not bad, bad[:3]


async def test_live_daemon_serves_after_fuzz(shared_yapd) -> None:
    async with ws_connect(shared_yapd.url()) as ws:
        await ws.send('{"type":"ping","n":' + HUGE_INT + "}")
        err = json.loads(await ws.recv())
        assert err["error_code"] == "invalid_json"
        check_turn(await run_turn(ws))
    assert shared_yapd.http("/healthz", key=None)[0] == 200


# --- the admin socket -----------------------------------------------------------------


def test_admin_socket_fuzz(shared_yapd) -> None:
    with fuzz.AdminClient(shared_yapd.admin_socket) as client:

        @settings(FAST, max_examples=250)
        @given(fuzz.admin_requests())
        @example(b'{"cmd": "logs", "level": {}}\n')  # an unhashable level once dropped the connection
        @example(b'{"cmd": "ping", "x": ' + HUGE_INT.encode() + b"}\n")
        @example(b"[" * 60_000 + b"\n")
        @example(b"\n")
        @example(b"\xff\xfe\n")
        def one(line: bytes) -> None:
            client.check(line)

        one()
        assert client.tried >= 250
    # Refused or not, nothing changed the daemon for good.
    st_ = shared_yapd.admin(cmd="status")[-1]
    assert st_["ok"] and st_["ready"] and not st_["draining"]
    bad = [i for i, ln in enumerate(shared_yapd.lines) if "admin client failed" in ln or "Traceback" in ln]
    assert not bad, "\n".join(shared_yapd.lines[bad[0]:bad[0] + 30])  # the traceback itself, not its first line


def test_admin_oversize_request_is_refused_clearly(shared_yapd) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(shared_yapd.admin_socket))
        s.sendall(b'{"cmd": "' + b"x" * (70 * 1024) + b'"}\n')
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and "longer than" in reply["error"]


# --- the config loader ------------------------------------------------------------------


@settings(FAST, max_examples=600)
@given(fuzz.config_files())
@example(b"[server]\nport = " + b"9" * 4400 + b"\n")
@example(b"[server]\nidle_timeout_s = nan\n")
@example(b"[server]\nsend_timeout_s = inf\n")
@example(b"[server]\nrate_limit_per_s = " + b"9" * 400 + b"\n")
@example(b"[server]\nwrite_buffer_bytes = -1\n")
@example(b"[admin]\nmode = 99999999\n")
@example(b"[logging]\nring_lines = -1\n")
@example(b"[turn]\nrepetition_penalty = 0\n")
@example(b"[[tools]]\nname = 'a'\n[[tools]]\nname = 'a'\n")
def test_config_loader_random_toml(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fuzz.check_config(content, Path(tmp) / "config.toml")


@pytest.mark.parametrize("text,needle", [
    (b"[server]\nidle_timeout_s = nan\n", "server.idle_timeout_s: expected a finite number"),
    (b"[turn]\ntemperature = inf\n", "turn.temperature: expected a finite number"),
    (b"[server]\nport = " + b"9" * 4400 + b"\n", "invalid TOML"),
    (b"[server]\nwrite_buffer_bytes = 10\n", "server.write_buffer_bytes"),
    (b"[admin]\nmode = 4096\n", "admin.mode"),
    (b"[logging]\nring_lines = 0\n", "ring_lines"),
    # vLLM's own range: a config it would refuse on every turn is refused at load
    (b"[turn]\ntemperature = 2.5\n", "turn.temperature must be in [0, 2]"),
])
def test_config_rejections_name_file_and_key(tmp_path: Path, text: bytes, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path, env={})
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_a_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="is a directory, not a config file"):
        config.load(tmp_path, env={})


@settings(FAST, max_examples=400)
@given(fuzz.env_overrides())
@example({"CHAT_GPU_FRAC": "nan"})
@example({"STREAM_FLUSH_MS": "inf"})
@example({"YAP_PORT": "9" * 5000})
def test_config_env_overrides_fuzz(env: dict[str, str]) -> None:
    fuzz.check_env(env)
