"""Fuzzing yapd's inputs: the protocol parser, a live daemon's WebSocket and admin
socket, and the config loader. Loopback only; bounded in examples and time.

    python -m yapctl.fuzz                                    # every target, its own demo daemon
    python -m yapctl.fuzz --target parser --examples 200000 --duration 600
    python -m yapctl.fuzz --target live --url ws://127.0.0.1:8000/ws --key K --admin-socket PATH

The strategies and the per-input checks live here so that the test suite
(tests/test_fuzz.py) runs the same ones with a small example count. A "crash" is any
input on which a check fails: an exception other than the component's own clear error,
a reply that is not the protocol's, a connection dropped where it should stay, an
internal_error, or a traceback in the daemon's log. Needs hypothesis (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import socket
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the dev extra is not installed
    sys.exit("yapctl.fuzz needs hypothesis: pip install 'yap[dev]'")

from yapd import config, protocol, unseen

# --- strategies: the WebSocket protocol -------------------------------------------

# Text without lone surrogates: those cannot be sent as UTF-8 at all, so a client cannot
# produce them (the websockets client would refuse before the daemon sees anything).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | TEXT)
JSON = st.recursive(LEAVES, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                    max_leaves=12)

PERSONA_FIELDS = ("persona_text", "persona_style", "assistant_gender", "user_identity")
MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("session_id", "user_utterance", *PERSONA_FIELDS, "history_text", "request_id"),
    "cancel": ("request_id",),
    "warm_persona": PERSONA_FIELDS,
    "warm_history": ("history_text", *PERSONA_FIELDS),
    "set_persona": PERSONA_FIELDS,
    "ping": (),
}
ALL_FIELDS = tuple(sorted({f for fs in MESSAGE_FIELDS.values() for f in fs}))


def _near_limit(limit: int) -> st.SearchStrategy[str]:
    return st.integers(limit - 1, limit + 1).map(lambda n: "i" * n)


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Plausible and implausible values of one message field."""
    if name in ("session_id", "request_id"):
        good: st.SearchStrategy[Any] = (TEXT | st.integers() | _near_limit(protocol.MAX_ID_CHARS)
                                        | st.just("") | st.just("   "))
    elif name == "assistant_gender":
        good = st.sampled_from([*protocol.GENDER_ALIASES, " Female ", "MAN", "robot", ""]) | _near_limit(32)
    elif name == "persona_style":
        good = st.sampled_from(["wholesome", "Wholesome ", "nope", "", "x" * 65]) | TEXT
    else:
        good = TEXT | st.sampled_from(["", "  ", "hello there", "User: hi\nAssistant: hello"])
    return good | JSON


@st.composite
def client_objects(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(MESSAGE_FIELDS)) -> dict[str, Any]:
    """A JSON object shaped like a client message of one of ``kinds``, fields given or
    not, well- or ill-typed, plus now and then an unknown type or stray keys."""
    kind = draw(st.sampled_from(kinds))
    obj: dict[str, Any] = {}
    roll = draw(st.integers(0, 19))
    if roll == 0:
        pass  # no type at all
    elif roll == 1:
        obj["type"] = draw(JSON)
    elif roll == 2:
        obj["type"] = draw(TEXT)
    else:
        obj["type"] = kind
    own = MESSAGE_FIELDS[kind]
    for name in ALL_FIELDS:
        # A message's own fields are usually there and usually well-typed; others rarely.
        if draw(st.integers(0, 9)) < (7 if name in own else 1):
            if name in ("session_id", "user_utterance", "history_text") and draw(st.booleans()):
                obj[name] = draw(st.sampled_from(["s1", "hello there", "User: hi"]))
            else:
                obj[name] = draw(field_values(name))
    if draw(st.integers(0, 9)) == 0:
        obj.update(draw(st.dictionaries(TEXT, JSON, max_size=3)))
    return obj


