"""Constrained output through xgrammar: a GBNF grammar or a JSON schema becomes a token mask per step.

Compiling needs a TokenizerInfo (a pass over the whole vocabulary) and the grammar itself. modules.constraints
first compiles each new grammar in a child process (trial_setup below runs there); the compiled grammar comes
back serialised when that is cheaper than compiling it again, and either way is kept per tokenizer, so a request
with a checked grammar costs a dictionary look-up here.
"""
from __future__ import annotations

import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr
from transformers import LogitsProcessor

from modules.constraints import TrialCompiler, constraint_text, digest
from modules.errors import ConstraintError, GenerationError

_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")  # "[20:47:36] /project/cpp/grammar_parser.cc:820: "
#: Compiled grammars kept per tokenizer (the most recently used).
_KEPT = 32
#: The child sends its compiled grammar back only when compiling took at least this long (else compiling again
#: here is as cheap as reading it)...
_SHIP_AFTER_SECONDS = 0.1
#: ...and its serialised form is at most this many characters per second of compiling: reading it back costs
#: about 0.03 s per MB, while the JSON grows with the grammar's rules far faster than compiling does (1,000
#: chained rules: 0.06 s to compile, 240 MB serialised).
_SHIP_CHARS_PER_SECOND = 10_000_000


def xgrammar_compile(compiler: xgr.GrammarCompiler, kind: str, text: str) -> xgr.CompiledGrammar:
    """The one way a constraint is compiled, here and in the trial; ConstraintError with xgrammar's message."""
    try:
        if kind == "json_schema":
            return compiler.compile_json_schema(text, any_whitespace=False)
        return compiler.compile_grammar(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _LOCATION.sub("", str(exc).strip())
        if "bad_alloc" in message:
            raise MemoryError(message) from None
        raise ConstraintError(f"The {kind} could not be compiled: {message}") from None


def trial_setup(tokenizer_info: str) -> Callable[[str, str], str | None]:
    """In the compiler process (modules.constraints.worker): compile against the model's vocabulary; return the
    compiled grammar serialised when the server had better read it than compile it again."""
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_info), cache_enabled=False)

    def compile_one(kind: str, text: str) -> str | None:
        started = time.perf_counter()
        compiled = xgrammar_compile(compiler, kind, text)
        seconds = time.perf_counter() - started
        if seconds < _SHIP_AFTER_SECONDS:
            return None
        try:
            payload = compiled.serialize_json()
        except (RuntimeError, MemoryError):  # too big to write out within the process's memory limit
            return None
        return payload if len(payload) <= seconds * _SHIP_CHARS_PER_SECOND else None

    return compile_one


@dataclass
class _Vocabulary:
    """One tokenizer at one logits width and stop set: its compiler, the grammars compiled for it, and how the
    trial compile reads it."""

    info: xgr.TokenizerInfo
    compiler: xgr.GrammarCompiler
    compiled: OrderedDict[str, xgr.CompiledGrammar] = field(default_factory=OrderedDict)
    trial: TrialCompiler | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, key: str, compiled: xgr.CompiledGrammar) -> None:
        with self.lock:
            self.compiled[key] = compiled
            self.compiled.move_to_end(key)
            while len(self.compiled) > _KEPT:
                self.compiled.popitem(last=False)

    def find(self, key: str) -> xgr.CompiledGrammar | None:
        with self.lock:
            compiled = self.compiled.get(key)
            if compiled is not None:
                self.compiled.move_to_end(key)
            return compiled

    def adopt(self, kind: str, text: str, payload: str | None) -> None:
        """After a successful trial: keep the child's compiled grammar, or compile it here (now known safe)."""
        compiled = None
        if payload is not None:
            try:
                compiled = xgr.CompiledGrammar.deserialize_json(payload, self.info)
            except (RuntimeError, ValueError):  # written by another xgrammar build: compile it instead
                compiled = None
        if compiled is None:
            compiled = xgrammar_compile(self.compiler, kind, text)
        self.keep(digest(kind, text), compiled)


class GrammarCompilers:
    """One xgrammar GrammarCompiler (which caches what it compiles) per tokenizer, vocabulary size and stop set,
    with the grammars compiled for it.

    Held weakly by tokenizer, so unloading a model frees its compilers. A cache of derived, read-only data."""

    def __init__(self) -> None:
        self._by_tokenizer: weakref.WeakKeyDictionary[Any, dict[tuple, _Vocabulary]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def vocabulary(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> _Vocabulary:
        key = (vocab_size, tuple(sorted(set(stop_ids))))
        with self._lock:
            vocabularies = self._by_tokenizer.setdefault(tokenizer, {})
            if key not in vocabularies:
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                          stop_token_ids=list(key[1]) or None)
                vocabularies[key] = _Vocabulary(info, xgr.GrammarCompiler(info))
            return vocabularies[key]

    def get(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> xgr.GrammarCompiler:
        return self.vocabulary(tokenizer, vocab_size, stop_ids).compiler

    def trial_compiler(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> TrialCompiler:
        """How modules.constraints trial-compiles for this vocabulary (the TokenizerInfo, serialised once)."""
        vocabulary = self.vocabulary(tokenizer, vocab_size, stop_ids)
        with vocabulary.lock:
            if vocabulary.trial is None:
                info = vocabulary.info.serialize_json()
                vocabulary.trial = TrialCompiler(key=f"xgrammar {digest('tokenizer', info)}",
                                                 setup=f"{__name__}:trial_setup", argument=info,
                                                 adopt=vocabulary.adopt)
            return vocabulary.trial


_COMPILERS = GrammarCompilers()


def trial_compiler(*, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> TrialCompiler:
    """The TrialCompiler of a Transformers model (TransformersModel.constraint_compiler)."""
    return _COMPILERS.trial_compiler(tokenizer, vocab_size, eos_token_ids)


def compile_constraint(*, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], grammar: str = "",
                       json_schema: dict[str, Any] | None = None) -> xgr.CompiledGrammar:
    """The compiled grammar or schema: the one the trial compile left, or compiled now; a ConstraintError with
    xgrammar's message when it does not compile."""
    source = constraint_text(grammar, json_schema)
    if source is None:
        raise ConstraintError("There is no grammar_string or json_schema to compile.")
    kind, text = source
    vocabulary = _COMPILERS.vocabulary(tokenizer, vocab_size, eos_token_ids)
    key = digest(kind, text)
    compiled = vocabulary.find(key)
    if compiled is None:
        compiled = xgrammar_compile(vocabulary.compiler, kind, text)
        vocabulary.keep(key, compiled)
    return compiled


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
