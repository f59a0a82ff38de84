"""FASA: a cheap proxy score from a few dominant RoPE frequency chunks, calibrated once per model."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.policies.base import Policy
from tokensift.policies.registry import register
from tokensift.policies.snapkv import _append_recent


@register
@dataclass
class FASA(Policy):
    """Score tokens with partial q.k over each head's dominant frequency chunks.

    "FASA: Frequency-aware Sparse Attention" (2025/26; the seed listing gives no authors or
    arXiv id). RoPE rotates dims ``f`` and ``f + dim/2`` together at frequency ``f``: that pair
    is a frequency chunk. On a calibration prompt (the first ``calib_tokens`` tokens of the Paul
    Graham essays) each query head's chunks are ranked by how well their partial logits'
    top-``top_fraction`` keys agree with the full logits' top keys (mean over the last
    ``calib_queries`` queries); the best ``chunks`` per head are dominant. At eviction time the
    recent ``obs_window`` queries are scored against the kept keys with those chunks only
    (``2 * chunks`` of ``dim`` multiply-adds per pair), softmaxed, averaged over queries and
    the query heads of each KV head. Calibration runs once per model and is cached as
    ``<cache_root>/fasa/<key>.pt`` (key: model path, shapes, a weight fingerprint and the
    calibration settings). A model without a loadable tokenizer is calibrated on
    pseudo-random token ids instead (test models).

    Parameters
    ----------
    chunks : int, default 8
        Dominant frequency chunks per query head used to score tokens.
    obs_window : int, default 32
        Recent queries (kept across decode steps) that score the kept keys at eviction time.
    calib_tokens : int, default 1024
        Length of the calibration prompt (at least 2).
    calib_queries : int, default 64
        Last queries of the calibration prompt over which chunk agreement is averaged.
    top_fraction : float, default 0.1
        Fraction of the keys, in (0, 1], whose top set a chunk must reproduce at calibration.

    Plus the common parameters of :class:`~tokensift.policies.base.Policy`.
    """

    name = "fasa"
    paper = "FASA: Frequency-aware Sparse Attention (2025)"
    needs_attention = True
    chunks: int = 8
    obs_window: int = 32
    calib_tokens: int = 1024
    calib_queries: int = 64
    top_fraction: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.chunks < 1 or self.obs_window < 1 or self.calib_tokens < 2 or self.calib_queries < 1:
            raise TokensiftError("fasa: chunks, obs_window, calib_queries must be >= 1 and calib_tokens >= 2")
        if not 0.0 < self.top_fraction <= 1.0:
            raise TokensiftError(f"fasa: top_fraction must be in (0, 1] (got {self.top_fraction})")

    # ------------------------------------------------------------ calibration
    def prepare(self, model) -> None:
        key = calibration_key(model, self)
        if getattr(self, "_key", None) == key:
            return
        self._key, self._dominant = key, load_or_calibrate(model, self, key)

    def dominant(self, layer_idx: int) -> torch.Tensor:
        """``[query_heads, chunks]`` dominant chunk indices of a layer."""
        table = getattr(self, "_dominant", None)
        if table is None:
            raise TokensiftError("fasa: not calibrated: build the cache with tokensift.engine.make_cache(model, policy)")
        return table[layer_idx]

    # ---------------------------------------------------------------- scoring
    def observe(self, layer, view) -> None:
        rows = view.last_rows(self.obs_window)
        layer.state["fasa_q"] = _append_recent(layer.state.get("fasa_q"), view.query[:, :, rows], self.obs_window)
        layer.state["fasa_pos"] = _append_recent(layer.state.get("fasa_pos"), view.query_positions[rows], self.obs_window)
        layer.state["fasa_valid"] = _append_recent(layer.state.get("fasa_valid"), view.query_valid[:, rows], self.obs_window)
        layer.state["fasa_scaling"] = view.scaling

    def score(self, layer) -> torch.Tensor:
        query, valid = layer.state["fasa_q"].float(), layer.state["fasa_valid"]
        dims = chunk_dims(self.dominant(layer.layer_idx).to(query.device), query.shape[-1])  # [q_heads, 2c]
        groups = query.shape[1] // layer.keys.shape[1]
        keys = layer.keys.float().repeat_interleave(groups, dim=1)
        q_part = query.gather(-1, dims[None, :, None, :].expand(query.shape[0], -1, query.shape[2], -1))
        k_part = keys.gather(-1, dims[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1))
        logits = torch.matmul(q_part, k_part.transpose(-1, -2)) * layer.state["fasa_scaling"]
        visible = layer.valid[:, :, None, :] & (layer.positions[:, :, None, :] <= layer.state["fasa_pos"][None, None, :, None])
        logits = logits.masked_fill(~visible.repeat_interleave(groups, dim=1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        weights = valid.float()[:, None, :, None]
        mean = (probs * weights).sum(2) / weights.sum(2).clamp(min=1.0)  # [b, q_heads, n]
        return mean.view(mean.shape[0], -1, groups, mean.shape[-1]).mean(2)


def chunk_dims(chunks: torch.Tensor, dim: int) -> torch.Tensor:
    """Chunk indices ``[..., c]`` -> the dims they cover ``[..., 2c]`` (rotate-half pairing)."""
    return torch.cat([chunks, chunks + dim // 2], dim=-1)


def chunk_agreement(query: torch.Tensor, keys: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """``[chunks]``: mean top-k overlap between each chunk's partial logits and the full logits.

    ``query`` ``[r, dim]`` are the last ``r`` queries of a sequence whose ``keys`` are ``[n, dim]``.
    """
    r, dim = query.shape
    n = keys.shape[0]
    half = dim // 2
    device = query.device
    visible = torch.arange(n, device=device)[None, :] <= torch.arange(n - r, n, device=device)[:, None]  # [r, n] causal
    product = query[:, None, :] * keys[None, :, :]  # [r, n, dim]
    partial = (product[..., :half] + product[..., half:]).permute(0, 2, 1)  # [r, chunks, n]
    full = product.sum(-1)  # [r, n]
    k = max(1, int(top_fraction * n))
    full_top = full.masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices
    chunk_top = partial.masked_fill(~visible[:, None, :], float("-inf")).topk(k, dim=-1).indices
    in_full = torch.zeros(r, n, dtype=torch.bool, device=device).scatter_(-1, full_top, True)
    hits = in_full[:, None, :].expand(-1, half, -1).gather(-1, chunk_top)
    return hits.float().mean(dim=(0, 2))


def calibration_key(model, policy: FASA) -> str:
    config = model.config.get_text_config(decoder=True)
    first = next(model.parameters()).detach().float()
    fingerprint = f"{float(first.abs().sum()):.6e}:{first.numel()}"
    text = "|".join(str(x) for x in (
        getattr(model.config, "_name_or_path", ""), config.num_hidden_layers, config.num_attention_heads,
        getattr(config, "num_key_value_heads", None), config.hidden_size, fingerprint,
        policy.chunks, policy.calib_tokens, policy.calib_queries, policy.top_fraction,
    ))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def calibration_ids(model, count: int) -> torch.Tensor:
    """The first ``count`` essay tokens under the model's tokenizer (pseudo-random ids without one)."""
    source = getattr(model.config, "_name_or_path", "")
    device = next(model.parameters()).device
    try:
        from transformers import AutoTokenizer

        from tokensift.data import essay_texts

        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = tokenizer("\n\n".join(essay_texts()[:8]), add_special_tokens=False)["input_ids"][:count]
        return torch.tensor([ids], device=device)
    except (OSError, ValueError, TokensiftError) as error:
        warnings.warn(f"fasa: no tokenizer or essays for '{source}' ({error}); calibrating on pseudo-random ids", stacklevel=2)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        generator = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, (1, count), generator=generator, device="cpu").to(device)


