"""Loading a model's tokenizer the way its model was trained to read text."""

from __future__ import annotations

import threading
from typing import Any

# Checkpoints whose tokenizer.json, as published, carries a pre-tokenizer regex that
# transformers 5 knows to be wrong (it splits text differently from Mistral's own
# tokenizer) and corrects only when asked with fix_mistral_regex=True.
MISTRAL_MODEL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})
# transformers resolves its names lazily, and two threads doing it first at once can fail
# ("cannot import name 'AutoConfig'"): two engines' tokenizers load side by side.
_IMPORT = threading.Lock()


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The Hugging Face tokenizer for ``name`` (a repo id or a directory).

    yapd hands token ids to its engines, so this tokenizer alone decides what the model
    reads: a Mistral-family model gets the corrected pre-tokenizer."""
    with _IMPORT:
        from transformers import AutoConfig, AutoTokenizer

    try:
        model_type = AutoConfig.from_pretrained(name, revision=revision).model_type
    except Exception:  # a tokenizer-only repo: nothing says it is a Mistral model
        model_type = None
    # Asked for other families, transformers would rewrite their pre-tokenizer too.
    extra = {"fix_mistral_regex": True} if model_type in MISTRAL_MODEL_TYPES else {}
    return AutoTokenizer.from_pretrained(name, revision=revision, **extra)
