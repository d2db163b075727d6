"""GenerationParams -> the samplers of exllamav2 and exllamav3, as plain values (no library import), so the mapping
is checked on any machine and the loaders only turn it into the libraries' objects.

exllamav2 has one fixed sampler (`ExLlamaV2Sampler.Settings`): penalties, bias, DRY, then temperature, top-k,
top-p, top-a, min-p, TFS, typical, mirostat (its v2 form), XTC and dynamic temperature in its own order;
`temperature_last` moves temperature after the truncation. exllamav3 builds a sampler from a list of steps
(`CustomSampler`): bias and penalties come first (the library needs them before the logits are transformed), then
temperature, top-k, top-p, min-p and XTC in the order `sampler_priority` gives.

Both libraries match banned strings ignoring case (they lower-case the text and the strings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modules.errors import UnsupportedParameter
from modules.generation_params import GenerationParams

_COMMON = frozenset({
    "do_sample", "seed", "temperature", "temperature_last", "top_p", "top_k", "min_p",
    "repetition_penalty", "repetition_penalty_range", "presence_penalty", "frequency_penalty",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers", "xtc_threshold",
    "xtc_probability", "ban_eos_token", "custom_token_bans", "logit_bias", "banned_strings",
})
#: The knobs the exllamav2 loader honours (ExLlamaV2Sampler.Settings and the job's banned strings).
EXLLAMAV2_PARAMS = _COMMON | {"dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent",
                              "smoothing_factor", "typical_p", "tfs", "top_a", "mirostat_mode", "mirostat_tau",
                              "mirostat_eta"}
#: The knobs the exllamav3 loader honours (its sampler steps, in `sampler_priority` order).
EXLLAMAV3_PARAMS = _COMMON | {"sampler_priority"}

#: exllamav3's penalty range when ours is 0 (the whole context): its own default.
_V3_WHOLE_CONTEXT = int(10e7)
#: The samplers whose order `sampler_priority` sets in exllamav3 (the rest have a fixed place).
_V3_ORDERED = ("temperature", "top_k", "top_p", "min_p", "xtc")


@dataclass
class SamplerPlan:
    """One request's sampler for an exllama library: `settings` (exllamav2: Settings fields) or `steps`
    (exllamav3: step class names with their arguments), and what the loader resolves with its tokenizer: logit
    biases (bans as -inf) and the DRY breakers as strings."""

    settings: dict[str, Any] = field(default_factory=dict)
    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    bias: dict[int, float] = field(default_factory=dict)
    dry_breakers: tuple[str, ...] = ()


def _bias(params: GenerationParams, eos_ids: list[int]) -> dict[int, float]:
    bias = {int(token): float(value) for token, value in params.logit_bias.items()}
    for token in params.custom_token_bans:
        bias[int(token)] = float("-inf")
    if params.ban_eos_token:
        for token in eos_ids:
            bias[token] = float("-inf")
    return bias


def exllamav2_plan(params: GenerationParams, eos_ids: list[int]) -> SamplerPlan:
    """ExLlamaV2Sampler.Settings fields for `params`. Every field is set: the library's defaults are not neutral
    (top_k 50, top_p 0.8, repetition penalty 1.025)."""
    if params.mirostat_mode == 1:
        raise UnsupportedParameter("The exllamav2 loader has mirostat 2 only (mirostat_mode 2); mirostat_mode 1 "
                                   "needs the llama.cpp or Transformers loader.")
    settings: dict[str, Any] = {
        "token_repetition_penalty": params.repetition_penalty,
        "token_repetition_range": params.repetition_penalty_range or -1,  # -1: the whole sequence
        "token_repetition_decay": 0,
        "token_frequency_penalty": params.frequency_penalty,
        "token_presence_penalty": params.presence_penalty,
        "dry_multiplier": params.dry_multiplier, "dry_base": params.dry_base,
        "dry_allowed_length": params.dry_allowed_length, "dry_range": 0,
        # neutral truncation; sampling below sets what the request asks for
        "temperature": 1.0, "top_k": 0, "top_p": 1.0, "top_a": 0.0, "min_p": 0.0, "tfs": 1.0, "typical": 1.0,
        "smoothing_factor": 0.0, "min_temp": 0.0, "max_temp": 0.0, "temp_exponent": 1.0,
        "temperature_last": False, "mirostat": False, "xtc_probability": 0.0, "xtc_threshold": 0.1,
    }
    if params.greedy:
        settings["top_k"] = 1
    else:
        settings.update(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, top_a=params.top_a,
            min_p=params.min_p, tfs=params.tfs, typical=params.typical_p, smoothing_factor=params.smoothing_factor,
            temperature_last=params.temperature_last, xtc_probability=params.xtc_probability,
            xtc_threshold=params.xtc_threshold)
        if params.dynamic_temperature:
            settings.update(min_temp=params.dynatemp_low, max_temp=params.dynatemp_high,
                            temp_exponent=params.dynatemp_exponent)
        if params.mirostat_mode == 2:
            settings.update(mirostat=True, mirostat_tau=params.mirostat_tau, mirostat_eta=params.mirostat_eta)
    return SamplerPlan(settings=settings, bias=_bias(params, eos_ids),
                       dry_breakers=tuple(params.dry_sequence_breakers) if params.dry_multiplier > 0 else ())


def exllamav3_plan(params: GenerationParams, eos_ids: list[int]) -> SamplerPlan:
    """exllamav3 sampler steps for `params` (names of exllamav3.generator.sampler classes and their keyword
    arguments); steps at their neutral value are left out (the library drops them too)."""
    plan = SamplerPlan(bias=_bias(params, eos_ids))
    steps = plan.steps
    bans = sorted(token for token, value in plan.bias.items() if value == float("-inf"))
    finite = {token: value for token, value in plan.bias.items() if value != float("-inf")}
    if finite:
        steps.append(("SS_LogitBias", {"logit_bias": finite}))
    sustain = params.repetition_penalty_range or _V3_WHOLE_CONTEXT
    if params.repetition_penalty != 1.0:
        steps.append(("SS_RepP", {"rep_p": params.repetition_penalty, "sustain_range": sustain, "decay_range": 0}))
    if params.presence_penalty or params.frequency_penalty:
        steps.append(("SS_PresFreqP", {"pres_p": params.presence_penalty, "freq_p": params.frequency_penalty,
                                       "sustain_range": sustain, "decay_range": 0}))
    if params.dry_multiplier > 0:
        plan.dry_breakers = tuple(params.dry_sequence_breakers)
        steps.append(("SS_DRY", {"dry_multiplier": params.dry_multiplier, "dry_base": params.dry_base,
                                 "dry_allowed_length": params.dry_allowed_length, "dry_range": 0}))
    if bans:
        steps.append(("SS_BanTokens", {"token_ids": bans}))
    if params.greedy:
        steps.append(("SS_Argmax", {}))
        return plan
    order = [name for name in params.sampler_priority if name in _V3_ORDERED]
    if params.temperature_last:
        order = [name for name in order if name != "temperature"] + ["temperature"]
    for name in order:
        if name == "temperature" and params.temperature != 1.0:
            steps.append(("SS_Temperature", {"temperature": params.temperature}))
        elif name == "top_k" and params.top_k > 0:
            steps.append(("SS_TopK", {"top_k": params.top_k}))
        elif name == "top_p" and params.top_p < 1.0:
            steps.append(("SS_TopP", {"top_p": params.top_p}))
        elif name == "min_p" and params.min_p > 0.0:
            steps.append(("SS_MinP", {"min_p": params.min_p}))
        elif name == "xtc" and params.xtc_probability > 0.0:
            steps.append(("SS_XTC", {"probability": params.xtc_probability, "threshold": params.xtc_threshold}))
    steps.append(("SS_Sample", {}))
    return plan
