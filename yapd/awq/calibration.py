"""Calibration text for AWQ: what the model reads while its activation scales are measured.

AWQ picks per-channel scales from the activations that calibration text produces, so the
text should look like what the model will serve. The built-in set is short spoken
conversations shipped in the package (``yapd/data/awq_calibration.json``), rendered the
way yapd prompts each model: the chat model gets a persona system prompt and the
dialogue through its chat template, the tool model gets the Hammer tool-call prompt.
Nothing is downloaded.

A user file replaces it: ``.jsonl`` with one ``{"text": ...}`` or ``{"messages": [...]}``
object a line, anything else plain text with one sample a line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Role = Literal["chat", "tool"]
BUILTIN_NAME = "builtin:yapd-conversations"


@dataclass(frozen=True)
class Sample:
    text: str
    # Rendered through a chat template, which already holds the special tokens.
    templated: bool


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[Sample]
    source: str  # "builtin:yapd-conversations-v1" or the user's file path
    sha256: str  # of the file the samples came from


def builtin_data() -> tuple[dict[str, Any], bytes]:
    raw = resources.files("yapd").joinpath("data/awq_calibration.json").read_bytes()
    return json.loads(raw), raw


def _chat_messages(system: str, turns: list[str]) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return msgs


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> Sample:
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return Sample(str(text), True)
        except Exception:
            # Some templates refuse a system role: fold it into the first user turn.
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
                return _render(tokenizer, [first, *messages[2:]], generation_prompt)
            raise
    return Sample("\n".join(m["content"] for m in messages), False)


def builtin_samples(role: Role, tokenizer: Any, count: int) -> list[Sample]:
    """``count`` samples (fewer if the set runs out of distinct ones), deterministic."""
    from yapd.config import DEFAULT_TOOLS
    from yapd.prompts import BUILTIN_STYLES, GENDERS, compose_persona
    from yapd.toolcall import instruction_block, query_block

    data, _ = builtin_data()
    dialogues: list[dict[str, Any]] = data["dialogues"]
    styles = list(BUILTIN_STYLES.values())
    out: list[Sample] = []
    if role == "chat":
        # Every dialogue under each persona style in turn: same words, different system prompts.
        for k in range(min(count, len(dialogues) * len(styles))):
            d = dialogues[k % len(dialogues)]
            rnd = k // len(dialogues)
            style = styles[(k + rnd) % len(styles)]
            system = compose_persona(style, GENDERS[k % 2], "")
            turns = list(d["turns"])
            # Dialogues end on the user's line, as a live prompt does, every other round.
            if rnd % 2 == 1 and len(turns) % 2 == 0:
                turns = turns[:-1]
            out.append(_render(tokenizer, _chat_messages(system, turns), generation_prompt=len(turns) % 2 == 1))
        return out
    head = instruction_block(DEFAULT_TOOLS)
    # The tool model sees one user utterance (every user line of every dialogue) with the
    # lines before it as context, and answers with a JSON list.
    queries: list[tuple[str, str, bool]] = []
    for d in dialogues:
        turns = d["turns"]
        for i in range(0, len(turns), 2):
            history = "\n".join(f"{'user' if j % 2 == 0 else 'assistant'}: {t}" for j, t in enumerate(turns[:i]))
            is_call = bool(d.get("tool")) and i == len(turns) - 2
            queries.append((turns[i], history, is_call))
    for utterance, history, is_call in queries[:count]:
        answer = '[{"name": "take_screenshot", "arguments": {}}]' if is_call else "[]"
        msgs = [{"role": "user", "content": head + query_block(utterance, history)},
                {"role": "assistant", "content": answer}]
        out.append(_render(tokenizer, msgs, generation_prompt=False))
    return out


def file_samples(path: Path, tokenizer: Any, count: int) -> list[Sample]:
    raw = path.read_text(encoding="utf-8")
    out: list[Sample] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(Sample(obj["text"], False))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                out.append(_render(tokenizer, obj["messages"], generation_prompt=False))
            else:
                raise ValueError(f'{path}:{n}: expected {{"text": ...}} or {{"messages": [...]}}')
        else:
            out.append(Sample(line, False))
        if len(out) >= count:
            break
    if not out:
        raise ValueError(f"{path}: no calibration samples in it")
    return out


def load(role: Role, tokenizer: Any, count: int, path: str = "") -> CalibrationSet:
    if path:
        p = Path(path).expanduser()
        samples = file_samples(p, tokenizer, count)
        return CalibrationSet(samples, str(p.resolve()), hashlib.sha256(p.read_bytes()).hexdigest())
    data, raw = builtin_data()
    return CalibrationSet(builtin_samples(role, tokenizer, count), f"{BUILTIN_NAME}-v{data['version']}",
                          hashlib.sha256(raw).hexdigest())


def tokenize(samples: list[Sample], tokenizer: Any, max_len: int) -> list[list[int]]:
    """Token ids per sample, cut at ``max_len``; samples of under two tokens are dropped."""
    out = []
    for s in samples:
        ids = tokenizer(s.text, add_special_tokens=not s.templated, truncation=True, max_length=max_len)["input_ids"]
        if len(ids) >= 2:
            out.append(list(ids))
    return out
