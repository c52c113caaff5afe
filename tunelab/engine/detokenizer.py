"""Turn a growing list of token ids into text deltas, honouring stop strings.

Text is held back while it could still become a stop string or ends in half of a multi-byte
character, so a streamed answer never shows text that a later token retracts.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Incremental detokenizer for one sequence."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.text = ""  # final text once stopped; otherwise the text emitted so far
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (may be empty)."""
        assert not self.stopped, "add() after a stop string"
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        if full.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._emit(full[: len(full) - self._held_back(full)])

    def finish(self) -> str:
        """Flush what was held back once generation ends without a stop string."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(full)

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
