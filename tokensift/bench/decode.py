"""The benchmark's one greedy decode loop, built on :class:`tokensift.generate.Decoder`.

Every suite that decodes greedily over a tokensift cache goes through :class:`GreedyDecoder`:
feed a suffix (or a prompt) after what the cache holds, then :meth:`GreedyDecoder.run` takes the
argmax, feeds it back, and stops after ``max_new_tokens`` or once every row is settled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensift.devices import clock, model_device
from tokensift.generate import Decoder, left_pad

Settled = Callable[[int, list[int]], bool]  # (row, tokens so far) -> can the row's score still change?
StepTimer = Callable[[float], None]  # gets the seconds of one decode step


class GreedyDecoder(Decoder):
    """A :class:`Decoder` over ``cache`` (``rows`` sequences of ``cache.get_seq_length()`` tokens,
    every one seen), choosing each next token greedily.

    Parameters
    ----------
    model
        A transformers causal language model.
    cache
        The cache the model reads and extends (a tokensift cache, possibly empty).
    rows
        Sequences in the batch.
    seen
        Tokens each row has seen so far (default: ``cache.get_seq_length()``).
    """

    def __init__(self, model, cache, rows: int = 1, seen: int | None = None):
        super().__init__(model, cache)
        self.rows = rows
        self.device = model_device(model)
        seen = cache.get_seq_length() if seen is None else seen
        self.mask = torch.ones(rows, seen, dtype=torch.long, device=self.device)

    def feed(self, suffixes: list[list[int]]) -> torch.Tensor:
        """Append ``suffixes[row]`` to each row (shorter ones padded on their left: masked slots
        between the cached tokens and the suffix, positions stay contiguous); last-position logits."""
        return self.forward(*left_pad(suffixes, pad_id=0, device=self.device))

    def feed_next(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[rows]``); last-position logits."""
        return self.forward(next_ids[:, None], torch.ones(self.rows, 1, dtype=torch.long, device=self.device))

    def timed_feed_next(self, next_ids: torch.Tensor, on_step: StepTimer | None) -> torch.Tensor:
        """:meth:`feed_next`, the seconds of its forward handed to ``on_step`` when given."""
        if on_step is None:
            return self.feed_next(next_ids)
        start = clock(self.device)
        logits = self.feed_next(next_ids)
        on_step(clock(self.device) - start)
        return logits

    def run(self, logits: torch.Tensor, max_new_tokens: int, settled: Settled | None = None,
            on_step: StepTimer | None = None) -> list[list[int]]:
        """Decode greedily from ``logits`` (``[rows, vocab]``, the last fed position's).

        Each step takes the argmax of every row, then (unless it was the last step) feeds it;
        ``max_new_tokens`` steps feed ``max_new_tokens - 1`` tokens. ``settled(row, tokens)``
        (optional) says a row's score can no longer change; decoding stops when every row is
        settled, so scores equal those of decoding all ``max_new_tokens``. ``on_step(seconds)``
        (optional) gets the time of each fed token (timing loops).
        """
        out: list[list[int]] = [[] for _ in range(self.rows)]
        chosen: list[torch.Tensor] = []  # without ``settled`` no step waits on the host
        for step in range(max_new_tokens):
            next_ids = logits.argmax(-1)
            if settled is None:
                chosen.append(next_ids)
            else:
                for tokens, token in zip(out, next_ids.tolist()):
                    tokens.append(token)
            if step + 1 == max_new_tokens or (settled is not None and all(settled(r, t) for r, t in enumerate(out))):
                break
            logits = self.timed_feed_next(next_ids, on_step)
        if chosen:
            out = torch.stack(chosen, dim=1).tolist()
        return out

    def run_from(self, first: torch.Tensor, steps: int, on_step: StepTimer | None = None) -> list[list[int]]:
        """Feed ``first`` (``[rows]``, a token already chosen) and decode: ``steps`` tokens fed in
        all, and the ``steps`` tokens they choose."""
        if steps < 1:
            return [[] for _ in range(self.rows)]
        return self.run(self.timed_feed_next(first, on_step), steps, on_step=on_step)


@torch.inference_mode()
def greedy_tokens(model, cache, suffixes: list[list[int]], max_new_tokens: int, settled: Settled | None = None) -> list[list[int]]:
    """Append ``suffixes[row]`` to each row of ``cache`` and decode greedily (see :class:`GreedyDecoder`)."""
    decoder = GreedyDecoder(model, cache, len(suffixes))
    return decoder.run(decoder.feed(suffixes), max_new_tokens, settled)