def load_or_calibrate(model, policy: FASA, key: str) -> dict[int, torch.Tensor]:
    from tokensift.models import cache_root

    path = cache_root() / "fasa" / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    table = calibrate(model, policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)
    return table


@torch.inference_mode()
def calibrate(model, policy: FASA) -> dict[int, torch.Tensor]:
    """Per selecting layer: ``[query_heads, chunks]`` dominant chunks (best agreement first)."""
    from tokensift.engine import make_cache
    from tokensift.policies.registry import build_policy

    ids = calibration_ids(model, policy.calib_tokens)
    cache = make_cache(model, build_policy("full"))
    recorded: dict = {}
    cache.shared["record_queries"] = recorded
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    table = {}
    for layer in cache.selecting_layers:
        query = recorded[layer.layer_idx][0][0].float()  # [q_heads, n, dim]
        keys = layer.keys[0].float()  # [kv_heads, n, dim]
        groups = query.shape[0] // keys.shape[0]
        rows = min(policy.calib_queries, query.shape[1])
        chosen = []
        for head in range(query.shape[0]):
            agreement = chunk_agreement(query[head, -rows:], keys[head // groups], policy.top_fraction)
            chosen.append(agreement.topk(min(policy.chunks, agreement.numel())).indices.sort().values)
        table[layer.layer_idx] = torch.stack(chosen).cpu()  # the cached file loads on any machine
    return table

