"""Repetition penalties that Transformers lacks or that need a context window (text-generation-webui semantics).

Each looks at the last `window` tokens of the context (prompt included); a window of 0 means the whole context.
They run under greedy decoding too: they change which token is most likely, not how a token is drawn.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import EncoderRepetitionPenaltyLogitsProcessor, LogitsProcessor, RepetitionPenaltyLogitsProcessor

#: DRY never extends a match further back than this (text-generation-webui's cap: keeps base**length finite).
DRY_MAX_MATCH = 50


def _recent(input_ids: torch.LongTensor, window: int) -> torch.LongTensor:
    return input_ids[:, -window:] if window > 0 else input_ids


class RangedRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """Transformers' multiplicative repetition penalty over the last `window` tokens only."""

    def __init__(self, penalty: float, window: int):
        super().__init__(float(penalty))
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return super().__call__(_recent(input_ids, self.window), scores)


class PromptRepetitionPenalty(EncoderRepetitionPenaltyLogitsProcessor):
    """Transformers' encoder repetition penalty for a decoder-only model: the "encoder input" is the prompt,
    which it reads from the first call's input_ids (so the caller needs only the prompt's length)."""

    def __init__(self, penalty: float, prompt_length: int):
        super().__init__(float(penalty), encoder_input_ids=torch.empty((1, 0), dtype=torch.long))
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.encoder_input_ids.shape[-1] == 0:
            self.encoder_input_ids = input_ids[:, : self.prompt_length]
        if self.encoder_input_ids.shape[-1] == 0:
            return scores
        return super().__call__(input_ids, scores)


class AdditivePenalty(LogitsProcessor):
    """OpenAI presence and frequency penalties: subtract `presence` once from every token seen in the window and
    `frequency` once per occurrence."""

    def __init__(self, presence: float, frequency: float, window: int):
        self.presence = presence
        self.frequency = frequency
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        ids = _recent(input_ids, self.window)
        vocab = scores.shape[-1]
        # Ids past the logits (an embedding larger than the head) land in a spare column that is dropped.
        counts = scores.new_zeros((scores.shape[0], vocab + 1))
        counts.scatter_add_(1, ids.clamp(max=vocab), torch.ones_like(ids, dtype=scores.dtype))
        counts = counts[:, :vocab]
        penalty = counts * self.frequency
        if self.presence:
            penalty = penalty + (counts > 0).to(scores.dtype) * self.presence
        return scores - penalty


class DRYPenalty(LogitsProcessor):
    """DRY ("don't repeat yourself"): when the context ends with a sequence that occurred before, penalise the
    token that followed it then, by multiplier * base ** (match length - allowed_length) for matches of at least
    allowed_length tokens. A sequence breaker token ends a match; the longest match per token counts."""

    def __init__(self, multiplier: float, base: float, allowed_length: int, breaker_ids: Iterable[int],
                 window: int):
        self.multiplier = multiplier
        self.base = base
        self.allowed_length = allowed_length
        self.breakers = torch.tensor(sorted(set(breaker_ids)), dtype=torch.long)
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        # The matching walks short index lists; on the CPU it costs one small copy per step and no device syncs.
        ids = _recent(input_ids, self.window).cpu()
        is_breaker = torch.isin(ids, self.breakers)
        rows: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for row in range(ids.shape[0]):
            found = self._longest_matches(ids[row], is_breaker[row])
            if found is None:
                continue
            token_ids, lengths = found
            rows.append(torch.full_like(token_ids, row))
            tokens.append(token_ids)
            values.append(self.multiplier * self.base ** (lengths - self.allowed_length).double())
        if not rows:
            return scores
        row_index = torch.cat(rows).to(scores.device)
        token_index = torch.cat(tokens).to(scores.device)
        inside = token_index < scores.shape[-1]
        penalty = torch.cat(values).to(device=scores.device, dtype=scores.dtype)
        return scores.index_put((row_index[inside], token_index[inside]), -penalty[inside], accumulate=True)

    def _longest_matches(self, ids: torch.Tensor, is_breaker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens to penalise, their longest match length >= allowed_length), or None."""
        n = ids.shape[0]
        if n < 2 or bool(is_breaker[-1]):
            return None
        # Earlier positions holding the last token (the last position itself always matches, so it is left out)...
        starts = torch.nonzero(ids[:-1] == ids[-1]).squeeze(1)
        # ...whose following token is no breaker.
        starts = starts[~is_breaker[starts + 1]]
        if starts.numel() == 0:
            return None
        lengths = torch.ones_like(starts)
        alive = torch.ones_like(starts, dtype=torch.bool)
        # Extend every match backwards at once; stop at the start of the text, a mismatch or a breaker.
        breaker_positions = torch.nonzero(is_breaker[:-1]).squeeze(1)
        last_breaker = int(breaker_positions[-1]) if breaker_positions.numel() else -1
        for m in range(1, min(DRY_MAX_MATCH, n - 1 - last_breaker)):
            earlier = starts - m
            alive &= earlier >= 0
            alive &= ids[earlier.clamp(min=0)] == ids[n - 1 - m]
            if not bool(alive.any()):
                break
            lengths += alive.long()
        following = ids[starts + 1]
        unique, inverse = torch.unique(following, return_inverse=True)
        longest = torch.zeros_like(unique).scatter_reduce(0, inverse, lengths, reduce="amax", include_self=False)
        hit = longest >= self.allowed_length
        if not bool(hit.any()):
            return None
        return unique[hit], longest[hit]
