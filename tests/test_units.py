"""Pure units: config, trimming, personas, Hammer parsing, rate limiting, engine args."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from yapd import config
from yapd.config import ConfigError
from yapd.engines.base import EngineError
from yapd.engines.vllm import engine_kwargs, require_gpus
from yapd.prompts import (
    BACK_OFF,
    BUILTIN_STYLES,
    ChatLayout,
    PromptCache,
    build_chat_prompt,
    compose_persona,
    persona_styles,
    trim_history,
    trim_utterance,
)
from yapd.session import RateLimiter
from yapd.toolcall import DecisionReader, instruction_block, parse_calls, query_block

# --- config ----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_originals():
    cfg = config.load(None, env={})
    assert cfg.server.api_keys == ["yap_token"] and cfg.server.port == 8000
    assert cfg.engines.deploy == "both" and cfg.max_connections == 16
    assert cfg.gpu_fraction("chat") == 0.70 and cfg.gpu_fraction("tool") == 0.20
    t = cfg.turn
    assert (t.chat_max_out, t.history_max_tokens, t.user_utt_max_tokens) == (200, 3000, 350)
    assert cfg.chat.max_model_len == 5760 and t.tool_timeout_s == 10.0
    assert cfg.chat.model == "SicariusSicariiStuff/Impish_Nemo_12B" and cfg.tool.model == "MadeAgents/Hammer2.1-3b"


@pytest.mark.parametrize("deploy,cap,frac", [("tool", 32, 0.90), ("chat", 24, 0.90), ("both", 16, 0.70)])
def test_deploy_aware_defaults(deploy, cap, frac):
    cfg = config.load(None, env={"DEPLOY_MODELS": deploy})
    assert cfg.max_connections == cap
    role = "tool" if deploy == "tool" else "chat"
    assert cfg.gpu_fraction(role) == frac


def test_env_overrides_every_original_variable():
    env = {"YAP_API_KEY": "a,b", "MAX_CONCURRENT_CONNECTIONS": "5", "DEPLOY_MODELS": "chat", "CHAT_MODEL": "x/y",
           "TOOL_MODEL": "t/m", "CHAT_GPU_FRAC": "0.5", "TOOL_GPU_FRAC": "0.3", "QUANTIZATION": "awq",
           "KV_DTYPE": "fp8", "CONCURRENT_MODEL_CALL": "1", "STREAM_FLUSH_MS": "15", "CHAT_MAX_OUT": "99",
           "HISTORY_MAX_TOKENS": "1000", "USER_UTT_MAX_TOKENS": "50", "EXACT_TOKEN_TRIM": "0", "CHAT_MAX_LEN": "4096",
           "AWQ_CHAT_MODEL": "o/chat-awq", "AWQ_TOOL_MODEL": "o/tool-awq"}
    cfg = config.load(None, env=env)
    assert cfg.server.api_keys == ["a", "b"] and cfg.max_connections == 5 and cfg.engines.deploy == "chat"
    assert (cfg.chat.model, cfg.tool.model) == ("x/y", "t/m")
    assert (cfg.gpu_fraction("chat"), cfg.tool.gpu_memory_utilization) == (0.5, 0.3)
    assert cfg.chat.quantization == "awq" and cfg.tool.quantization == "awq"
    assert cfg.chat.kv_cache_dtype == "fp8" == cfg.tool.kv_cache_dtype
    t = cfg.turn
    assert t.concurrent and t.stream_flush_ms == 15 and t.chat_max_out == 99 and t.history_max_tokens == 1000
    assert t.user_utt_max_tokens == 50 and t.exact_token_trim is False and cfg.chat.max_model_len == 4096
    assert (cfg.chat.awq_model, cfg.tool.awq_model) == ("o/chat-awq", "o/tool-awq")


@pytest.mark.parametrize("text,needle", [
    ("[server]\nport = 'eighty'\n", "server.port: expected an integer"),
    ("[server]\nbogus = 1\n", "server.bogus: unknown key"),
    ("[nope]\nx = 1\n", "nope: unknown section"),
    ("[server]\napi_keys = 'k'\n", "server.api_keys: expected a list"),
    ("[server]\napi_keys = []\n", "api_keys: at least one"),
    ("[engines]\ndeploy = 'all'\n", "engines.deploy: 'all' is not one of"),
    ("[engines]\nstart_method = 'thread'\n", "engines.start_method: 'thread' is not one of 'fork', 'spawn'"),
    ("[tool]\nstart_method = 'forkserver'\n", "tool.start_method: 'forkserver' is not one of '', 'fork', 'spawn'"),
    ("[engines]\ncore_switch_interval_ms = 0.001\n", "engines.core_switch_interval_ms: must be 0 (Python's own) or in"),
    ("[engines]\ncore_switch_interval_ms = -1\n", "engines.core_switch_interval_ms: must be 0"),
    ("[engines]\ncore_switch_interval_ms = 500\n", "engines.core_switch_interval_ms: must be 0"),
    ("[engines]\ncore_switch_interval_ms = '1'\n", "engines.core_switch_interval_ms: expected a number"),
    ("[engines]\ndetokenizer_context = -1\n", "engines.detokenizer_context: must be >= 0 (0: the whole prompt)"),
    ("[engines]\nfork_from_main_thread = 1\n", "engines.fork_from_main_thread: expected true or false, got int"),
    ("[chat]\nmax_num_batched_tokens = -1\n", "chat.max_num_batched_tokens: must be >= 0"),
    ("[tool]\nmax_num_batched_tokens = 1024\nenable_chunked_prefill = false\n",
     "tool.max_num_batched_tokens: 1024 is below max_model_len (5760) with enable_chunked_prefill = false"),
    ("[chat]\ngpu_memory_utilization = 0.8\n[tool]\ngpu_memory_utilization = 0.3\n", "leaves no room"),
    ("[server]\nrate_limit_burst = 1" + "0" * 400 + "\n", "server.rate_limit_burst: expected a 64-bit integer"),
    ("[turn]\nhistory_max_tokens = -9223372036854775809\n", "expected a 64-bit integer"),
    ("[server]\nallowed_origins = ['https://app.example/']\n", "server.allowed_origins[0]: 'https://app.example/' "
     "is not an origin"),
    ("[server]\nallowed_origins = ['app.example']\n", "is not an origin"),
    ("[turn]\nchat_max_out = 6000\n", "turn.chat_max_out: turn.chat_max_out + turn.user_utt_max_tokens = 6350 "
     "leaves no room for a prompt in chat.max_model_len (5760)"),
    ("[turn]\ntool_max_tokens = 5000\n[tool]\nmax_model_len = 4096\n", "turn.tool_max_tokens: turn.tool_max_tokens "
     "+ turn.user_utt_max_tokens + turn.tool_history_tokens = 5606 leaves no room for a prompt in tool.max_model_len "
     "(4096)"),
    ("[turn]\ndefault_persona_style = 'grumpy'\n", "default_persona_style"),
    ("[[tools]]\ndescription = 'x'\n", "a tool needs a name"),
    ("[server\n", "invalid TOML"),
    ("[logging]\nlevel = 'loud'\n", "logging.level"),
])
def test_bad_config_names_file_key_and_reason(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    assert needle in str(info.value) and str(path) in str(info.value)


def test_a_deployed_engine_without_its_engine_object_is_named_not_left_out():
    """Before the first start makes the engines (an AWQ build, MPS) and while a restart
    has stopped one: /healthz, /status and yapd_engine_up had no entry for the role."""
    from yapd.runtime import Runtime

    rt = Runtime(config.load(None, env={}))
    assert rt.engine_states() == {"chat": "starting", "tool": "starting"}
    assert rt.engines_up() == {"chat": False, "tool": False}
    rt.restarting = {"tool"}
    assert rt.engine_states() == {"chat": "starting", "tool": "restarting"}
    assert rt.status()["engines"]["tool"] == {"role": "tool", "state": "restarting", "ok": False, "in_flight": 0}


def test_a_value_the_checks_refuse_names_where_it_came_from(tmp_path):
    """A value that parses but fails a check named the file (which said port = 8000, or
    nothing) where the environment or the command line had set it."""
    path = tmp_path / "c.toml"
    path.write_text('[server]\napi_keys = ["k"]\nport = 8000\n')
    with pytest.raises(ConfigError) as info:
        config.load(path, env={"YAP_PORT": "99999"})
    assert str(info.value) == "environment YAP_PORT: server.port: 99999 is not a TCP port (0-65535)"
    with pytest.raises(ConfigError, match=r"^environment MAX_CONCURRENT_CONNECTIONS: server.max_connections: "):
        config.load(None, env={"MAX_CONCURRENT_CONNECTIONS": "-1"})
    with pytest.raises(ConfigError, match=r"^environment STREAM_FLUSH_MS: turn.stream_flush_ms must be >= 0"):
        config.load(path, env={"STREAM_FLUSH_MS": "-5"})
    with pytest.raises(ConfigError, match=r"^command line: server.port: "):
        config.load(path, env={}, overrides={"server.port": 70000})
    path.write_text('[server]\napi_keys = ["k"]\nport = 99999\n')  # the file's own: the file
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: server.port: "):
        config.load(path, env={})


def test_bad_env_names_the_variable():
    with pytest.raises(ConfigError, match="MAX_CONCURRENT_CONNECTIONS"):
        config.load(None, env={"MAX_CONCURRENT_CONNECTIONS": "lots"})
    with pytest.raises(ConfigError, match="CONCURRENT_MODEL_CALL"):
        config.load(None, env={"CONCURRENT_MODEL_CALL": "maybe"})
    with pytest.raises(ConfigError, match="YAP_ENGINE_START_METHOD"):
        config.load(None, env={"YAP_ENGINE_START_METHOD": "forkserver"})
    assert config.load(None, env={"YAP_ENGINE_START_METHOD": "spawn"}).engines.start_method == "spawn"
    mixed = config.from_mapping({"engines": {"start_method": "fork"}, "tool": {"start_method": "spawn"}}, "t")
    assert (mixed.start_method("chat"), mixed.start_method("tool")) == ("fork", "spawn")
    assert config.load(None, env={"YAP_ENGINE_START_METHOD": "spawn"}).start_method("tool") == "spawn"


def test_the_tool_core_spawns_by_default_beside_a_forked_chat_core():
    """Measured on an H100 (docs/bench/README.md, run aj): the tool's core spawned answers
    sooner than forked. Its own key keeps it so under a [tool] section and the engines'
    variable; "" hands it back to engines.start_method."""
    for cfg in (config.load(None, env={}), config.from_mapping({"tool": {"max_model_len": 4096}}, "t"),
                config.load(None, env={"YAP_ENGINE_START_METHOD": "fork"})):
        assert (cfg.start_method("chat"), cfg.start_method("tool")) == ("fork", "spawn")
    assert config.from_mapping({"tool": {"start_method": ""}}, "t").start_method("tool") == "fork"
    assert config.from_mapping({"chat": {"max_model_len": 4096}}, "t").chat.start_method == ""


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml", env={})


def test_example_config_loads_and_documents_every_key():
    root = Path(__file__).resolve().parent.parent
    example = root / "config.example.toml"
    cfg = config.load(example, env={})
    assert cfg.tools[0].name == "take_screenshot"
    assert (cfg.start_method("chat"), cfg.start_method("tool")) == ("fork", "spawn")  # as the defaults
    text = example.read_text()
    import dataclasses

    for section in ("server", "engines", "chat", "tool", "turn", "admin", "logging", "awq"):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"{f.name} =" in text, f"config.example.toml does not document {section}.{f.name}"


def test_diff_keys_split():
    old = config.load(None, env={})
    new = config.load(None, env={"YAP_API_KEY": "new", "CHAT_MODEL": "other/model", "YAP_PORT": "9000"})
    live, engine, restart = config.diff_keys(old, new)
    assert "server.api_keys" in live and "chat.model" in engine and "server.port" in restart


# --- trimming and prompts ----------------------------------------------------------


def test_trim_history_exact_and_coarse():
    ids = list(range(5000))
    assert trim_history(ids, 3000) == ids[-3000:]
    assert trim_history(ids[:100], 3000) == ids[:100]
    assert trim_history(ids, 0) == []
    coarse = trim_history(ids, 3000, step=256)
    assert len(coarse) <= 3000 and coarse == ids[-len(coarse):] and len(coarse) > 3000 - 256
    # The cut point stays put while the history grows by less than a step: same prefix.
    a = trim_history(list(range(3100)), 3000, step=256)
    b = trim_history(list(range(3200)), 3000, step=256)
    assert a[0] == b[0] == 256


def test_trim_utterance_keeps_the_start():
    assert trim_utterance(list(range(1000)), 350) == list(range(350))


@pytest.mark.parametrize("name", ["byte_level", "metaspace_byte_fallback"])
def test_trim_utterance_ends_where_a_character_does(name):
    """Cut at any token of a text of characters spelled in several byte tokens each: the
    kept text never ends in a character cut short (vLLM's detokenizer would give the
    whole prompt back as the reply's first text)."""
    from tests.test_firsttext import TOKENIZERS

    tok = TOKENIZERS[name]

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=False)

    # Spaced characters; a run of them unspaced (a byte-fallback tokenizer spells it as one
    # run of byte tokens, all U+FFFD if cut anywhere); ZWJ sequences (a byte-level token
    # may hold one character's end and the next one's start).
    for text in ("ok " + "🦀 日本 ü" * 12, "ok " + "🦀" * 30, "ok " + "🧑‍🚀🏳️‍🌈👨‍👩‍👧" * 6):
        ids = tok.encode(text, add_special_tokens=False).ids
        cut_inside = 0
        for m in range(1, len(ids)):
            kept = trim_utterance(ids, m, decode)
            assert kept == ids[:len(kept)] and m - BACK_OFF <= len(kept) <= m
            assert not decode(kept).endswith("\ufffd"), (m, decode(kept))
            cut_inside += decode(ids[:m]).endswith("\ufffd")
        assert cut_inside > 10  # the cuts this checks fell inside characters


