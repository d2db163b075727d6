"""Mirostat v1 and v2: sampling that steers the surprise of each token towards a target `tau`.

Mirostat is a sampler, not a filter: this processor draws the token itself (from the request's own generator
when it has one, else torch's global RNG, which transformers.set_seed reproduces) and leaves every other logit
at -inf, so whatever generate() does next (argmax or a draw) yields that token. It keeps `mu` across steps and learns from the token that was actually
chosen: the last of input_ids at the next call, scored against the distribution it sampled from.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from modules.samplers.draws import SeededDraws, generator_on

NEG_INF = float("-inf")
#: Mirostat v1 estimates the Zipf exponent from this many of the most likely tokens (llama.cpp's m).
V1_CANDIDATES = 100


class Mirostat(LogitsProcessor):
    def __init__(self, mode: int, tau: float, eta: float, vocab_size: int, prompt_length: int,
                 draws: SeededDraws | None = None):
        if mode not in (1, 2):
            raise ValueError(f"mirostat mode must be 1 or 2, not {mode}")
        self.mode = mode
        self.tau = tau
        self.eta = eta
        self.vocab_size = vocab_size
        self.prompt_length = prompt_length
        self.draws = draws
        self.mu: torch.Tensor | None = None  # per row, in bits; starts at 2 * tau
        self._surprise: torch.Tensor | None = None  # bits of each token in the last sampled distribution

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch = scores.shape[0]
        if self.mu is None or self.mu.shape[0] != batch:
            self.mu = torch.full((batch,), 2 * self.tau, dtype=torch.float32, device=scores.device)
        elif self._surprise is not None and input_ids.shape[-1] > self.prompt_length:
            self._learn(input_ids[:, -1])
        probs = scores.float().softmax(dim=-1)
        keep = self._truncate_v1(probs) if self.mode == 1 else self._truncate_v2(probs)
        keep.scatter_(-1, probs.argmax(dim=-1, keepdim=True), True)  # never an empty row
        kept = probs.masked_fill(~keep, 0.0)
        kept = kept / kept.sum(dim=-1, keepdim=True)
        chosen = torch.multinomial(kept, 1, generator=generator_on(self.draws, kept.device))
        self._surprise = -kept.log2()  # +inf where truncated
        out = torch.full_like(scores, NEG_INF)
        return out.scatter(-1, chosen, scores.gather(-1, chosen))

    def _learn(self, chosen: torch.Tensor) -> None:
        observed = self._surprise.gather(-1, chosen.to(self._surprise.device)[:, None]).squeeze(-1)
        # A token that was not offered (a later processor overrode the pick) teaches nothing.
        update = torch.where(torch.isfinite(observed), observed - self.tau, torch.zeros_like(observed))
        self.mu = self.mu - self.eta * update

    def _truncate_v2(self, probs: torch.Tensor) -> torch.Tensor:
        """Keep the tokens whose surprise (-log2 p) is at most mu."""
        return probs >= torch.pow(2.0, -self.mu)[:, None]

    def _truncate_v1(self, probs: torch.Tensor) -> torch.Tensor:
        """Estimate the Zipf exponent s from the top tokens, then keep the k most likely tokens where
        k = (eps * 2**mu / (1 - N**-eps)) ** (1 / s), eps = s - 1 (llama.cpp's mirostat)."""
        vocab = probs.shape[-1]
        m = min(V1_CANDIDATES, vocab)
        top = probs.topk(m, dim=-1).values
        ranks = torch.arange(1, m, device=probs.device, dtype=torch.float32)
        t = torch.log((ranks + 1) / ranks)  # log((i + 2) / (i + 1)) for i = 0..m-2
        usable = top[:, 1:] > 0  # pairs among the tokens still allowed
        b = torch.log(top[:, :-1] / top[:, 1:]).masked_fill(~usable, 0.0)
        t_used = t[None, :] * usable
        s_hat = (t_used * b).sum(dim=-1) / (t_used * t_used).sum(dim=-1)
        eps = s_hat - 1
        k = ((eps * torch.pow(2.0, self.mu)) / (1 - torch.pow(float(self.vocab_size), -eps))) ** (1 / s_hat)
        k = torch.nan_to_num(k, nan=1.0, posinf=float(vocab)).clamp(min=1, max=vocab).long()
        # The k-th largest probability of each row is its cut.
        largest = top if int(k.max()) <= m else probs.topk(int(k.max()), dim=-1).values
        cut = largest.gather(-1, (k - 1)[:, None])
        return probs >= cut
