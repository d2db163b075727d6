"""GenerationParams -> the Transformers logits-processor chain and the generate() keyword arguments around it.

Our list is the whole sampler: generate_kwargs() neutralises every sampler Transformers (or a model's
generation_config.json) would add by itself. The chain runs in this order:

1. token bias: logit_bias, custom_token_bans, ban_eos_token and banned_strings (one SequenceBias processor);
2. the grammar or JSON-schema mask;
3. the samplers in `sampler_priority` order, only those switched on. Under greedy decoding only the penalties
   (repetition, presence, frequency, DRY, encoder repetition, no-repeat-ngram) remain. temperature_last moves
   temperature, dynamic temperature and quadratic sampling after the truncation samplers;
4. mirostat, last whatever its priority: it draws the token, so nothing after it could change anything.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from modules.errors import ConfigError
from modules.generation_params import GenerationParams
from modules.samplers.draws import SeededDraws
from modules.samplers.grammar import GrammarConstraint, compile_constraint
from modules.samplers.mirostat import Mirostat
from modules.samplers.penalties import AdditivePenalty, DRYPenalty, PromptRepetitionPenalty, RangedRepetitionPenalty
from modules.samplers.warpers import (
    DynamicTemperature,
    ExcludeTopChoices,
    QuadraticSmoothing,
    TailFree,
    TopA,
    TopK,
    TopNSigma,
)

#: GenerationParams fields the Transformers path honours: this chain, generate_kwargs(), and what the loader
#: itself does (max_new_tokens, stop, seed, add_bos_token, skip_special_tokens, logprobs). Left out:
#: penalty_alpha, because Transformers 5 moved contrastive search to a Hub repository it downloads and runs as
#: remote code, which this workbench does not do.
TRANSFORMERS_SUPPORTED_PARAMS: frozenset[str] = frozenset({
    "max_new_tokens", "do_sample", "seed",
    "temperature", "temperature_last", "dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent",
    "smoothing_factor", "smoothing_curve",
    "top_p", "top_k", "min_p", "typical_p", "tfs", "top_a", "top_n_sigma", "epsilon_cutoff", "eta_cutoff",
    "sampler_priority",
    "repetition_penalty", "repetition_penalty_range", "encoder_repetition_penalty", "presence_penalty",
    "frequency_penalty", "no_repeat_ngram_size",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers",
    "xtc_threshold", "xtc_probability", "mirostat_mode", "mirostat_tau", "mirostat_eta",
    "guidance_scale", "negative_prompt",
    "num_beams", "length_penalty", "early_stopping", "prompt_lookup_num_tokens",
    "stop", "ban_eos_token", "add_bos_token", "skip_special_tokens", "custom_token_bans", "banned_strings",
    "logit_bias", "grammar_string", "json_schema", "logprobs",
})

_PENALTIES = frozenset({"repetition_penalty", "presence_penalty", "frequency_penalty", "dry",
                        "encoder_repetition_penalty", "no_repeat_ngram"})
_MOVED_BY_TEMPERATURE_LAST = ("temperature", "dynamic_temperature", "quadratic_sampling")


def build_logits_processors(params: GenerationParams, *, tokenizer: Any, vocab_size: int,
                            eos_token_ids: list[int], prompt_length: int,
                            draws: SeededDraws | None = None) -> LogitsProcessorList:
    """The processors for one generate() call or one row of a batch (several are stateful: build a fresh list per
    sequence).

    `vocab_size` is the width of the model's logits, which may exceed the tokenizer's vocabulary. `draws`: the
    request's own generators for the processors that draw (XTC, mirostat); None uses torch's global RNG."""
    _check_combinations(params)
    chain = LogitsProcessorList()
    bias = _sequence_bias(params, tokenizer=tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids)
    if bias is not None:
        chain.append(bias)
    if params.grammar_string.strip() or params.json_schema is not None:
        compiled = compile_constraint(tokenizer=tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                                      grammar=params.grammar_string, json_schema=params.json_schema)
        chain.append(GrammarConstraint(compiled, prompt_length))
    min_keep = 1 if params.num_beams == 1 else len(eos_token_ids) + 1
    context = _Context(params, tokenizer, vocab_size, eos_token_ids, prompt_length, min_keep, draws)
    for name in sampler_order(params):
        if params.greedy and name not in _PENALTIES:
            continue
        processor = context.make(name)
        if processor is not None:
            chain.append(processor)
    if not params.greedy and params.mirostat_mode:
        chain.append(Mirostat(params.mirostat_mode, params.mirostat_tau, params.mirostat_eta, vocab_size,
                              prompt_length, draws))
    return chain


def sampler_order(params: GenerationParams) -> list[str]:
    """sampler_priority with temperature_last applied (text-generation-webui's rule) and mirostat left out."""
    order = [name for name in params.sampler_priority if name != "mirostat"]
    if params.temperature_last:
        order = [name for name in order if name not in _MOVED_BY_TEMPERATURE_LAST] + list(_MOVED_BY_TEMPERATURE_LAST)
    return order


def generate_kwargs(params: GenerationParams, *, tokenizer: Any, eos_token_ids: list[int],
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """generate() arguments besides the processors: the decoding mode, beam and prompt-lookup settings,
    classifier-free guidance, and neutral values for every sampler generate() would otherwise add itself
    (from its defaults, such as top_k=50, or from the model's generation_config.json).

    `device` is where negative_prompt_ids must live (the model's device); CPU when None."""
    sampling = draws_token(params)
    kwargs: dict[str, Any] = {
        "do_sample": sampling,
        "num_beams": params.num_beams,
        # Processors generate() adds whatever do_sample says; ours replace them.
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "bad_words_ids": None,
        "sequence_bias": None,
    }
    if sampling:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                      eta_cutoff=0.0, top_h=None)
    if params.num_beams > 1:
        kwargs.update(length_penalty=params.length_penalty, early_stopping=params.early_stopping)
    if params.prompt_lookup_num_tokens > 0:
        kwargs["prompt_lookup_num_tokens"] = params.prompt_lookup_num_tokens
    if params.guidance_scale != 1:
        kwargs["guidance_scale"] = params.guidance_scale
        if params.negative_prompt:
            ids = tokenizer(params.negative_prompt, return_tensors="pt").input_ids
            if ids.shape[-1]:
                kwargs["negative_prompt_ids"] = ids.to(device or "cpu")
                kwargs["negative_prompt_attention_mask"] = torch.ones_like(kwargs["negative_prompt_ids"])
    return kwargs


def draws_token(params: GenerationParams) -> bool:
    """Whether the token is drawn from the processed distribution (else it is the argmax). Mirostat draws the token
    itself and leaves one finite logit: then the argmax is its pick."""
    return not params.greedy and not params.mirostat_mode


def only_generate(params: GenerationParams) -> bool:
    """Whether these knobs need Transformers' generate() on a batch of one: beam search (it picks among several
    hypotheses at the end), prompt-lookup decoding (several tokens a step) and classifier-free guidance (a second,
    negative-prompt pass). Every other knob runs in our own step loop, alone or batched."""
    return params.num_beams > 1 or params.prompt_lookup_num_tokens > 0 or params.guidance_scale != 1


class _Context:
    """What the sampler factories need besides the params."""

    def __init__(self, params: GenerationParams, tokenizer: Any, vocab_size: int, eos_token_ids: list[int],
                 prompt_length: int, min_keep: int, draws: SeededDraws | None):
        self.p = params
        self.draws = draws
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.prompt_length = prompt_length
        self.min_keep = min_keep

    def make(self, name: str) -> LogitsProcessor | None:
        """The processor for sampler `name`, or None when it is off."""
        p, keep = self.p, self.min_keep
        window = p.repetition_penalty_range
        if name == "repetition_penalty" and p.repetition_penalty != 1:
            if p.repetition_penalty <= 0:
                raise ConfigError("repetition_penalty must be above 0 (1 is off).")
            return RangedRepetitionPenalty(p.repetition_penalty, window)
        if name == "presence_penalty" and p.presence_penalty:
            return AdditivePenalty(p.presence_penalty, 0.0, window)
        if name == "frequency_penalty" and p.frequency_penalty:
            return AdditivePenalty(0.0, p.frequency_penalty, window)
        if name == "dry" and p.dry_multiplier > 0:
            breakers = {last_token(self.tokenizer, s) for s in p.dry_sequence_breakers if s}
            return DRYPenalty(p.dry_multiplier, p.dry_base, p.dry_allowed_length, breakers - {None}, window)
        if name == "encoder_repetition_penalty" and p.encoder_repetition_penalty != 1:
            if p.encoder_repetition_penalty <= 0:
                raise ConfigError("encoder_repetition_penalty must be above 0 (1 is off).")
            return PromptRepetitionPenalty(p.encoder_repetition_penalty, self.prompt_length)
        if name == "no_repeat_ngram" and p.no_repeat_ngram_size > 0:
            return NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size)
        if name == "temperature" and p.temperature != 1 and not p.dynamic_temperature:  # dynatemp replaces it
            # temperature 0 outside greedy mode (mirostat on) keeps only the top token, as llama.cpp does
            return TemperatureLogitsWarper(float(p.temperature)) if p.temperature > 0 else TopK(1)
        if name == "dynamic_temperature" and p.dynamic_temperature:
            return DynamicTemperature(p.dynatemp_low, p.dynatemp_high, p.dynatemp_exponent)
        if name == "quadratic_sampling" and p.smoothing_factor > 0:
            return QuadraticSmoothing(p.smoothing_factor, p.smoothing_curve)
        if name == "top_k" and p.top_k > 0:
            return TopK(p.top_k, keep)
        if name == "top_p" and p.top_p < 1:
            return TopPLogitsWarper(p.top_p, min_tokens_to_keep=keep)
        if name == "typical_p" and p.typical_p < 1:
            # Transformers refuses a mass of 0; a tiny one means the same: keep the most typical token(s).
            return TypicalLogitsWarper(max(p.typical_p, 1e-6), min_tokens_to_keep=keep)
        if name == "min_p" and p.min_p > 0:
            return MinPLogitsWarper(p.min_p, min_tokens_to_keep=keep)
        if name == "epsilon_cutoff" and p.epsilon_cutoff > 0:
            return _cutoff(EpsilonLogitsWarper, p.epsilon_cutoff * 1e-4, keep)  # in units of 1e-4, as eta
        if name == "eta_cutoff" and p.eta_cutoff > 0:
            return _cutoff(EtaLogitsWarper, p.eta_cutoff * 1e-4, keep)  # eta_cutoff is in units of 1e-4
        if name == "tfs" and p.tfs < 1:
            return TailFree(p.tfs, keep)
        if name == "top_a" and p.top_a > 0:
            return TopA(p.top_a, keep)
        if name == "top_n_sigma" and p.top_n_sigma > 0:
            return TopNSigma(p.top_n_sigma, keep)
        if name == "xtc" and p.xtc_probability > 0:
            protected = set(self.eos_token_ids)
            newline = last_token(self.tokenizer, "\n")
            if newline is not None:
                protected.add(newline)
            return ExcludeTopChoices(p.xtc_threshold, p.xtc_probability, protected, self.draws)
        return None


