"""Sparse reading as a layer kind: any selecting layer class, with single-token decode queries
answered by its policy's :meth:`~tokensift.policies.sparse_base.SparsePolicy.read`.

:func:`sparse_layer_class` builds (once per base class) ``Sparse<Base>``: the
:class:`SparseReadMixin` over whatever layer class stores the K/V (plain
:class:`~tokensift.cache.SelectingLayer`, an evicting policy's, or a storage variant such as
zipcache's), so reading composes with eviction and precision policies. Per decode step (one
new query per sequence) over a layer holding more than ``k`` tokens, the layer reports itself
non-plain and the policy's ``read`` runs instead of dense attention. Prefill and multi-token
blocks stay dense.
"""

from __future__ import annotations

import torch

from tokensift.selection import count

_LAYER_CLASSES: dict[type, type] = {}


class SparseReadMixin:
    """Mixed into a SelectingLayer subclass: sparse reads for single-token decode queries."""

    query_len: int = 0  # tokens of the coming attention call's query (set when they are marked)

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        self.query_len = new_valid.shape[1]
        super().mark_new_tokens(new_valid)

    def sparse_step(self) -> bool:
        """Will the coming attention call read a subset (one query token, policy says so)?"""
        return self.query_len == 1 and self.policy.wants_sparse(self)

    @property
    def is_plain(self) -> bool:
        return super().is_plain and not self.sparse_step()

    def attend(self, query, key, value, query_valid, scaling, new_block=None):
        if query.shape[2] == 1 and self.policy.wants_sparse(self):
            output = self.policy.read(self, query, key, value, query_valid, scaling)
            if output is not None:
                count(self, "sparse")
                return output
        count(self, "dense")
        return super().attend(query, key, value, query_valid, scaling, new_block)


def sparse_layer_class(base: type) -> type:
    """``base`` (a SelectingLayer subclass) with sparse reading mixed in (cached per base)."""
    if issubclass(base, SparseReadMixin):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"Sparse{base.__name__}", (SparseReadMixin, base), {})
    return _LAYER_CLASSES[base]