def test_the_tool_querys_utterance_cut_ends_where_a_character_does():
    """PromptCache.first_tokens (the tool prompt's utterance, cut in its own tokens): as
    text, with no U+FFFD from a character cut short."""
    from transformers import PreTrainedTokenizerFast

    from tests.test_firsttext import TOKENIZERS

    tok = PreTrainedTokenizerFast(tokenizer_object=TOKENIZERS["byte_level"])
    text = "ok " + "🦀 日本 ü" * 12
    n = len(tok.encode(text, add_special_tokens=False))
    cut_inside = 0
    for m in range(1, n):
        kept = PromptCache(tok).first_tokens(text, m)
        assert text.startswith(kept) and "\ufffd" not in kept, (m, kept)
        cut_inside += "\ufffd" in tok.decode(tok.encode(text, add_special_tokens=False)[:m])
    assert cut_inside > 10


def test_a_chat_prompt_cut_inside_a_character_does_not_end_its_text_there():
    """build_chat_prompt's utterance cut (turn.user_utt_max_tokens), with a template whose
    tail is a special token (as NeMo's "[/INST]"): the prompt's text, specials skipped as
    vLLM decodes it, ends in a whole character."""
    from transformers import PreTrainedTokenizerFast

    from tests.test_firsttext import TOKENIZERS

    tok = PreTrainedTokenizerFast(tokenizer_object=TOKENIZERS["byte_level"])
    layout = ChatLayout("", "\nUser: ", "<|im_end|>", False)
    for extra in range(8):
        utterance = "x" * extra + " I was at the party 🦀🦀 and it was great ü " * 30
        prompt = build_chat_prompt(PromptCache(tok), layout, "You are Ava.", "", utterance, history_max_tokens=100,
                                   history_step=16, utterance_max_tokens=60, max_model_len=4096, max_out=100)
        assert prompt.ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and 57 <= prompt.utterance_tokens <= 60
        assert not tok.decode(prompt.ids, skip_special_tokens=True).endswith("\ufffd"), extra
    # An utterance ending in U+FFFD itself (a speech-to-text's unreadable character)
    prompt = build_chat_prompt(PromptCache(tok), layout, "You are Ava.", "", "what is this? \ufffd\ufffd \ufffd ",
                               history_max_tokens=100, history_step=16, utterance_max_tokens=60, max_model_len=4096,
                               max_out=100)
    assert tok.decode(prompt.ids, skip_special_tokens=True).endswith("what is this?")


class FakeTok:
    """Whitespace tokenizer: one token per word (to check exact counting)."""

    chat_template = None

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[str] = []

    def encode(self, text, add_special_tokens=False):
        self.calls.append(text)
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[i] for i in ids)


def test_build_prompt_is_token_exact_and_ordered():
    tok = FakeTok()
    cache = PromptCache(tok)
    layout = ChatLayout.from_tokenizer(tok)
    history = " ".join(f"h{i}" for i in range(5000))
    utt = " ".join(f"u{i}" for i in range(500))
    p = build_chat_prompt(cache, layout, "persona words here", history, utt, history_max_tokens=3000,
                          history_step=1, utterance_max_tokens=350, max_model_len=10000, max_out=200)
    text = tok.decode(p.ids)
    assert p.persona_tokens == 3 and p.history_tokens == 3000 and p.utterance_tokens == 350
    assert text.startswith("persona words here")
    assert "h4999" in text and "h1999 " not in text and "h2000" in text
    assert "u0 " in text and "u349" in text and "u350" not in text
    assert text.index("h4999") < text.index("u0")


def test_history_tokenized_incrementally():
    """Each turn tokenizes the last turn's last line again with what follows it (that line
    goes on: "today?" then "\nassistant"), the lines before it are held."""
    tok = FakeTok()
    cache = PromptCache(tok)
    first = cache.history_ids("user: a b c", 100)
    second = cache.history_ids("user: a b c\nassistant: d e", 100)
    tok.calls.clear()
    third = cache.history_ids("user: a b c\nassistant: d e\nuser: f", 100)
    assert tok.calls == ["assistant: d e\n", "user: f"]
    assert third[: len(first)] == first and third[: len(second)] == second
    assert third == tok.encode("user: a b c\nassistant: d e\nuser: f")
    tok.calls.clear()
    assert cache.history_ids("user: a b c\nassistant: d e\nuser: f", 100) == third and tok.calls == []
    # An edit above the held lines: tokenized whole again
    assert cache.history_ids("user: A b c\nassistant: d e\nuser: f", 100) == tok.encode("user: A b c\nassistant: "
                                                                                         "d e\nuser: f")


@pytest.mark.parametrize("kind", ["qwen", "gpt2", "sp"])
def test_a_history_grown_turn_by_turn_has_the_ids_a_new_session_gives_it(kind):
    """A session's history ids are the whole text's, whatever turns came before: a history
    that ended "me?" tokenized then, and "?\n" now, gave the same history two ids in two
    sessions (found with Tekken: '?', '\n' against '?\n'). SentencePiece, which marks
    every call's start, is held whole and appended to, as before."""
    from yapd.prompts import tokenizes_by_line

    tok = trained_tokenizer(kind)
    turns = [line for line in CONVERSATION.splitlines(keepends=True) if line.strip()]
    grown = PromptCache(tok)
    for i in range(1, len(turns) + 1):
        text = "".join(turns[:i]).strip()
        ids = grown.history_ids(text, 3000)
        if tokenizes_by_line(tok):
            assert ids == PromptCache(tok).history_ids(text, 3000) == tok.encode(text, add_special_tokens=False), i


def test_second_turn_tokenizes_only_the_utterance():
    tok = FakeTok()
    tok.chat_template = "x"
    cache = PromptCache(tok)
    layout = ChatLayout("<s>[SYS]", "[/SYS] [INST]", "[/INST]", True)
    kw = dict(history_max_tokens=3000, history_step=1, utterance_max_tokens=350, max_model_len=10000, max_out=200)
    first = build_chat_prompt(cache, layout, "persona words", "h1 h2 h3", "hello there", **kw)
    tok.calls.clear()
    second = build_chat_prompt(cache, layout, "persona words", "h1 h2 h3", "bye now", **kw)
    assert tok.calls == ["bye now"]  # persona, history and the template's pieces are held
    assert tok.decode(second.ids) == tok.decode(first.ids).replace("hello there", "bye now")


