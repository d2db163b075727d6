"""A fused forward and backward for PEFT's LoRA linear layers while training.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate operations: the base product, two
LoRA products, a scaling pass and an addition pass over the whole (tokens x out_features) output, and in the
backward another scaling pass and an addition of the two input gradients. On a CPU those full-width elementwise
passes run at memory speed and cost about as much as the rank-r products themselves. Here the LoRA product is
accumulated into the base output by one `addmm_` (scaling as its alpha), and the backward does the same for the
input gradient, so only the small (tokens x rank) tensors are scaled. The arithmetic is the same; the parameters,
their names and the saved adapter are PEFT's own, untouched.

Only plain LoRA on a plain `torch.nn.Linear` is fused (no DoRA or other variant, no LoRA bias, no quantized base,
one active adapter, not merged, no autocast); every other call goes to PEFT's own forward, checked on each call.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling * (x_lora A^T) B^T, where x_lora is x after LoRA dropout (often x itself)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        rows_lora = rows if x_lora is x else x_lora.reshape(-1, shape[-1])
        out = F.linear(rows, weight, bias)
        hidden = rows_lora.mm(lora_a.t())
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.same_input = x_lora is x
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(rows, rows_lora, hidden, weight, lora_a, lora_b)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, rows_lora, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_x_lora, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = grad.mm(lora_b).mul_(ctx.scaling)  # (tokens x rank): the only scaled activation
        grad_a = grad_hidden.t().mm(rows_lora) if need_a else None
        grad_b = grad.t().mm(hidden).mul_(ctx.scaling) if need_b else None
        grad_w = grad.t().mm(rows) if need_w else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        grad_x = grad_x_lora = None
        shape = (*grad_out.shape[:-1], rows.shape[-1])
        if ctx.same_input:
            if need_x:
                grad_x = grad.mm(weight).addmm_(grad_hidden, lora_a).reshape(shape)
        else:
            if need_x:
                grad_x = grad.mm(weight).reshape(shape)
            if need_x_lora:
                grad_x_lora = grad_hidden.mm(lora_a).reshape(shape)
        return grad_x, grad_x_lora, grad_w, grad_bias, grad_a, grad_b, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = self.active_adapters
    adapter = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter is None or adapter not in self.lora_A
            or adapter in self.lora_variant or torch.is_autocast_enabled(x.device.type)):
        return self._peft_forward(x, *args, **kwargs)
    base, lora_a, lora_b = self.base_layer, self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if self.lora_B[adapter].bias is not None or not (x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype):
        return self._peft_forward(x, *args, **kwargs)
    x_lora = self.lora_dropout[adapter](x)
    return LoraLinearFunction.apply(x, x_lora, base.weight, base.bias, lora_a, lora_b,
                                    float(self.scaling[adapter]))


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Give each plain LoRA linear layer of a PEFT model the fused forward; returns how many got it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
            continue
        if not hasattr(module, "_peft_forward"):  # not fused by an earlier call
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused
