"""A request's first text without decoding its whole prompt again.

vLLM's front end detokenizes each request's output as it arrives, in its output handler
on yapd's event loop, through a tokenizers ``DecodeStream`` primed with the request's
whole prompt. The stream's first step decodes that prompt twice (as the text so far and
with the new token) to find the new token's text, for every request of a step's batch
before any of them reaches its turn. ``yapctl.firsttextbench`` (vLLM 0.26's
``OutputProcessor``, NeMo's tokenizer, gpubench's 2,632-token chat prompt, this project's
CPU machine) times the step bringing 16 such first tokens at 7.0-7.4 ms p50, and 0.15 ms
with each stream primed from the prompt's last 16 tokens (finding those windows added
0.1 ms to adding the 16 requests). On an H100 at 16 sessions the chat's first token took
11.4 ms p50 from the output handler taking it to the turn holding it, raw vLLM's as long
(runs ap and ar, docs/bench/README.md).

A new token's text depends only on the tokens just before it: a byte-level decoder's on
the bytes of a character cut across tokens (at most 4), a metaspace decoder's on nothing
before it (its leading space is the token's own; the decoder's strip of a leading space
applies to the start of every decode alike). So the stream is primed with the prompt's
last ``tokens`` instead, and yields the same text, where the window is taken as
``prime_window`` says: from a character's start (a stream primed from the middle of one
would put a replacement character before the first token's text), and with text in it
(a window of skipped special tokens decodes to nothing, and the first token would then
be decoded as the text's start: a metaspace decoder drops its leading space).

One case differs, on purpose: a prompt whose text ends in U+FFFD (a character cut short,
or that character itself). A DecodeStream primed with it holds all of its text back and
gives it with the reply's first token: vLLM then streams the whole prompt (persona and
history) as the start of the reply. The window leaves those last tokens out, so the
reply's text is the reply's; past ``tokens`` of them, or where the end cannot be read
near it (inside a cut byte-fallback run), the window is empty and the reply's first
token is read alone (a metaspace decoder may drop its leading space), never the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from yapd.prompts import BACK_OFF

# The tokens read to see how a text ends.
END_WINDOW = 8


def clean_start(decode: Callable[[Sequence[int]], str], ids: Sequence[int], at: int,
                end: int) -> tuple[int, str] | None:
    """The latest start at or before ``at`` from which ``ids[start:end]`` decodes to text
    that is not empty (skipped special tokens decode to nothing) and does not begin in
    U+FFFD, with that text: read from there, the window's text is the end of the whole
    one's. The text's own start (0) is always one (reached only within BACK_OFF of
    ``at``: a short window). None if none within BACK_OFF."""
    for start in range(at, max(0, at - BACK_OFF) - 1, -1):
        said = decode(ids[start:end])
        if start == 0 or (said and not said.startswith("\ufffd")):
            return start, said
    return None


def ends_broken(decode: Callable[[Sequence[int]], str], ids: Sequence[int], end: int) -> bool | None:
    """Whether ``ids[:end]``'s text ends in U+FFFD (a character cut short, or that
    character), read from its last tokens, from a start where the text begins whole and
    is not empty (skipped special tokens decode to nothing); None where there is no such
    start near the end (a long run of U+FFFD, specials, or byte-fallback tokens)."""
    found = clean_start(decode, ids, max(0, end - END_WINDOW), end)
    return None if found is None else found[1].endswith("\ufffd")


def prime_window(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool, tokens: int) -> tuple[int, int]:
    """The prompt tokens ``[start, end)`` to prime a request's DecodeStream with (see the
    module's text; ``tokenizer``: a tokenizers.Tokenizer): the last ``tokens`` of the
    prompt, read from where its text begins whole and holds text, leaving out the tokens
    of a text that ends in U+FFFD. ``(0, len(prompt_ids))``, vLLM's own, for ``tokens``
    0; ``(0, end)`` where no such start is found near the end. An empty window, never the
    prompt's text, where more than ``tokens`` end it in U+FFFD or the window's own text
    still ends so: the reply's first token is then read alone."""
    n = len(prompt_ids)
    if tokens <= 0:
        return 0, n

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    end = n
    while broken := ends_broken(decode, prompt_ids, end):
        if n - end >= tokens:
            return n, n
        end -= 1
    if broken is None:
        # No start near the end reads it whole (a long run of byte-fallback tokens, of
        # U+FFFD or of specials): read it from the farthest one, and where that ends in
        # U+FFFD, read the reply alone rather than walk back over the run.
        if decode(prompt_ids[max(0, end - END_WINDOW - BACK_OFF):end]).endswith("\ufffd"):
            return n, n
    if end <= tokens:
        return 0, end
    found = clean_start(decode, prompt_ids, end - tokens, end)
    if found is None:
        return 0, end
    start, said = found
    if said.endswith("\ufffd"):  # read inside a byte-fallback run cut before it
        return n, n
    return start, end


def decode_stream(ids: Sequence[int], skip_special_tokens: bool) -> Any:
    """A DecodeStream primed with ``ids``. Looked up on the module as vLLM does, so a
    backend that replaces the class is honoured here too."""
    import tokenizers.decoders

    return tokenizers.decoders.DecodeStream(ids=list(ids), skip_special_tokens=skip_special_tokens)


def primed_stream(tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool, tokens: int) -> Any:
    """A DecodeStream primed as prime_window says (the whole prompt for ``tokens`` 0)."""
    start, end = prime_window(tokenizer, prompt_ids, skip_special_tokens, tokens)
    return decode_stream(prompt_ids[start:end], skip_special_tokens)


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
        if detokenizer is None or tokenizer is None or not hasattr(detokenizer, "stream") or ids is None:
            return
        skip = bool(getattr(detokenizer, "skip_special_tokens", True))
        start, end = prime_window(tokenizer, ids, skip, tokens)
        if (start, end) != (0, len(ids)):  # else vLLM's own stream is the same
            detokenizer.stream = decode_stream(ids[start:end], skip)

    processor.add_request = add_request
    return True