def test_a_new_sessions_first_turn_finds_a_known_persona_tokenized():
    """Calls to one bot send one persona: the daemon's SharedTexts keep it across sessions,
    so a new session's first turn tokenizes only what is its own. Bounded, least recently
    used out; over-long texts are tokenized and not kept; a restarted engine's tokenizer
    gets a fresh store."""
    from yapd.prompts import SharedTexts
    from yapd.runtime import Runtime

    tok = FakeTok()
    tok.chat_template = "x"
    rt = Runtime(config.load(None, env={}))
    layout = ChatLayout("<s>[SYS]", "[/SYS] [INST]", "[/INST]", True)
    kw = dict(history_max_tokens=3000, history_step=1, utterance_max_tokens=350, max_model_len=10000, max_out=200)
    first = build_chat_prompt(PromptCache(tok, rt.shared_texts("chat", tok)), layout, "persona words", "", "hi", **kw)
    tok.calls.clear()
    other = build_chat_prompt(PromptCache(tok, rt.shared_texts("chat", tok)), layout, "persona words", "", "hi", **kw)
    assert "<s>[SYS]persona words" not in tok.calls and other.ids == first.ids, tok.calls
    assert rt.shared_texts("chat", FakeTok()) is not rt.shared_texts("chat", tok) is rt.shared_texts("chat", tok)

    calls: list[str] = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return [len(text)]

    shared = SharedTexts(encode, max_items=2, max_chars=10)
    assert [shared.ids(t) for t in ("a", "bb", "a", "ccc", "a", "bb")] == [[1], [2], [1], [3], [1], [2]]
    assert calls == ["a", "bb", "ccc", "bb"]  # "bb" went out when "ccc" came (least recent)
    assert shared.ids("x" * 11) == shared.ids("x" * 11) == [11] and calls[-2:] == ["x" * 11] * 2  # not kept


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
CONVERSATION = ("user: hi there, can you hear me?\nassistant: loud and clear!  \n\nuser: what's 42 times 7?\r\n"
                "assistant:   it is 294.\n\n\n    (an indented aside)\n\tuser: thanks\nassistant: any time\n")


def trained_tokenizer(kind: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if kind == "qwen":  # Qwen2.5 / Hammer: regex split, then bytes
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:  # SentencePiece-style: every call starts with a word-start mark
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind != "sp" else []
    tok.train_from_iterator([CONVERSATION * 3, "the quick brown fox\n\n" * 5, "well\n   \nthen\t\r\n\t\r\n \n" * 5],
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# Qwen's (and Tekken's) split ends a pre-token at a run of line breaks; GPT-2's lets the
# spaces after one join it, SentencePiece marks the start of every call: both of those
# get whole-text tokenization.
@pytest.mark.parametrize(("kind", "by_line"), [("qwen", True), ("gpt2", False), ("sp", False)])
def test_tool_query_tokenized_by_line_gives_the_whole_texts_ids(kind, by_line):
    from yapd.prompts import tokenizes_by_line

    tok = trained_tokenizer(kind)
    assert tokenizes_by_line(tok) is by_line
    cache = PromptCache(tok)
    # lines of blanks alone: Qwen's split takes the breaks around them as one pre-token
    blanks = "user: hi there\n   \n\t\r\nassistant: loud and clear!\n \n"
    for text in (CONVERSATION, CONVERSATION[7:], "no line break", "\n\nonly\r\n\r\nbreaks\n", "", blanks):
        assert cache.encode_lines(text) == tok.encode(text, add_special_tokens=False), text


def test_tool_query_tokenizes_only_new_lines():
    tok = trained_tokenizer("qwen")
    cache = PromptCache(tok)
    seen: list[str] = []
    encode = cache.encode

    def counting(text):
        seen.append(text)
        return encode(text)

    lines = [f"user: line {i} of the talk\n" for i in range(12)]
    cache.encode_lines("".join(lines[:8]))
    cache.encode = counting  # type: ignore[method-assign]
    ids = cache.encode_lines("".join(lines[3:10]))  # the window slid down two lines
    assert seen == lines[8:10]
    assert ids == tok.encode("".join(lines[3:10]), add_special_tokens=False)


@pytest.mark.parametrize("kind", ["qwen", "gpt2", "sp"])
def test_prompts_call_the_rust_tokenizer_directly_for_the_same_ids(kind):
    from yapd.prompts import encoder

    tok = trained_tokenizer(kind)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    enc = encoder(tok)
    assert enc.__name__ == "fast"
    for text in (CONVERSATION, "<|im_start|>user\nhi<|im_end|>", " lead", "trail ", "caf\u00e9 \U0001f389", ""):
        assert enc(text) == tok.encode(text, add_special_tokens=False), text


def test_a_tokenizer_whose_rust_side_disagrees_keeps_transformers_encode():
    from types import SimpleNamespace

    from yapd.prompts import encoder

    class Tok:  # transformers adds something the Rust tokenizer alone would not
        all_special_tokens = ["<s>"]
        backend_tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(ids=[1]))

        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    tok = Tok()
    enc = encoder(tok)
    assert enc.__name__ == "slow" and enc("x") == [1, 2]
    # Decided once per tokenizer, and the decision does not keep the tokenizer alive.
    tok.backend_tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(ids=[1, 2]))
    assert encoder(tok).__name__ == "slow"
    ref = weakref.ref(tok)
    del tok, enc
    gc.collect()
    assert ref() is None


def test_start_now_has_run_the_task_up_to_its_first_wait():
    import sys

    from yapd.turn import start_now

    async def main() -> None:
        seen: list[str] = []
        gate = asyncio.Event()

        async def body() -> int:
            seen.append("started")
            await gate.wait()
            return 7

        task = start_now(body(), name="turn-x")
        # Eager tasks (Python 3.12+): the engine request is out before start_now returns;
        # before 3.12 an ordinary task, started on the loop's next round.
        assert seen == (["started"] if sys.version_info >= (3, 12) else [])
        gate.set()
        assert await task == 7 and task.get_name() == "turn-x" and seen == ["started"]

    asyncio.run(main())


def test_a_deferred_request_cancelled_before_its_round_is_never_made():
    """A barge-in one loop round after a start cancels the turn's deferred tool request
    before its task's first step (Python before 3.12): nothing of it may have been made,
    or it is a coroutine never awaited, a RuntimeWarning in the journal."""
    import gc
    import warnings

    from yapd.turn import after_a_round, start_now

    made: list[str] = []

    async def decide() -> str:
        made.append("decide")
        return "no"

    async def main() -> None:
        task = start_now(after_a_round(decide))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await start_now(after_a_round(decide)) == "no"  # not cancelled: made a round later

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert made == ["decide"]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught


def test_prompt_fits_the_context():
    tok = FakeTok()
    p = build_chat_prompt(PromptCache(tok), ChatLayout.from_tokenizer(tok), "p " * 10,
                          " ".join(f"h{i}" for i in range(3000)), "hello", history_max_tokens=3000, history_step=64,
                          utterance_max_tokens=350, max_model_len=1000, max_out=200)
    assert len(p.ids) + 200 <= 1000


def test_chat_layout_from_a_real_template(cache_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache_dir / "demo" / "chat")
    layout = ChatLayout.from_tokenizer(tok)
    assert layout.system_role and layout.head == "<|im_start|>system\n"
    assert layout.tail.endswith("<|im_start|>assistant\n")


def test_persona_composition():
    text = compose_persona(BUILTIN_STYLES["savage"], "man", "a pilot from Oslo")
    assert "a man" in text and "roast" in text and "a pilot from Oslo" in text
    assert "a woman" in compose_persona(BUILTIN_STYLES["wholesome"], "woman", "")
    styles = persona_styles({"Pirate": "Talk like a pirate."})
    assert "pirate" in styles and {"wholesome", "savage", "flirty"} <= set(styles)


def test_a_custom_style_is_named_in_any_case_and_the_cache_dir_takes_a_daemon_restart():
    """[personas] Pirate with default_persona_style = "Pirate" (styles are looked up
    lower-cased: it was refused as unknown); engines.cache_dir reloaded is a restart key
    (the caches' environment is set once, at start: an engine restart kept the old)."""
    cfg = config.from_mapping({"personas": {"Pirate": "Talk like a pirate."},
                               "turn": {"default_persona_style": "Pirate"}}, "test")
    config.validate(cfg)
    moved = config.from_mapping({"engines": {"cache_dir": "/elsewhere"}}, "test")
    assert config.diff_keys(config.from_mapping({}, "test"), moved) == ([], [], ["engines.cache_dir"])


def test_an_engine_restart_applies_engine_keys_but_not_the_daemons_restart_keys(tmp_path):
    """engines.cache_dir reloaded beside chat.max_num_seqs: a restart of both engines
    applies the engine key and keeps the running cache dir (the caches' environment is
    the process's, set at its start), and nothing stays pending for the engines."""
    from yapd.daemon import Daemon

    cfg = config.from_mapping({"engines": {"cache_dir": str(tmp_path / "a")}}, "test")
    d = Daemon(cfg, None, {})
    d._file_cfg = config.from_mapping({"engines": {"cache_dir": str(tmp_path / "b")},
                                       "chat": {"max_num_seqs": 8}}, "test")
    d._pending_from_file()
    assert d.pending_keys == ["chat.max_num_seqs"]
    d._apply_pending(["chat", "tool"])
    assert d.cfg.chat.max_num_seqs == 8 and d.cfg.engines.cache_dir == str(tmp_path / "a")
    assert d.pending_keys == [] and d.pending is None


def test_tail_lines_keeps_the_last_whole_lines_within_the_tokens_tokenizing_each_once(cache_dir):
    """The tool prompt's history cut in tokens: the last whole lines that fit, each line
    tokenized once while it stays in the window (a new turn's window adds a line: only
    that one is tokenized), so a history of many tokens a character costs a few lines'
    tokenizing a turn, not the whole window's (1.2 ms a turn before, on the demo tokenizer)."""
    from transformers import AutoTokenizer

    cache = PromptCache(AutoTokenizer.from_pretrained(cache_dir / "demo" / "tool"))
    encode, seen = cache.encode, []

    def counted(text: str) -> list[int]:
        seen.append(text)
        return encode(text)

    cache.encode = counted  # type: ignore[method-assign]
    lines = [f"user: \u6f22\u5b57 line {i}\n" for i in range(40)]
    kept = cache.tail_lines("".join(lines), 60)
    assert kept and "".join(lines).endswith(kept) and kept.startswith("user:")
    assert len(encode(kept)) <= 60 and len(encode(lines[-len(kept.splitlines()) - 1] + kept)) > 60
    seen.clear()
    again = cache.tail_lines("".join(lines[1:]) + "user: one more\n", 60)
    assert seen == ["user: one more\n"] and again.endswith("user: one more\n")


# --- Hammer output ---------------------------------------------------------------

KNOWN = ["take_screenshot", "get_weather"]


