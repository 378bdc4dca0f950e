"""Hammer 2.1 tool calling: the prompt, and reading the model's answer early.

Hammer answers with a JSON list of calls, ``[]`` meaning none, sometimes inside a
```json fence. :class:`DecisionReader` is fed the text as it streams and settles the
decision at the earliest character that fixes it: ``[]`` or anything that cannot start
a list is "no" at once; a list of calls is "yes" the moment its closing bracket lands.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from yapd import jsonparse
from yapd.config import ToolSpec

log = logging.getLogger("yapd.toolcall")

TASK_INSTRUCTION = (
    "You are a tool calling assistant for a live voice conversation. Decide whether the user's "
    "latest utterance asks for one of the available tools right now. Most utterances are ordinary "
    "conversation and need no tool."
)
FORMAT_INSTRUCTION = (
    "The output MUST strictly adhere to the following JSON format, and NO other text MUST be "
    "included. If no function call is needed, output an empty list '[]'.\n"
    "```\n"
    '[\n    {"name": "func_name1", "arguments": {"argument1": "value1"}},\n'
    "    ... (more tool calls as required)\n]\n"
    "```"
)


def tools_json(tools: Sequence[ToolSpec]) -> str:
    return json.dumps(
        [{"name": t.name, "description": t.description,
          "parameters": t.parameters or {"type": "object", "properties": {}, "required": []}}
         for t in tools],
        ensure_ascii=False,
    )


def instruction_block(tools: Sequence[ToolSpec]) -> str:
    """The part of the Hammer prompt that is the same for every turn (prefix-cached)."""
    return (
        f"[BEGIN OF TASK INSTRUCTION]\n{TASK_INSTRUCTION}\n[END OF TASK INSTRUCTION]\n\n"
        f"[BEGIN OF AVAILABLE TOOLS]\n{tools_json(tools)}\n[END OF AVAILABLE TOOLS]\n\n"
        f"[BEGIN OF FORMAT INSTRUCTION]\n{FORMAT_INSTRUCTION}\n[END OF FORMAT INSTRUCTION]\n\n"
    )


def query_block(utterance: str, recent_history: str = "") -> str:
    query = utterance.strip()
    if recent_history.strip():
        query = f"(recent conversation, for context)\n{recent_history.strip()}\n\n(latest utterance)\nuser: {query}"
    return f"[BEGIN OF QUERY]\n{query}\n[END OF QUERY]\n\n"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class Decision:
    status: Literal["yes", "no"]
    calls: tuple[ToolCall, ...]
    raw: str
    reason: str  # "calls", "empty", "malformed", "unknown_tool", "timeout", "error"

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "raw": self.raw, "calls": [c.as_json() for c in self.calls]}


# A Markdown fence's opening: its backticks, a language tag, and the rest of its line.
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?")


def _strip_fence(text: str) -> str:
    s = text.strip()
    if s.startswith("```"):
        s = s[3:]
        if s.lower().startswith("json"):
            s = s[4:]
        end = s.find("```")
        if end >= 0:
            s = s[:end]
    return s.strip()


def parse_calls(text: str, known: Sequence[str] | None = None) -> Decision:
    """Parse a complete Hammer answer. Anything but a list of {name, arguments} is
    malformed and counts as "no"; calls to tools not in ``known`` are dropped."""
    body = _strip_fence(text)
    try:
        data = jsonparse.loads(body)
    except ValueError:
        return Decision("no", (), text, "malformed")
    if isinstance(data, dict) and "tool_calls" in data:  # Hammer 2.0's object form
        data = data["tool_calls"]
    if isinstance(data, dict) and "name" in data:  # a single bare call
        data = [data]
    if not isinstance(data, list):
        return Decision("no", (), text, "malformed")
    if not data:
        return Decision("no", (), text, "empty")
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return Decision("no", (), text, "malformed")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = jsonparse.loads(args)
            except ValueError:
                return Decision("no", (), text, "malformed")
        call = ToolCall(item["name"], args) if isinstance(args, dict) else None
        if call is None or not _sendable(call):
            return Decision("no", (), text, "malformed")
        calls.append(call)
    if known is not None:
        kept = [c for c in calls if c.name in known]
        if not kept:
            return Decision("no", (), text, "unknown_tool")
        calls = kept
    return Decision("yes", tuple(calls), text, "calls")


def _sendable(call: ToolCall) -> bool:
    """Whether ``call`` goes to the client as strict JSON text. Python's parser takes what
    a client's refuses (NaN, Infinity, 1e400 as a float's infinity) and escapes UTF-8
    cannot carry (a lone surrogate from "\\ud83d"): the first reached a JavaScript client
    as a toolcall it could not parse, the second failed the whole turn at its send."""
    try:
        json.dumps(call.as_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError:  # UnicodeEncodeError is one
        return False
    return True


class DecisionReader:
    """Feed streamed text; :attr:`decision` is set as soon as the text settles it."""

    def __init__(self, known: Sequence[str] | None = None) -> None:
        self.known = list(known) if known is not None else None
        self.text = ""
        self.decision: Decision | None = None
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._pos = 0  # scan position in the fence-stripped body
        self._started = False
        self._list = False
        self._after_newline = False  # only blanks since a newline outside a string
        self._cut: int | None = None  # where the body begins in the stripped text (after a fence)

    def _body(self) -> str | None:
        """The text after an optional ```json fence, on a line of its own or not (```json
        [...]```); None while the fence is incomplete. Where the body begins is decided
        once: a newline inside the list must not move it."""
        s = self.text.lstrip()
        if self._cut is None:
            if not s or (len(s) < 3 and "```".startswith(s)):
                return None
            fence = _FENCE.match(s)
            if fence is not None and fence.end() == len(s) and not s.endswith("\n"):
                return None  # the fence's line goes on
            self._cut = fence.end() if fence is not None else 0
        return s[self._cut:]

    def feed(self, delta: str) -> Decision | None:
        if self.decision is not None:
            return self.decision
        self.text += delta
        return self._scan()

    def _scan(self) -> Decision | None:
        body = self._body()
        if body is None:
            return None
        if not self._started:
            lead = body.lstrip()
            if not lead:
                return None
            if lead[0] not in "[{":  # "{": a bare call object, read to its end
                self.decision = Decision("no", (), self.text, "malformed")
                log.info("tool model answered without a list: %r", self.text[:200])
                return self.decision
            self._started = True
            self._list = lead[0] == "["
            self._pos = len(body) - len(lead)
        while self._pos < len(body):
            ch = body[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == "\n" and self._after_newline:
                # A blank line ends an answer (a single newline may sit inside a JSON list),
                # where it stands in the text, however the deltas cut it: a blank line
                # inside the list ended it when read token by token, not when the whole list
                # came in one delta. Read here rather than as the engine's stop string: vLLM
                # holds back a stop string's possible prefix, which delays a one-character
                # first token ("["). Blank lines before the answer are not its end.
                self.text = self.text[: len(self.text) - len(body) + self._pos - 1].rstrip()
                return self.finish()
            self._after_newline = ch == "\n" or (self._after_newline and ch in " \t\r")
            if ch == '"':
                self._in_string = True
            elif ch in "[{":
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
                if self._depth == 0:
                    return self._settle(body[: self._pos])
            elif self._list and self._depth == 1 and ch not in " \t\r\n,":
                # Only call objects may stand in the top-level list: '[1' or '[x' is no call.
                self.decision = Decision("no", (), self.text, "malformed")
                log.info("tool model answered a list of non-calls: %r", self.text[:200])
                return self.decision
        return None

    def _settle(self, body: str) -> Decision:
        decision = parse_calls(body, self.known)
        self.decision = Decision(decision.status, decision.calls, self.text, decision.reason)
        if decision.reason in ("malformed", "unknown_tool"):
            log.info("tool model output counted as no (%s): %r", decision.reason, self.text[:200])
        return self.decision

    def finish(self) -> Decision:
        """The generation ended (stop, length or timeout) without settling."""
        if self.decision is None:
            final = parse_calls(self.text, self.known)
            if final.reason in ("malformed", "unknown_tool"):
                log.info("tool model output counted as no (%s): %r", final.reason, self.text[:200])
            self.decision = final
        return self.decision
