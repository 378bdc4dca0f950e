"""The bench's turns: the issue's prompt as words, and the token ids yapd builds for each turn."""

from __future__ import annotations

import uuid
from typing import Any

from yapctl.bench import salted_persona, turn_utterance
from yapctl.gpubench.runsetup import ROUNDS, Setup, turns_for

WORDS = ("the quick brown fox jumps over a lazy dog while the persona keeps talking about music movies "
         "travel plans and what to cook tonight because the user likes spicy food").split()


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


# The vLLM issue's prompt: a 600-token persona, a 2,000-token history (exactly, with NeMo's
# tokenizer) and a short utterance; 200 tokens out. Runs before af had 450 and 1,500 words:
# 471 and 1,555 tokens, a 2,058-token chat prompt where the issue asks ~2,630.
PROMPT = {"persona_words": 575, "history_words": 1930, "utterance_words": 20, "max_out": 200}
PROMPT_BEFORE_AF = {**PROMPT, "persona_words": 450, "history_words": 1500}  # files that recorded none
PERSONA = "<|persona|> " + text(PROMPT["persona_words"], 1)
HISTORY = "<|history|> " + text(PROMPT["history_words"], 2)
UTTERANCE = text(PROMPT["utterance_words"], 100)


def level_salt(s: Setup) -> str:
    """A level's persona salt under --fresh-prompts (a new one every level, A/B arm and
    start, so nothing is cached from an earlier one); "" otherwise."""
    return uuid.uuid4().hex[:8] if s.fresh_prompts else ""


class _Tok:
    def __init__(self, tok: Any) -> None:
        self.tokenizer = tok


class TurnPrompts:
    """The exact token ids yapd builds for each of the bench's turns (chat and tool):
    the floor and ``vllm serve`` get the prompts yapd's engines get."""

    def __init__(self, s: Setup) -> None:
        from yapd.engines.tokenizer import load_tokenizer
        from yapd.runtime import Runtime

        self.cfg = s.config()
        # yapd's own loading: a Mistral model's tokenizer gets its corrected pre-tokenizer
        self.chat_tok: Any = load_tokenizer(str(s.models / "nemo-12b"))
        self.tool_tok: Any = load_tokenizer(str(s.models / "hammer-3b"))
        rt = Runtime(self.cfg)
        self.layout = rt.layout(_Tok(self.chat_tok))  # type: ignore[arg-type]
        self.tool_prefix, self.tool_tail = rt.tool_prefix(_Tok(self.tool_tok))  # type: ignore[arg-type]
        self._memo: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        self.salt = ""  # the level's persona salt (level_salt): set before building its turns

    def turn(self, i: int) -> tuple[list[int], list[int]]:
        """(chat ids, tool ids) of turn ``i`` (see yapctl.bench.turn_utterance) under the
        current salt."""
        key = (self.salt, i)
        if key not in self._memo:
            from yapd.prompts import PromptCache, build_chat_prompt
            from yapd.turn import tool_query

            t = self.cfg.turn
            utterance = turn_utterance(UTTERANCE, i)
            persona = salted_persona(PERSONA, self.salt, i)
            chat = build_chat_prompt(PromptCache(self.chat_tok), self.layout, persona, HISTORY, utterance,
                                     history_max_tokens=t.history_max_tokens, history_step=t.history_trim_step,
                                     utterance_max_tokens=t.user_utt_max_tokens,
                                     max_model_len=self.cfg.chat.max_model_len, max_out=t.chat_max_out,
                                     exact=t.exact_token_trim).ids
            query = PromptCache(self.tool_tok).encode_lines(tool_query(utterance, HISTORY, t))
            self._memo[key] = chat, self.tool_prefix + query + self.tool_tail
        return self._memo[key]

    def chat_text(self, i: int) -> str:
        """Turn ``i``'s chat prompt as the text a `vllm serve` user would send."""
        return str(self.chat_tok.decode(self.turn(i)[0], skip_special_tokens=False))

    def all(self, levels: tuple[int, ...], rounds: int = ROUNDS) -> None:
        """Build every turn's prompts ahead of the clock (under the current salt)."""
        for i in range(-1, max(turns_for(c, rounds) for c in levels)):
            self.turn(i)

    def level(self, s: Setup, c: int) -> None:
        """Before level ``c``: a salt of its own under --fresh-prompts, its turns built."""
        self.salt = level_salt(s)
        if self.salt:
            self.all((c,), s.rounds)
