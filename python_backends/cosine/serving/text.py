"""Streaming text: incremental detokenization that only releases complete UTF-8, and stop strings."""
from __future__ import annotations

from dataclasses import dataclass


def decode_increment(tokenizer, ids: list[int], read_offset: int, final: bool) -> tuple[str, bool]:
    """Text that ids[read_offset:] add after ids[:read_offset], and whether it is complete.

    Decoding a short window of context with the new ids (instead of the ids alone) keeps word boundaries right;
    text ending in U+FFFD is an incomplete UTF-8 sequence and is held back until more ids arrive (or `final`)."""
    before = tokenizer.decode(ids[:read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids, skip_special_tokens=True)
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        return after[len(before):], True
    return "", final


@dataclass
class DetokenizerOffsets:
    """The caller's side of decode_increment: which ids to send and how to move on."""
    prefix: int = 0
    read: int = 0

    def window(self, ids: list[int]) -> tuple[list[int], int]:
        return ids[self.prefix:], self.read - self.prefix

    def advance(self, total_ids: int) -> None:
        self.prefix, self.read = self.read, total_ids


class StopStrings:
    def __init__(self, stop_words):
        self.stop_words = [word for word in stop_words if word]

    def releasable(self, text: str, final: bool) -> tuple[int, bool]:
        """(how many leading chars of text may be shown, whether a stop string ends the output there).

        Text that could be the start of a stop string is held back until it is decided."""
        hits = [i for i in (text.find(word) for word in self.stop_words) if i >= 0]
        if hits:
            return min(hits), True
        if final:
            return len(text), False
        held = max((k for word in self.stop_words for k in range(1, len(word)) if text.endswith(word[:k])),
                   default=0)
        return len(text) - held, False
