"""Keep PyTorch's attention off cuDNN on CUDA.

On Hopper GPUs PyTorch (2.11 seen) picks cuDNN for `scaled_dot_product_attention`, and cuDNN builds an execution
plan for every sequence length it has not met yet: about 130 ms each, measured on an H100. Training rows and chat
turns change length at every step, so the plan building dominated: a LoRA step of the 135M starter model took
1.03 s with cuDNN and 0.26 s with flash/memory-efficient attention, which need no plans (docs/benchmarks.md, the H100 runs)."""
from __future__ import annotations


def avoid_cudnn_attention() -> None:
    """Process-wide (a torch backend flag); a no-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
