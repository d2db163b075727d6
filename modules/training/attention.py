"""Attention for padding-free training rows: each example in the row attends only to itself, computed one example
at a time with PyTorch's fused causal SDPA kernel.

Transformers' own SDPA path builds a row-long block-diagonal boolean mask for such rows and runs masked
attention over the whole row, so a row of 8 examples of ~90 tokens costs a 720x720 attention instead of eight
90x90 ones, plus the mask itself. Registered under its own name, this function gets no mask at all (Transformers
skips mask building for attention functions it does not know) and the position ids, from which it finds where
each example starts. Rows that are not packed fall back to Transformers' SDPA with a causal mask, which right
padding never needs to see past.

A prompt prefix that all the examples of a micro-batch share (a default system prompt, an Alpaca preamble) can
be written once at the row's start: each example then continues at the prefix's length in positions and attends
to the prefix and to itself (see `row_segments`).
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
    segments = row_segments(position_ids[0])
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    lengths = [end - start for start, end, _ in segments]
    # split, not slicing: the backward of a split concatenates the pieces' gradients, where that of each slice
    # would fill a zero tensor of the whole row
    queries, keys, values = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
    pieces = []
    for (start, end, shared), q, k, v in zip(segments, queries, keys, values):
        if not shared:
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=scaling,
                                                         enable_gqa=gqa))
            continue
        # an example after a shared prefix: its queries see the whole prefix, then themselves causally
        k = torch.cat([keys[0][:, :, :shared], k], dim=2)
        v = torch.cat([values[0][:, :, :shared], v], dim=2)
        mask = torch.ones(end - start, shared + end - start, dtype=torch.bool, device=q.device).tril(shared)
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling,
                                                     enable_gqa=gqa))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def row_segments(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, shared) for each example in a row, found where the positions stop counting up by one.

    An example whose positions start at p > 0 continues the row's first p tokens, a prefix that the collator
    wrote once for all the examples sharing it (modules.training.trainer.PaddingFreeCollator): `shared` = p. If
    the row does not begin with such a prefix, the example stands alone (shared = 0)."""
    starts = torch.cat([positions.new_zeros(1), (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1])
    starts_list, firsts = torch.stack([starts, positions[starts]]).tolist()  # one device sync per layer, not two
    ends = starts_list[1:] + [positions.shape[0]]
    head = ends[0] if firsts[0] == 0 else 0
    return [(start, end, first if 0 < first <= head and index > 0 else 0)
            for index, (start, end, first) in enumerate(zip(starts_list, ends, firsts))]


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
