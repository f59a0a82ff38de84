"""Streaming text out of a token stream without breaking characters.

A byte-level tokenizer can split one character (``é``, ``日``, an emoji) across tokens, so
decoding each token alone prints replacement characters. :class:`IncrementalText` decodes
the growing sequence and emits only what is new, holding back an incomplete character until
the token that completes it arrives (what transformers' ``TextStreamer`` does, without its
word buffering).
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to


class IncrementalText:
    """``push(token)`` returns the text that token adds; ``flush()`` whatever is still held."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one token; return the new complete text (empty while a character is incomplete)."""
        self.ids.append(int(token))
        text = self._text()
        if text.endswith(INCOMPLETE):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """The text not returned yet (an incomplete character at the very end included)."""
        return self._take(self._text())

    def _take(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece
