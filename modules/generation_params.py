"""GenerationParams: every sampling knob in one typed object; and the token events and stats a generation yields.

GenerationParams is the single description of "how to generate" that presets, the Parameters tab, the API and
the CLI all map onto. Loaders read it; each loader declares which knobs it honours (`LoadedModel.supported_params`)
and `unsupported_knobs` tells a caller which of the knobs it set would be ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modules.errors import UnsupportedParameter

#: Names of the samplers whose order `sampler_priority` sets (text-generation-webui's names).
SAMPLER_NAMES: tuple[str, ...] = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry",
    "top_n_sigma",
    "temperature",
    "dynamic_temperature",
    "quadratic_sampling",
    "top_k",
    "top_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "tfs",
    "top_a",
    "min_p",
    "mirostat",
    "xtc",
    "encoder_repetition_penalty",
    "no_repeat_ngram",
)

DEFAULT_DRY_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")
#: text-generation-webui samplers the workbench does not have; an order that names them (SillyTavern sends
#: text-generation-webui's whole list) is accepted, and their place in it changes nothing here.
OTHER_SAMPLER_NAMES: frozenset[str] = frozenset({"adaptive_p"})


class GenerationParams(BaseModel):
    """How to generate. Defaults are neutral: each sampler is off until a preset or the user turns it on."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- length and basics -------------------------------------------------------------------------------------
    max_new_tokens: int = Field(512, ge=1, le=1_000_000, description="Most tokens to generate.")
    do_sample: bool = Field(True, description="Sample from the distribution; off means greedy (argmax).")
    seed: int = Field(-1, description="Random seed; -1 picks a fresh one each time.")
    # --- temperature family ------------------------------------------------------------------------------------
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="Divides the logits; 0 means greedy.")
    temperature_last: bool = Field(False, description="Apply temperature after the truncation samplers.")
    dynamic_temperature: bool = Field(False, description="Scale temperature by the entropy of the distribution.")
    dynatemp_low: float = Field(1.0, ge=0.0, description="Dynamic temperature at zero entropy.")
    dynatemp_high: float = Field(1.0, ge=0.0, description="Dynamic temperature at maximal entropy.")
    dynatemp_exponent: float = Field(1.0, ge=0.0, description="Exponent on the normalised entropy.")
    smoothing_factor: float = Field(0.0, ge=0.0, description="Quadratic sampling: 0 is off.")
    smoothing_curve: float = Field(1.0, ge=1.0, description="Quadratic sampling curve (1 = quadratic only).")
    # --- truncation samplers -----------------------------------------------------------------------------------
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling: 1 is off.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens: 0 is off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability.")
    typical_p: float = Field(1.0, ge=0.0, le=1.0, description="Locally typical sampling: 1 is off.")
    tfs: float = Field(1.0, ge=0.0, le=1.0, description="Tail-free sampling: 1 is off.")
    top_a: float = Field(0.0, ge=0.0, description="Drop tokens below top_a times the squared top probability.")
    top_n_sigma: float = Field(0.0, ge=0.0, description="Keep logits within n standard deviations of the max: 0 is off.")
    epsilon_cutoff: float = Field(0.0, ge=0.0, description="Drop tokens below this probability, in units of 1e-4: "
                                                           "0 is off.")
    eta_cutoff: float = Field(0.0, ge=0.0, description="Eta sampling, in units of 1e-4: 0 is off.")
    sampler_priority: list[str] = Field(default_factory=lambda: list(SAMPLER_NAMES),
                                        description="Order the samplers apply in.")
    # --- penalties ---------------------------------------------------------------------------------------------
    repetition_penalty: float = Field(1.0, ge=0.0, description="Divides logits of tokens already seen: 1 is off.")
    repetition_penalty_range: int = Field(1024, ge=0, description="How many recent tokens the penalties look at; 0 "
                                                                  "(or -1) = all.")
    encoder_repetition_penalty: float = Field(1.0, ge=0.0, description="Favours tokens of the prompt: 1 is off.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from each seen token's logit.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted per occurrence of a seen token.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating any n-gram of this size: 0 is off.")
    dry_multiplier: float = Field(0.0, ge=0.0, description="DRY repetition penalty strength: 0 is off.")
    dry_base: float = Field(1.75, ge=1.0, description="DRY penalty growth per extra repeated token.")
    dry_allowed_length: int = Field(2, ge=1, description="Longest repeated sequence DRY lets pass.")
    dry_sequence_breakers: list[str] = Field(default_factory=lambda: list(DEFAULT_DRY_BREAKERS),
                                             description="Strings that end a DRY match.")
    # --- exotic samplers ---------------------------------------------------------------------------------------
    xtc_threshold: float = Field(0.1, ge=0.0, le=1.0, description="XTC: tokens above this probability are candidates.")
    xtc_probability: float = Field(0.0, ge=0.0, le=1.0, description="XTC: chance to exclude top choices: 0 is off.")
    mirostat_mode: Literal[0, 1, 2] = Field(0, description="Mirostat: 0 off, 1 v1, 2 v2.")
    mirostat_tau: float = Field(5.0, ge=0.0, description="Mirostat target surprise.")
    mirostat_eta: float = Field(0.1, ge=0.0, description="Mirostat learning rate.")
    guidance_scale: float = Field(1.0, ge=0.0, description="Classifier-free guidance: 1 is off.")
    negative_prompt: str = Field("", description="Prompt to steer away from when guidance_scale != 1.")
    # --- search ------------------------------------------------------------------------------------------------
    num_beams: int = Field(1, ge=1, le=64, description="Beam search width: 1 is off.")
    length_penalty: float = Field(1.0, description="Beam search length penalty exponent.")
    early_stopping: bool = Field(False, description="Beam search stops when num_beams candidates are done.")
    penalty_alpha: float = Field(0.0, ge=0.0, le=1.0, description="Contrastive search degeneration penalty: 0 is off.")
    prompt_lookup_num_tokens: int = Field(0, ge=0, description="Prompt-lookup decoding draft length: 0 is off.")
    # --- stopping and tokens -----------------------------------------------------------------------------------
    stop: list[str] = Field(default_factory=list, description="Strings that end the reply (never shown).")
    ban_eos_token: bool = Field(False, description="Never stop on the end-of-sequence token.")
    add_bos_token: bool = Field(True, description="Prepend the BOS token to a text prompt.")
    skip_special_tokens: bool = Field(True, description="Hide special tokens in the output text.")
    custom_token_bans: list[int] = Field(default_factory=list, description="Token ids never to generate.")
    banned_strings: list[str] = Field(default_factory=list, description="Strings never to generate.")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="Added to the logits of these token ids.")
    # --- constrained output ------------------------------------------------------------------------------------
    grammar_string: str = Field("", description="A GBNF grammar the output must follow.")
    json_schema: dict[str, Any] | None = Field(None, description="A JSON schema the output must follow.")
    # --- what to report ----------------------------------------------------------------------------------------
    logprobs: int = Field(0, ge=0, le=20, description="Also report this many top alternatives per token.")

    @field_validator("sampler_priority", mode="before")
    @classmethod
    def _sampler_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # text-generation-webui's presets: one sampler per line (or comma-separated)
            return [part.strip() for part in value.replace(",", "\n").splitlines() if part.strip()]
        return value

    @field_validator("sampler_priority")
    @classmethod
    def _known_samplers(cls, value: list[str]) -> list[str]:
        value = [name for name in value if name not in OTHER_SAMPLER_NAMES]
        unknown = [name for name in value if name not in SAMPLER_NAMES]
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; known: {list(SAMPLER_NAMES)}")
        # Samplers left out keep their default relative order after the named ones.
        return list(dict.fromkeys(value)) + [name for name in SAMPLER_NAMES if name not in value]

    @field_validator("repetition_penalty_range", mode="before")
    @classmethod
    def _negative_range_is_all(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value == -1:
            return 0  # SillyTavern's and KoboldCpp's "-1: the whole context"
        return value

    @field_validator("custom_token_bans", mode="before")
    @classmethod
    def _token_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # text-generation-webui and SillyTavern send "1, 2, 3"
            try:
                return [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"write token ids separated by commas, such as \"1, 2, 3\" (got {value!r})") \
                    from None
        return value

    @field_validator("dry_sequence_breakers", mode="before")
    @classmethod
    def _breakers_from_text(cls, value: Any) -> Any:
        # text-generation-webui's form is JSON strings without the brackets ('"\\n", ":"'); SillyTavern sends a
        # JSON list as a string ('["\\n", ":"]')
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return []
            try:
                return json.loads(text if text.startswith("[") else f"[{text}]")
            except json.JSONDecodeError:
                raise ValueError(f"write the breakers as JSON strings, such as [\"\\n\", \":\"] or \"\\n\", \":\" "
                                 f"(got {value!r})") from None
        return value

    @field_validator("stop", "banned_strings", mode="before")
    @classmethod
    def _string_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc}") from exc
            except RecursionError:  # the reader recurses per level; modules.constraints allows far fewer anyway
                raise ValueError("json_schema nests too deeply to be read") from None
        # an empty schema means none (SillyTavern's setting is {} until the user writes one)
        return None if value == {} else value

    @model_validator(mode="after")
    def _one_constraint(self) -> "GenerationParams":
        if self.grammar_string.strip() and self.json_schema is not None:
            raise ValueError("set grammar_string or json_schema, not both")
        return self

    # --- helpers -----------------------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """True when sampling is off: do_sample=False or temperature 0 (mirostat and beams aside)."""
        return not self.do_sample or (self.temperature == 0 and self.mirostat_mode == 0)

    def active_knobs(self) -> set[str]:
        """The knobs that change the output compared with the neutral defaults."""
        defaults = _DEFAULTS
        active = {name for name in type(self).model_fields if getattr(self, name) != getattr(defaults, name)}
        # A knob that only tunes a sampler which is off changes nothing.
        for knob, gate in _GATES.items():
            if knob in active and gate not in active:
                active.discard(knob)
        if self.greedy:
            active -= _SAMPLING_ONLY
        return active - _ALWAYS_HONOURED

    def non_default(self) -> dict[str, Any]:
        """The fields that differ from the defaults, as a preset stores them."""
        defaults = _DEFAULTS
        return {name: getattr(self, name) for name in type(self).model_fields
                if getattr(self, name) != getattr(defaults, name)}


