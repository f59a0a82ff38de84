"""Select visual tokens in front of (stage 1) and inside (stage 2) a VLM's language model.

``VisualTokenPruner(model, method, ratio=...)`` wraps a ``transformers`` LLaVA, LLaVA-NeXT,
Qwen2-VL, Idefics3 or SmolVLM model (each tested on a tiny random instance); its ``generate(**inputs)`` runs the model's own
``generate`` with hooks (removed afterwards):

* stage 1 — in the prefill, the language model's inputs (visual tokens after the vision tower
  and projector, already scattered into the embeddings) are cut to the kept visual tokens plus
  all text. Kept tokens keep their original positions (``position_ids``, including Qwen2-VL's
  multimodal rotary positions); later steps keep generate's true positions and get the
  attention mask restricted to the tokens actually cached.
* stage 2 (ToDRE, SparseVLM-style) — at LLM layer ``stage2_layer`` the visual tokens the
  instruction tokens attended to least in the previous layer are dropped from the hidden
  states, so that layer and all later ones compute and cache fewer tokens. The attention
  is read by a function registered with ``AttentionInterface`` (SDPA plus one small softmax
  over the instruction rows at one layer), so stage 2 runs the language model on SDPA.

Stage-1 importance scores: projected visual tokens carry no [CLS], so attention-based
selectors use ``proxy_scores`` (attention of the mean visual token) inside a VLM.

Keeping every token gives outputs identical to the unwrapped model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from tokensift.errors import TokensiftError

from .selectors import get_selector, resolve_budget
from .selectors.base import gather_tokens

ATTN_NAME = "tokensift_vlm"
SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
             "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


@dataclass
class PruneStats:
    """What the last prefill kept: visual-token indices, and columns of the prompt sequence."""

    visual_in: int = 0
    visual_kept: int = 0
    visual_kept_stage2: int | None = None
    kept_indices: torch.Tensor | None = None
    kept_columns: torch.Tensor | None = None
    stage2_dropped: torch.Tensor | None = None


@dataclass
class _State:
    """Per-prefill bookkeeping shared by the hooks."""

    input_ids: torch.Tensor | None = None
    prefill: bool = False
    orig_len: int = 0
    keep_cols: torch.Tensor | None = None
    s1_len: int = 0
    s2_cols: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    visual_cols: torch.Tensor | None = None
    scores: torch.Tensor | None = None


_RECORDING: dict = {}


def _vlm_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA; at the recording layer also the instruction tokens' attention over the keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _RECORDING.get("layer")
    if rec is not None and getattr(module, "layer_idx", None) == rec and query.shape[2] > 1:
        _RECORDING["probs"] = _text_attention(module, query, key, kwargs.get("scaling"), _RECORDING["rows"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _text_attention(module, query, key, scaling, rows):
    """Attention ``[B, n_keys]`` paid by query rows ``rows`` ``[B, r]``, averaged over heads and rows."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    q = torch.gather(query.float(), 2, rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
    logits = q @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    causal = rows[:, None, :, None] >= torch.arange(key.shape[2], device=key.device)
    logits = logits.masked_fill(~causal, -torch.inf)
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


