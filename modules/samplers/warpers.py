"""Samplers Transformers lacks, with text-generation-webui's semantics, vectorised over the batch and vocabulary.

Truncation samplers set dropped logits to -inf and always keep the `min_keep` most likely tokens (more than one
only under beam sampling), so a chain can never leave a row with nothing to sample.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from transformers import LogitsProcessor

from modules.samplers.draws import SeededDraws, generator_on

NEG_INF = float("-inf")


def _drop(scores: torch.Tensor, remove: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Set `remove`d logits to -inf, sparing the `min_keep` largest of each row."""
    keep = scores.topk(min(min_keep, scores.shape[-1]), dim=-1).indices
    remove = remove.scatter(-1, keep, False)
    return scores.masked_fill(remove, NEG_INF)


class TopK(LogitsProcessor):
    """Keep exactly the k most likely tokens. Transformers' TopKLogitsWarper keeps every token tied with the k-th
    as well, so top_k=1 sampled among equal bf16 logits where greedy decoding takes the first; here ties go to the
    lower token id, as argmax and llama.cpp's top-k do."""

    def __init__(self, top_k: int, min_keep: int = 1):
        self.k = max(top_k, min_keep)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, False), NEG_INF)


class TopA(LogitsProcessor):
    """Drop tokens whose probability is below top_a times the square of the top probability."""

    def __init__(self, top_a: float, min_keep: int = 1):
        self.top_a = top_a
        self.min_keep = min_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        return _drop(scores, probs < self.top_a * top * top, self.min_keep)


class TailFree(LogitsProcessor):
    """Tail-free sampling: sort the probabilities, take the absolute second differences, normalise them to a
    distribution and cut where its running sum passes `tfs`. As in the original, the first token is always kept
    and the last always dropped."""

    def __init__(self, tfs: float, min_keep: int = 1):
        self.tfs = tfs
        self.min_keep = min_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] < 3:
            return scores
        sorted_logits, order = scores.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        curvature = probs.diff().diff().abs()
        cdf = (curvature / curvature.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
        first = torch.zeros_like(cdf[:, :1], dtype=torch.bool)
        sorted_remove = torch.cat((first, cdf > self.tfs, ~first), dim=-1)
        remove = sorted_remove.scatter(-1, order, sorted_remove)
        return _drop(scores, remove, self.min_keep)


class TopNSigma(LogitsProcessor):
    """Keep the logits within n standard deviations of the largest one. Mean and deviation are taken over the
    finite logits only (tokens an earlier sampler removed do not count), as llama.cpp does."""

    def __init__(self, n_sigma: float, min_keep: int = 1):
        self.n_sigma = n_sigma
        self.min_keep = min_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores)
        count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
        values = scores.masked_fill(~finite, 0.0)
        mean = values.sum(dim=-1, keepdim=True) / count
        variance = ((values - mean) ** 2).masked_fill(~finite, 0.0).sum(dim=-1, keepdim=True) / count
        top = scores.amax(dim=-1, keepdim=True)
        return _drop(scores, scores < top - self.n_sigma * variance.sqrt(), self.min_keep)


class DynamicTemperature(LogitsProcessor):
    """Temperature from the entropy: low + (high - low) * (entropy / max entropy) ** exponent, where the maximum
    entropy is that of a uniform choice among the tokens still allowed."""

    def __init__(self, low: float, high: float, exponent: float):
        self.low = low
        self.high = high
        self.exponent = exponent

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.log_softmax(dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).nan_to_num(0.0, 0.0, 0.0).sum(dim=-1, keepdim=True)
        entropy = entropy.clamp(min=1e-10)
        allowed = (scores > NEG_INF).sum(dim=-1, keepdim=True).to(scores.dtype)
        max_entropy = allowed.log().clamp(min=1e-10)
        normalised = entropy / max_entropy
        temperature = self.low + (self.high - self.low) * normalised.pow(self.exponent)
        return scores / temperature.clamp(min=1e-6)


class QuadraticSmoothing(LogitsProcessor):
    """Quadratic sampling: bend the logits around the top one, max - k*f*d^2 + s*f*d^3 with d = logit - max,
    k = (3 - curve) / 2 and s = (curve - 1) / 2. A curve of 1 is purely quadratic."""

    def __init__(self, factor: float, curve: float):
        self.factor = factor
        self.curve = curve

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.amax(dim=-1, keepdim=True)
        diff = scores - top
        k = (3 - self.curve) / 2
        s = (self.curve - 1) / 2
        bent = -(k * self.factor * diff**2) + (s * self.factor * diff**3) + top
        return torch.where(scores == NEG_INF, scores, bent)


class ExcludeTopChoices(LogitsProcessor):
    """XTC: with chance `probability` (drawn per row on the CPU, from the request's own generator when it has one,
    else from torch's global RNG, which transformers.set_seed reproduces), drop every token at or above `threshold`
    probability except the least likely of them. Rows where that would drop a protected token (the newline or an
    end-of-sequence token) are left as they are."""

    def __init__(self, threshold: float, probability: float, protected_ids: Iterable[int],
                 draws: SeededDraws | None = None):
        self.threshold = threshold
        self.probability = probability
        self.protected = torch.tensor(sorted(set(protected_ids)), dtype=torch.long)
        self.draws = draws

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        act = torch.rand(scores.shape[0], generator=generator_on(self.draws, "cpu")) < self.probability
        if not bool(act.any()):
            return scores
        probs = scores.softmax(dim=-1)
        above = probs >= self.threshold
        least_above = probs.masked_fill(~above, math.inf).amin(dim=-1, keepdim=True)
        remove = above & (probs > least_above)
        protected = self.protected.to(scores.device)
        protected = protected[protected < scores.shape[-1]]
        if protected.numel():
            act = act.to(scores.device) & ~remove[:, protected].any(dim=-1)
        remove &= act.to(scores.device)[:, None]
        return scores.masked_fill(remove, NEG_INF)
