"""The engines' tokenizer loader: Mistral-family checkpoints get transformers' corrected
pre-tokenizer, every other family is loaded exactly as published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yapd.engines.tokenizer import load_tokenizer

# transformers only inspects tokenizers of Mistral's size (a vocabulary over 100k).
VOCAB = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(100_001)}}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def checkpoint(tmp_path: Path, tokenizer_json: Path, model_type: str) -> str:
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    # No transformers_version: a checkpoint saved before transformers 5, as most are.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def test_mistral_checkpoint_gets_the_fixed_regex(tmp_path: Path, tokenizer_json: Path) -> None:
    tok = load_tokenizer(checkpoint(tmp_path, tokenizer_json, "mistral"))
    pre = tok.backend_tokenizer.pre_tokenizer
    assert type(pre).__name__ == "Sequence"
    assert "Split" in repr(pre) and "ByteLevel" in repr(pre)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_other_families_are_left_alone(tmp_path: Path, tokenizer_json: Path, model_type: str) -> None:
    from transformers import AutoTokenizer

    path = checkpoint(tmp_path, tokenizer_json, model_type)
    ours, plain = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert repr(ours.backend_tokenizer.pre_tokenizer) == repr(plain.backend_tokenizer.pre_tokenizer)
    assert type(ours.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"


def test_tokenizer_only_directory(tmp_path: Path, tokenizer_json: Path) -> None:
    path = checkpoint(tmp_path, tokenizer_json, "mistral")
    (tmp_path / "config.json").unlink()
    assert load_tokenizer(path).backend_tokenizer.pre_tokenizer is not None