@dataclass
class VisualTokenPruner:
    """Wrap a VLM so ``generate``/forward run on a selected subset of its visual tokens.

    ``method``/``budget``/``ratio`` pick stage 1 (any registered selector; budget per image
    sequence). ``stage2_layer`` (>= 1) and ``stage2_keep`` (fraction of the stage-1 visual tokens
    kept from that LLM layer on; 0 drops them all) enable ToDRE's stage 2.

    Parameters
    ----------
    model : transformers VLM
        The model to wrap: one of ``SUPPORTED`` (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3, SmolVLM).
    method : str, default "todre"
        Stage-1 selector: a name from ``SELECTORS``.
    budget : int or None, default None
        Visual tokens kept per sequence (all its images together) by stage 1.
    ratio : float or None, default None
        Alternative to ``budget``: fraction in (0, 1) of each sequence's visual tokens kept by
        stage 1 (neither: every visual token is kept; both: an error at prefill).
    stage2_layer : int or None, default None
        LLM layer (1 .. layers - 1) from which stage 2 drops visual tokens, scored by the
        instruction tokens' attention in the layer before (None: no stage 2).
    stage2_keep : float, default 0.5
        Fraction in [0, 1) of the stage-1 visual tokens kept from ``stage2_layer`` on (0 drops
        them all); used only with ``stage2_layer``.
    params : dict, default {}
        Hyper-parameters of the selector, passed as ``get_selector(method, **params)``.
    stats : PruneStats, default PruneStats()
        What the last prefill kept; an output, replaced at each prefill (leave it unset).
    """

    model: torch.nn.Module
    method: str = "todre"
    budget: int | None = None
    ratio: float | None = None
    stage2_layer: int | None = None
    stage2_keep: float = 0.5
    params: dict = field(default_factory=dict)
    stats: PruneStats = field(default_factory=PruneStats)

    def __post_init__(self):
        name = type(self.model).__name__
        if name not in SUPPORTED:
            raise TokensiftError(f"{name} is not a supported VLM; use one of: {', '.join(SUPPORTED)}")
        self.selector = get_selector(self.method, **self.params)
        self._state = _State()
        if self.stage2_layer is not None:
            n_layers = len(self._lm().layers)
            if not 1 <= self.stage2_layer < n_layers:
                raise TokensiftError(f"stage2_layer must be in 1..{n_layers - 1} for this model")
            if not 0 <= self.stage2_keep < 1:
                raise TokensiftError("stage2_keep must be in [0, 1): the fraction of visual tokens kept")

    def generate(self, **kwargs):
        """``model.generate(**kwargs)`` with visual token selection."""
        with self.attached():
            return self.model.generate(**kwargs)

    def __call__(self, **kwargs):
        """A single forward of the wrapped model with visual token selection."""
        with self.attached(), torch.no_grad():
            return self.model(**kwargs)

    # --- hooks -------------------------------------------------------------------------

    def _inner(self):
        """The VLM's base model (LlavaModel, Qwen2VLModel, Idefics3Model, ...)."""
        return self.model.model

    def _lm(self):
        """The language model inside the VLM."""
        inner = self._inner()
        return getattr(inner, "language_model", None) or inner.text_model

    def _image_token_id(self) -> int:
        """Placeholder token id of image features."""
        config = self.model.config
        value = getattr(config, "image_token_id", None)
        return value if value is not None else config.image_token_index

    @contextlib.contextmanager
    def attached(self):
        """Install the hooks (and the recording attention for stage 2) for the duration."""
        handles = [
            self._inner().register_forward_pre_hook(self._outer_hook, with_kwargs=True),
            self._lm().register_forward_pre_hook(self._lm_hook, with_kwargs=True),
        ]
        lm = self._lm()
        previous = lm.config._attn_implementation
        if self.stage2_layer is not None:
            _register_attention()
            lm.config._attn_implementation = ATTN_NAME
            for i, layer in enumerate(lm.layers):
                if i >= self.stage2_layer:
                    handles.append(layer.register_forward_pre_hook(self._layer_hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            lm.config._attn_implementation = previous
            _RECORDING.clear()

    def _outer_hook(self, module, args, kwargs):
        """Remember the prompt's token ids at prefill."""
        past = kwargs.get("past_key_values")
        self._state.prefill = past is None or past.get_seq_length() == 0
        if self._state.prefill:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise TokensiftError("VisualTokenPruner needs input_ids (not inputs_embeds) to find the visual tokens")
            self._state.input_ids = ids
        return args, kwargs

    def _lm_hook(self, module, args, kwargs):
        """Stage 1 at prefill; mask and cache bookkeeping at later steps."""
        if self._state.prefill:
            self._state.prefill = False
            return args, self._stage1(kwargs)
        return args, self._later_step(kwargs)

    def _stage1(self, kwargs: dict) -> dict:
        """Cut the language model's prefill inputs to text + selected visual tokens."""
        st = self._state
        embeds = kwargs["inputs_embeds"]
        B, n, _ = embeds.shape
        vis = (st.input_ids == self._image_token_id()).to(embeds.device)
        counts = vis.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise TokensiftError("every sequence in a batch must have the same number of visual tokens; run them separately")
        n_vis = int(counts[0])
        st.orig_len = n
        if n_vis == 0:
            st.keep_cols = torch.arange(n, device=embeds.device).expand(B, n)
            self.stats = PruneStats(0, 0)
            return kwargs
        vis_cols = torch.nonzero(vis)[:, 1].view(B, n_vis)
        text_cols = torch.nonzero(~vis)[:, 1].view(B, n - n_vis)
        k = resolve_budget(n_vis, self.budget, self.ratio) if (self.budget, self.ratio) != (None, None) else n_vis
        feats = gather_tokens(embeds, vis_cols)
        sel = self.selector.select(feats, k, text=gather_tokens(embeds, text_cols) if n_vis < n else None)
        kept, _ = sel.gather(feats)
        embeds = embeds.scatter(1, torch.gather(vis_cols, 1, sel.indices).unsqueeze(-1).expand_as(kept), kept)
        keep_cols = torch.sort(torch.cat([text_cols, torch.gather(vis_cols, 1, sel.indices)], dim=1), dim=1).values
        st.keep_cols, st.s1_len = keep_cols, keep_cols.shape[1]
        self.stats = PruneStats(n_vis, k, kept_indices=sel.indices, kept_columns=keep_cols)
        kwargs = _cut(kwargs, keep_cols, n)
        kwargs["inputs_embeds"] = gather_tokens(embeds, keep_cols)
        if self.stage2_layer is not None:
            self._prepare_stage2(vis.gather(1, keep_cols), keep_cols)
        return kwargs

    def _later_step(self, kwargs: dict) -> dict:
        """Restrict the 2D attention mask to the cached columns (positions stay generate's)."""
        st = self._state
        mask = kwargs.get("attention_mask")
        if st.keep_cols is not None and mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.gather(1, st.keep_cols), mask[:, st.orig_len:]], dim=1)
        return kwargs

    # --- stage 2 -------------------------------------------------------------------------

    def _prepare_stage2(self, vis_kept: torch.Tensor, keep_cols: torch.Tensor) -> None:
        """Record instruction-token attention in the layer before ``stage2_layer``."""
        st = self._state
        B, n1 = vis_kept.shape
        positions = torch.arange(n1, device=vis_kept.device).expand(B, n1)
        last_vis = torch.where(vis_kept, positions, -1).max(dim=1, keepdim=True).values
        text_after = (~vis_kept) & (positions > last_vis)
        rows = text_after if bool(text_after.any(dim=1).all()) else ~vis_kept
        counts = rows.sum(dim=1)
        r = int(counts.min())
        st.text_rows = torch.stack([torch.nonzero(rows[b])[-r:, 0] for b in range(B)])
        st.visual_cols = torch.nonzero(vis_kept)[:, 1].view(B, -1)
        st.s2_cols = None
        _RECORDING.update(layer=self.stage2_layer - 1, rows=st.text_rows, probs=None)

    def _stage2_cols(self, n1: int) -> torch.Tensor:
        """Columns (of the stage-1 sequence) kept from ``stage2_layer`` on."""
        st = self._state
        probs = _RECORDING.get("probs")
        vis_scores = probs.gather(1, st.visual_cols)
        k2 = int(round(st.visual_cols.shape[1] * self.stage2_keep))
        order = torch.sort(vis_scores, dim=1, descending=True, stable=True).indices
        dropped = torch.gather(st.visual_cols, 1, order[:, k2:])
        keep = torch.ones(st.visual_cols.shape[0], n1, dtype=torch.bool, device=probs.device)
        keep.scatter_(1, dropped, False)
        self.stats.visual_kept_stage2 = k2
        self.stats.stage2_dropped = torch.sort(st.keep_cols.gather(1, dropped), dim=1).values
        return torch.nonzero(keep)[:, 1].view(keep.shape[0], -1)

    def _layer_hook(self, module, args, kwargs):
        """Drop stage-2 tokens from the hidden states (first layer) and every per-token kwarg."""
        st = self._state
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1 and st.s2_cols is None:
            if _RECORDING.get("probs") is None:
                return args, kwargs
            st.s2_cols = self._stage2_cols(st.s1_len)
            _RECORDING["layer"] = None
        if st.s2_cols is None:
            return args, kwargs
        if hidden.shape[1] == st.s1_len:
            hidden = gather_tokens(hidden, st.s2_cols)
            kwargs = _cut_layer_kwargs(kwargs, st.s2_cols, st.s1_len)
        elif hidden.shape[1] == st.s2_cols.shape[1]:
            kwargs = _cut_layer_kwargs(kwargs, st.s2_cols, st.s1_len)
        else:
            kwargs = _cut_decode_mask(kwargs, st.s2_cols, st.s1_len)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _register_attention() -> None:
    """Register the recording attention (and its mask function) once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _vlm_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _cut(kwargs: dict, cols: torch.Tensor, n: int) -> dict:
    """Keep columns ``cols`` of the prefill's 2D mask and position ids (last dim of length ``n``)."""
    out = dict(kwargs)
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        out["attention_mask"] = mask.gather(1, cols)
    elif mask is not None:
        raise TokensiftError("VisualTokenPruner needs a 2D attention mask (or none)")
    pos = out.get("position_ids")
    if pos is not None and pos.shape[-1] == n:
        idx = cols.expand(*pos.shape[:-2], *cols.shape) if pos.dim() > 2 else cols
        out["position_ids"] = pos.expand(*pos.shape[:-2], cols.shape[0], n).gather(-1, idx)
    return out