@st.composite
def client_frames(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(MESSAGE_FIELDS)) -> str:
    """A text frame: mostly a client message, else JSON of another shape, broken JSON,
    deep nesting, or any text."""
    roll = draw(st.integers(0, 19))
    if roll < 14:
        return json.dumps(draw(client_objects(kinds)))
    if roll == 14:
        return json.dumps(draw(JSON))
    if roll == 15:
        text = json.dumps(draw(client_objects(kinds)))
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if roll == 16:
        depth = draw(st.integers(1, 200_000))
        return draw(st.sampled_from(["[", "{\"a\":"])) * depth
    if roll == 17:
        return draw(st.sampled_from(['{"type":"ping"}', "NaN", "Infinity", "-0", '""', "null", "{}", "[]",
                                     '{"type":"start","session_id":"s","user_utterance":"x","type":"cancel"}',
                                     '{"type":"ping"}{"type":"ping"}', "\ufeff{}", '{"type":"\\ud800"}',
                                     # Python refuses to parse integers of over 4300 digits.
                                     '{"type":"cancel","request_id":' + "7" * 5000 + "}",
                                     '{"type":"ping","n":1e999999}', '{"type":"ping","n":-' + "1" * 4301 + "}"]))
    return draw(st.text(max_size=200).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)))


# --- checks: the parser ------------------------------------------------------------

PARSER_CODES = {protocol.INVALID_JSON, protocol.INVALID_MESSAGE, protocol.UNKNOWN_TYPE}


def check_parse(frame: str) -> protocol.ClientMessage | protocol.ProtocolError:
    """Parse one frame; either a typed message or a ProtocolError that says clearly what
    is wrong. Anything else raises AssertionError (or the parser's own exception)."""
    try:
        msg = protocol.parse_client_message(frame)
    except protocol.ProtocolError as exc:
        assert exc.code in PARSER_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message.strip(), exc.message
        # Bounded: an error never echoes a client's megabytes back.
        assert len(exc.message) <= 400, len(exc.message)
        if exc.code == protocol.INVALID_MESSAGE:
            # It names what is wrong: a field, the type, or the shape.
            assert any(name in exc.message for name in (*ALL_FIELDS, "type", "JSON object")), exc.message
        _check_request_id(frame, exc)
        return exc
    assert isinstance(msg, protocol.Start | protocol.Cancel | protocol.WarmPersona | protocol.WarmHistory
                      | protocol.SetPersona | protocol.Ping), msg
    if isinstance(msg, protocol.Start):
        assert msg.session_id.strip() and msg.user_utterance.strip()
        assert len(msg.session_id) <= protocol.MAX_ID_CHARS
    persona = getattr(msg, "persona", None)
    if persona is not None:
        assert persona.assistant_gender in (None, "woman", "man"), persona
    rid = getattr(msg, "request_id", None)
    assert rid is None or (isinstance(rid, str) and len(rid) <= protocol.MAX_ID_CHARS)
    return msg