@pytest.mark.parametrize("raw,status,names,reason", [
    ("[]", "no", [], "empty"),
    ('[{"name": "take_screenshot", "arguments": {}}]', "yes", ["take_screenshot"], "calls"),
    ('```json\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}]\n```', "yes", ["get_weather"], "calls"),
    ('[{"name": "take_screenshot", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
     "yes", ["take_screenshot", "get_weather"], "calls"),
    ('{"tool_calls": [{"name": "take_screenshot", "arguments": {}}]}', "yes", ["take_screenshot"], "calls"),
    ('[{"name": "launch_rocket", "arguments": {}}]', "no", [], "unknown_tool"),
    ("I cannot help with that.", "no", [], "malformed"),
    ('[{"name": "take_screenshot", "arguments": ', "no", [], "malformed"),
    ('[{"arguments": {}}]', "no", [], "malformed"),
    ("[1, 2]", "no", [], "malformed"),
    # arguments as a JSON string the model nested past the parser's depth, or a number Python
    # will not convert: malformed, not an exception out of the tool's turn
    ('[{"name": "get_weather", "arguments": "' + "[" * 3000 + '"}]', "no", [], "malformed"),
    ('[{"name": "get_weather", "arguments": "' + "7" * 5000 + '"}]', "no", [], "malformed"),
    ("[" * 3000, "no", [], "malformed"),
    # what Python's parser takes and the client's frame cannot carry: a JS client refuses
    # Infinity / NaN, UTF-8 has no lone surrogate
    ('[{"name": "get_weather", "arguments": {"days": Infinity}}]', "no", [], "malformed"),
    ('[{"name": "get_weather", "arguments": {"days": 1e400}}]', "no", [], "malformed"),
    ('[{"name": "get_weather", "arguments": "{\\"days\\": NaN}"}]', "no", [], "malformed"),
    ('[{"name": "get_weather", "arguments": {"city": "\\ud83d"}}]', "no", [], "malformed"),
    ('[{"name": "get_weather\\udfff", "arguments": {}}]', "no", [], "malformed"),
    ('[{"name": "get_weather", "arguments": {"city": "\\ud83d\\ude00"}}]', "yes", ["get_weather"], "calls"),
])
def test_parse_calls(raw, status, names, reason):
    d = parse_calls(raw, KNOWN)
    assert (d.status, [c.name for c in d.calls], d.reason) == (status, names, reason)
    assert d.raw == raw


def feed_all(text: str, step: int = 1) -> tuple[DecisionReader, int]:
    r = DecisionReader(KNOWN)
    for i in range(0, len(text), step):
        if r.feed(text[i:i + step]) is not None:
            return r, i + step
    r.finish()
    return r, len(text)


def test_reader_decides_no_at_the_empty_list():
    r, used = feed_all("[]\n\nsome trailing junk the model would keep generating")
    assert r.decision is not None and r.decision.status == "no" and used == 2


def test_reader_decides_no_at_the_first_non_list_character():
    r, used = feed_all("Sure! Let me think about it for a long while")
    assert r.decision is not None and r.decision.reason == "malformed" and used == 1


def test_reader_settles_yes_when_the_list_closes():
    call = '[{"name": "get_weather", "arguments": {"city": "a ] tricky \\" [ city"}}]'
    r, used = feed_all(call + "\nand more", step=3)
    assert r.decision is not None and r.decision.status == "yes"
    assert r.decision.calls[0].arguments == {"city": 'a ] tricky " [ city'}
    assert used <= len(call) + 2


@pytest.mark.parametrize("text", [
    '```json [{"name": "take_screenshot", "arguments": {}}]```',  # a fence on the list's own line
    '```json [\n{"name": "take_screenshot",\n"arguments": {}}\n]\n```',  # ... and lines inside it
    '```json\n[{"name": "take_screenshot", "arguments": {}}]\n```',
])
@pytest.mark.parametrize("step", [1, 4, 200])
def test_reader_reads_a_fenced_list_as_parse_calls_does(text, step):
    r, _ = feed_all(text + "\n\n", step)
    assert r.decision is not None and (r.decision.status, r.decision.reason) == ("yes", "calls"), r.decision
    assert parse_calls(text, KNOWN).status == "yes"


def test_reader_ends_the_answer_at_a_blank_line():
    # The list never closes: the blank line ends the answer (the tool request carries no
    # stop string), the text after it is not the model's answer.
    r, used = feed_all('[{"name": "take_screenshot", "arguments": {}}\n\n[{"name": "get_weather"}]')
    assert r.decision is not None and r.text == '[{"name": "take_screenshot", "arguments": {}}'
    assert used == r.text.index("}}") + 4  # decided on the second newline, not at the end
    # A single newline may sit inside the list.
    r2, _ = feed_all('[\n{"name": "take_screenshot", "arguments": {}}\n]\n\nmore')
    assert r2.decision is not None and r2.decision.status == "yes"


@pytest.mark.parametrize("text,decided", [
    # a blank line between two calls ends the answer inside its list, in one delta or many
    ('[{"name": "take_screenshot", "arguments": {}},\n\n{"name": "get_weather", "arguments": {}}]',
     ("no", "malformed", [])),
    ('[{"name": "take_screenshot", "arguments": {}},\r\n \t\r\n{"name": "get_weather", "arguments": {}}]',
     ("no", "malformed", [])),
    # blank lines before the answer, or after its fence, are not its end
    ('\n\n[{"name": "take_screenshot", "arguments": {}}]', ("yes", "calls", ["take_screenshot"])),
    ('```json\n\n[{"name": "take_screenshot", "arguments": {}}]\n```', ("yes", "calls", ["take_screenshot"])),
])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_reader_decides_the_same_however_the_deltas_cut_the_text(text, decided, step):
    r, _ = feed_all(text, step)
    assert r.decision is not None
    assert (r.decision.status, r.decision.reason, [c.name for c in r.decision.calls]) == decided


def test_reader_with_fence_and_incomplete_output():
    r, _ = feed_all('```json\n[{"name": "take_screenshot", "arguments": {}}]\n```')
    assert r.decision is not None and r.decision.status == "yes"
    r2, _ = feed_all('[{"name": "take_scr')
    assert r2.decision is not None and r2.decision.status == "no" and r2.decision.reason == "malformed"


def test_hammer_prompt_shape():
    cfg = config.load(None, env={})
    block = instruction_block(cfg.tools)
    assert block.index("[BEGIN OF TASK INSTRUCTION]") < block.index("[BEGIN OF AVAILABLE TOOLS]")
    tools = json.loads(block.split("[BEGIN OF AVAILABLE TOOLS]\n")[1].split("\n[END OF AVAILABLE TOOLS]")[0])
    assert tools[0]["name"] == "take_screenshot"
    q = query_block("look at this", "user: hi\nassistant: hello")
    assert q.startswith("[BEGIN OF QUERY]") and "look at this" in q and "assistant: hello" in q


# --- misc ------------------------------------------------------------------------


def test_rate_limiter():
    rl = RateLimiter(rate=2, burst=3)
    t = rl.stamp
    assert [rl.allow(t) for _ in range(4)] == [True, True, True, False]
    assert rl.allow(t + 0.5) is True and rl.allow(t + 0.5) is False


def test_vllm_engine_args_from_config():
    cfg = config.load(None, env={})
    chat = engine_kwargs("chat", cfg, cfg.chat.model, (9, 0))
    assert chat["quantization"] == "fp8" and chat["kv_cache_dtype"] == "fp8"
    assert chat["gpu_memory_utilization"] == 0.70 and chat["enable_prefix_caching"] and not chat["enforce_eager"]
    assert chat["max_model_len"] == 5760
    tool = engine_kwargs("tool", cfg, cfg.tool.model, (9, 0))
    assert tool["quantization"] is None and tool["gpu_memory_utilization"] == 0.20
    gptq = engine_kwargs("chat", cfg, "someone/Model-GPTQ-4bit", (9, 0))
    assert gptq["quantization"] is None and gptq["kv_cache_dtype"] == "auto"
    ampere = engine_kwargs("chat", cfg, cfg.chat.model, (8, 0))
    assert ampere["kv_cache_dtype"] == "auto"
    # 0: left to vLLM (2048 from Python); set, it reaches vLLM (and the memory plan's key)
    assert "max_num_batched_tokens" not in chat
    cfg.tool.max_num_batched_tokens = 8192
    assert engine_kwargs("tool", cfg, cfg.tool.model, (9, 0))["max_num_batched_tokens"] == 8192
    cfg.chat.tensor_parallel_size = 2
    cfg.chat.extra_engine_args = {"max_num_batched_tokens": 4096}
    tp = engine_kwargs("chat", cfg, cfg.chat.model, (9, 0))
    assert tp["tensor_parallel_size"] == 2 and tp["max_num_batched_tokens"] == 4096