def _cut_layer_kwargs(kwargs: dict, cols: torch.Tensor, n: int) -> dict:
    """Cut a decoder layer's per-token kwargs (mask, rotary cos/sin, positions) to ``cols``."""
    out = dict(kwargs)
    pe = out.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(_gather_dim(t, cols, -2, n) for t in pe)
    pos = out.get("position_ids")
    if pos is not None and pos.shape[-1] == n:
        out["position_ids"] = _gather_dim(pos, cols, -1, n)
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = _gather_dim(mask, cols, -1, n) if mask.shape[-1] == n else mask
        out["attention_mask"] = _gather_dim(mask, cols, -2, n) if mask.shape[-2] == n else mask
    return out


def _cut_decode_mask(kwargs: dict, cols: torch.Tensor, n1: int) -> dict:
    """At a later step, keep the stage-2 key columns of a 4D mask (plus the newer ones)."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return kwargs
    B, k = cols.shape
    newer = torch.arange(n1, mask.shape[-1], device=mask.device).expand(B, -1)
    idx = torch.cat([cols, newer], dim=1)
    return {**kwargs, "attention_mask": _gather_dim(mask, idx, -1, mask.shape[-1])}


def _gather_dim(t: torch.Tensor, cols: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Gather ``cols`` ``[B, k]`` along ``dim`` of ``t`` whose batch dim is the one sized B (or 1)."""
    if t.shape[dim] != n:
        return t
    dim = dim % t.dim()
    B = cols.shape[0]
    bdim = next((d for d in range(dim) if t.shape[d] == B), None)
    if bdim is None:
        bdim = next(d for d in range(dim) if t.shape[d] == 1)
        t = t.expand(*[B if d == bdim else -1 for d in range(t.dim())])
    shape = [1] * t.dim()
    shape[bdim], shape[dim] = B, cols.shape[1]
    idx = cols.view(shape).expand(*[cols.shape[1] if d == dim else t.shape[d] for d in range(t.dim())])
    return torch.gather(t, dim, idx)