def _check_request_id(frame: str, exc: protocol.ProtocolError) -> None:
    """An error about a message that carried a usable request_id names that turn."""
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return
    rid = obj.get("request_id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        return
    # An id that is itself refused (too long, control characters, half a character) is not
    # echoed back.
    text = str(rid)
    whole = not any("\ud800" <= c <= "\udfff" for c in text)  # no half of a character
    if len(text) <= protocol.MAX_ID_CHARS and whole and not unseen.ANY.search(text):
        assert exc.request_id == str(rid), (exc.request_id, rid)


# --- checks: a live daemon -----------------------------------------------------------

SERVER_TYPES = {"ack", "toolcall", "token", "final", "done", "error", "pong", "warmed"}
# Error codes a fuzzed (but not flooding, not oversized) client may see on a healthy daemon.
# engine_unavailable: the demo engine can fail a step (see docs/reliability.md); the
# checks below allow it only as a turn's error before its done, or a warm-up's answer.
LIVE_CODES = PARSER_CODES | {protocol.INVALID_PERSONA_STYLE, protocol.ENGINE_UNAVAILABLE}


class LiveClient:
    """One WebSocket to a daemon, reused across inputs (reconnecting only if it dropped,
    which counts as a failure). Uses websockets' sync client: no event loop to share with
    hypothesis."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: Any = None
        self.tried = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LiveClient:
        self._connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _connect(self) -> None:
        from websockets.sync.client import connect

        self.ws = self._stack.enter_context(connect(self.url, open_timeout=10, max_size=None, compression=None))

    def recv(self, timeout: float = 30) -> dict[str, Any]:
        raw = self.ws.recv(timeout=timeout)
        assert isinstance(raw, str), f"binary frame from the server: {raw!r}"
        msg = json.loads(raw)
        assert isinstance(msg, dict) and msg.get("type") in SERVER_TYPES, msg
        if msg["type"] == "error":
            assert msg.get("error_code") in LIVE_CODES, msg
            assert isinstance(msg.get("message"), str) and msg["message"], msg
        return msg

    def check(self, frame: str) -> None:
        """Send ``frame``, then cancel and ping: by the pong, the reply to the frame and
        the done of any turn it started must have come, in protocol order."""
        from websockets.exceptions import ConnectionClosed

        self.tried += 1
        try:
            self._check(frame)
        except ConnectionClosed:
            self._connect()  # leave a usable connection for the next input, then fail this one
            raise AssertionError("the daemon closed the connection") from None

    def _check(self, frame: str) -> None:
        expected = check_parse(frame)
        self.ws.send(frame)
        self.ws.send('{"type":"cancel"}')
        self.ws.send('{"type":"ping"}')
        turn: str | None = None
        warms = 1 if isinstance(expected, protocol.WarmPersona | protocol.WarmHistory) else 0
        answered = False
        got: list[dict[str, Any]] = []
        while True:
            msg = self.recv()
            got.append(msg)
            kind = msg["type"]
            if kind == "pong":
                break
            if kind == "warmed" or (kind == "error" and msg["error_code"] == protocol.ENGINE_UNAVAILABLE
                                    and msg.get("request_id") is None):
                warms -= 1  # a warm-up's answer (the demo engine may fail one: it says so)
                continue
            if isinstance(expected, protocol.ProtocolError):
                assert kind == "error" and msg["error_code"] == expected.code and not answered, got
                answered = True
            elif isinstance(expected, protocol.Start):
                if kind == "ack":
                    assert turn is None and not answered, got
                    turn, answered = msg["request_id"], True
                    if expected.request_id is not None:
                        assert turn == expected.request_id, got
                elif kind == "error" and turn is not None:
                    # The engine failed the turn: it says so, and the turn's done follows.
                    assert msg["error_code"] == protocol.ENGINE_UNAVAILABLE and msg.get("request_id") == turn, got
                elif kind == "error":
                    # The only refusal a parsed start may get here: an unknown persona style.
                    assert msg["error_code"] == protocol.INVALID_PERSONA_STYLE and not answered, got
                    answered = True
                else:
                    assert turn is not None and msg.get("request_id") == turn, got
                    if kind == "done":
                        turn = None
            elif isinstance(expected, protocol.SetPersona):
                assert (kind == "ack" and msg.get("for") == "set_persona") or \
                    (kind == "error" and msg["error_code"] == protocol.INVALID_PERSONA_STYLE), got
                answered = True
            elif isinstance(expected, protocol.WarmPersona | protocol.WarmHistory):
                assert kind == "error" and msg["error_code"] == protocol.INVALID_PERSONA_STYLE, got
                warms = 0  # refused: no warm-up runs
            else:  # cancel, ping: nothing but the pong of our own ping (and a second pong)
                assert kind == "pong", got
        if isinstance(expected, protocol.Ping):
            assert self.recv()["type"] == "pong"
        assert turn is None, f"turn {turn} had no done before the next message's reply: {got}"
        if isinstance(expected, protocol.ProtocolError | protocol.Start | protocol.SetPersona):
            assert answered, f"no reply to {frame[:200]!r}: {got}"
        # A warm-up answers when the engine is done: after our pong, maybe.
        while warms > 0:
            msg = self.recv()
            assert msg["type"] == "warmed" or msg.get("error_code") in (protocol.ENGINE_UNAVAILABLE,
                                                                        protocol.INVALID_PERSONA_STYLE), msg
            warms -= 1


# --- strategies and checks: the admin socket ----------------------------------------

ADMIN_FIELDS = ("n", "level", "grep", "follow", "target", "on", "action", "seconds", "role", "steps")


@st.composite
def admin_requests(draw: st.DrawFn) -> bytes:
    """One request line. Never one that changes the daemon for good or never ends:
    no real restart, no drain on, no log follow, no AWQ rebuild; and no profile window
    of a second or more (its default is 10 s: a few of them were most of the run)."""
    from yapd.admin import COMMANDS
    from yapd.loopprofile import MAX_SECONDS as MAX_PROFILE_S

    roll = draw(st.integers(0, 9))
    if roll == 0:
        return draw(st.binary(max_size=200)).replace(b"\n", b"") + b"\n"
    if roll == 1:
        return json.dumps(draw(JSON)).encode() + b"\n"
    req: dict[str, Any] = {"cmd": draw(st.sampled_from([*COMMANDS, "debug"]) | TEXT | JSON)}
    for name in ADMIN_FIELDS:
        if draw(st.integers(0, 3)) == 0:
            req[name] = draw(JSON | st.sampled_from(["chat", "tool", "both", "debug", "error", "status"]))
    if req["cmd"] == "restart":
        req["target"] = draw(JSON.filter(lambda v: v not in ("chat", "tool", "both")))
    if req["cmd"] == "drain":
        req["on"] = draw(JSON.filter(lambda v: v is not True))
    if req["cmd"] == "logs":
        req["follow"] = draw(JSON.filter(lambda v: not v))
    if req["cmd"] == "profile":
        # Short windows, or values the daemon refuses: "seconds": 57 was a 57 s profile,
        # past the client's 30 s timeout on a loaded machine ("broke the connection").
        req["seconds"] = draw(st.floats(0.01, 0.2) | JSON.filter(
            lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_PROFILE_S))
    if req["cmd"] == "awq" and req.get("action") == "rebuild":
        req["action"] = "status"
    return json.dumps(req).encode() + b"\n"


class AdminClient:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.tried = 0

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()

    def _readline(self) -> bytes:
        assert self.sock is not None
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("admin socket closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def check(self, line: bytes) -> list[dict[str, Any]]:
        """Send one request line; every reply line is a JSON object, the last one has
        "ok", a refusal says why in "error", and the connection stays open."""
        self.tried += 1
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(30)
            self.sock.connect(self.path)
            self.buf = b""
        try:
            if not line.strip():
                # A blank line is skipped, unanswered: check the connection with a ping.
                line += b'{"cmd": "ping"}\n'
            self.sock.sendall(line)
            replies = []
            while True:
                reply = json.loads(self._readline())
                assert isinstance(reply, dict), reply
                replies.append(reply)
                if "ok" in reply:
                    break
                assert reply.get("event") in ("log", "progress"), reply
            if reply["ok"] is False:
                assert isinstance(reply.get("error"), str) and reply["error"], reply
            return replies
        except (OSError, ValueError):
            self.sock.close()
            self.sock = None
            raise AssertionError(f"admin request {line[:200]!r} broke the connection") from None


# --- strategies and checks: the config loader ----------------------------------------

SECTIONS: dict[str, type] = {"server": config.ServerConfig, "engines": config.EnginesConfig,
                             "chat": config.EngineConfig, "tool": config.EngineConfig,
                             "turn": config.TurnConfig, "admin": config.AdminConfig,
                             "logging": config.LoggingConfig, "awq": config.AwqConfig}
KNOWN_NAMES = {*SECTIONS, "personas", "tools", "demo",
               *(f.name for cls in {*SECTIONS.values(), config.ToolSpec} for f in dataclasses.fields(cls))}
SAFE_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
TOML_LEAVES = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | SAFE_TEXT
               | st.datetimes(min_value=datetime.datetime(1, 1, 1)) | st.dates())
TOML_VALUES = st.recursive(TOML_LEAVES, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(SAFE_TEXT, c, max_size=3), max_leaves=8)


def typed_values(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a config field's own type (boundaries, NaN, infinities), or any value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        own: st.SearchStrategy[Any] = st.sampled_from(args)
    elif tp is bool:
        own = st.booleans()
    elif tp is int:
        own = st.integers(-2, 70_000) | st.sampled_from([0, 1, 255, 256, 1023, 1024, 65535, 65536, 2**63 - 1])
    elif tp is float:
        own = st.floats() | st.sampled_from([0.0, -0.0, 0.5, 0.99, 1.0, 5.0, 1e-9])
    elif tp is str:
        own = SAFE_TEXT | st.sampled_from(["info", "debug", "wholesome", "woman", "both", "auto", "cpu"])
    elif origin is list:
        own = st.lists(SAFE_TEXT, max_size=3)
    else:
        own = st.dictionaries(SAFE_TEXT, TOML_VALUES, max_size=3)
    return own | own | TOML_VALUES


@st.composite
def config_tables(draw: st.DrawFn) -> dict[str, Any]:
    """A config file's content as a mapping: known sections and keys mostly, with values
    of their type or not, and now and then an unknown section or key."""
    data: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        hints = typing.get_type_hints(cls)
        keys = draw(st.lists(st.sampled_from(sorted(hints)), max_size=6, unique=True))
        table = {k: draw(typed_values(hints[k])) for k in keys}
        if draw(st.integers(0, 9)) == 0:
            table[draw(SAFE_TEXT)] = draw(TOML_VALUES)
        data[name] = table
    if draw(st.integers(0, 4)) == 0:
        data["personas"] = draw(st.dictionaries(SAFE_TEXT, SAFE_TEXT | TOML_VALUES, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        data["tools"] = draw(st.lists(st.fixed_dictionaries(
            {"name": SAFE_TEXT | TOML_VALUES},
            optional={"description": SAFE_TEXT | TOML_VALUES, "parameters": st.dictionaries(SAFE_TEXT, TOML_VALUES),
                      "extra": TOML_VALUES}), max_size=3) | TOML_VALUES)
    if draw(st.integers(0, 4)) == 0:
        data["demo"] = draw(st.booleans() | TOML_VALUES)
    if draw(st.integers(0, 9)) == 0:
        data[draw(SAFE_TEXT)] = draw(TOML_VALUES)
    return data


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.datetime | datetime.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer: top-level scalars, then [tables], then [[arrays of tables]]."""
    head, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            body = "".join(f"{_toml_str(k)} = {_toml_value(v)}\n" for k, v in value.items())
            tables.append(f"[{_toml_str(key)}]\n{body}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                body = "".join(f"{_toml_str(k)} = {_toml_value(v)}\n" for k, v in item.items())
                tables.append(f"[[{_toml_str(key)}]]\n{body}")
        else:
            head.append(f"{_toml_str(key)} = {_toml_value(value)}\n")
    return "".join(head) + "\n".join(tables)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """A config file: mostly TOML of a config's shape, else mangled TOML or any bytes."""
    roll = draw(st.integers(0, 19))
    if roll < 16:
        return to_toml(draw(config_tables())).encode()
    if roll == 16:
        # Python refuses to parse integers of over 4300 digits; TOML itself has no limit.
        return b"[server]\nport = " + b"9" * draw(st.integers(4290, 4310)) + b"\n"
    if roll in (17, 18):
        text = to_toml(draw(config_tables())).encode()
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.binary(max_size=8)) + text[cut:]
    return draw(st.binary(max_size=300))


def _finite_floats(obj: Any, where: str) -> None:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _finite_floats(getattr(obj, f.name), f"{where}.{f.name}")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{where} = {obj} was accepted"
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_floats(v, f"{where}[{i}]")


def check_config(content: bytes, path: Path) -> config.Config | config.ConfigError:
    """Load ``content`` as a config file (no environment): a valid Config, or a
    ConfigError that names the file and, past parsing, the key."""
    path.write_bytes(content)
    try:
        cfg = config.load(path, env={})
    except config.ConfigError as exc:
        text = str(exc)
        assert text.startswith(f"{path}: "), text
        rest = text[len(str(path)) + 2:]
        assert rest.strip(), text
        if not rest.startswith(("invalid TOML", "not UTF-8")):
            # Past parsing, the message names the key it is about.
            assert any(name in rest for name in KNOWN_NAMES), text
        return exc
    _finite_floats(cfg, "config")
    assert 0 <= cfg.server.port <= 65535 and cfg.server.api_keys and cfg.max_connections > 0
    config.validate(cfg)  # what loaded must stay valid
    return cfg


@st.composite
def env_overrides(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(sorted(config.ENV_OVERRIDES)), min_size=1, max_size=4, unique=True))
    return {n: draw(SAFE_TEXT.filter(lambda t: "\x00" not in t)
                    | st.sampled_from(["1", "0", "true", "-1", "nan", "inf", "1e9", "chat", "awq", "a,b"]))
            for n in names}


