"""Incremental detokenization with stop strings: the text a sequence may send so far."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Text that could still be the start of a stop string is held back (at most the longest stop
    string minus one character), as is a trailing partial UTF-8 character; ``push`` reports a
    stop string as soon as it appears and never sends it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return ``(delta, stopped)``."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.sent - self.holdback)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._take(len(self.text)), True
        if self.text.endswith("\ufffd"):
            return "", False
        return self._take(len(self.text) - self.holdback), False

    def flush(self) -> str:
        """Whatever is held back, once the sequence has ended without a stop string."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
