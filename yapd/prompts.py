"""Personas, chat prompt layout and token trimming.

A chat prompt is three token segments, in this order, so the engine's prefix cache
reuses the first two across turns:

    [persona: template head + persona] [history] [utterance + template tail]

Each segment is tokenized on its own and cached per session; a client that resends a
longer history_text each turn costs only the tokenization of what it appended.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

GENDERS = ("woman", "man")

# Our own styles. Each is a short instruction about how the assistant talks; voice
# agents speak the reply aloud, so every style asks for plain spoken sentences.
BUILTIN_STYLES: dict[str, str] = {
    "wholesome": "You are warm, kind and encouraging. You notice the good in people and say so sincerely.",
    "savage": "You are blunt and quick-witted. You roast the user playfully, never cruelly, and never "
               "pretend to agree when you don't.",
    "flirty": "You are charming and playful, with light teasing and compliments, always respectful.",
    "sarcastic": "You answer with dry, deadpan sarcasm, but you still give the real answer.",
    "chill": "You are relaxed and easygoing. You keep things low-key and short.",
    "nerdy": "You love details, facts and fun trivia, and you get excited explaining how things work.",
    "cheerful": "You are upbeat and energetic, quick to laugh and full of enthusiasm.",
    "mentor": "You are a calm, thoughtful mentor. You ask good questions and give practical advice.",
}

SPOKEN_RULES = (
    "You are speaking out loud in a live voice conversation. Reply in one to three short spoken "
    "sentences: no lists, no markdown, no emojis, no stage directions."
)


def style_key(name: str) -> str:
    """A persona style's name as styles are looked up: "Pirate" and "pirate " alike."""
    return name.strip().lower()


def persona_styles(custom: Mapping[str, str]) -> dict[str, str]:
    """Built-in styles overlaid with the config's [personas] table."""
    styles = dict(BUILTIN_STYLES)
    styles.update({style_key(k): v for k, v in custom.items()})
    return styles


def compose_persona(style_text: str, gender: str, user_identity: str) -> str:
    who = "a woman" if gender == "woman" else "a man"
    parts = [f"You are {who} talking with the user.", style_text, SPOKEN_RULES]
    if user_identity.strip():
        parts.append(f"About the user: {user_identity.strip()}")
    return " ".join(parts)


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that prompts use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ChatLayout:
    """The literal text a chat template puts around the system and user contents."""

    head: str  # before the persona (BOS, system header)
    middle: str  # between history and utterance (system footer, user header)
    tail: str  # after the utterance (user footer, assistant header)
    system_role: bool

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> ChatLayout:
        sys_mark, usr_mark = "\x00YAPSYS\x00", "\x00YAPUSR\x00"
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(
                    [{"role": "system", "content": sys_mark}, {"role": "user", "content": usr_mark}],
                    tokenize=False, add_generation_prompt=True,
                )
                if isinstance(text, str) and sys_mark in text and usr_mark in text:
                    head, rest = text.split(sys_mark, 1)
                    middle, tail = rest.split(usr_mark, 1)
                    return cls(head, middle, tail, True)
            except Exception:  # noqa: S110 - templates that refuse a system role raise
                pass
            text = tok.apply_chat_template([{"role": "user", "content": usr_mark}], tokenize=False,
                                           add_generation_prompt=True)
            if isinstance(text, str) and usr_mark in text:
                head, tail = text.split(usr_mark, 1)
                return cls(head, "\n\nUser: ", tail, False)
        # No template: a plain transcript layout.
        return cls("", "\nUser: ", "\nAssistant:", False)