def test_gpu_count_check_names_what_is_missing(monkeypatch):
    require_gpus("chat", {"tensor_parallel_size": 2, "data_parallel_size": 1}, 2)
    require_gpus("tool", {}, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(EngineError, match=r"chat engine needs 4 GPUs \(tensor_parallel_size=2 x "
                                          r"data_parallel_size=2\); 1 visible \(CUDA_VISIBLE_DEVICES=3\)"):
        require_gpus("chat", {"tensor_parallel_size": 2, "data_parallel_size": 2}, 1)
    with pytest.raises(EngineError, match="tool engine needs 1 GPU "):
        require_gpus("tool", {"tensor_parallel_size": 1}, 0)


# --- CPU engine --------------------------------------------------------------------


async def test_cpu_engines_loading_side_by_side_get_exactly_the_saved_weights(cache_dir):
    # transformers swaps process-wide torch state while it builds a model: two loads at
    # once used to leave weights uninitialised (NaN logits a few times per thousand steps).
    import torch
    from transformers import AutoModelForCausalLM

    from yapd.engines.cpu import CpuEngine

    paths = {"chat": cache_dir / "demo" / "chat", "tool": cache_dir / "demo" / "tool"}
    saved = {role: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
             for role, path in paths.items()}
    for _ in range(6):
        engines = [CpuEngine(role, str(path), workers=1) for role, path in paths.items()]
        await asyncio.gather(*(e.start() for e in engines))
        for e in engines:
            loaded = e._model.state_dict()
            differ = [k for k, v in saved[e.role].items() if not torch.equal(v, loaded[k])]
            assert not differ, f"{e.role}: {differ[:5]}"
            await e.shutdown()


async def test_the_daemon_stops_its_engines_side_by_side(caplog):
    """Each engine's stop waits here until the other's has begun: stopped one after the
    other, the first would run past its time. One that fails is logged and the other
    stops still."""
    import logging

    from yapd.daemon import Daemon

    begun = {"chat": asyncio.Event(), "tool": asyncio.Event(), "broken": asyncio.Event()}

    class Stopping:
        def __init__(self, role: str, other: str) -> None:
            self.role, self.other, self.stopped = role, other, False

        async def shutdown(self) -> None:
            begun[self.role].set()
            await begun[self.other].wait()
            if self.role == "broken":
                raise RuntimeError("its core would not go")
            self.stopped = True

    chat, tool, broken = Stopping("chat", "tool"), Stopping("tool", "broken"), Stopping("broken", "chat")
    with caplog.at_level(logging.INFO, logger="yapd.daemon"):
        await asyncio.wait_for(Daemon._stop_engines({"chat": chat, "tool": tool, "broken": broken}, timeout=5), 10)
    assert chat.stopped and tool.stopped
    text = caplog.text
    assert "engine broken shutdown: its core would not go" in text
    assert "engine stopped role=chat seconds=0.0" in text and "engine stopped role=tool seconds=0.0" in text


async def test_cpu_engine_shut_down_mid_step_logs_no_failure(cache_dir, caplog):
    # A shutdown unloads the model while a worker thread may be inside a step; that
    # request was aborted first, so what the step then raises is no engine failure.
    import logging
    import threading

    from yapd.engines.base import SamplingSpec
    from yapd.engines.cpu import CpuEngine

    eng = CpuEngine("chat", str(cache_dir / "demo" / "chat"), workers=1)
    await eng.start()
    inside, release = threading.Event(), threading.Event()
    forward, steps = eng._forward, []

    def held(*args):
        steps.append(1)
        if len(steps) == 3:  # hold the third step until the model is gone
            inside.set()
            release.wait(30)
        return forward(*args)

    eng._forward = held  # type: ignore[method-assign]
    stream = eng.stream([5, 6, 7], SamplingSpec(max_tokens=50, ignore_eos=True), "mid-step")
    reader = asyncio.ensure_future(anext(stream))
    assert await asyncio.to_thread(inside.wait, 30)
    with caplog.at_level(logging.DEBUG, logger="yapd.engine.cpu"):
        await eng.shutdown()
        release.set()
        for t in threading.enumerate():
            if t.name.startswith("yapd-chat"):
                await asyncio.to_thread(t.join, 30)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert any("generation stopped" in r.getMessage() for r in caplog.records)  # the step did fail
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_the_cpu_engine_cuts_a_stop_string_found_across_tokens_before_it(cache_dir):
    """A stop string whose first characters came with an earlier token: the reply ends
    before it, as vLLM's does (the CPU engine had sent those characters already: 27 of 30
    seeded replies ended in the stop's first character). Same seed, same tokens: the
    reply with the stop is the one without, cut where the stop first begins."""
    from yapd.engines.base import SamplingSpec
    from yapd.engines.cpu import CpuEngine

    eng = CpuEngine("chat", str(cache_dir / "demo" / "chat"), workers=1)
    await eng.start()
    try:
        cut = 0
        for seed in range(12):
            spec = SamplingSpec(max_tokens=60, temperature=1.0, top_p=1.0, seed=seed)
            whole = "".join([d.text async for d in eng.stream([5, 6, 7, seed], spec, f"whole-{seed}")])
            with_stop = dataclasses.replace(spec, stop=("e ",))
            stopped = "".join([d.text async for d in eng.stream([5, 6, 7, seed], with_stop, f"stop-{seed}")])
            if "e " in whole:
                cut += 1
                assert stopped == whole[:whole.index("e ")], (seed, stopped[-10:], whole[:whole.index("e ") + 2][-10:])
            else:
                assert stopped == whole
        assert cut >= 3  # the seeds do reach the stop string
    finally:
        await eng.shutdown()


# --- GPU benchmark program (its CPU-side parts) ---------------------------------------


def test_gpubench_setup_carries_tensor_parallelism_and_tables_show_every_level(tmp_path):
    from yapctl.gpubench.report import markdown
    from yapctl.gpubench.runsetup import Setup

    cfg = Setup(tmp_path / "models", tmp_path / "work", (16, 32), chat_tp=2).config()
    assert cfg.chat.tensor_parallel_size == 2 and cfg.tool.tensor_parallel_size == 1
    assert engine_kwargs("chat", cfg, cfg.chat.model, (9, 0))["tensor_parallel_size"] == 2
    row = {"ttft_ms": {"p50": 1.0, "p95": 2.0}}
    table = markdown({"setup": {"chat_tensor_parallel_size": 2}, "yapd": {"c16": row, "c32": row}})
    assert "Chat tensor parallelism: 2 GPU(s)" in table
    assert "| 16 | TTFT p50 / p95 ms | 1 / 2 |" in table and "| 32 | TTFT p50 / p95 ms | 1 / 2 |" in table


def test_gpubench_table_shows_the_tool_gated_figures():
    from yapctl.gpubench.report import markdown

    data = {"yapd": {"c16": {"ttft_ms": {"p50": 70.0, "p95": 80.0}}},
            "raw": {"c16": {"ttft_ms": {"p50": 60.0, "p95": 70.0}, "ttft_gated_ms": {"p50": 65.0, "p95": 75.0}}},
            "serve": {"c16": {"ttft_ms": {"p50": 66.0, "p95": 76.0}},
                      "c16_with_tool": {"ttft_ms": {"p50": 90.0, "p95": 99.0},
                                        "ttft_gated_ms": {"p50": 91.0, "p95": 99.5},
                                        "tool_ms": {"p50": 40.0, "p95": 50.0}}}}
    table = markdown(data)
    assert "| 16 | TTFT held for the tool decision (toolcall before tokens) p50 / p95 ms | 70 / 80 | 65 / 75 | " \
           "91 / 99.5 (with tool server) |" in table
    assert "| 16 | TTFT, vllm serve beside a tool server, chat alone counted, p50 / p95 ms | - | - | 90 / 99 |" in table
    assert "| 40 / 50 |" in table
    assert "| 16_with_tool |" not in table  # a variant, not a level of its own


def test_gpubench_serve_reader_stops_when_told_and_times_what_it_read():
    """The `vllm serve` client: first output with text, gaps after it, and a stop on the
    tool's decision that closes the connection (as a user's client would)."""
    from yapctl.gpubench.serve import _post_stream

    async def main() -> None:
        closed = asyncio.Event()
        bodies: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
            for text in ("", "[", "]", "x", "y"):
                writer.write(b"data: " + json.dumps({"choices": [{"text": text}]}).encode() + b"\n\n")
                await writer.drain()
                if text == "]" and len(bodies) == 1:
                    assert await reader.read() == b""  # the client hung up on its decision
                    closed.set()
                    writer.close()
                    return
            writer.write(b"data: [DONE]\n\n")
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            seen: list[str] = []
            first, gaps_ms, end = await _post_stream({"prompt": [1, 2]}, port, lambda t: seen.append(t) or t == "]")
            assert seen == ["[", "]"] and first is not None and len(gaps_ms) == 1 and end >= first
            await asyncio.wait_for(closed.wait(), 10)
            first, gaps_ms, _ = await _post_stream({"prompt": [3]}, port)
            assert len(gaps_ms) == 3  # four outputs with text; the empty one is not counted
        assert json.loads(bodies[0]) == {"prompt": [1, 2]}

    asyncio.run(main())


def test_gpubench_level_warms_then_runs_each_turn_once_c_at_a_time():
    from yapctl.gpubench.measure import at_level
    from yapctl.gpubench.runsetup import turns_for

    running, most, seen = 0, 0, []

    async def one(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        seen.append(i)
        return i

    rows = asyncio.run(at_level(8, one))
    assert seen[:8] == [-1] * 8 and most == 8
    assert sorted(rows) == list(range(turns_for(8))) == sorted(seen[8:]) == list(range(64))
    seen.clear()
    rows = asyncio.run(at_level(4, one, rounds=3))  # --rounds: 3 bursts of 4 after the warm-up
    assert seen[:4] == [-1] * 4 and sorted(rows) == list(range(12))
    assert turns_for(1, 3) == 9 and turns_for(1) == 24  # one session: 3 x rounds turns


def standin_runtime(tmp_path: Path, cache_dir: Path,
                    replies: Callable[[str, list[int]], AsyncIterator[Any]]) -> tuple[Any, Any]:
    """A Runtime on gpubench's config (and its Setup) whose two engines are stand-ins: the
    demo models' tokenizers under gpubench's model names, each request answered by
    ``replies(role, prompt_ids)``."""
    from transformers import AutoTokenizer

    from yapctl.gpubench.runsetup import Setup
    from yapd.engines.base import Engine, EngineHealth
    from yapd.runtime import Runtime

    models = tmp_path / "models"
    models.mkdir()
    (models / "nemo-12b").symlink_to(cache_dir / "demo" / "chat")
    (models / "hammer-3b").symlink_to(cache_dir / "demo" / "tool")

    class StandIn(Engine):
        backend = "test"

        def __init__(self, role: str) -> None:
            path = models / ("nemo-12b" if role == "chat" else "hammer-3b")
            self.role, self.model, self._tok = role, str(path), AutoTokenizer.from_pretrained(path)

        @property
        def tokenizer(self):
            return self._tok

        async def start(self, alongside: bool = False, child_env=None) -> None: ...

        def stream(self, prompt_ids, spec, request_id, together=False):
            self.together = together  # turn.send_together, as the turn passed it
            return replies(self.role, list(prompt_ids))

        async def abort(self, request_id: str) -> None: ...
        async def shutdown(self) -> None: ...

        def health(self) -> EngineHealth:
            return EngineHealth(True, "ready")

        @property
        def in_flight(self) -> int:
            return 0

    setup = Setup(models, tmp_path)
    rt = Runtime(setup.config())
    rt.engines = {"chat": StandIn("chat"), "tool": StandIn("tool")}
    return rt, setup


def test_gpubench_floor_gets_the_token_ids_yapd_builds(tmp_path, cache_dir, monkeypatch):
    """The raw and serve phases must run the very prompts yapd's engines get: a real Turn
    through recording engines, against the bench's own TurnPrompts."""
    from yapctl.bench import turn_utterance
    from yapctl.gpubench.prompts import HISTORY, PERSONA, UTTERANCE, TurnPrompts
    from yapd.engines.base import Delta
    from yapd.prompts import PromptCache
    from yapd.turn import Turn, TurnInput

    seen: dict[str, list[int]] = {}
    order: list[str] = []  # the order the requests went out in

    async def recording(role: str, prompt_ids: list[int]) -> AsyncIterator[Delta]:
        seen[role] = list(prompt_ids)
        order.append(role)
        yield Delta("[]" if role == "tool" else "hi", 1, True, "stop")

    rt, setup = standin_runtime(tmp_path, cache_dir, recording)
    sent: list[object] = []

    async def send(msg: object) -> None:
        sent.append(msg)

    inp = TurnInput("r", "s", turn_utterance(UTTERANCE, 5), HISTORY, PERSONA, 1)

    def run(*inputs: TurnInput) -> list[Turn]:
        """Turns that start in one loop round, as a burst of start messages does."""
        order.clear()
        turns = [Turn(rt, i, send, PromptCache(rt.engines["chat"].tokenizer),
                      PromptCache(rt.engines["tool"].tokenizer)) for i in inputs]

        async def go() -> None:
            await asyncio.gather(*(t.run({"type": "ack"}) for t in turns))

        asyncio.run(go())
        assert all(t.state == "done" for t in turns)
        assert (seen["chat"], seen["tool"]) == TurnPrompts(setup).turn(5)
        return turns

    rt.cfg.turn.request_order = "chat_first"
    run(inp)
    assert order == ["chat", "tool"]
    assert not rt.engines["chat"].together and not rt.engines["tool"].together
    rt.cfg.turn.send_together = True  # live: the next turn's requests ask for it
    run(inp)
    assert rt.engines["chat"].together and rt.engines["tool"].together
    rt.cfg.turn.send_together = False
    # tool_first (the default): the tool request leaves first, the prompts stay the same.
    rt.cfg.turn.request_order = "tool_first"
    run(inp)
    assert order == ["tool", "chat"]
    run(inp, inp)
    assert order == ["tool", "chat", "tool", "chat"]
    # chats_then_tools: turns starting together send every chat request before any tool's.
    rt.cfg.turn.request_order = "chats_then_tools"
    run(inp)
    assert order == ["chat", "tool"]
    run(inp, inp, inp)
    assert order == ["chat", "chat", "chat", "tool", "tool", "tool"]
    # Python 3.10 has no asyncio.timeout: the decision's timeout must not cost the tool
    # request its place there either.
    monkeypatch.delattr(asyncio, "timeout")
    rt.cfg.turn.request_order = "tool_first"
    run(inp)
    assert order == ["tool", "chat"]
    # --fresh-prompts: a level's salt reaches yapd in the persona (the bench client's start
    # message) and raw's prompts alike; the chat prompt then shares nothing past its first
    # words with an unsalted one, the tool's (no persona in it) stays the same.
    from yapctl.bench import salted_persona

    tp = TurnPrompts(setup)
    plain = tp.turn(5)
    tp.salt = "c0ffee"
    salted = TurnInput("r", "s", turn_utterance(UTTERANCE, 5), HISTORY, salted_persona(PERSONA, "c0ffee", 5), 1)
    turn = Turn(rt, salted, send, PromptCache(rt.engines["chat"].tokenizer), PromptCache(rt.engines["tool"].tokenizer))
    asyncio.run(turn.run({"type": "ack"}))
    assert (seen["chat"], seen["tool"]) == tp.turn(5) and seen["tool"] == plain[1]
    shared = next(k for k, (a, b) in enumerate(zip(plain[0], seen["chat"], strict=False)) if a != b)
    assert shared < 16, shared  # under one KV block: nothing of it is found in a prefix cache
    assert salted_persona(PERSONA, "", 5) == PERSONA


@pytest.mark.parametrize(("concurrent", "slow_ack"), [(True, False), (False, False), (True, True)])
def test_the_tool_decision_goes_out_as_it_settles_and_never_before_the_ack(tmp_path, cache_dir, concurrent, slow_ack):
    """The toolcall leaves the moment the tool's output settles it, before its request's
    abort (the stream's close) and the turn's own wake-up, each a wait in a busy event
    loop; a decision that settles while the ack is still being sent follows the ack at once."""
    from yapd.engines.base import Delta
    from yapd.prompts import PromptCache
    from yapd.turn import Turn, TurnInput

    sent: list[dict[str, Any]] = []
    at_close: list[list[str]] = []  # what the client had when the tool request was closed

    async def replies(role: str, prompt_ids: list[int]) -> AsyncIterator[Delta]:
        if role == "chat":
            yield Delta("hi", 1, True, "stop")
            return
        try:
            yield Delta("[]", 1, False, None)  # settles it: no tool
            await asyncio.Event().wait()  # a request that runs on until aborted
        finally:
            at_close.append([m["type"] for m in sent])

    rt, _ = standin_runtime(tmp_path, cache_dir, replies)
    rt.cfg.turn.concurrent = concurrent

    async def send(msg: dict[str, Any] | str) -> None:
        m = msg if isinstance(msg, dict) else json.loads(msg)  # tokens come serialized
        if slow_ack and m["type"] == "ack":
            for _ in range(5):  # a client slow to take it: the decision settles meanwhile
                await asyncio.sleep(0)
        sent.append(m)

    turn = Turn(rt, TurnInput("r", "s", "hello there", "", "", 1), send,
                PromptCache(rt.engines["chat"].tokenizer), PromptCache(rt.engines["tool"].tokenizer))
    asyncio.run(turn.run({"type": "ack"}))
    assert [m["type"] for m in sent] == ["ack", "toolcall", "token", "final", "done"], sent
    assert sent[1]["status"] == "no" and turn.tool_ms is not None
    assert at_close == [["ack", "toolcall"]], at_close  # a slow ack's toolcall right after it


@pytest.mark.parametrize("native", [True, False])
def test_within_times_out_in_the_calling_task_and_lets_cancels_through(monkeypatch, native):
    from yapd.timeouts import within

    if not native:  # the Python 3.10 path
        monkeypatch.delattr(asyncio, "timeout")

    async def main() -> None:
        assert await within(asyncio.sleep(0, "ok"), 1) == "ok"
        assert await within(asyncio.sleep(0, "ok"), None) == "ok"
        with pytest.raises(asyncio.TimeoutError):
            await within(asyncio.sleep(30), 0.05)
        task = asyncio.ensure_future(within(asyncio.sleep(30), 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Cancelled in the loop round its result arrives in (a barge-in as a slow send
        # completes): it ends cancelled. asyncio.wait_for (before 3.12) returned the result.
        arrives: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(arrives, 10))
        await asyncio.sleep(0.01)
        arrives.set_result("sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_loop_lag_keeps_a_window_of_time_and_reports_in_ms():
    from yapd.looplag import LoopLag

    lag = LoopLag(interval=0.05, window_s=0.975)
    assert lag.snapshot() == {"samples": 0, "window_s": 0.0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    for ms in range(30):  # one a 50 ms tick: the last 0.975 s keep 20 of them
        lag.add(ms * 0.05, ms / 1000)
    assert lag.snapshot() == {"samples": 20, "window_s": 1.0, "p50_ms": 20.0, "p99_ms": 29.0, "max_ms": 29.0}
    # Asked for a shorter span (a benchmark level's): only the samples in it, none before.
    assert lag.snapshot(0.12) == {"samples": 3, "window_s": 0.1, "p50_ms": 28.0, "p99_ms": 29.0, "max_ms": 29.0}
    assert lag.snapshot(60.0) == lag.snapshot()  # never more than the window kept
    lag.add(100.0, 0.5)  # a loop held for long: the samples before it are out of the window
    assert lag.snapshot() == {"samples": 1, "window_s": 0.1, "p50_ms": 500.0, "p99_ms": 500.0, "max_ms": 500.0}


def test_vllm_stream_carries_the_engines_stamps_on_the_first_delta_only(monkeypatch):
    """With vLLM's request stats on, a request's first output holds when its EngineCore
    queued it, scheduled it and made its first token; the stream hands them on with the
    first delta. Stats off (yapd's default): metrics is None and nothing is claimed. The
    GPU test module checks the same on a real engine."""
    from types import SimpleNamespace

    from yapd.engines import vllm as vllm_engine
    from yapd.engines.base import EngineStamps, SamplingSpec

    def output(text: str, metrics: object) -> SimpleNamespace:
        done = text == "!"
        return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[1], finish_reason="length" if done
                                                        else None)], finished=done, prompt_token_ids=[1, 2],
                               num_cached_tokens=0, metrics=metrics)

    class LLM:
        def __init__(self, metrics: object) -> None:
            self.metrics = metrics

        async def generate(self, prompt: object, sp: object, request_id: str):  # type: ignore[no-untyped-def]
            for text in ("a", "b", "!"):
                yield output(text, self.metrics)

    monkeypatch.setattr(vllm_engine, "sampling_params", lambda *args: None)
    cfg = config.from_mapping({}, "test")

    async def deltas(metrics: object) -> list:  # type: ignore[type-arg]
        engine = vllm_engine.VllmEngine("tool", cfg)
        engine._state, engine._llm = "ready", LLM(metrics)
        return [d async for d in engine.stream([1, 2], SamplingSpec(max_tokens=3), "r")]

    stats = SimpleNamespace(queued_ts=10.0, scheduled_ts=10.5, first_token_ts=11.0)
    on = asyncio.run(deltas(stats))
    assert [d.text for d in on] == ["a", "b", "!"]
    assert on[0].stamps == EngineStamps(10.0, 10.5, 11.0) and on[1].stamps is None and on[2].stamps is None
    assert all(d.stamps is None for d in asyncio.run(deltas(None)))
    assert vllm_engine.request_stamps(SimpleNamespace(queued_ts=0.0)) is None  # stats on, nothing stamped yet


class _QueuedLLM:
    """What yapd's vLLM engine sees of an AsyncLLM, fed by hand: each request's outputs
    come from its queue, and abort ends a request as vLLM's output processor does, with
    a final output whose finish reason is "abort"."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.calls: list[str] = []

    @staticmethod
    def output(text: str, finish: str | None = None) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[1] if text else [],
                                                        finish_reason=finish)],
                               finished=finish is not None, prompt_token_ids=[1, 2], num_cached_tokens=0,
                               metrics=None)

    async def generate(self, prompt: object, sp: object, request_id: str):  # type: ignore[no-untyped-def]
        q = self.queues.setdefault(request_id, asyncio.Queue())
        while True:
            out = await q.get()
            yield out
            if out.finished:
                return

    async def abort(self, request_id: Any) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.calls.append(f"abort {','.join(ids)}")
        for rid in ids:
            self.queues[rid].put_nowait(self.output("", "abort"))

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def _queued_vllm_engine(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, _QueuedLLM]:
    from yapd.engines import vllm as vllm_engine

    monkeypatch.setattr(vllm_engine, "sampling_params", lambda *args: None)
    engine = vllm_engine.VllmEngine("chat", config.from_mapping({}, "test"))
    llm = _QueuedLLM()
    engine._state, engine._llm = "ready", llm
    return engine, llm


@pytest.mark.parametrize("reason", ["error", "abort"])
async def test_a_request_the_vllm_engine_ends_itself_is_an_engine_error(monkeypatch, reason):
    """vLLM ends a request it failed (finish reason "error") or aborted itself ("abort":
    its shutdown) as a finished output; a reply cut short that way is the turn's engine
    error, not a reply that came to its end. One yapd aborted ends as asked."""
    from yapd.engines.base import EngineError, SamplingSpec

    engine, llm = _queued_vllm_engine(monkeypatch)
    stream = engine.stream([1, 2], SamplingSpec(max_tokens=8), "r")
    llm.queues["r"] = asyncio.Queue()
    llm.queues["r"].put_nowait(llm.output("hel"))
    assert (await anext(stream)).text == "hel"
    llm.queues["r"].put_nowait(llm.output("", reason))
    with pytest.raises(EngineError, match="failed the request" if reason == "error" else "aborted the request"):
        await anext(stream)
    assert engine.in_flight == 0

    asked = engine.stream([1, 2], SamplingSpec(max_tokens=8), "s")
    llm.queues["s"] = asyncio.Queue()
    llm.queues["s"].put_nowait(llm.output("a"))
    assert (await anext(asked)).text == "a"
    await engine.abort("s")
    last = await anext(asked)
    assert last.finished and last.finish_reason == "abort"
    assert [d async for d in asked] == []
    assert engine.in_flight == 0 and not engine._aborted


async def test_a_vllm_engine_shut_down_mid_request_ends_its_streams_first(monkeypatch):
    """vLLM's shutdown stops the task that feeds its requests' queues: a request still
    running is aborted first, so its reader gets an error instead of waiting for ever."""
    from yapd.engines.base import EngineError, SamplingSpec

    engine, llm = _queued_vllm_engine(monkeypatch)
    stream = engine.stream([1, 2], SamplingSpec(max_tokens=8), "r")
    llm.queues["r"] = asyncio.Queue()
    llm.queues["r"].put_nowait(llm.output("hel"))
    assert (await anext(stream)).text == "hel"
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the reader waits on the request's next output
    await engine.shutdown()
    assert llm.calls == ["abort r", "shutdown"]
    with pytest.raises(EngineError, match="aborted the request"):
        await asyncio.wait_for(reader, 5)
    assert engine.in_flight == 0


def test_quantization_auto_leaves_a_quantized_checkpoint_to_its_own_method(tmp_path, monkeypatch):
    """A chat checkpoint whose config.json names a quantization (compressed-tensors FP8,
    say) starts with it: vLLM refuses quantization="fp8" on it. Read from a local folder
    and from the Hub cache (no network); a float checkpoint still gets FP8 and FP8 KV."""
    from yapd.engines.vllm import checkpoint_quantization, engine_kwargs

    quantized, plain = tmp_path / "Model-FP8-dynamic", tmp_path / "plain"
    for path, cfg in ((quantized, {"quantization_config": {"quant_method": "compressed-tensors"}}), (plain, {})):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "mistral", **cfg}))
    assert checkpoint_quantization(str(quantized), None) == "compressed-tensors"
    assert checkpoint_quantization(str(plain), None) is None
    assert checkpoint_quantization(str(tmp_path / "none"), None) is None

    # The Hub cache's layout (huggingface_hub's): refs/main names the snapshot
    hub = tmp_path / "hub"
    repo = hub / "models--someone--Chat-W8A8"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8"}}))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert checkpoint_quantization("someone/Chat-W8A8", None) == "fp8"
    assert checkpoint_quantization("someone/Not-Cached", None) is None

    cfg = config.from_mapping({}, "test")
    own = engine_kwargs("chat", cfg, str(quantized), (9, 0), checkpoint_quantization(str(quantized), None))
    assert own["quantization"] is None and own["kv_cache_dtype"] == "auto"
    fp8 = engine_kwargs("chat", cfg, str(plain), (9, 0), checkpoint_quantization(str(plain), None))
    assert fp8["quantization"] == "fp8" and fp8["kv_cache_dtype"] == "fp8"
    # asked for by name, the method is the config's, whatever the checkpoint
    cfg.chat.quantization = "fp8"
    assert engine_kwargs("chat", cfg, str(quantized), (9, 0), "compressed-tensors")["quantization"] == "fp8"


def test_first_tokens_per_step_groups_equal_stamps():
    from yapctl.bench import per_step

    # Three steps: two first tokens at ~0 (one stamp seen through two clocks), three at
    # ~10, one at 30; steps are milliseconds apart.
    assert per_step([0.0, 0.004, 10.0, 10.003, 9.998, 30.0]) == 2.0
    assert per_step([5.0, 6.0, 7.0]) == 1.0
    assert per_step([]) is None


def test_burst_steps_time_an_engines_first_token_steps_from_each_bursts_first_start():
    from yapctl.bench import burst_steps

    # Two bursts of starts (a second apart, each strung over 3 ms). The first: its first
    # tokens from steps at 10, 22 and 40 ms after its first start (two at 22, one stamp
    # seen through two clocks); the second: all four from one step at 15.
    turns = [(0.0, 10.0), (1.0, 22.0), (2.0, 22.004), (3.0, 40.0),
             (1000.0, 1015.0), (1001.0, 1015.0), (1002.5, 1015.002), (1003.0, 1015.0)]
    got = burst_steps(turns)
    assert got == {"bursts": 2, "steps": {"p50": 3, "max": 3}, "first_ms": 15.0,
                   "last_ms": {"p50": 40.0, "p95": 40.0}, "between_ms": {"p50": 18.0, "p95": 18.0}}, got
    # One turn alone is a burst of one step; nothing to time between steps.
    assert burst_steps([(5.0, 9.5)]) == {"bursts": 1, "steps": {"p50": 1, "max": 1}, "first_ms": 4.5,
                                         "last_ms": {"p50": 4.5, "p95": 4.5},
                                         "between_ms": {"p50": None, "p95": None}}
    assert burst_steps([]) is None


async def test_a_spawned_start_waits_for_its_own_core_not_one_titled_since(monkeypatch: pytest.MonkeyPatch):
    """Another engine's core, forked a moment before this start and titled by vLLM after
    it began, is not this start's spawned core: the start's turn ends only at its own.
    Real processes; a child retitles itself by exec (its pid kept), as setproctitle would
    (the title joined there: its command line before must not hold it)."""
    from yapd.engines import vllm

    sleep = "import sys, time; print(flush=True); time.sleep(60)"
    retitle = ("import os, sys; print(flush=True); sys.stdin.readline(); "
               f"os.execv(sys.executable, [sys.executable, '-c', {sleep!r}, 'VLLM::' + 'EngineCore'])")
    forked = subprocess.Popen([sys.executable, "-c", retitle], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    children: list[subprocess.Popen[str]] = [forked]
    assert forked.stdout is not None and forked.stdin is not None and forked.stdout.readline() == "\n"
    looks = 0
    began, looked = asyncio.Event(), asyncio.Event()
    real = vllm.starting_cores
    loop = asyncio.get_running_loop()

    def counted(parent: int | None = None) -> set[int]:
        nonlocal looks
        found = real(parent)
        loop.call_soon_threadsafe(began.set)  # a look's done: so is the snapshot before it
        if forked.pid in found:
            looks += 1
            if looks >= 3:
                loop.call_soon_threadsafe(looked.set)
        return found

    monkeypatch.setattr(vllm, "starting_cores", counted)
    start: asyncio.Future[None] = loop.create_future()
    try:
        waiting = asyncio.create_task(vllm._until_spawned(lambda: start))
        await asyncio.wait_for(began.wait(), 30)
        forked.stdin.write("\n")
        forked.stdin.flush()
        seen = asyncio.ensure_future(looked.wait())
        await asyncio.wait({waiting, seen}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert looked.is_set() and not waiting.done()  # it saw the other core titled, and waits on
        own = subprocess.Popen([sys.executable, "-c", "from multiprocessing.spawn import spawn_main; " + sleep,
                                "--multiprocessing-fork"], stdout=subprocess.PIPE, text=True)
        children.append(own)
        assert await asyncio.wait_for(waiting, 30) is start and not start.done()
    finally:
        for p in children:
            p.kill()
            p.wait()


def test_starting_cores_are_the_children_vllm_titled_enginecore():
    """Real child processes: one titled as vLLM titles an EngineCore (in its command line,
    as setproctitle leaves it), one started as multiprocessing's spawn starts one (not yet
    titled: still importing), one with the command line of vLLM's model inspection, one
    none of these; a grandchild with the title is not ours to end."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    from yapd.engines.vllm import start_children, starting_cores

    def running(*args: str) -> subprocess.Popen[str]:
        # Back once the child runs: in the middle of its exec its command line reads empty.
        child = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "\n"
        return child

    sleep = "import subprocess, sys, time; print(flush=True); time.sleep(60)"
    # (the title joined in the grandchild: the parent's own command line must not hold it)
    grand = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "print(flush=True); time.sleep(60)', 'VLLM::' + 'EngineCore'], stdout=subprocess.PIPE); "
             "p.stdout.readline(); print(flush=True); print(p.pid, flush=True); time.sleep(60)")
    core = running(sleep, "VLLM::EngineCore")
    other = running(sleep, "something-else")
    # multiprocessing's spawn: -c 'from multiprocessing.spawn import spawn_main; spawn_main(...)'
    spawned = running("from multiprocessing.spawn import spawn_main; " + sleep, "--multiprocessing-fork")
    # vLLM runs: python -m vllm.model_executor.models.registry
    inspection = running(sleep, "-m", "vllm.model_executor.models.registry")
    parent = running(grand, "plain")
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        found = starting_cores()
        assert core.pid in found and spawned.pid in found and other.pid not in found and parent.pid not in found
        assert grandchild not in found and starting_cores(parent.pid) == {grandchild}
        kinds = start_children()
        assert kinds[inspection.pid] == "model inspection" and inspection.pid not in found
        assert kinds[core.pid] == kinds[spawned.pid] == "EngineCore" and other.pid not in kinds
    finally:
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
        for p in (core, spawned, other, inspection, parent):
            p.kill()
            p.wait()


def test_slow_turns_are_counted_by_burst():
    from yapctl.bench import slow_bursts

    # Three bursts of four starts (1 ms apart), each 1 s after the last; the second burst
    # is all slow, and one turn of the third: the tail is two bursts, one of them whole.
    sent = [b + i * 0.001 for b in (100.0, 101.0, 102.0) for i in range(4)]
    ttft = [20.0] * 4 + [90.0] * 4 + [20.0, 20.0, 41.0, 20.0]
    assert slow_bursts(sent, ttft) == {"over_ms": 40.0, "turns": 5, "of": 12, "bursts": 2, "at_s": [1.0, 2.0]}
    assert slow_bursts(sent, [20.0] * 12) == {"over_ms": 40.0, "turns": 0, "of": 12, "bursts": 0, "at_s": []}
    assert slow_bursts([], []) is None


def test_log_lines_carry_no_terminal_escape_sequences():
    """A message quoting a client's text or an engine's error kept its ESC bytes: on
    yapctl logs, journalctl or less they retitled or recoloured the reader's terminal."""
    import logging

    from yapd.logs import LineFormatter, RingHandler

    msg = "bad id 'a\x1b]0;owned\x07b' and \u202eexe.txt\nsecond line"
    record = logging.LogRecord("yapd.x", logging.WARNING, "x.py", 1, msg, None, None)
    line = LineFormatter(False).format(record)
    assert line == "warning yapd.x: bad id 'a\\x1b]0;owned\\x07b' and \\u202eexe.txt\\nsecond line", line
    ring = RingHandler(4)
    ring.emit(record)
    kept = ring.tail(1)[0].message
    assert "\x1b" not in kept and "\u202e" not in kept and "\\x1b" in kept and "\n" in kept, kept


RING_FORK = r"""
import asyncio, json, logging, os
from yapd.logs import RingHandler

async def main():
    ring = RingHandler(10)
    queue = ring.follow()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child that logs, as an EngineCore may
        ring.emit(logging.LogRecord("yapd.x", logging.INFO, "child.py", 1, "from the child", None, None))
        os.write(write, json.dumps([len(ring._followers), len(ring.ring)]).encode())
        os._exit(0)
    os.close(write)
    child = json.loads(os.read(read, 64))
    os.waitpid(pid, 0)
    await asyncio.sleep(0.05)  # a record the child offered would have been queued by now
    print(json.dumps({"child": child, "parent_followers": len(ring._followers), "queued": queue.qsize()}))

asyncio.run(main())
"""


def test_a_forked_child_logging_does_not_feed_the_parents_log_followers():
    """The admin socket's log followers (yapctl logs -f, the TUI) live on yapd's loop: a
    forked child that logs keeps its record and wakes nothing of the parent's."""
    out = subprocess.run([sys.executable, "-c", RING_FORK], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen == {"child": [0, 1], "parent_followers": 1, "queued": 0}, seen


def test_backend_auto_asks_nvml_never_cudas_runtime(monkeypatch, caplog):
    # torch.cuda.is_available() calls cudaGetDeviceCount, after which torch refuses CUDA
    # in every forked child: yapd's forked EngineCores would all fail to start.
    import torch

    from yapd.engines import cuda_available, resolve_backend

    def runtime_asked() -> int:
        raise AssertionError("cudaGetDeviceCount poisons this process's forks")

    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", runtime_asked, raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 2)
    assert cuda_available()
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: -1)  # NVML could not tell
    assert not cuda_available()
    # With vLLM installed and no GPU seen, auto runs the CPU engine, and says so.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name in ("vllm", "torch") else None)
    cfg = config.load(None, env={})
    with caplog.at_level("WARNING", logger="yapd.engines"):
        assert resolve_backend(cfg.chat, demo=False) == "cpu"
    assert "no GPU is visible" in caplog.text and cfg.chat.model in caplog.text


def test_the_admin_socket_default_for_yapctl_and_for_a_second_daemon(tmp_path, monkeypatch):
    # /run/yapd is the service's (0750, group yapd): yapctl run by someone outside the
    # group takes its socket there (connecting says why it may not) instead of a traceback;
    # a second yapd (make demo on that host) makes a socket of its own elsewhere.
    from yapd import paths

    run = tmp_path / "run-yapd"
    run.mkdir()
    (run / "admin.sock").touch()
    monkeypatch.setattr(paths, "SYSTEM_RUNTIME_DIR", run)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)  # not this user's to write
    assert paths.default_admin_socket(client=True) == run / "admin.sock"
    assert paths.default_admin_socket() == tmp_path / "xdg" / "yapd" / "admin.sock"
    real_exists = Path.exists

    def denied(self: Path, *a: Any, **k: Any) -> bool:
        if self.parent == run:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *a, **k)

    monkeypatch.setattr(Path, "exists", denied)
    assert paths.default_admin_socket(client=True) == run / "admin.sock"