def check_env(env: dict[str, str]) -> config.Config | config.ConfigError:
    """Environment overrides: a valid Config, or a ConfigError naming the variable."""
    try:
        cfg = config.load(None, env=env)
    except config.ConfigError as exc:
        text = str(exc)
        assert any(name in text for name in env) or text.startswith("<defaults>: "), text
        return exc
    _finite_floats(cfg, "config")
    return cfg


# --- the program ---------------------------------------------------------------------


@dataclass
class Result:
    target: str
    tried: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)


def run_property(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], Any], *,
                 examples: int, duration: float, chunk: int = 1000) -> Result:
    """Run ``check`` on ``examples`` inputs (or until ``duration`` s), in chunks so that a
    failure is recorded (hypothesis shrinks it first) and the run goes on."""
    res = Result(name)
    t0 = time.monotonic()
    counter = [0]

    def counted(x: Any) -> None:
        counter[0] += 1
        check(x)

    while counter[0] < examples and time.monotonic() - t0 < duration:
        n = min(chunk, examples - counter[0])
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))(given(strategy)(counted))
        try:
            test()
        except Exception as exc:
            text = f"{type(exc).__name__}: {str(exc)[:500]}"
            if text not in res.crashes:
                res.crashes.append(text)
            if len(res.crashes) >= 20:
                break
    res.tried = counter[0]
    res.seconds = round(time.monotonic() - t0, 1)
    return res


