"""GenerationParams -> a native llama.cpp sampler chain, in the order `sampler_priority` gives; and the trial
compile modules.constraints runs in its compiler process for llama.cpp models and servers."""
from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.constraints import TrialCompiler, constraint_text
from modules.errors import ConfigError, ConstraintError, GenerationError
from modules.generation_params import GenerationParams

SUPPORTED_PARAMS = frozenset({
    "do_sample", "seed", "temperature", "temperature_last", "dynamic_temperature", "dynatemp_low", "dynatemp_high",
    "dynatemp_exponent", "top_p", "top_k", "min_p", "typical_p", "top_n_sigma", "sampler_priority",
    "repetition_penalty", "repetition_penalty_range", "presence_penalty", "frequency_penalty",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers", "xtc_threshold",
    "xtc_probability", "mirostat_mode", "mirostat_tau", "mirostat_eta", "ban_eos_token", "custom_token_bans",
    "logit_bias", "grammar_string", "json_schema",
})

_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: pick a random seed


@dataclass
class SamplerChains:
    """Two llama_sampler chains applied in turn to the same candidates: `mask` (logit bias, bans, the grammar)
    says which tokens may come next, `choose` (penalties, truncation samplers, temperature, the draw) picks one.
    They are kept apart so that a decode loop sees when nothing may come next before it accepts a token:
    llama.cpp's grammar sampler throws a C++ exception when it accepts a token it masked (a grammar that can go
    no further, or one that may only end while the end is banned), and that aborts the whole process."""

    mask: Any
    choose: Any

    def free(self, lib: Any) -> None:
        lib.llama_sampler_free(self.mask)
        lib.llama_sampler_free(self.choose)