def test_a_demo_does_not_read_the_services_config_unless_named(tmp_path):
    # On a host where the service runs, /etc/yapd/config.toml is its (0640, group yapd):
    # `make demo` there failed on it, or served with its keys and port. (A process of its
    # own: yapd's main holds the garbage collector for its start.)
    service = tmp_path / "config.toml"
    service.write_text("[server]\nport = 'not a port'\n")

    def yapd(*args: str) -> subprocess.CompletedProcess[str]:
        code = ("import sys; from pathlib import Path; from yapd import cli; "
                f"cli.DEFAULT_CONFIG = Path({str(service)!r}); sys.exit(cli.main({list(args)!r}))")
        env = {k: v for k, v in os.environ.items() if k != "YAPD_CONFIG"}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)

    read = yapd("--check-config")  # the service's, read by default
    assert read.returncode == 2 and "port" in read.stderr
    demo = yapd("--demo", "--check-config")
    assert demo.returncode == 0 and json.loads(demo.stdout)["demo"] is True
    assert yapd("--demo", "--check-config", "--config", str(service)).returncode == 2  # named: read


async def test_polled_looks_once_at_least_and_gives_up_at_its_time():
    from yapd.timeouts import polled

    assert await polled(lambda: True, 0)  # no time given: still looked at
    t0 = time.monotonic()
    assert not await polled(lambda: False, 0.15, every=0.05)
    assert time.monotonic() - t0 >= 0.15
    seen = iter([False, False, True])
    assert await polled(lambda: next(seen), 5, every=0.01)


