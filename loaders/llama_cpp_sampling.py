"""GenerationParams -> a native llama.cpp sampler chain, in the order `sampler_priority` gives."""
from __future__ import annotations

import ctypes
import json
from typing import Any

from modules.errors import ConfigError
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


def build_sampler_chain(lib: Any, llama: Any, params: GenerationParams, prompt: list[int],
                        eog_tokens: set[int]) -> Any:
    """A llama_sampler chain the caller frees with llama_sampler_free. `prompt` seeds the penalty samplers so
    they see the context, as Transformers' processors do; the grammar never sees it."""
    vocab = llama._model.vocab
    n_vocab = llama.n_vocab()
    seed = _DEFAULT_SEED if params.seed < 0 else params.seed % 2**32
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        _add_bias(lib, chain, n_vocab, params, eog_tokens)
        if params.grammar_string.strip() or params.json_schema is not None:
            lib.llama_sampler_chain_add(chain, _grammar_sampler(lib, vocab, params))
        last_n = params.repetition_penalty_range or -1
        history = prompt[-last_n:] if last_n > 0 else prompt
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
    from llama_cpp import LlamaGrammar

    try:
        if params.json_schema is not None:
            grammar = LlamaGrammar.from_json_schema(json.dumps(params.json_schema), verbose=False)
        else:
            grammar = LlamaGrammar.from_string(params.grammar_string, verbose=False)
    except Exception as exc:  # the converter raises ValueError, KeyError, RecursionError... on bad input
        raise ConfigError(f"The grammar could not be parsed: {exc}") from None
    sampler = lib.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not sampler:
        raise ConfigError("llama.cpp rejected the grammar (see its log for the failing rule).")
    return sampler
