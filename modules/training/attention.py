"""Attention for padding-free training rows: each example in the row attends only to itself, computed one example
at a time with PyTorch's fused causal SDPA kernel.

Transformers' own SDPA path builds a row-long block-diagonal boolean mask for such rows and runs masked
attention over the whole row, so a row of 8 examples of ~90 tokens costs a 720x720 attention instead of eight
90x90 ones, plus the mask itself. Registered under its own name, this function gets no mask at all (Transformers
skips mask building for attention functions it does not know) and the position ids, from which it finds where
each example starts. Rows that are not packed fall back to Transformers' SDPA with a causal mask, which right
padding never needs to see past.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "workbench_packed_sdpa"


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query: (batch, heads, length, dim), key/value: (batch, kv_heads, length, dim) -> (batch, length, heads,
    dim), as Transformers' attention functions return it."""
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [query.shape[2]]
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    lengths = [e - s for s, e in zip(starts, ends)]
    # split, not slicing: the backward of a split concatenates the pieces' gradients, where that of each slice
    # would fill a zero tensor of the whole row
    pieces = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=scaling, enable_gqa=gqa)
              for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                 value.split(lengths, dim=2))]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