def test_the_soaks_rss_check_tells_a_levelling_curve_from_a_leak():
    """Run K's curve (397 -> 413.5 MiB, flat from 45 s) is an allocator filling its
    arenas; a leak that crosses the whole-load allowance goes on growing over the second half."""
    from yapctl.soak import parser, rss_growth, sample_rss

    args = parser().parse_args([])
    slack, tail_slack = args.rss_slack, args.rss_tail_slack
    kib = 1024
    levelling = [(t, int(v * kib)) for t, v in [(0, 397.0), (10, 408.8), (20, 410.5), (30, 412.0), (40, 413.0),
                                                (50, 413.3), (60, 413.3)]]
    growth, tail = rss_growth(397 * kib, int(413.5 * kib), levelling, 66.0)
    assert growth == pytest.approx(16.5 / 397) and tail == pytest.approx(1.5 / 397)
    assert tail < tail_slack
    leak = [(t, int((397 + 0.4 * t) * kib)) for t in range(0, 61, 10)]  # 0.4 MiB a second, on and on
    growth, tail = rss_growth(397 * kib, int((397 + 0.4 * 66) * kib), leak, 66.0)
    assert growth > slack and tail is not None and tail > tail_slack
    assert rss_growth(397 * kib, 400 * kib, [], 66.0)[1] is None  # no sample by the midpoint: no figure

    async def sampled() -> list[tuple[float, int]]:
        samples: list[tuple[float, int]] = []
        task = asyncio.ensure_future(sample_rss(os.getpid(), time.monotonic(), samples, every=0.01))
        while len(samples) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        return samples

    samples = asyncio.run(sampled())
    assert [t for t, _ in samples] == sorted(t for t, _ in samples) and all(kib > 1000 for _, kib in samples)


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="idle deadlines move on reload from Python 3.11")
async def test_a_reload_passes_over_an_idle_deadline_firing_now():
    """A connection's idle deadline that fires in the loop round of a reload is past
    moving: asyncio's reschedule raises on it, which failed the reload."""
    from yapd.runtime import Runtime
    from yapd.server import YapServer

    server = YapServer(Runtime(config.load(None, env={})))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0) as deadline:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                server._waits[object()] = (0.0, deadline)  # type: ignore[index]
                server.config_changed()
                raise


