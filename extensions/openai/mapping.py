"""Requests onto the core: which GenerationParams (preset < request knobs < OpenAI fields), and the chat prompt,
built by modules.chat (the same builder as the Chat tab) with the extensions' hooks around it. Which model, LoRAs
and keep_alive a request gets: target.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from extensions.openai.errors import ApiError, api_error_from, validation_error
from modules.errors import WorkbenchError
from modules.generation_params import GenerationParams
from modules.presets import load_preset

_OPENAI_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_CHAT_FIELDS = {"mode", "character", "instruction_template", "instruction_template_str", "user_name", "user_bio",
                "chat_instruct_command", "continue_", "name1"}


# --- token ids ----------------------------------------------------------------------------------------------------
def vocab_size(model: Any) -> int | None:
    """The model's vocabulary size where its loader tells (llama.cpp aborts the process on an unknown id)."""
    value = getattr(model, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def check_token_ids(manager: Any, ids: list[int], param: str, model: str | None = None) -> None:
    size = vocab_size(manager.require_model(model))
    bad = [t for t in ids if t < 0 or (size is not None and t >= size)]
    if bad:
        raise ApiError(400, f"Token id(s) {bad[:5]} are outside the vocabulary (0 to {size - 1 if size else '?'}).",
                       param=param)


# --- generation parameters ----------------------------------------------------------------------------------------
def _set(request: BaseModel, name: str) -> Any:
    return getattr(request, name, None) if name in request.model_fields_set else None


def build_params(services: Any, request: BaseModel, *, max_tokens: int | None = None,
                 stops: list[str] | None = None, logprobs: int = 0,
                 model: str | None = None) -> tuple[GenerationParams, list[str]]:
    """GenerationParams for a request to `model`: its preset (models.yaml, else the settings'; or the request's
    `preset`), then every knob the request set under GenerationParams' names, then the OpenAI fields. Returns
    (params, warnings)."""
    settings = services.settings
    warnings: list[str] = []
    if getattr(request, "preset", None):
        try:
            values = load_preset(settings.preset_dir, request.preset).model_dump()
        except WorkbenchError as exc:
            raise api_error_from(exc, "preset") from None
    else:
        values = services.default_params(model).model_dump()
    for name in GenerationParams.model_fields:
        if name in _OPENAI_FIELDS or name in ("stop", "logit_bias", "logprobs"):
            continue
        value = _set(request, name)
        if value is not None:
            values[name] = value
    for name in _OPENAI_FIELDS:
        value = _set(request, name)
        if value is not None:
            values[name] = value
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    bias = _set(request, "logit_bias")
    if bias:
        try:
            values["logit_bias"] = {int(token): float(value) for token, value in bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids written as strings, such as \"50256\".",
                           param="logit_bias") from None
    stop = _set(request, "stop")
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    values["stop"] = list(dict.fromkeys([*values.get("stop", []), *stop_list,
                                         *(getattr(request, "stopping_strings", None) or []), *(stops or [])]))
    values["logprobs"] = logprobs
    try:
        params = GenerationParams(**values)
    except ValidationError as exc:
        raise validation_error(exc) from None
    extra = sorted(k for k in (request.model_extra or {}) if k not in _CHAT_FIELDS)
    if extra:
        warnings.append(f"Ignored unknown field(s): {', '.join(extra)}.")
    return params, warnings


def state_of(params: GenerationParams, **extra: Any) -> dict[str, Any]:
    """The `state` dict extensions' hooks receive: the knobs by name plus the request's other settings."""
    return {**params.model_dump(), "source": "api", **extra}


def params_from_state(state: dict[str, Any], params: GenerationParams) -> GenerationParams:
    """Apply what a state_modifier changed among the knobs."""
    changed = {k: v for k, v in state.items() if k in GenerationParams.model_fields and v != getattr(params, k)}
    if not changed:
        return params
    try:
        return params.model_copy(update=GenerationParams(**{**params.model_dump(), **changed}).model_dump())
    except ValidationError as exc:
        raise validation_error(exc, prefix="An extension's state_modifier set a bad value: ") from None


# --- the chat prompt ------------------------------------------------------------------------------------------------
def check_template_str(params: Any, request: Any) -> None:
    """Refuse a client's own Jinja template (instruction_template_str) unless the server allows it: rendering it
    runs the client's loops and string operations here, where one template could hold a worker for hours or ask
    for gigabytes."""
    if getattr(request, "instruction_template_str", None) and not params.allow_template_str:
        raise ApiError(400, "instruction_template_str is refused: this server renders no client-supplied templates "
                            "(its operator may allow them with the openai extension's allow_template_str). Name a "
                            "template of instruction-templates/ with instruction_template instead.",
                       param="instruction_template_str", code="template_str_disabled")


@dataclass
class ChatPrompt:
    prompt: str
    stops: list[str]
    add_bos: bool | None
    warnings: list[str] = field(default_factory=list)


def build_chat_prompt(services: Any, messages: list[dict[str, Any]], request: Any, params: GenerationParams,
                      state: dict[str, Any], tools: list[dict[str, Any]] | None, model: str | None = None
                      ) -> ChatPrompt:
    """The prompt for an OpenAI-style conversation through the Chat tab's own builder
    (modules.chat.model_prompt) for the resident model `model` (None: the default one), with the request's
    text-generation-webui chat fields over the chat settings. Instruct mode unless the request asks for another;
    the conversation brings its own system message."""
    from modules.chat.model_prompt import build_model_prompt

    settings = services.settings
    registry = services.extensions
    if registry is not None:
        messages = registry.modify_history(messages)
        custom = registry.custom_chat_prompt(messages, state, services)
        if custom is not None:
            return ChatPrompt(custom, [], None)
    overrides = {key: value for key, value in {
        "mode": getattr(request, "mode", None) or "instruct",
        "character": getattr(request, "character", None),
        "instruction_template": getattr(request, "instruction_template", None),
        "user_name": getattr(request, "user_name", None),
        "user_bio": getattr(request, "user_bio", None),
        "chat_instruct_command": getattr(request, "chat_instruct_command", None),
    }.items() if value}
    chat = services.chat_settings(model).model_copy(update={"system_message": "", **overrides})
    built = build_model_prompt(services.manager.require_model(model), chat, messages,
                               max_new_tokens=params.max_new_tokens,
                               template_dir=settings.template_dir, characters_dir=settings.character_dir,
                               template_override=getattr(request, "instruction_template_str", None), tools=tools,
                               continue_last=bool(getattr(request, "continue_", False)), drop_old_messages=False)
    result = built.result
    return ChatPrompt(result.prompt, result.stop_strings, False if result.starts_with_bos else None, built.warnings)


def apply_input_hooks(services: Any, messages: list[dict[str, Any]], state: dict[str, Any]) -> list[dict[str, Any]]:
    """chat_input_modifier and input_modifier on the last user message (text content only)."""
    registry = services.extensions
    if registry is None:
        return messages
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "user" and isinstance(message.get("content"), str):
            text, _visible = registry.modify_chat_input(message["content"], message["content"], state)
            text = registry.modify_input(text, state)
            return [*messages[:index], {**message, "content": text}, *messages[index + 1:]]
    return messages
