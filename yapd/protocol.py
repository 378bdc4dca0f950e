"""The WebSocket protocol, v1: message types, validation and server messages.

Pure functions and dataclasses, no I/O: :func:`parse_client_message` turns one text
frame into a typed message or raises :class:`ProtocolError` with the error code the
client gets. Shared with yapctl's client tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from yapd import jsonparse, unseen

PROTOCOL_VERSION = 1

# Error codes. The first two end the connection; the rest leave it usable.
AUTHENTICATION_FAILED = "authentication_failed"
SERVER_AT_CAPACITY = "server_at_capacity"
# The connection-ending two, as clients tell them from the rest.
ENDS_CONNECTION = (AUTHENTICATION_FAILED, SERVER_AT_CAPACITY)
INVALID_JSON = "invalid_json"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_TYPE = "unknown_type"
BINARY_FRAME = "binary_frame"
MESSAGE_TOO_LARGE = "message_too_large"
INVALID_PERSONA_STYLE = "invalid_persona_style"
INTERNAL_ERROR = "internal_error"
IDLE_TIMEOUT = "idle_timeout"
RATE_LIMITED = "rate_limited"
ENGINE_UNAVAILABLE = "engine_unavailable"
SHUTTING_DOWN = "shutting_down"
ORIGIN_NOT_ALLOWED = "origin_not_allowed"

# WebSocket close codes used by the server.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013

GENDER_ALIASES = {"woman": "woman", "female": "woman", "man": "man", "male": "man"}
# A client's ids and persona fields are bounded so a session cannot pin megabytes of state.
MAX_ID_CHARS = 256
MAX_PERSONA_CHARS = 64 * 1024


class ProtocolError(Exception):
    """A client message the server refuses; the connection stays usable."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class ClientGone(Exception):
    """The client's connection is closed, so nothing more can reach it. The server's send
    function raises it; a turn or warm-up that meets it just ends (it is not a fault)."""


@dataclass(frozen=True)
class PersonaFields:
    """Persona settings a message may carry; None means "not given"."""

    persona_text: str | None = None
    persona_style: str | None = None
    assistant_gender: str | None = None
    user_identity: str | None = None

    def any_given(self) -> bool:
        return any(v is not None for v in (self.persona_text, self.persona_style,
                                           self.assistant_gender, self.user_identity))


@dataclass(frozen=True)
class Start:
    session_id: str
    user_utterance: str
    persona: PersonaFields
    history_text: str | None
    request_id: str | None


@dataclass(frozen=True)
class Cancel:
    request_id: str | None


@dataclass(frozen=True)
class WarmPersona:
    persona: PersonaFields


@dataclass(frozen=True)
class WarmHistory:
    persona: PersonaFields
    history_text: str


@dataclass(frozen=True)
class SetPersona:
    persona: PersonaFields


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Start | Cancel | WarmPersona | WarmHistory | SetPersona | Ping
CLIENT_TYPES = ("start", "cancel", "warm_persona", "warm_history", "set_persona", "ping")


def _field(obj: dict[str, Any], name: str, *, required: bool = False, limit: int | None = None,
           allow_int: bool = False) -> str | None:
    """A string field; ids may come as integers and are turned into strings. An id
    (``allow_int``) is shown to operators (yapctl's tables, the log): none of the
    characters of :mod:`yapd.unseen`, which would reach their terminals."""
    value = obj.get(name)
    if value is None:
        if required:
            raise ProtocolError(INVALID_MESSAGE, f"missing required field '{name}'")
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ProtocolError(INVALID_MESSAGE, f"field '{name}' must be a string, got {_json_type(value)}")
    if required and not value.strip():
        raise ProtocolError(INVALID_MESSAGE, f"field '{name}' must not be empty")
    if limit is not None and len(value) > limit:
        raise ProtocolError(INVALID_MESSAGE, f"field '{name}' is longer than {limit} characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # JSON's "\ud83d" alone: half of a character, as a cut JS string leaves
            raise ProtocolError(INVALID_MESSAGE, f"field '{name}' is not valid text: it holds half of a "
                                "UTF-16 surrogate pair (a character cut in two?)") from None
    if allow_int and unseen.ANY.search(value):
        raise ProtocolError(INVALID_MESSAGE, f"field '{name}' holds control characters (an escape sequence, "
                            "a bidi override, a line break)")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__


def _persona(obj: dict[str, Any]) -> PersonaFields:
    gender = _field(obj, "assistant_gender", limit=32)
    if gender is not None:
        norm = GENDER_ALIASES.get(gender.strip().lower())
        if norm is None:
            raise ProtocolError(
                INVALID_MESSAGE,
                f"field 'assistant_gender' must be one of woman, man (or female, male), got {gender!r}",
            )
        gender = norm
    style = _field(obj, "persona_style", limit=64)
    return PersonaFields(
        persona_text=_field(obj, "persona_text", limit=MAX_PERSONA_CHARS),
        persona_style=style.strip().lower() if style is not None else None,
        assistant_gender=gender,
        user_identity=_field(obj, "user_identity", limit=MAX_PERSONA_CHARS),
    )


def parse_client_message(frame: str) -> ClientMessage:
    """Validate one text frame. Long history and utterances are accepted here and
    trimmed later with the model's tokenizer; only the frame size limit refuses them."""
    try:
        obj = jsonparse.loads(frame)
    except ValueError as exc:
        raise ProtocolError(INVALID_JSON, f"frame is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(INVALID_MESSAGE, f"a message must be a JSON object, got {_json_type(obj)}")
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError(INVALID_MESSAGE, "missing required field 'type' (a string)")
    if not isinstance(kind, str):
        raise ProtocolError(INVALID_MESSAGE, f"field 'type' must be a string, got {_json_type(kind)}")
    request_id = None
    try:
        request_id = _field(obj, "request_id", limit=MAX_ID_CHARS, allow_int=True)
        if kind == "start":
            return Start(
                session_id=_field(obj, "session_id", required=True, limit=MAX_ID_CHARS,
                                  allow_int=True) or "",
                user_utterance=_field(obj, "user_utterance", required=True) or "",
                persona=_persona(obj),
                history_text=_field(obj, "history_text"),
                request_id=request_id,
            )
        if kind == "cancel":
            return Cancel(request_id=request_id)
        if kind == "warm_persona":
            return WarmPersona(persona=_persona(obj))
        if kind == "warm_history":
            return WarmHistory(persona=_persona(obj),
                               history_text=_field(obj, "history_text", required=True) or "")
        if kind == "set_persona":
            fields = _persona(obj)
            if not fields.any_given():
                raise ProtocolError(INVALID_MESSAGE, "set_persona needs at least one of persona_text, "
                                    "persona_style, assistant_gender, user_identity")
            return SetPersona(persona=fields)
        if kind == "ping":
            return Ping()
    except ProtocolError as exc:
        exc.request_id = exc.request_id or request_id
        raise
    raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind[:64]!r} (known: {', '.join(CLIENT_TYPES)})",
                        request_id)


# --- server messages --------------------------------------------------------------


def dumps(msg: dict[str, Any]) -> str:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"))


def error(code: str, message: str, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "error", "error_code": code, "message": message}
    if request_id is not None:
        msg["request_id"] = request_id
    msg.update(extra)
    return msg


def token(request_id: str, text: str) -> str:
    # The hot path: one small frame per delta, so skip building a dict.
    return f'{{"type":"token","request_id":{json.dumps(request_id)},"text":{json.dumps(text, ensure_ascii=False)}}}'