@contextlib.contextmanager
def own_daemon(cache_dir: str | None) -> Iterator[Any]:
    from yapctl.soak import demo_daemon

    d = demo_daemon({"max_connections": 8, "rate_limit_per_s": 10_000.0, "rate_limit_burst": 10_000},
                    cache_dir=cache_dir).start(timeout=180)
    try:
        yield d
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m yapctl.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=["all", "parser", "config", "env", "live", "admin"], default="all")
    p.add_argument("--examples", type=int, default=20_000, help="inputs per target (default 20000)")
    p.add_argument("--live-examples", type=int, default=None, help="inputs for live and admin (default: --examples)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds per target at most (default 300)")
    p.add_argument("--url", help="ws://127.0.0.1:PORT/ws of a running yapd (default: start a demo daemon)")
    p.add_argument("--key", default="", help="API key for --url")
    p.add_argument("--admin-socket", help="the --url daemon's admin socket")
    p.add_argument("--cache-dir", help="YAP_CACHE_DIR for the demo daemon's models")
    args = p.parse_args(argv)
    targets = ["parser", "config", "env", "live", "admin"] if args.target == "all" else [args.target]
    live_n = args.live_examples or args.examples
    results: list[Result] = []
    if args.url and (urlsplit(args.url).hostname or "") not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("fuzz: only a loopback daemon may be fuzzed")
    for target in targets:
        if target == "parser":
            results.append(run_property("parser", client_frames(), check_parse, examples=args.examples,
                                        duration=args.duration))
        elif target == "config":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.toml"
                results.append(run_property("config", config_files(), functools.partial(check_config, path=path),
                                            examples=args.examples, duration=args.duration))
        elif target == "env":
            results.append(run_property("env", env_overrides(), check_env, examples=args.examples,
                                        duration=args.duration))
        else:
            results.append(_run_live(target, args, live_n))
        r = results[-1]
        print(f"fuzz {r.target:7} inputs {r.tried:8d} in {r.seconds:7.1f} s   crashes {len(r.crashes)}", flush=True)
        for c in r.crashes:
            print(f"    crash: {c}", flush=True)
    total = sum(r.tried for r in results)
    crashes = sum(len(r.crashes) for r in results)
    print(f"fuzz total: {total} inputs, {crashes} crashes")
    return 1 if crashes else 0


def _run_live(target: str, args: argparse.Namespace, n: int) -> Result:
    with contextlib.ExitStack() as stack:
        lines: list[str] = []
        if args.url:
            url = args.url if "api_key=" in args.url else f"{args.url}?api_key={args.key}"
            admin = args.admin_socket
        else:
            d = stack.enter_context(own_daemon(args.cache_dir))
            url, admin, lines = d.url(), str(d.admin_socket), d.lines
        if target == "live":
            client: Any = stack.enter_context(LiveClient(url))
            res = run_property("live", client_frames(), client.check, examples=n, duration=args.duration)
        else:
            if not admin:
                raise SystemExit("fuzz: --admin-socket is needed with --url for the admin target")
            client = stack.enter_context(AdminClient(admin))
            res = run_property("admin", admin_requests(), client.check, examples=n, duration=args.duration)
        bad = [ln for ln in lines if "Traceback" in ln or " error " in ln or " critical " in ln]
        if bad:
            res.crashes.append(f"{len(bad)} error lines in the daemon's log, e.g. {bad[0][:300]}")
        return res


if __name__ == "__main__":
    sys.exit(main())
