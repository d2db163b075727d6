"""Constrained output through xgrammar: a GBNF grammar or a JSON schema becomes a token mask per step.

Compiling needs a TokenizerInfo (a pass over the whole vocabulary) and the grammar itself; both are cached per
tokenizer, so a second request with the same tokenizer and grammar costs a dictionary look-up.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from modules.errors import ConfigError, GenerationError

_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")  # "[20:47:36] /project/cpp/grammar_parser.cc:820: "


class GrammarCompilers:
    """One xgrammar GrammarCompiler (which caches what it compiles) per tokenizer, vocabulary size and stop set.

    Held weakly by tokenizer, so unloading a model frees its compilers. A cache of derived, read-only data."""

    def __init__(self) -> None:
        self._by_tokenizer: weakref.WeakKeyDictionary[Any, dict[tuple, xgr.GrammarCompiler]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> xgr.GrammarCompiler:
        key = (vocab_size, tuple(sorted(set(stop_ids))))
        with self._lock:
            compilers = self._by_tokenizer.setdefault(tokenizer, {})
            if key not in compilers:
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                          stop_token_ids=list(key[1]) or None)
                compilers[key] = xgr.GrammarCompiler(info)
            return compilers[key]


_COMPILERS = GrammarCompilers()


def compile_constraint(*, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], grammar: str = "",
                       json_schema: dict[str, Any] | None = None) -> xgr.CompiledGrammar:
    """The compiled grammar or schema; a ConfigError with xgrammar's message when it does not parse."""
    compiler = _COMPILERS.get(tokenizer, vocab_size, eos_token_ids)
    try:
        if json_schema is not None:
            return compiler.compile_json_schema(json.dumps(json_schema), any_whitespace=False)
        return compiler.compile_grammar(grammar)
    except (RuntimeError, ValueError, TypeError) as exc:
        what = "json_schema" if json_schema is not None else "grammar_string"
        message = _LOCATION.sub("", str(exc).strip())
        raise ConfigError(f"The {what} could not be compiled: {message}") from None


class GrammarConstraint(LogitsProcessor):
    """Masks every token the grammar does not allow next. Stateful: one instance per generate() call.

    Each call first feeds the matcher the tokens generated since the last call (input_ids past the prompt), then
    fills the mask. Logits wider than the grammar's vocabulary (a padded head) are masked past its end."""

    def __init__(self, compiled: xgr.CompiledGrammar, prompt_length: int):
        self.compiled = compiled
        self.prompt_length = prompt_length
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self._matchers: list[xgr.GrammarMatcher] = []
        self._bitmask: torch.Tensor | None = None
        self._fed = 0  # generated tokens already given to the matchers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        if not self._matchers:
            self._matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch)]
            self._bitmask = xgr.allocate_token_bitmask(batch, self.vocab_size)
        elif batch != len(self._matchers):
            raise GenerationError("The grammar constraint cannot follow a batch whose size changes.")
        new = input_ids[:, self.prompt_length + self._fed:].tolist()
        self._fed += len(new[0]) if new else 0
        for matcher, tokens in zip(self._matchers, new):
            for token in tokens:
                if matcher.is_terminated():
                    break
                if not matcher.accept_token(token):
                    raise GenerationError(f"The grammar rejected token {token}, which was generated anyway; "
                                          "another logits processor must have overridden the grammar's mask.")
        active = [row for row, matcher in enumerate(self._matchers) if not matcher.is_terminated()]
        if not active:
            return scores
        for row in active:
            self._matchers[row].fill_next_token_bitmask(self._bitmask, row)
        scores = scores.clone()  # generate() may keep the raw logits it handed us
        width = min(scores.shape[-1], self.vocab_size)
        device_type = scores.device.type
        target = scores if device_type in ("cpu", "cuda") else scores.cpu()
        xgr.apply_token_bitmask_inplace(target, self._bitmask.to(target.device, non_blocking=True),
                                        vocab_size=width, indices=active)
        if target is not scores:
            scores = target.to(scores.device)
        if scores.shape[-1] > self.vocab_size:
            scores[active, self.vocab_size:] = float("-inf")
        return scores
