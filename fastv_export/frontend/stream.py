"""Text out of generated tokens as they come: an incremental detokenizer that emits only completed characters
(a UTF-8 character split over byte tokens is held until its last byte), and stop strings."""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"     # what a decoder writes for an incomplete UTF-8 sequence


class StreamDecoder:
    """Feed token ids one at a time; each :meth:`push` returns the text they completed.

    The text is decoded over a short window (the tokens of the last emitted piece and the new ones) and only
    the part beyond the window's old text is emitted, once it no longer ends in an incomplete character, so
    tokenizers that depend on the neighbouring tokens (Metaspace spaces, byte fallback, byte-level BPE) give
    the same text as decoding everything at once."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0       # start of the window
        self._read = 0         # end of what has been emitted
        self.text = ""         # everything emitted so far

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            delta = now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character comes out as U+FFFD, as a full decode gives it)."""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        delta = now[len(before):] if len(now) > len(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class StopStrings:
    """Stop strings of one row: where the text must be cut, and how much of its end to hold back while
    streaming (a stop string may still be forming there)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def cut(self, text: str) -> int | None:
        """The index where ``text`` ends before its first stop string, or None when it holds none."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def visible(self, text: str, finished: bool) -> str:
        """The part of ``text`` that may be shown: up to the first stop string, else all of it when the row is
        finished, else all but the held-back end."""
        at = self.cut(text)
        if at is not None:
            return text[:at]
        if finished or not self.holdback:
            return text
        return text[:max(0, len(text) - self.holdback)]
