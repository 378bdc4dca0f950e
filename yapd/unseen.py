"""Characters that change how a terminal shows text rather than showing themselves.

A client's id or an engine's message reaches operators' terminals (yapctl's tables, the
log through yapctl, journalctl, less): an escape sequence there retitles or recolours the
terminal, a bidi override reorders what follows. The set is fixed, not Unicode's
categories (``str.isprintable``): those refuse ordinary text (ZWJ emoji, Persian's ZWNJ,
a no-break space) and change with the Python version's Unicode tables.
"""

from __future__ import annotations

import re

# C0 and C1 controls (ESC among them), DEL; the bidi controls (ALM, LRM, RLM, the embeddings
# and overrides, the isolates); the line and paragraph separators.
_CONTROLS = "\x00-\x1f\x7f-\x9f"
_LAYOUT = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"

ANY = re.compile(f"[{_CONTROLS}{_LAYOUT}]")
# In a log message a line break and a tab are the text's own (a traceback's lines).
_IN_LOGS = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_LAYOUT}]")


def visible(text: str) -> str:
    """``text`` with those characters written as escapes (``\\x1b``, ``\\u202e``); line
    breaks and tabs kept."""
    return _IN_LOGS.sub(lambda m: ascii(m.group())[1:-1], text)