def _cutoff(cls: type, value: float, keep: int) -> LogitsProcessor:
    # Transformers wants 0 < value < 1; a cutoff of 1 or more drops all but the top token(s).
    return cls(value, min_tokens_to_keep=keep) if value < 1 else TopK(keep)


def last_token(tokenizer: Any, text: str) -> int | None:
    """The token `text` ends with when it follows other text (text-generation-webui prefixes an "a" so that a
    tokenizer's start-of-text handling does not change the encoding)."""
    ids = tokenizer.encode(f"a{text}", add_special_tokens=False)
    return int(ids[-1]) if ids else None


def banned_string_ids(tokenizer: Any, text: str) -> list[list[int]]:
    """Token sequences to forbid for `text`: as it encodes alone and after a space. Banning works on tokens, so
    the model can still spell the string with other tokens; this catches the usual ways."""
    variants = []
    for candidate in (text, " " + text):
        ids = [int(i) for i in tokenizer.encode(candidate, add_special_tokens=False)]
        if ids and ids not in variants:
            variants.append(ids)
    return variants


def _sequence_bias(params: GenerationParams, *, tokenizer: Any, vocab_size: int,
                   eos_token_ids: list[int]) -> SequenceBiasLogitsProcessor | None:
    bias: dict[tuple[int, ...], float] = {}
    for field, tokens in (("logit_bias", list(params.logit_bias)), ("custom_token_bans", params.custom_token_bans)):
        bad = sorted({int(t) for t in tokens if not 0 <= int(t) < vocab_size})
        if bad:
            raise ConfigError(f"{field} names token id(s) {bad} outside this model's vocabulary of {vocab_size}.")
    for token, value in params.logit_bias.items():
        bias[(int(token),)] = float(value)
    bans = [int(t) for t in params.custom_token_bans]
    if params.ban_eos_token:
        bans += [int(t) for t in eos_token_ids]
    for token in bans:
        bias[(token,)] = float("-inf")
    for text in params.banned_strings:
        if text:
            for ids in banned_string_ids(tokenizer, text):
                if all(i < vocab_size for i in ids):
                    bias[tuple(ids)] = float("-inf")
    if not bias:
        return None
    return SequenceBiasLogitsProcessor([[list(ids), value] for ids, value in bias.items()])


def _check_combinations(params: GenerationParams) -> None:
    constrained = bool(params.grammar_string.strip()) or params.json_schema is not None
    stateful = [name for name, on in (("grammar_string/json_schema", constrained),
                                      ("mirostat_mode", params.mirostat_mode and not params.greedy)) if on]
    for name in stateful:
        if params.num_beams > 1:
            raise ConfigError(f"{name} cannot be combined with beam search (num_beams > 1): it follows a single "
                              "sequence token by token.")
        if params.prompt_lookup_num_tokens > 0:
            raise ConfigError(f"{name} cannot be combined with prompt_lookup_num_tokens: it follows a single "
                              "sequence token by token.")
    if constrained and params.ban_eos_token:
        raise ConfigError("ban_eos_token cannot be combined with grammar_string/json_schema: the grammar ends "
                          "the reply with the end-of-sequence token. Turn one of them off.")