class Candidates:
    """The candidate array the chains work on, reused from token to token: every token with its logit."""

    def __init__(self, lib: Any, n_vocab: int):
        import numpy as np

        self._lib = lib
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._pointer = self._data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))

    def next_token(self, chains: SamplerChains, logits: Any) -> int | None:
        """What llama_sampler_sample picks from `logits`, or None when the mask leaves no token that may come
        next (the caller ends the reply instead of handing llama.cpp a token it must refuse)."""
        import numpy as np

        lib = self._lib
        self._data["id"] = self._ids
        self._data["logit"] = logits
        self._data["p"] = 0.0
        array = lib.llama_token_data_array(data=self._pointer, size=len(self._ids), selected=-1, sorted=False)
        lib.llama_sampler_apply(chains.mask, ctypes.byref(array))
        if not np.isfinite(self._data["logit"]).any():
            return None
        array.selected = -1
        lib.llama_sampler_apply(chains.choose, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise GenerationError("llama.cpp's samplers picked no token.")
        token = int(array.data[array.selected].id)  # samplers may reorder the candidates or move `data`
        lib.llama_sampler_accept(chains.mask, token)
        lib.llama_sampler_accept(chains.choose, token)
        return token


def build_sampler_chains(lib: Any, llama: Any, params: GenerationParams, prompt: list[int],
                         eog_tokens: set[int]) -> SamplerChains:
    """The chains for `params`; the caller frees them. `prompt` seeds the penalty samplers so they see the
    context, as Transformers' processors do; the grammar never sees it."""
    mask = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        _add_bias(lib, mask, llama.n_vocab(), params, eog_tokens)
        if params.grammar_string.strip() or params.json_schema is not None:
            lib.llama_sampler_chain_add(mask, _grammar_sampler(lib, llama._model.vocab, params))
        return SamplerChains(mask, _choosing_chain(lib, llama, params, prompt))
    except BaseException:
        lib.llama_sampler_free(mask)
        raise


def _choosing_chain(lib: Any, llama: Any, params: GenerationParams, prompt: list[int]) -> Any:
    vocab = llama._model.vocab
    n_vocab = llama.n_vocab()
    seed = _DEFAULT_SEED if params.seed < 0 else params.seed % 2**32
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        # 0 means every token of the context; llama.cpp's penalty sampler reads 0 (and -1) as "off".
        last_n = params.repetition_penalty_range or llama.n_ctx()
        history = prompt[-last_n:]
        greedy = params.greedy
        temperature_at_end = params.temperature_last and not greedy
        penalties_added = False
        for name in params.sampler_priority:
            sampler = None
            if name in _PENALTIES:
                if penalties_added or not _penalties_on(params):
                    continue
                penalties_added = True
                sampler = lib.llama_sampler_init_penalties(n_vocab, last_n, params.repetition_penalty,
                                                           params.frequency_penalty, params.presence_penalty)
                _accept_all(lib, sampler, history)
            elif name == "dry" and params.dry_multiplier > 0:
                breakers = [b.encode("utf-8") for b in params.dry_sequence_breakers]
                array = (ctypes.c_char_p * len(breakers))(*breakers)
                sampler = lib.llama_sampler_init_dry(vocab, params.dry_multiplier, params.dry_base,
                                                     params.dry_allowed_length, last_n, array, len(breakers))
                _accept_all(lib, sampler, history)
            elif greedy:
                continue  # the truncation samplers and temperature change nothing under argmax
            elif name == "top_n_sigma" and params.top_n_sigma > 0:
                sampler = lib.llama_sampler_init_top_n_sigma(params.top_n_sigma)
            elif name == "temperature" and not params.dynamic_temperature and not temperature_at_end:
                sampler = lib.llama_sampler_init_temp(params.temperature)
            elif name == "dynamic_temperature" and params.dynamic_temperature and not temperature_at_end:
                sampler = _dynatemp(lib, params)
            elif name == "top_k" and params.top_k > 0:
                sampler = lib.llama_sampler_init_top_k(params.top_k)
            elif name == "top_p" and params.top_p < 1:
                sampler = lib.llama_sampler_init_top_p(params.top_p, 1)
            elif name == "typical_p" and params.typical_p < 1:
                sampler = lib.llama_sampler_init_typical(params.typical_p, 1)
            elif name == "min_p" and params.min_p > 0:
                sampler = lib.llama_sampler_init_min_p(params.min_p, 1)
            elif name == "xtc" and params.xtc_probability > 0:
                sampler = lib.llama_sampler_init_xtc(params.xtc_probability, params.xtc_threshold, 1, seed)
            if sampler is not None:
                lib.llama_sampler_chain_add(chain, sampler)
        if greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if temperature_at_end:
            lib.llama_sampler_chain_add(chain, _dynatemp(lib, params) if params.dynamic_temperature
                                        else lib.llama_sampler_init_temp(params.temperature))
        if params.mirostat_mode == 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
        elif params.mirostat_mode == 2:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_mirostat_v2(
                seed, params.mirostat_tau, params.mirostat_eta))
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain
    except BaseException:
        lib.llama_sampler_free(chain)
        raise


def _penalties_on(params: GenerationParams) -> bool:
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def _dynatemp(lib: Any, params: GenerationParams) -> Any:
    low, high = params.dynatemp_low, params.dynatemp_high
    return lib.llama_sampler_init_temp_ext((low + high) / 2, (high - low) / 2, params.dynatemp_exponent)


def _accept_all(lib: Any, sampler: Any, tokens: list[int]) -> None:
    for token in tokens:
        lib.llama_sampler_accept(sampler, token)


def _add_bias(lib: Any, chain: Any, n_vocab: int, params: GenerationParams, eog_tokens: set[int]) -> None:
    bias: dict[int, float] = {int(k): float(v) for k, v in params.logit_bias.items()}
    for token in params.custom_token_bans:
        bias[int(token)] = float("-inf")
    if params.ban_eos_token:
        for token in eog_tokens:
            bias[token] = float("-inf")
    bad = [t for t in bias if not 0 <= t < n_vocab]
    if bad:
        raise ConfigError(f"Token id(s) {bad} are outside this model's vocabulary of {n_vocab}.")
    if not bias:
        return
    array = (lib.llama_logit_bias * len(bias))()
    for i, (token, value) in enumerate(bias.items()):
        array[i].token = token
        array[i].bias = value
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(bias), array))


def _grammar_sampler(lib: Any, vocab: Any, params: GenerationParams) -> Any:
    kind, text = constraint_text(params.grammar_string, params.json_schema)
    sampler = lib.llama_sampler_init_grammar(vocab, constraint_gbnf(kind, text).encode("utf-8"), b"root")
    if not sampler:  # modules.constraints ran this grammar through the same parser already
        raise ConstraintError(f"llama.cpp's parser refused the {kind}.")
    return sampler


