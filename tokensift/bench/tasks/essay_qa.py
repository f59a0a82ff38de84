"""``essay_qa``: a question about the essay text itself, with no inserted needle.

The context is unaltered essay text (a window of the Paul Graham essays). The question quotes
the start of one sentence (10 words, at a depth that cycles 0%, 25%, 50%, 75%, 100% over the
instances) and asks how it goes on; the answer cue repeats the quote, and the answer is the
sentence's next three words, exactly (one phrase, scored 0 or 1). Unlike the needle tasks the
fact asked about is ordinary prose, so a policy cannot keep it because it stands out; the
question arrives after compression (query-agnostic), so the policy cannot know which sentence.
"""

from __future__ import annotations

from tokensift.bench.tasks.base import Prompt, _random_start, assemble
from tokensift.data import encode, essay_stream
from tokensift.bench.tasks.registry import Task, register

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUOTE_WORDS = 10
ANSWER_WORDS = 3
HEADER = "Read the following essays carefully. I will quote a passage and ask how it continues.\n"


@register
class EssayQA(Task):
    """Quote a sentence start of the essay text; answer with the words that follow it."""

    name = "essay_qa"
    description = "quoted sentence start of the real essay text -> its next 3 words"

    def make(self, tokenizer, rng, length, index, seed, protocol):
        stream = essay_stream(tokenizer)
        depth = DEPTHS[index % len(DEPTHS)]
        chosen: dict = {}

        def body(n: int) -> list[int]:
            start = _random_start(stream, rng, n)
            ids = list(stream.ids[start:start + n])
            # sentence starts inside the window, leaving room for the quote and its answer
            starts = [b - start for b in stream.boundaries_between(start, start + n - 64)]
            target = depth * (n - 64)
            spot = min(starts, key=lambda b: (abs(b - target), b)) if starts else 0
            words = tokenizer.decode(ids[spot:spot + 64]).split()
            chosen["quote"] = " ".join(words[:QUOTE_WORDS])
            chosen["answer"] = " ".join(words[QUOTE_WORDS:QUOTE_WORDS + ANSWER_WORDS])
            return ids

        # the body decides the quote, the prompt needs it: build the body first, then assemble around it
        probe = Prompt(header=HEADER, question="", answer_cue="")
        header_len = len(encode(tokenizer, probe.header))
        body_ids = body(_body_length(tokenizer, length, header_len, protocol))
        quote, answer = chosen["quote"], chosen["answer"]
        prompt = Prompt(
            header=HEADER,
            question=f'Which words come right after the passage "{quote}" in the essays above?',
            answer_cue=f'"{quote}',
        )
        instance = assemble(
            task=self.name, tokenizer=tokenizer, protocol=protocol, length=length, index=index, seed=seed,
            prompt=prompt, body=lambda n: _fit(body_ids, n, stream), answers=[answer], max_new_tokens=12,
            meta={"depth": depth, "quote": quote},
        )
        return instance, [f"{quote} {answer}"]


def _body_length(tokenizer, length: int, header_len: int, protocol: str) -> int:
    """Body tokens before the question is known (query-aware contexts end with the question: a guess
    that ``_fit`` corrects by trimming the body's end or padding it from the essays)."""
    from tokensift.bench.tasks.base import context_length

    return context_length(length) - header_len


def _fit(body_ids: list[int], n: int, stream) -> list[int]:
    """``body_ids`` cut (from the end) or extended with the essay text that follows, to ``n`` tokens."""
    if len(body_ids) >= n:
        return body_ids[:n]
    return body_ids + list(stream.ids[: n - len(body_ids)])
