"""SepLLM: keep sinks, separator tokens and the recent window; evict other tokens first."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.scoring import pad_to

SEPARATOR_CHARS = set(".,;:!?\n。，；：！？、…")


@register
@dataclass
class SepLLM(Policy):
    """Separators (punctuation and newline tokens) stand in for the segments they close.

    Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
    Separator" (2024, arXiv:2412.12094). Sinks and the recent window are protected by the
    cache; every separator outranks every other token; when the budget cannot hold all
    separators, they are ranked by the attention they received (accumulated, as in H2O).
    Budget left over after the separators goes to the most recent other tokens.

    Token ids: the cache records each forward's ``input_ids`` (``tokensift.hooks``, installed
    by ``make_cache``) and this policy flags separators as tokens arrive
    (``token_state["sep"]``). The separator ids come from ``separator_ids`` ("13 11 30", any
    non-digit delimiter) or, when empty, from the model's tokenizer (loaded from
    ``model.config._name_or_path`` in ``prepare``): every token whose text, spaces stripped,
    is made only of ``. , ; : ! ? \\n`` and their CJK/ellipsis variants. Forwards fed with
    embeddings instead of ids flag no separators.

    Parameters
    ----------
    separator_ids : str, default ""
        Token ids counted as separators, e.g. ``"13 11 30"`` (empty: found in the tokenizer).

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "sepllm"
    paper = "Chen et al. 2024, SepLLM: Accelerate Large Language Models by Compressing One Segment into One Separator (arXiv:2412.12094)"
    needs_attention = True
    separator_ids: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._separators = parse_ids(self.separator_ids) if self.separator_ids else None

    def prepare(self, model) -> None:
        if self._separators is not None:
            return
        try:
            self._separators = tokenizer_separators(model.config._name_or_path)
        except TokensiftError as error:  # e.g. a randomly initialized test model
            warnings.warn(f"{error}; no token counts as a separator", stacklevel=2)
            self._separators = frozenset()

    def observe(self, layer, view) -> None:
        kept, new = layer.kept, view.num_queries
        flags = pad_to(layer.token_state.get("sep"), kept, layer.keys)
        flags[..., kept - new:] = self.new_token_flags(layer, view.query_valid.shape[0], new)[:, None, :]
        layer.token_state["sep"] = flags
        running = pad_to(layer.token_state.get("sep_attn"), kept, layer.keys)
        layer.token_state["sep_attn"] = running + view.column_sum()

    def new_token_flags(self, layer, batch: int, new: int) -> torch.Tensor:
        """``[batch, new]`` float: 1.0 where the newest tokens are separators."""
        ids = layer.shared.get("input_ids")
        if self._separators is None:
            raise TokensiftError("sepllm: no separator ids: build the cache with make_cache, or pass separator_ids=...")
        if ids is None or tuple(ids.shape) != (batch, new):
            return torch.zeros(batch, new, device=layer.keys.device)
        table = torch.tensor(sorted(self._separators), dtype=ids.dtype, device=ids.device)
        return torch.isin(ids, table).float().to(layer.keys.device)

    def score(self, layer) -> torch.Tensor:
        flags = layer.token_state["sep"]
        attention = layer.token_state["sep_attn"]
        attention = attention / attention.amax(dim=-1, keepdim=True).clamp(min=1e-12)  # in [0, 1]
        recency = layer.positions.float() / (layer.seen + 1)  # in [0, 1)
        return torch.where(flags > 0, 2.0 + attention, recency)


def parse_ids(text: str) -> frozenset[int]:
    """``"13, 11 30"`` -> {13, 11, 30}."""
    return frozenset(int(part) for part in re.split(r"[^0-9]+", text) if part)


def is_separator_text(text: str) -> bool:
    """True for a token text made only of separator characters (spaces ignored)."""
    core = text.replace(" ", "").replace("\t", "").replace("\r", "")
    return bool(core) and all(ch in SEPARATOR_CHARS for ch in core)


def separator_ids_of(tokenizer) -> frozenset[int]:
    """The ids of every separator token in ``tokenizer``'s vocabulary."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    return frozenset(i for i, text in enumerate(texts) if is_separator_text(text))


@lru_cache(maxsize=8)
def tokenizer_separators(source: str) -> frozenset[int]:
    """Separator ids of the tokenizer saved with a model (a folder or hub id)."""
    from transformers import AutoTokenizer

    if not source:
        raise TokensiftError("sepllm: the model has no tokenizer path: pass separator_ids=...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise TokensiftError(f"sepllm: cannot load the tokenizer of '{source}' ({error}): pass separator_ids=...") from None
    return separator_ids_of(tokenizer)