#: Knob -> the knob that switches its sampler on. A tuning knob counts only when its switch is on.
_GATES: dict[str, str] = {
    "temperature_last": "temperature",
    "dynatemp_low": "dynamic_temperature",
    "dynatemp_high": "dynamic_temperature",
    "dynatemp_exponent": "dynamic_temperature",
    "smoothing_curve": "smoothing_factor",
    "repetition_penalty_range": "repetition_penalty",
    "dry_base": "dry_multiplier",
    "dry_allowed_length": "dry_multiplier",
    "dry_sequence_breakers": "dry_multiplier",
    "xtc_threshold": "xtc_probability",
    "mirostat_tau": "mirostat_mode",
    "mirostat_eta": "mirostat_mode",
    "negative_prompt": "guidance_scale",
    "length_penalty": "num_beams",
    "early_stopping": "num_beams",
}
#: Knobs with no effect when decoding is greedy.
_SAMPLING_ONLY = {"temperature", "temperature_last", "dynamic_temperature", "dynatemp_low", "dynatemp_high",
                  "dynatemp_exponent", "smoothing_factor", "smoothing_curve", "top_p", "top_k", "min_p",
                  "typical_p", "tfs", "top_a", "top_n_sigma", "epsilon_cutoff", "eta_cutoff", "xtc_threshold",
                  "xtc_probability", "seed", "sampler_priority", "do_sample"}