def trim_history(ids: Sequence[int], max_tokens: int, step: int = 1) -> list[int]:
    """The most recent ``max_tokens`` tokens at most, cut in whole ``step``s from the
    front: while the history grows by less than ``step`` tokens, the cut point stays
    put and so does the prompt prefix."""
    excess = len(ids) - max_tokens
    if excess <= 0:
        return list(ids)
    if max_tokens <= 0:
        return []
    step = max(1, min(step, max_tokens))
    cut = -(-excess // step) * step
    return list(ids[cut:])


# How far back a window of tokens may start to begin where the text does not begin in
# U+FFFD: a byte-level BPE cuts a character into at most 4 tokens, but a byte-fallback
# tokenizer (SentencePiece's) spells a run of characters in byte tokens that decode
# together, all of them U+FFFD if any is cut.
BACK_OFF = 32


def trim_utterance(ids: Sequence[int], max_tokens: int,
                   decode: Callable[[Sequence[int]], str] | None = None) -> list[int]:
    """The first ``max_tokens`` tokens: what the user said first is what they asked. With
    ``decode`` (the tokenizer's), ending where a character does: a character cut short
    ends the prompt's text in U+FFFD, which vLLM's detokenizer holds back with the whole
    prompt until the reply's first token and then streams all of it as that token's text
    (yapd/engines/firsttext.py). Read from the whole kept text (an utterance is short): a
    token may hold one character's end and the next one's start, and a byte-fallback run
    cut anywhere is U+FFFD throughout."""
    end = min(len(ids), max_tokens)
    if decode is not None and end < len(ids):
        floor = max(0, end - BACK_OFF)
        while end > floor and decode(ids[:end]).endswith("\ufffd"):
            end -= 1
    return list(ids[:end])


# A token covers at most this many characters of ordinary text; cutting the text to
# limit * this before tokenizing bounds the work on a 1 MiB history.
MAX_CHARS_PER_TOKEN = 16
APPROX_CHARS_PER_TOKEN = 4


# Cut points after each run of line breaks that a line with text follows: Qwen's and
# Tekken's pre-tokenizers never let a pre-token run on past such a run, so text cut
# there tokenizes to the same ids piece by piece as whole. A line of blanks alone is no
# cut: their "\s*[\r\n]+" takes the breaks around it as one pre-token ("\n   \n").
_AFTER_LINE_BREAKS = re.compile(r"(?<=[\r\n])(?=[^\S\r\n]*\S)")
_LINES_PROBE = ("user: hi there\n\nassistant:  fine, thanks!\r\n  an indented line \n   \n\t\r\n"
                "42 apples\n\n\nok")
_lines_safe: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_rust_same: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _once_per_tokenizer(table: weakref.WeakKeyDictionary[Any, bool], tok: Tokenizer,
                        check: Callable[[], bool]) -> bool:
    """``check()``'s answer for ``tok``, asked once: kept as a flag beside the tokenizer
    (never a reference that would keep a replaced engine's tokenizer alive)."""
    try:
        return table[tok]
    except (KeyError, TypeError):
        pass
    answer = check()
    with contextlib.suppress(TypeError):  # not weak-referenceable: check again next time
        table[tok] = answer
    return answer


def tokenizes_by_line(tok: Tokenizer) -> bool:
    """Whether ``tok`` gives the same ids for text cut after its line breaks as for the
    whole text. SentencePiece tokenizers do not (each call marks a word start), so they
    get whole-text tokenization."""

    def check() -> bool:
        whole = list(tok.encode(_LINES_PROBE, add_special_tokens=False))
        pieces = [i for part in _AFTER_LINE_BREAKS.split(_LINES_PROBE)
                  for i in tok.encode(part, add_special_tokens=False)]
        return whole == pieces

    return _once_per_tokenizer(_lines_safe, tok, check)


def encoder(tok: Tokenizer) -> Callable[[str], list[int]]:
    """``tok``'s text -> ids without special tokens added. A transformers fast tokenizer
    wraps its Rust tokenizer's encode in ~60 us of Python per call (Tekken: 134 -> 72 us
    for a 120-character utterance on this project's CPU machine), paid on the event loop
    by every turn; so the Rust one is called directly - where it gives the same ids on a
    probe holding the tokenizer's special tokens (checked once per tokenizer)."""

    def slow(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return slow

    def fast(text: str) -> list[int]:
        return list(backend.encode(text, add_special_tokens=False).ids)

    def check() -> bool:
        specials = "".join(str(t) for t in (getattr(tok, "all_special_tokens", None) or [])[:16])
        probe = f"{_LINES_PROBE} {specials} x{specials}y caf\u00e9 \u6f22\u5b57 \U0001f389 "
        try:
            return fast(probe) == slow(probe)
        except Exception:
            return False

    return fast if _once_per_tokenizer(_rust_same, tok, check) else slow


@dataclass
class _Segment:
    text: str = ""
    ids: list[int] = field(default_factory=list)


class SharedTexts:
    """Token ids of whole texts that many sessions send alike (a bot's persona), for every
    session on one tokenizer: a call's first turn then finds its persona tokenized instead
    of spending ~0.45 ms of the event loop on 600 tokens (this project's CPU machine,
    docs/bench/README.md). The least recently used go past ``max_items``; texts longer
    than ``max_chars`` are not kept. Callers must not change the lists."""

    def __init__(self, encode: Callable[[str], list[int]], max_items: int = 32, max_chars: int = 64 * 1024) -> None:
        self.encode = encode
        self.max_items, self.max_chars = max_items, max_chars
        self._ids: OrderedDict[str, list[int]] = OrderedDict()

    def ids(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is not None:
            self._ids.move_to_end(text)
            return ids
        ids = self.encode(text)
        if len(text) <= self.max_chars:
            self._ids[text] = ids
            if len(self._ids) > self.max_items:
                self._ids.popitem(last=False)
        return ids


class PromptCache:
    """One session's tokenized segments for one model (chat or tool); its persona from
    ``shared`` (the daemon's, across sessions) where given."""

    def __init__(self, tok: Tokenizer, shared: SharedTexts | None = None) -> None:
        self.tok = tok
        self.encode = encoder(tok)
        self.shared = shared
        self._persona = _Segment(text="\x00unset")
        self._history = _Segment()  # whole lines of the last history, held for the next
        self._history_last = _Segment(text="\x00unset")
        self._lines: dict[str, list[int]] = {}
        self._fixed: dict[str, list[int]] = {}
        self._tail: dict[str, list[int]] = {}  # tail_lines' memo: the lines it kept last call
        # Set once the tool prompt had to be cut in tokens (histories of many tokens a
        # character): later turns cut that way at once, not in characters first.
        self.cut_in_tokens = False

    def encode_fixed(self, text: str) -> list[int]:
        """Token ids of a text that is the same every turn (the chat template's pieces):
        tokenized once per session. Callers must not change the list."""
        ids = self._fixed.get(text)
        if ids is None:
            if len(self._fixed) >= 8:  # a layout changed under a long session: start over
                self._fixed.clear()
            ids = self._fixed[text] = self.encode(text)
        return ids

    def encode_lines(self, text: str) -> list[int]:
        """Token ids of ``text``, tokenizing only the lines the last call did not have: a
        window that slides down a conversation mostly repeats lines it held last turn."""
        if not tokenizes_by_line(self.tok):
            return self.encode(text)
        held = self._lines
        kept: dict[str, list[int]] = {}
        ids: list[int] = []
        for line in _AFTER_LINE_BREAKS.split(text):
            line_ids = held.get(line) or kept.get(line)
            if line_ids is None:
                line_ids = self.encode(line)
            kept[line] = line_ids
            ids += line_ids
        self._lines = kept  # only this call's lines: the memo never outgrows one window
        return ids

    def tail_lines(self, text: str, max_tokens: int) -> str:
        """``text``'s last whole lines within ``max_tokens`` tokens, each line tokenized
        once while it stays in the window (a conversation's window slides down a line or
        two a turn)."""
        held = self._tail
        kept: dict[str, list[int]] = {}
        lines: list[str] = []
        total = 0
        for line in reversed(_AFTER_LINE_BREAKS.split(text)):
            ids = held.get(line) or kept.get(line)
            if ids is None:
                ids = self.encode(line)
            kept[line] = ids  # the first line that does not fit too: the next call asks it again
            if total + len(ids) > max_tokens:
                break
            lines.append(line)
            total += len(ids)
        self._tail = kept
        return "".join(reversed(lines))

    def first_tokens(self, text: str, max_tokens: int) -> str:
        """``text`` cut to its first ``max_tokens`` tokens (trim_utterance's), as text: for a
        prompt built as text (the tool's) whose limits are counted in tokens."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        return self.decode(trim_utterance(ids, max_tokens, self.decode))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=False))

    def persona_ids(self, text: str) -> list[int]:
        if text != self._persona.text:
            self._persona = _Segment(text, self.shared.ids(text) if self.shared is not None else self.encode(text))
        return self._persona.ids

    def history_ids(self, text: str, max_tokens: int, *, exact: bool = True) -> list[int]:
        """Token ids of ``text``'s tail; only what the last call did not hold is tokenized
        when ``text`` extends the previous history. With a tokenizer that tokenizes by line,
        the last call's whole lines are held and its last line is tokenized again with what
        follows it: a history ending "today?" goes on "\nassistant: ...", and "?\n" is one
        token of the whole text. The ids are then the whole text's, whatever the session
        saw before (the same history in another session hits the same prefix cache)."""
        if max_tokens <= 0 or not text:
            return []
        limit = max_tokens * (MAX_CHARS_PER_TOKEN if exact else APPROX_CHARS_PER_TOKEN)
        if len(text) > limit:
            text = text[-limit:]
        if text == self._history_last.text:  # the same history as last turn: its prompt's ids
            return self._history_last.ids
        prev = self._history
        held = len(prev.text)
        if not (prev.text and text.startswith(prev.text)):
            prev, held = _Segment(), 0
        if not tokenizes_by_line(self.tok):  # SentencePiece: held whole, new text appended
            ids = prev.ids + self.encode(text[held:]) if len(text) > held else prev.ids
            self._history = self._history_last = _Segment(text, ids)
            return ids
        if held and not _AFTER_LINE_BREAKS.match(text, held):
            prev, held = _Segment(), 0  # the held lines' last break goes on: no cut there now
        cut = held
        for m in _AFTER_LINE_BREAKS.finditer(text, held):
            cut = m.start()
        lines = prev.ids + self.encode(text[held:cut]) if cut > held else prev.ids
        self._history = _Segment(text[:cut], lines)
        self._history_last = _Segment(text, lines + self.encode(text[cut:]))
        return self._history_last.ids


def clip_text(text: str, max_tokens: int, *, from_end: bool, exact: bool = True) -> str:
    """Bound raw text before tokenizing it (see MAX_CHARS_PER_TOKEN)."""
    limit = max_tokens * (MAX_CHARS_PER_TOKEN if exact else APPROX_CHARS_PER_TOKEN)
    if len(text) <= limit:
        return text
    return text[-limit:] if from_end else text[:limit]


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    persona_tokens: int
    history_tokens: int
    utterance_tokens: int


def fit_prefix(persona_ids: list[int], history_ids: list[int], budget: int,
               history_step: int) -> tuple[list[int], list[int]]:
    """Persona and history cut to ``budget`` tokens together: history gives way first (in
    whole steps, so the cached prefix survives), then the persona's end."""
    if len(persona_ids) + len(history_ids) > budget:
        history_ids = trim_history(history_ids, max(0, budget - len(persona_ids)), history_step)
    if len(persona_ids) > budget:
        persona_ids = persona_ids[: max(0, budget)]
    return persona_ids, history_ids


def spoken(utterance: str) -> str:
    """The utterance as the chat prompt ends with it: without the spaces around it, nor
    U+FFFD at its end (a speech-to-text's unreadable character, which says nothing): a
    prompt whose text ends in it is streamed back whole by vLLM as the reply's start
    (yapd/engines/firsttext.py). Stripped, not matched: a pattern anchored at the end
    would try every start in a long run of spaces inside the text."""
    said = utterance.strip()
    while said.endswith("\ufffd"):
        said = said.rstrip("\ufffd").rstrip()
    return said


def build_chat_prompt(
    cache: PromptCache,
    layout: ChatLayout,
    persona: str,
    history_text: str,
    utterance: str,
    *,
    history_max_tokens: int,
    history_step: int,
    utterance_max_tokens: int,
    max_model_len: int,
    max_out: int,
    exact: bool = True,
) -> ChatPrompt:
    persona_ids = cache.persona_ids(layout.head + persona)
    history_ids: list[int] = []
    if history_text.strip():
        raw = cache.history_ids("\n\nConversation so far:\n" + history_text.strip(), history_max_tokens,
                                exact=exact)
        history_ids = trim_history(raw, history_max_tokens, history_step)
    utt_ids = trim_utterance(
        cache.encode(clip_text(spoken(utterance), utterance_max_tokens, from_end=False, exact=exact)),
        utterance_max_tokens, cache.decode,
    )
    middle = cache.encode_fixed(layout.middle)
    tail = cache.encode_fixed(layout.tail)
    # What must fit: the reply.
    budget = max_model_len - max_out - len(middle) - len(tail) - len(utt_ids)
    persona_ids, history_ids = fit_prefix(persona_ids, history_ids, budget, history_step)
    ids = persona_ids + history_ids + middle + utt_ids + tail
    return ChatPrompt(ids, len(persona_ids), len(history_ids), len(utt_ids))
