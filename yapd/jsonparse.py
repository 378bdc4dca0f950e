"""JSON from outside the daemon (a client's frame, an admin request, the tool model's
answer), parsed without deep recursion and refused with one kind of error.

``json.loads`` recurses once per nested array or object and stops only at the
interpreter's recursion limit (1,000 frames): a client frame of 60,000 "[" ran the
parser a thousand frames deep, and a garbage collection that started down there ran
yapd's collection callback (yapd.gcpause) with no room left: it failed, and its
traceback went to the journal. Nothing yapd reads nests more than a few levels, so text
nested deeper than MAX_DEPTH is refused before it is parsed: the parse then stays
hundreds of frames clear of the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A tool call's arguments are the deepest thing yapd parses, a few levels of objects and
# lists; a frame with no more brackets than this (nearly every one) is parsed unscanned.
MAX_DEPTH = 100

# A JSON string (its escapes included, its brackets skipped) or one bracket. Unrolled
# ("[^"\\]*(?:\\.[^"\\]*)*") so that a long string is one fast run, not a branch per
# character. The closing quote is optional: an unterminated string runs to the end in one
# match. Required, each of its quotes would start a scan to the end that fails: a 80 kB
# frame of escaped quotes held the loop for 12.6 s.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')


def deeper_than(text: str, limit: int) -> bool:
    """Whether ``text``'s arrays and objects nest more than ``limit`` deep (brackets inside
    strings do not count, nor do those after an unterminated string's quote: broken JSON,
    which the parser refuses). Stops at the first level past ``limit``: a million "[" cost
    as little as a hundred. Linear in the text's length, whatever it holds."""
    level = 0
    for m in _STRUCTURE.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            level += 1
            if level > limit:
                return True
        elif c == "]" or c == "}":
            level -= 1
    return False


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for text from outside. Every refusal is a ValueError: malformed JSON,
    bytes that are not UTF-8, integers of over 4,300 digits, nesting deeper than
    ``max_depth``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    # Text with no more brackets than max_depth cannot nest deeper: the usual frame (spoken
    # history) is let through on two counts, without the scan (3 ns a character).
    if text.count("[") + text.count("{") > max_depth and deeper_than(text, max_depth):
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    return json.loads(text)
