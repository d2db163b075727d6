"""The last decoder layer's position-wise parts run only at positions whose logits the loss uses.

With prompts masked, most positions of a training row have no target. Earlier layers must still compute them
(later positions attend to them), but in the last layer only their keys and values matter: its attention output
projection and its MLP act on each position alone, and their results at untrained positions reach nothing but
logits nobody asks for. So inside `only_kept_rows` those two modules run on the kept rows and leave zeros
elsewhere; the loss and every gradient are those of the full computation (the skipped rows would get zero
gradient anyway). That is about three quarters of the last layer's work at three quarters of the positions.

It applies to Llama-style models (`model.layers[-1]` with `self_attn.o_proj` and a dense `mlp` with a
`down_proj`, the layout of Llama, Mistral, Qwen and most others); for other layouts it does nothing. It must not be used with activation
checkpointing, whose recomputation runs outside the `with` block and would see other shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def position_wise_tail(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The last decoder layer's attention output projection and MLP, or [] for layouts this does not know."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not layers:
        return []
    last = layers[-1]
    o_proj = getattr(getattr(last, "self_attn", None), "o_proj", None)
    mlp = getattr(last, "mlp", None)
    if not isinstance(o_proj, torch.nn.Module) or not isinstance(getattr(mlp, "down_proj", None), torch.nn.Module):
        return []  # a mixture of experts (no down_proj of its own) routes, and may return more than a tensor
    return [o_proj, mlp]


def _rows_forward(forward: Callable[..., torch.Tensor], keep: torch.Tensor, length: int) -> Callable[..., Any]:
    def on_kept_rows(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != length:
            return forward(x, *args, **kwargs)
        rows = forward(x[:, keep], *args, **kwargs)
        return rows.new_zeros((1, length, rows.shape[-1])).index_copy(1, keep, rows)

    return on_kept_rows


@contextmanager
def only_kept_rows(model: torch.nn.Module, keep: torch.Tensor, length: int) -> Iterator[None]:
    """Within the block, the last layer's position-wise parts compute only rows `keep` of a (1, length) row."""
    parts = position_wise_tail(model) if keep.numel() < length else []
    saved = [module.__dict__.get("forward") for module in parts]  # an instance forward (fused LoRA) or None
    try:
        for module in parts:
            module.forward = _rows_forward(module.forward, keep, length)
        yield
    finally:
        for module, forward in zip(parts, saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
