"""Fields that clients written for other backends send in a generation request, mapped onto ours.

SillyTavern's text-generation-webui mode sends one body for every backend it knows: each knob under
text-generation-webui's name and again under KoboldCpp's, llama.cpp's or Ollama's (`rep_pen`, `typical`,
`n_predict`, ...), plus settings of samplers we do not have (at their "off" value unless the user turned them on)
and its own bookkeeping (`api_type`, `api_server`). `normalise` rewrites such a body before the strict request
model reads it: another backend's name for one of our knobs becomes ours (its value is then validated as ours), a
knob we lack is dropped while it is off (else it stays, and comes back as an ignored field), bookkeeping is dropped.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Another backend's name -> ours, for the same knob with the same meaning and units.
ALIASES: dict[str, str] = {
    "rep_pen": "repetition_penalty",  # KoboldCpp
    "repeat_penalty": "repetition_penalty",  # llama.cpp, Ollama
    "rep_pen_range": "repetition_penalty_range",
    "repeat_last_n": "repetition_penalty_range",
    "typical": "typical_p",
    "tfs_z": "tfs",
    "nsigma": "top_n_sigma",
    "mirostat": "mirostat_mode",
    "ignore_eos": "ban_eos_token",
    "sampler_seed": "seed",
    "n_predict": "max_new_tokens",  # llama.cpp
    "num_predict": "max_new_tokens",  # Ollama
    "grammar": "grammar_string",  # llama.cpp, KoboldCpp
    "guided_grammar": "grammar_string",  # vLLM, Aphrodite
    "guided_json": "json_schema",
    "dynatemp_min": "dynatemp_low",  # Aphrodite
    "dynatemp_max": "dynatemp_high",
}


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _is(expected: bool | int) -> Callable[[Any, dict[str, Any]], bool]:
    if isinstance(expected, bool):
        return lambda value, body: value is expected
    return lambda value, body: _number(value) == expected


def _at_most_zero(value: Any, body: dict[str, Any]) -> bool:
    number = _number(value)
    return number is not None and number <= 0


def _adaptive_off(value: Any, body: dict[str, Any]) -> bool:
    return _at_most_zero(body.get("adaptive_target", 0), body)


def _dry_range_unused(value: Any, body: dict[str, Any]) -> bool:
    return value == 0 or not body.get("dry_multiplier")


def _dynatemp_range_redundant(value: Any, body: dict[str, Any]) -> bool:
    # SillyTavern derives it from dynatemp_low/high, which we honour; without them it asks for something else
    return not body.get("dynamic_temperature") or ("dynatemp_low" in body and "dynatemp_high" in body)


def _n_probs_redundant(value: Any, body: dict[str, Any]) -> bool:
    return "logprobs" in body or not value


#: Knobs of samplers and features we do not have -> whether the request's value leaves them off (or says nothing
#: beyond the fields we honour). Off: accepted without a word; on: kept, so it comes back as an ignored field.
OFF_WHEN: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "min_length": _is(0),  # text-generation-webui: a minimum reply length
    "min_tokens": _is(0),
    "minimum_message_content_tokens": _is(0),  # DreamGen
    "skew": _is(0),  # TabbyAPI
    "max_tokens_second": _is(0),  # text-generation-webui's streaming rate limit
    "rep_pen_slope": _is(1),  # KoboldCpp
    "repetition_decay": _is(0),  # TabbyAPI
    "min_keep": _is(0),  # llama.cpp
    "speculative_ngram": _is(False),
    "auto_max_new_tokens": _is(False),
    "static_cache": _is(False),
    "spaces_between_special_tokens": _is(True),  # vLLM
    "include_reasoning": _is(True),  # replies come back as generated, reasoning included
    "adaptive_target": _at_most_zero,  # text-generation-webui's adaptive-p sampler
    "adaptive_decay": _adaptive_off,
    "dry_penalty_last_n": _dry_range_unused,
    "dynatemp_range": _dynatemp_range_redundant,
    "n_probs": _n_probs_redundant,  # llama.cpp's logprobs; SillyTavern sends logprobs beside it
}

#: The client's bookkeeping, with no bearing on generation here: which backend it thinks it talks to, its URL,
#: its context size (prompts are fitted to the loaded model's context), llama.cpp's prompt cache switch.
CLIENT_ONLY = frozenset({"api_type", "api_server", "legacy_api", "truncation_length", "num_ctx", "cache_prompt"})


def normalise(body: Any) -> Any:
    """`body` with other backends' fields mapped onto ours (see the module docstring); anything else unchanged."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for name, ours in ALIASES.items():
        if name not in out:
            continue
        if ours not in out:
            out[ours] = out.pop(name)
        elif out[ours] == out[name]:
            del out[name]  # the same value twice; a different one stays and is reported as ignored
    for name, is_off in OFF_WHEN.items():
        if name in out and is_off(out[name], body):
            del out[name]
    for name in CLIENT_ONLY & out.keys():
        del out[name]
    return out
