"""Demo models: tiny random-weight checkpoints built locally, no network needed.

``yapd --demo`` (and the test suite) serve these on the CPU engine. They are real
Hugging Face checkpoints (Llama-architecture chat model, Qwen2-architecture tool model,
a byte-level BPE tokenizer trained here, ChatML chat templates), so every code path is
the real one, but the weights are random: **their output is random text**.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from yapd.config import DEFAULT_TOOLS
from yapd.prompts import BUILTIN_STYLES, SPOKEN_RULES
from yapd.toolcall import FORMAT_INSTRUCTION, TASK_INSTRUCTION, tools_json

log = logging.getLogger("yapd.demo")

DEMO_VERSION = "1"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SAMPLE_TEXT = """\
Hello there, how are you doing today? I'm good, thanks for asking. What did you do this weekend?
We went hiking by the lake and the weather was perfect. Tell me about your favourite movie.
Who was Columbus? He was an explorer who sailed across the Atlantic in 1492.
Can you look at this? Let me show you my screen. What do you think of this picture?
I want to cook something spicy tonight. Maybe a curry with rice and fresh coriander.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
[{"name": "take_screenshot", "arguments": {}}] [] {"type": "object", "properties": {}}
"""


def corpus() -> list[str]:
    lines = _SAMPLE_TEXT.splitlines()
    lines += [*BUILTIN_STYLES.values(), SPOKEN_RULES, TASK_INSTRUCTION, FORMAT_INSTRUCTION, tools_json(DEFAULT_TOOLS)]
    return lines * 4


def build_tokenizer(out: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[2], pad_token=SPECIALS[0], bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def _save_model(out: Path, arch: str, vocab: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model: Any
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, bos_token_id=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, bos_token_id=None))
    model.save_pretrained(out)


def build(root: Path) -> dict[str, Path]:
    """Build the demo checkpoints under ``root`` once; later calls reuse them."""
    paths = {"chat": root / "chat", "tool": root / "tool"}
    stamp = root / "demo.json"
    if stamp.exists() and all((p / "config.json").exists() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()).get("version") == DEMO_VERSION:
                return paths
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    log.info("building demo models in %s (random weights, random output)", root)
    # Build beside the target and rename into place: a crash never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        build_tokenizer(tmp / "tokenizer")
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tmp / "tokenizer"))
        for role, arch, seed in (("chat", "llama", 1), ("tool", "qwen2", 2)):
            d = tmp / role
            _save_model(d, arch, vocab, seed)
            for f in (tmp / "tokenizer").iterdir():
                shutil.copy(f, d / f.name)
        (tmp / "demo.json").write_text(json.dumps({"version": DEMO_VERSION}))
        for name in ("chat", "tool"):
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        os.replace(tmp / "demo.json", stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
