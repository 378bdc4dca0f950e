"""yapd.jsonparse: JSON from outside, refused before the parser recurses deep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from yapd.jsonparse import MAX_DEPTH, deeper_than, loads


@pytest.mark.parametrize("text,depth", [
    ("{}", 1),
    ('{"a": [1, {"b": []}]}', 4),
    ('"[[[[{{{{"', 0),  # brackets inside a string
    ('["\\"[[[", 1]', 1),  # an escaped quote does not end the string
    ('["\\\\", [[]]]', 3),  # nor does an escaped backslash hide the quote after it
    ('["a", "[[[', 1),  # an unterminated string runs to the end: broken JSON, which the parser refuses
])
def test_nesting_counts_structure_not_strings(text, depth):
    assert not deeper_than(text, depth) and (depth == 0 or deeper_than(text, depth - 1))


def test_text_nested_past_the_limit_is_refused_before_it_is_parsed(monkeypatch):
    # With the interpreter's limit at 300 frames a 250-deep parse would fail; 100 deep is
    # refused before json.loads recurses at all, and MAX_DEPTH deep still parses.
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} levels deep"):
        loads("[" * 250 + "]" * 250)
    with pytest.raises(ValueError, match="nested more than 100"):
        loads("[" * 1_000_000)
    monkeypatch.undo()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) == eval("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    finally:
        sys.setrecursionlimit(limit)


def test_many_shallow_brackets_parse():
    text = json.dumps({"history_text": "[laughs] {x} " * 500, "calls": [[1, 2]] * 500})
    assert loads(text)["calls"][-1] == [1, 2]


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", '{"a": ' + "7" * 5000 + "}", "{not json", ""])
def test_every_refusal_is_a_value_error(raw):
    with pytest.raises(ValueError):
        loads(raw)


def test_bytes_are_utf8():
    assert loads('{"x": "\u00e9"}'.encode()) == {"x": "\u00e9"}


def test_the_scan_is_linear_whatever_the_text_holds():
    """An unterminated string of escaped quotes once made each quote start a scan to the
    end (an 80 kB frame held the loop 12.6 s). Each shape here, a MiB long, took hours that
    way; linear, well under a second. Run apart, so that a regression is a timeout here,
    not a hung suite."""
    code = """if True:
        from yapd.jsonparse import loads
        n = 1 << 20
        for text in ('"' + '\\\\"' * (n // 2) + '[' * 101, '"' * n + '[' * 101,
                     '"\\\\' * (n // 2) + '[' * 101, '[]' * (n // 2)):
            try:
                loads(text)
            except ValueError:
                pass
        print("done")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "done"