def test_gap_tail_counts_the_long_gaps_and_the_table_shows_them():
    from yapctl.bench import gap_tail
    from yapctl.gpubench.report import markdown

    # 97 one-step gaps and three of two steps: p99 lands on the long ones
    gaps = [7.0] * 97 + [15.0, 16.0, 18.0]
    assert gap_tail(gaps) == {"gaps": 100, "over_ms": 10.5, "long_pct": 3.0, "long_p50": 16.0, "long_p90": 18.0}
    assert gap_tail([])["long_pct"] is None
    assert gap_tail([7.0] * 10)["long_pct"] == 0.0 and gap_tail([7.0] * 10)["long_p50"] is None
    data = {"yapd": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}, "itl_tail": gap_tail(gaps)}},
            "raw": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}},
            "serve": {"c16_with_tool": {"itl_tail": gap_tail([7.0] * 99 + [14.0])}}}
    assert ("| 16 | ITL gaps over 1.5 x its p50 (a step or more missed): share %; their p50 / p90 ms | "
            "3 % of 100 (over 10.5); 16.0 / 18.0 | - | 1 % of 100 (over 10.5); 14.0 / 14.0 |") in markdown(data)
    # Files from before it: no such row
    assert "ITL gaps over" not in markdown({"yapd": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}}})


def test_gaps_by_starts_tells_the_gaps_beside_other_turns_starts_and_the_table_shows_them():
    from yapctl.bench import gaps_by_starts
    from yapctl.gpubench.report import markdown

    # Turn A streams every 10 ms from t=0.1 s; turn B starts at 0.145 and has its first
    # text at 0.175: A's gaps ending 0.15..0.18 overlap B's start (one of them long).
    a = (0.0, [0.1 + 0.01 * i for i in range(5)] + [0.16, 0.18] + [0.19 + 0.01 * i for i in range(10)])
    b = (0.145, [0.175, 0.185, 0.195])
    split = gaps_by_starts([a, b])
    gaps_a = 16
    # beside B's span (0.145, 0.175): A's (0.14, 0.16], (0.16, 0.18]; B's own gaps come after its first text
    assert split["beside_pct"] == round(100 * 2 / (gaps_a + 2), 2), split
    assert split["beside_p99"] == 20.0 and split["apart_p99"] == 10.0, split
    assert split["long_beside_pct"] == 100.0, split  # both 20 ms gaps are beside it: no long gap apart
    # A start whose span ends before a gap begins leaves it apart, as does a turn's own start
    alone = gaps_by_starts([(0.0, [0.1, 0.11, 0.12])])
    assert alone == {"beside_pct": 0.0, "beside_p99": None, "apart_p99": 10.0, "long_beside_pct": None}
    assert gaps_by_starts([])["beside_pct"] is None
    data = {"yapd": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}, "itl_starts": split}},
            "raw": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}, "itl_starts": alone}}}
    assert ("| 16 | ITL p99 ms apart from / beside other turns' starts (sent to first text); gaps beside them; "
            "long gaps beside them | 10 / 20; 11.11 %; 100 % | 10 / -; 0 %; - | - |") in markdown(data)
    assert "beside other turns' starts" not in markdown({"yapd": {"c16": {"ttft_ms": {"p50": 1.0, "p95": 2.0}}}})
