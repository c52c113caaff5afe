"""Turn a growing list of token ids into text deltas, honouring stop strings.

Text is held back while it could still become a stop string or ends in half of a multi-byte
character, so a streamed answer never shows text that a later token retracts.

Decoding is incremental: each new token decodes a short window (the tokens since the last
complete character boundary, plus the ones before it for context) instead of the whole
output, so decoding a long stream costs linear, not quadratic, time. Decoding the window with and
without the new tokens and keeping the difference preserves what a window decode alone would
get wrong (SentencePiece drops the leading space of a window's first token, a byte-level
token can be half a character).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class TextStream:
    """Incremental detokenizer for one sequence."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.text = ""  # final text once stopped; otherwise the text emitted so far
        self.stopped = False  # a stop string was found
        self._decoded = ""  # text of ids[:_read], complete characters only
        self._prefix = 0  # ids[_prefix:_read] give the window's context...
        self._read = 0  # ...and ids[_read:] the tokens not yet turned into text

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (may be empty)."""
        assert not self.stopped, "add() after a stop string"
        self.ids.append(token_id)
        new = self._window_delta()
        if not new:
            return ""
        if new.endswith(REPLACEMENT):  # half a character: wait for the rest of it...
            # ...unless the complete characters before it already finish a stop string
            cut = self._find_stop(self._decoded + new.rstrip(REPLACEMENT))
            if cut is None:
                return ""
            self.stopped = True
            return self._emit((self._decoded + new)[:cut])
        self._decoded += new
        self._prefix, self._read = self._read, len(self.ids)
        full = self._decoded
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held_back(full)])

    def finish(self) -> str:
        """Flush what was held back once generation ends without a stop string."""
        if self.stopped:
            return ""
        self._decoded += self._window_delta()  # a trailing half character shows as U+FFFD
        self._prefix = self._read = len(self.ids)
        cut = self._find_stop(self._decoded)  # a stop string completed by the held tokens
        self.stopped = cut is not None
        return self._emit(self._decoded if cut is None else self._decoded[:cut])

    def _window_delta(self) -> str:
        """Text that ids[_read:] add after ids[_prefix:_read]."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        return after[len(before) :]

    def _emit(self, safe: str) -> str:
        delta = safe[len(self.text) :]
        self.text = safe
        return delta

    def _find_stop(self, full: str) -> int | None:
        if not self.stop:
            return None
        longest = max(map(len, self.stop))
        start = max(0, len(self.text) - longest)
        hits = [i for s in self.stop if (i := full.find(s, start)) != -1]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of ``full`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best
