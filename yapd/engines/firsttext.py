"""A request's first text without decoding its whole prompt again.

vLLM's front end detokenizes each request's output as it arrives, in its output handler
on yapd's event loop, through a tokenizers ``DecodeStream`` primed with the request's
whole prompt. The stream's first step decodes that prompt twice (as the text so far and
with the new token) to find the new token's text, for every request of a step's batch
before any of them reaches its turn. ``yapctl.firsttextbench`` (vLLM 0.26's
``OutputProcessor``, NeMo's tokenizer, gpubench's 2,632-token chat prompt, this project's
CPU machine) times the step bringing 16 such first tokens at 7.07 ms p50, and 0.15 ms
with each stream primed from the prompt's last 16 tokens. On an H100 at 16 sessions the
chat's first token took 11.4 ms p50 from the output handler taking it to the turn
holding it, raw vLLM's as long (runs ap and ar, docs/bench/README.md).

A new token's text depends only on the tokens just before it: a byte-level decoder's on
the bytes of a character cut across tokens (at most 4), a metaspace decoder's on nothing
before it (its leading space is the token's own; the decoder's strip of a leading space
applies to the start of every decode alike). So the stream is primed with the prompt's
last ``tokens`` instead, taken from a character's start (a stream primed from the middle
of one would put a replacement character before the first token's text), and yields the
same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The most tokens a character's bytes are cut into after its first (UTF-8: 4 bytes).
CHARACTER_TAIL = 3


def prompt_end(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool, tokens: int) -> int:
    """Where the last ``tokens`` of ``prompt_ids`` begin, moved back to a character's start
    (``tokenizer``: a tokenizers.Tokenizer); 0, the whole prompt, for ``tokens`` 0 or where
    no start is found that near (a prompt holding U+FFFD itself there)."""
    if tokens <= 0 or len(prompt_ids) <= tokens:
        return 0
    start = len(prompt_ids) - tokens
    for at in range(start, max(0, start - CHARACTER_TAIL) - 1, -1):
        if not tokenizer.decode(list(prompt_ids[at:]), skip_special_tokens=skip_special_tokens).startswith("\ufffd"):
            return at
    return 0


def primed_stream(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool, tokens: int) -> Any:
    """A DecodeStream primed with the last ``tokens`` of ``prompt_ids`` (see prompt_end;
    the whole prompt for 0). Looked up on the module as vLLM does, so a backend that
    replaces the class is honoured here too."""
    import tokenizers.decoders

    ids = list(prompt_ids[prompt_end(tokenizer, prompt_ids, skip_special_tokens, tokens):])
    return tokenizers.decoders.DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)


def primes_from_prompt_end(llm: Any, tokens: int) -> bool:
    """Have ``llm`` (an AsyncLLM) prime each new request's detokenizer with its prompt's
    last ``tokens`` (see the module's text); wrapped on this AsyncLLM's output processor
    alone. False, and vLLM left as it is, for ``tokens`` 0 or a vLLM whose output
    processor keeps its requests otherwise."""
    processor = getattr(llm, "output_processor", None)
    add = getattr(processor, "add_request", None)
    states = getattr(processor, "request_states", None)
    if tokens <= 0 or processor is None or add is None or not isinstance(states, dict):
        return False

    def add_request(request: Any, *args: Any, **kwargs: Any) -> None:
        # A request already there is a streaming input's next chunk (vLLM queues it on the
        # request's state): its stream has decoded the reply so far and stays.
        new = request.request_id not in states
        add(request, *args, **kwargs)
        if not new:
            return
        detokenizer = getattr(states.get(request.request_id), "detokenizer", None)
        ids = getattr(request, "prompt_token_ids", None)
        tokenizer = getattr(detokenizer, "tokenizer", None)
        # Only vLLM's fast detokenizer keeps a DecodeStream (and its tokenizer's Rust
        # side); the slow one already works from a few prompt tokens.
        if detokenizer is None or tokenizer is None or not hasattr(detokenizer, "stream") or ids is None \
                or len(ids) <= tokens:
            return
        detokenizer.stream = primed_stream(tokenizer, ids, bool(getattr(detokenizer, "skip_special_tokens", True)),
                                           tokens)

    processor.add_request = add_request
    return True