# --- the trial compile (modules.constraints.worker) --------------------------------------------------------------
def constraint_gbnf(kind: str, text: str) -> str:
    """The GBNF llama.cpp compiles for a constraint: the grammar itself, or the one llama-cpp-python's converter
    writes for a JSON schema (given as text)."""
    if kind != "json_schema":
        return text
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(_named_root(text))
    except MemoryError:
        raise
    except Exception as exc:  # the converter asserts, and raises ValueError, KeyError... on what it cannot do
        raise ConstraintError(f"json_schema cannot be turned into a llama.cpp grammar: "
                              f"{str(exc) or type(exc).__name__}") from None


_ROOT_NAME = "root-schema"


def _named_root(text: str) -> str:
    """The schema with `{"$ref": "#"}` (the whole schema again: OpenAI's recursive examples use it) pointing at a
    copy under $defs, as llama-cpp-python's converter follows only "#/..." references."""
    schema = json.loads(text)
    found = False
    stack = [schema]
    while stack:  # no recursion: the schema passed modules.constraints' depth limit, but stay safe anyway
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("$ref") == "#":
                value["$ref"] = "#/$defs/" + _ROOT_NAME
                found = True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    if not found or not isinstance(schema, dict):
        return text
    schema["$defs"] = {**schema.get("$defs", {}),
                       _ROOT_NAME: {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}}
    return json.dumps(schema)


def trial_compiler(model_file: Path | None) -> TrialCompiler:
    """How modules.constraints trial-compiles for a GGUF model (its vocabulary), or, with None, only parses
    (for a remote llama.cpp server, which compiles for itself)."""
    if model_file is None:
        return TrialCompiler(key="llama.cpp parser", setup=f"{__name__}:trial_setup")
    stat = model_file.stat()
    return TrialCompiler(key=f"llama.cpp {model_file} {stat.st_size} {stat.st_mtime_ns}",
                         setup=f"{__name__}:trial_setup", argument=str(model_file))


def trial_setup(model_file: str | None) -> Callable[[str, str], None]:
    """In the compiler process: read the model's vocabulary (vocab_only: no weights) and return the function
    that compiles one constraint: parse it, build the sampler and run it once over the whole vocabulary, as the
    first step of a generation does."""
    import llama_cpp

    logged: list[str] = []  # llama.cpp's log lines in this process (the grammar's own errors among them)

    @llama_cpp.llama_log_callback
    def keep_log(level: int, text: bytes, user_data: Any) -> None:
        logged.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep_log, ctypes.c_void_p(0))
    model = llama_cpp.Llama(model_file, vocab_only=True, verbose=False) if model_file else None
    vocab = model._model.vocab if model is not None else None

    def compile_one(kind: str, text: str) -> None:
        gbnf = constraint_gbnf(kind, text)
        logged.clear()
        with _stderr_captured() as said:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise ConstraintError(f"{kind} does not parse: {_parser_message(''.join(said + logged))}")
        try:
            if vocab is not None:
                _apply_once(llama_cpp, sampler, llama_cpp.llama_vocab_n_tokens(vocab))
        finally:
            llama_cpp.llama_sampler_free(sampler)

    compile_one.keep = (model, keep_log)  # type: ignore[attr-defined]  # alive as long as the function
    return compile_one


def _apply_once(llama_cpp: Any, sampler: Any, n_vocab: int) -> None:
    data = (llama_cpp.llama_token_data * n_vocab)()
    for token in range(n_vocab):
        data[token].id = token
    candidates = llama_cpp.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """A list that, once the block ends, holds what native code wrote to file descriptor 2 meanwhile (llama.cpp's
    grammar parser reports there)."""
    import os
    import sys
    import tempfile

    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.append(sink.read().decode("utf-8", "replace"))


def _parser_message(said: str) -> str:
    """The parser's reason from what it printed ("parse: error parsing grammar: Undefined rule identifier
    'x'\n\n<the grammar>\nfailed to parse grammar")."""
    for line in said.splitlines():
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "llama.cpp's parser refused it"
