"""Reading a reply through a tokenizers DecodeStream as vLLM's fast detokenizer does: for
tests/test_firsttext.py and the GPU tests (whose device has no hypothesis)."""

from __future__ import annotations

from typing import Any


def texts(tok: Any, stream: Any, reply: list[int], skip: bool = True) -> list[str]:
    """Each reply token's text, as vLLM's fast detokenizer steps its stream: a decode whose
    text no longer starts with what came before (byte fallback, tokens sampled at random)
    starts the stream over."""
    from tokenizers.decoders import DecodeStream

    said = []
    for t in reply:
        try:
            text = stream.step(tok, t)
        except Exception as exc:
            assert str(exc).startswith("Invalid prefix encountered"), exc
            stream = DecodeStream(skip_special_tokens=skip)
            text = stream.step(tok, t)
        said.append(text or "")
    return said