#: Handled by the core for every loader (stop strings, length, reporting), so never "unsupported".
_ALWAYS_HONOURED = {"max_new_tokens", "stop", "do_sample", "seed", "skip_special_tokens", "add_bos_token",
                    "logprobs"}

_DEFAULTS = GenerationParams()


def unsupported_knobs(params: GenerationParams, supported: frozenset[str] | set[str]) -> list[str]:
    """Knobs the caller set that a loader honouring `supported` would ignore, sorted."""
    return sorted(params.active_knobs() - set(supported))


def honoured_knobs(supported: frozenset[str] | set[str]) -> frozenset[str]:
    """Every knob a loader honouring `supported` acts on, counting those the core handles for all loaders (the
    Parameters tab greys out the rest)."""
    return frozenset(supported) | _ALWAYS_HONOURED


def check_supported(params: GenerationParams, supported: frozenset[str] | set[str], loader: str,
                    *, strict: bool = False) -> list[str]:
    """Warnings (or, when strict, an UnsupportedParameter) for knobs the loader cannot honour."""
    missing = unsupported_knobs(params, supported)
    if not missing:
        return []
    message = f"The {loader} loader does not support {', '.join(missing)}; these settings are ignored."
    if strict:
        raise UnsupportedParameter(message.replace("these settings are ignored", "unset them or load another loader"))
    return [message]


@dataclass
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass
class TokenEvent:
    """One generated token as a loader yields it."""

    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    logprob: float | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "cancelled", "error"] = "length"
    stop_string: str | None = None  # the stop string that ended the reply, when one did
    time_to_first_token_s: float | None = None
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
