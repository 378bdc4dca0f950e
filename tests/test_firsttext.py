"""Each vLLM request's detokenizer primed from its prompt's end (yapd.engines.firsttext):
the same text as one primed with the whole prompt, for the decoders yapd's models use,
and the hook on an output processor built as vLLM 0.26's is where yapd wraps it (the real
one runs on the GPU: tests/test_gpu_vllm.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.decoding import texts
from yapd.engines.firsttext import prime_window, primed_stream, primes_from_prompt_end
from yapd.prompts import BACK_OFF

# Text a prompt or a reply may hold: ASCII words, accents, CJK, emoji with modifiers
# (four UTF-8 bytes, several tokens each), combining marks, newlines and tabs.
PIECES = [*"abc xyz.,?!\n\t", "é", "ö", "ß", "日", "本", "語", "🎉", "👍🏽", "\u0301", "—"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=120).map("".join)
CORPUS = ["Hello there, how are you doing today? I'm good, thanks for asking.",
          "The weather is nice; shall we meet at the café at 5 o'clock?",
          "日本語のテキストも少し。 Emoji too 🎉👍🏽 and accents: naïve, façade, Straße."] * 20


def byte_level() -> Any:
    """Byte-level BPE, as Tekken (Mistral NeMo) and Qwen's (Hammer) tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def metaspace_byte_fallback() -> Any:
    """SentencePiece-style BPE with byte fallback, as Llama's and Mistral's v1 tokenizers
    are: a word's leading space is its token's own, a character the vocabulary lacks is
    spelled in <0xNN> tokens, and the decoder strips the text's first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.train_from_iterator([line.encode("ascii", "ignore").decode() for line in CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    vocab = trained.get_vocab()
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


TOKENIZERS = {"byte_level": byte_level(), "metaspace_byte_fallback": metaspace_byte_fallback()}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A 40-token byte-fallback run cut at its last byte (a review found it 1 run in 20)
@example(prompt="é日日日日👍🏽👍🏽👍🏽é", cut=1, tail=[], reply="a", noise=[], skip=False, tokens=16)
@given(prompt=TEXT, cut=st.integers(0, 6), tail=st.lists(st.integers(0, 10**6), max_size=20), reply=TEXT,
       noise=st.lists(st.integers(0, 10**6), max_size=12), skip=st.booleans(), tokens=st.integers(1, 24))
def test_a_stream_primed_from_the_prompts_end_yields_the_reply_vllm_gives(
        name: str, prompt: str, cut: int, tail: list[int], reply: str, noise: list[int], skip: bool,
        tokens: int) -> None:
    """The same text as vLLM's stream primed with the whole prompt, for any prompt: its
    text's tokens cut anywhere (inside a character too) and any tokens after them
    (specials, bytes cut from their character), and any reply. Where the prompt's text
    ends in U+FFFD, the text vLLM's would give had the prompt ended before it (vLLM's
    own would give the whole prompt's text as the reply's first), or, past the window,
    the reply's own text read alone."""
    tok = TOKENIZERS[name]
    size = tok.get_vocab_size()
    text_ids = tok.encode(prompt, add_special_tokens=False).ids
    prompt_ids = [1, *text_ids[:len(text_ids) - cut], *(n % size for n in tail)]
    # A model's reply: text's tokens, and any token at all, as sampling from random
    # weights gives.
    reply_ids = tok.encode(reply, add_special_tokens=False).ids + [n % size for n in noise]
    end = len(prompt_ids)
    while end > 1 and tok.decode(prompt_ids[:end], skip_special_tokens=skip).endswith("\ufffd"):
        end -= 1
    ours = texts(tok, primed_stream(tok, prompt_ids, skip, tokens), reply_ids, skip)
    alone = texts(tok, primed_stream(tok, [], skip, 0), reply_ids, skip)
    vllms = texts(tok, primed_stream(tok, prompt_ids[:end], skip, 0), reply_ids, skip)
    n = len(prompt_ids)
    if n - end > tokens:  # a run of U+FFFD longer than the window: the reply read alone
        assert ours == alone
    elif prime_window(tok, prompt_ids, skip, tokens) == (n, n) and end < n:
        # A cut byte-fallback run longer than the reading's reach: read alone too. A
        # byte-level decoder reads a reply alone as after its prompt; a metaspace one may
        # drop the first token's leading space.
        assert ours == alone and (name != "byte_level" or ours == vllms)
    else:
        assert ours == vllms


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_the_prompts_end_is_taken_from_a_characters_start(name: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode("well done 🦀!", add_special_tokens=False).ids
    # The last cut inside the crab's bytes (a character the corpus lacks, so spelled in
    # them), and the start of its first byte's token, where the prompt's end moves.
    inside = [i for i in range(len(ids)) if tok.decode(ids[i:], skip_special_tokens=True).startswith("\ufffd")]
    assert inside, "the crab's bytes should be cut across tokens"
    at = min(inside) - 1
    assert "🦀" in tok.decode(ids[at:]) and "🦀" not in tok.decode(ids[at + 1:])
    cut_inside = len(ids) - max(inside)
    n = len(ids)
    assert prime_window(tok, ids, True, cut_inside) == (at, n)
    assert prime_window(tok, ids, True, n - at) == (at, n)
    assert prime_window(tok, ids, True, 0) == (0, n) and prime_window(tok, ids, True, n) == (0, n)
    reply = tok.encode("yes", add_special_tokens=False).ids
    first = texts(tok, primed_stream(tok, ids, True, cut_inside), reply)
    assert first == texts(tok, primed_stream(tok, ids, True, 0), reply) and "\ufffd" not in "".join(first)


def test_a_window_starts_before_a_replacement_characters_run_at_its_cut() -> None:
    """U+FFFD itself at the window's start reads as a character cut there: the window
    starts before it, or at the prompt's start where it is more than BACK_OFF tokens."""
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode("well done \ufffd\ufffd\ufffd\ufffd\ufffd!", add_special_tokens=False).ids
    start, end = prime_window(tok, ids, True, 2)
    assert end == len(ids) and tok.decode(ids[start:]) == " \ufffd\ufffd\ufffd\ufffd\ufffd!"
    ids = tok.encode("well done " + "\ufffd" * (BACK_OFF + 8) + "!", add_special_tokens=False).ids
    assert prime_window(tok, ids, True, 2) == (0, len(ids))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_window_of_skipped_special_tokens_is_primed_whole(name: str) -> None:
    """The last tokens all specials, skipped: primed with them alone the reply's first
    token would be decoded as the text's start (a metaspace decoder drops its space). The
    window starts where it holds text, or at the prompt's start where that is more than
    BACK_OFF tokens further."""
    tok = TOKENIZERS[name]
    special = tok.token_to_id("</s>" if name.startswith("metaspace") else "<|im_end|>")
    text = tok.encode("Hello there, look at this:", add_special_tokens=False).ids
    ids = text + [special] * 12
    start, end = prime_window(tok, ids, True, 8)
    assert end == len(ids) and 0 < start < len(text) and tok.decode(ids[start:end], skip_special_tokens=True)
    assert prime_window(tok, ids, False, 8) == (len(ids) - 8, len(ids))
    reply = tok.encode(" Hello there", add_special_tokens=False).ids
    assert texts(tok, primed_stream(tok, ids, True, 8), reply) == texts(tok, primed_stream(tok, ids, True, 0), reply)
    ids = text + [special] * (BACK_OFF + 10)
    assert prime_window(tok, ids, True, 8) == (0, len(ids))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_prompt_whose_text_ends_in_a_broken_character_is_not_given_back_as_the_reply(name: str) -> None:
    """A prompt cut inside the crab's bytes (and a special token after, skipped): primed
    with the whole prompt, vLLM's stream gives the prompt's text with the reply's first
    token; primed without the broken bytes, only the reply's text."""
    tok = TOKENIZERS[name]
    special = tok.token_to_id("</s>" if name.startswith("metaspace") else "<|im_end|>")
    head = tok.encode("You are Ava. The user said: well done", add_special_tokens=False).ids
    crab = tok.encode(" 🦀", add_special_tokens=False).ids
    ids = [*head, *crab[:-1], special]
    assert tok.decode(ids, skip_special_tokens=True).endswith("\ufffd")
    reply = tok.encode(" Thanks", add_special_tokens=False).ids
    vllms = texts(tok, primed_stream(tok, ids, True, 0), reply)
    assert "You are Ava" in vllms[0]
    _, end = prime_window(tok, ids, True, 16)
    assert len(head) <= end <= len(ids) - 3 and not tok.decode(ids[:end], skip_special_tokens=True).endswith("\ufffd")
    ours = texts(tok, primed_stream(tok, ids, True, 16), reply)
    assert "".join(ours) == "".join(texts(tok, primed_stream(tok, head, True, 0), reply))
    assert "Ava" not in "".join(ours)


class OutputProcessor:
    """vLLM 0.26's OutputProcessor where yapd hooks it: ``add_request`` makes the request's
    state, keyed by the request's (internal) id, whose fast detokenizer holds a
    DecodeStream primed with the whole prompt and its request's skip_special_tokens."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.request_states: dict[str, Any] = {}

    def add_request(self, request: Any, prompt: str | None, parent_req: Any = None, request_index: int = 0,
                    queue: Any = None) -> None:
        if request.request_id in self.request_states:
            return  # vLLM: a streaming input's next chunk, queued on the request's state
        skip = request.sampling_params.skip_special_tokens
        detokenizer = SimpleNamespace(skip_special_tokens=skip, tokenizer=self.tok,
                                      stream=primed_stream(self.tok, request.prompt_token_ids, skip, 0))
        self.request_states[request.request_id] = SimpleNamespace(detokenizer=detokenizer, queue=queue,
                                                                  vllms_stream=detokenizer.stream)


def request(request_id: str, ids: list[int], skip: bool = True) -> Any:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=ids,
                           sampling_params=SimpleNamespace(skip_special_tokens=skip))


def test_the_hook_primes_each_long_prompts_stream_from_its_end_and_leaves_short_ones() -> None:
    tok = TOKENIZERS["byte_level"]
    processor = OutputProcessor(tok)
    assert primes_from_prompt_end(SimpleNamespace(output_processor=processor), 8)
    long_ids = tok.encode(" ".join(CORPUS[:6])).ids
    short_ids = long_ids[:8]
    reply = tok.encode(" and then some more words, with a café ☕").ids
    processor.add_request(request("long-1", long_ids), None, None, 0, queue="q")
    processor.add_request(request("short-1", short_ids), None)
    assert processor.request_states["long-1"].queue == "q"  # the arguments reach vLLM's own
    long_state, short_state = processor.request_states["long-1"], processor.request_states["short-1"]
    assert long_state.detokenizer.stream is not long_state.vllms_stream
    assert short_state.detokenizer.stream is short_state.vllms_stream
    primed = long_state.detokenizer.stream
    # A streaming input's next chunk for a request already there: its stream stays.
    processor.add_request(request("long-1", long_ids + reply), None)
    assert long_state.detokenizer.stream is primed
    assert texts(tok, primed, reply) == texts(tok, primed_stream(tok, long_ids, True, 0), reply)
    assert texts(tok, processor.request_states["short-1"].detokenizer.stream, reply) == \
        texts(tok, primed_stream(tok, short_ids, True, 0), reply)


def test_the_hook_leaves_vllm_as_it_is_when_asked_for_the_whole_prompt_or_not_knowing_it() -> None:
    processor = OutputProcessor(TOKENIZERS["byte_level"])
    add = processor.add_request
    assert not primes_from_prompt_end(SimpleNamespace(output_processor=processor), 0)
    assert processor.add_request == add
    assert not primes_from_prompt_end(SimpleNamespace(), 16)
    assert not primes_from_prompt_end(SimpleNamespace(output_processor=SimpleNamespace(add_request=add)), 16)


def test_a_slow_detokenizer_without_a_stream_is_left_alone() -> None:
    processor = OutputProcessor(TOKENIZERS["byte_level"])
    slow = SimpleNamespace(prompt_len=3, tokenizer=TOKENIZERS["byte_level"])  # as vLLM's slow one: no stream

    def add_request(request: Any, *args: Any) -> None:
        processor.request_states[request.request_id] = SimpleNamespace(detokenizer=slow)

    processor.add_request = add_request  # type: ignore[method-assign]
    assert primes_from_prompt_end(SimpleNamespace(output_processor=processor), 2)
    processor.add_request(request("r-1", list(range(40))), None)
    assert processor.request_states["r-1"].detokenizer is slow and not hasattr(slow, "stream")


@pytest.mark.parametrize("context", [16, 0])
def test_an_engine_primes_as_configured_and_warns_of_a_vllm_it_cannot(context: int, caplog) -> None:
    """VllmEngine's hooks on a started AsyncLLM: the priming on engines.detokenizer_context's
    count, a warning where this vLLM has no output processor like 0.26's (every first
    output then decodes its whole prompt), nothing at all for 0."""
    from yapd import config
    from yapd.engines.vllm import VllmEngine

    cfg = config.from_mapping({"engines": {"detokenizer_context": context}}, "test")
    processor = OutputProcessor(TOKENIZERS["byte_level"])
    add = processor.add_request
    VllmEngine("chat", cfg)._hook_client(SimpleNamespace(output_processor=processor))
    assert (processor.add_request != add) == bool(context)
    VllmEngine("tool", cfg)._hook_client(SimpleNamespace())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == (["this vLLM's output processor is not the one engines.detokenizer_context knows: each first "
                       "output decodes its whole prompt role=tool"] if context else [])


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("specials", [1, 8, 12])
def test_skipped_special_tokens_after_a_cut_character_do_not_hide_it(name: str, specials: int) -> None:
    """A character cut short, then more skipped special tokens than the end is read
    from: the window still leaves the broken end out, and the reply's text is its own."""
    tok = TOKENIZERS[name]
    special = tok.token_to_id("</s>" if name.startswith("metaspace") else "<|im_end|>")
    head = tok.encode("You are Ava. The user says: well done", add_special_tokens=False).ids
    crab = tok.encode(" 🦀", add_special_tokens=False).ids
    ids = [*head, *crab[:-1], *[special] * specials]
    reply = tok.encode(" Thanks", add_special_tokens=False).ids
    whole = [*head, *crab[:-1]]
    while tok.decode(whole, skip_special_tokens=True).endswith("\ufffd"):
        whole.pop()
    ours = texts(tok, primed_stream(tok, ids, True, 16), reply)
    assert ours == texts(tok, primed_stream(tok, whole, True, 0), reply) and "Ava" not in "".join(ours)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_run_of_replacement_characters_longer_than_the_window_is_never_streamed_back(name: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode("You are Ava. The user says: what is this " + "\ufffd" * 40, add_special_tokens=False).ids
    assert prime_window(tok, ids, True, 16) == (len(ids), len(ids))
    reply = tok.encode(" It", add_special_tokens=False).ids
    ours = texts(tok, primed_stream(tok, ids, True, 16), reply)
    assert "Ava" not in "".join(ours) and "".join(ours).strip() == "It"
    assert "Ava" in texts(tok, primed_stream(tok, ids, True, 0), reply)[0]  # vLLM's own


@pytest.mark.parametrize("skip", [True, False])
def test_the_hooks_stream_keeps_the_requests_special_tokens_setting(skip: bool) -> None:
    """A request that shows special tokens (skip_special_tokens false) gets a stream that
    shows them too, primed from its own window."""
    tok = TOKENIZERS["byte_level"]
    special = tok.token_to_id("<|im_end|>")
    processor = OutputProcessor(tok)
    assert primes_from_prompt_end(SimpleNamespace(output_processor=processor), 8)
    ids = [*tok.encode(" ".join(CORPUS[:3]), add_special_tokens=False).ids, special, special]
    processor.add_request(request("r-1", ids, skip), None)
    reply = [special, *tok.encode(" ok", add_special_tokens=False).ids]
    said = texts(tok, processor.request_states["r-1"].detokenizer.stream, reply, skip)
    assert said == texts(tok, primed_stream(tok, ids, skip, 0), reply, skip)
    assert ("<|im_end|>" in "".join(said)) is not skip


def test_a_run_made_invalid_before_the_window_reads_the_reply_alone() -> None:
    """A byte-fallback run whose first byte continues no character (all of it U+FFFD to
    a byte-fallback decoder) ending the prompt, while its last characters read whole on
    their own: the window reaching over that byte ends in U+FFFD, and the reply is read
    alone, never after the prompt's text."""
    tok = TOKENIZERS["metaspace_byte_fallback"]
    crabs = tok.encode("🦀🦀🦀", add_special_tokens=False).ids[1:]  # 12 byte tokens, the leading "▁" dropped
    ids = [*tok.encode("You are Ava. Hello", add_special_tokens=False).ids, tok.token_to_id("<0x9D>"), *crabs,
           tok.token_to_id("</s>")]
    assert tok.decode(ids, skip_special_tokens=True).endswith("\ufffd")
    assert prime_window(tok, ids, True, 16) == (len(ids), len(ids))
    reply = tok.encode(" Sure", add_special_tokens=False).ids
    ours = texts(tok, primed_stream(tok, ids, True, 16), reply)
    assert ours == texts(tok, primed_stream(tok, [], True, 0), reply) and "Ava" not in "".join(ours)
