"""Is this grammar or JSON schema acceptable? One answer for every caller (API, UI tabs, CLI), given before the
generation is queued, so that neither a hostile constraint nor a slow compile can take the server or the model's
queue with it.

A constraint passes, in order:
1. static bounds, measured in Python without recursion (modules.constraints.limits says which and why);
2. validity: a JSON schema against its metaschema (the `jsonschema` library) plus the contradictions a
   metaschema cannot see (minimum above maximum...);
3. a trial compile by the model's own compiler in a child process (modules.constraints.worker), killed after
   limits.COMPILE_SECONDS. Loaders without a local compiler (a remote server compiles for itself) may skip it.
Verdicts are cached by content hash per vocabulary, so a repeated constraint costs a dictionary look-up.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Any

from modules.constraints import limits
from modules.constraints.scan import scan
from modules.constraints.schema import check_bounds, check_valid, schema_text
from modules.constraints.worker import CompileWorker, TrialCompiler
from modules.errors import ConstraintError
from modules.generation_params import GenerationParams

__all__ = ["ConstraintChecker", "CompileWorker", "TrialCompiler", "constraint_text", "digest", "trial_compiler_of"]

#: Verdicts kept (the most recently used).
CACHE_SIZE = 512


def constraint_text(grammar_string: str, json_schema: dict[str, Any] | None) -> tuple[str, str] | None:
    """(kind, text) of a request's constraint, as every compiler and cache sees it: ("json_schema", the schema as
    compact JSON) or ("grammar_string", the grammar); None without one. Only for a constraint that passed
    ConstraintChecker.check (the JSON writer recurses)."""
    if json_schema is not None:
        return "json_schema", schema_text(json_schema)
    if grammar_string.strip():
        return "grammar_string", grammar_string
    return None


def digest(kind: str, text: str) -> str:
    """The cache key of a constraint's text."""
    return hashlib.sha256(f"{kind}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


def trial_compiler_of(model: Any) -> TrialCompiler | None:
    """The model's TrialCompiler (LoadedModel.constraint_compiler); None without a model or a local compiler."""
    return model.constraint_compiler() if model is not None else None


class ConstraintChecker:
    """Owned by the ModelManager: its compiler process and its verdict cache live and die with it."""

    def __init__(self, worker: CompileWorker | None = None):
        self.worker = worker or CompileWorker()
        weakref.finalize(self, self.worker.close)  # the compiler process ends with its owner
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()  # key -> None (accepted) or the refusal
        self._lock = threading.Lock()  # guards the verdicts
        self._compiling = threading.Lock()

    def check(self, params: GenerationParams, model: Any) -> None:
        """Raise ConstraintError if the request's grammar_string or json_schema must not reach `model`."""
        if params.json_schema is not None:
            kind, text = "json_schema", _static_schema(params.json_schema)
        elif params.grammar_string.strip():
            kind, text = "grammar_string", _static_grammar(params.grammar_string)
        else:
            return
        compiler = trial_compiler_of(model)
        key = digest(kind, f"{compiler.key if compiler else 'no compiler'}\0{text}")
        if self._known(key):
            return
        with self._compiling:  # one new constraint at a time; the same one asked twice meanwhile is found above
            if self._known(key):
                return
            try:
                if kind == "json_schema":
                    check_valid(params.json_schema)
                if compiler is not None:
                    payload = self.worker.compile(compiler, kind, text)
                    if compiler.adopt is not None:
                        compiler.adopt(kind, text, payload)
            except ConstraintError as exc:
                self._remember(key, str(exc))
                raise
            self._remember(key, None)

    def close(self) -> None:
        self.worker.close()

    def _known(self, key: str) -> bool:
        """True for a constraint accepted before; ConstraintError for one refused before; False when new."""
        with self._lock:
            if key not in self._verdicts:
                return False
            self._verdicts.move_to_end(key)
            refusal = self._verdicts[key]
        if refusal is not None:
            raise ConstraintError(refusal)
        return True

    def _remember(self, key: str, refusal: str | None) -> None:
        with self._lock:
            self._verdicts[key] = refusal
            while len(self._verdicts) > CACHE_SIZE:
                self._verdicts.popitem(last=False)


def _static_schema(schema: Any) -> str:
    check_bounds(schema)
    text = schema_text(schema)
    if len(text) > limits.MAX_TEXT_CHARS:
        raise ConstraintError(f"json_schema: {len(text)} characters exceed the limit of {limits.MAX_TEXT_CHARS}.")
    return text


def _static_grammar(grammar: str) -> str:
    if len(grammar) > limits.MAX_TEXT_CHARS:
        raise ConstraintError(f"grammar_string: {len(grammar)} characters exceed the limit of "
                              f"{limits.MAX_TEXT_CHARS}.")
    scan(grammar, "gbnf", "grammar_string")
    return grammar
