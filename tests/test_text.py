"""Incremental detokenization and stop strings."""
import pytest
from transformers import AutoTokenizer

from cosine.serving.text import DetokenizerOffsets, StopStrings, decode_increment

TEXTS = ["héllo wörld 🌍 中文 ok", "def f(x):\n    return x  # ✓", "emoji 👩‍👩‍👧 family"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_concatenates_and_never_splits_a_character(tiny_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    ids = tokenizer.encode(text)
    offsets, pieces = DetokenizerOffsets(), []
    for end in range(1, len(ids) + 1):
        window, read = offsets.window(ids[:end])
        piece, advanced = decode_increment(tokenizer, window, read, final=end == len(ids))
        if advanced:
            offsets.advance(end)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 2  # it did stream


def test_stop_strings_hold_back_possible_starts_and_cut_at_the_first_hit():
    stops = StopStrings(["END", "\n\n"])
    assert stops.releasable("abc E", final=False) == (4, False)
    assert stops.releasable("abc EN", final=False) == (4, False)
    assert stops.releasable("abc ENX", final=False) == (7, False)
    assert stops.releasable("abc\n\nxEND", final=False) == (3, True)
    assert stops.releasable("abc E", final=True) == (5, False)
    assert StopStrings([]).releasable("abc", final=False) == (3, False)
