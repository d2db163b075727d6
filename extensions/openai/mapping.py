"""Requests onto the core: which GenerationParams (preset < request knobs < OpenAI fields), and a chat request as
the core's ChatRequest (modules.chat.request, the one chat path the Chat tab and the CLI take too): the route maps
the body, the core builds the prompt. Which model, LoRAs and keep_alive a request gets: target.py."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from extensions.openai.errors import ApiError, api_error_from, validation_error
from modules.chat.attachments import take_file_parts
from modules.chat.request import ChatRequest
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


def chat_messages(request: Any) -> list[dict[str, Any]]:
    """An OpenAI conversation as the core's messages: developer -> system, function -> tool, text parts joined;
    a message with image_url parts keeps its parts (the core reads them: modules.chat.images)."""
    messages = []
    for number, message in enumerate(request.messages):
        data = message.model_dump(exclude_none=True)
        if data["role"] == "developer":
            data["role"] = "system"
        elif data["role"] == "function":
            data["role"] = "tool"
        content = data.get("content")
        if isinstance(content, list) and any(part.get("type") == "file" for part in content):
            # file parts become the message's attachments (modules.chat.attachments), read into text
            content, data["attachments"] = take_file_parts(content, field=f"messages.{number}.content")
            data["content"] = content
        if isinstance(content, list):
            other = sorted({str(part.get("type")) for part in content} - {"text", "image_url"})
            if other:
                raise ApiError(400, f"Content parts of type {', '.join(other)} are not supported (text and image_url "
                                    "are).", param="messages")
            if all(part.get("type") == "text" for part in content):
                data["content"] = "".join(part.get("text") or "" for part in content)
        data.setdefault("content", "")
        messages.append(data)
    return messages


def chat_request(services: Any, request: Any, model: str | None = None) -> tuple[ChatRequest, list[str]]:
    """A /v1/chat/completions body as the core's ChatRequest for the resident model `model` (None: the default
    one), and the warnings about the body (unknown fields). The chat settings are the server's for that model,
    with the request's text-generation-webui chat fields over them, in instruct mode unless it asks for another;
    the conversation brings its own system message. A conversation too long for the context is refused, as
    OpenAI does."""
    top = request.top_logprobs or 0
    params, warnings = build_params(services, request, max_tokens=request.max_completion_tokens or request.max_tokens,
                                    logprobs=max(top, 1) if request.logprobs else 0, model=model)
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":  # a tool_choice that forces a call takes precedence (the core's)
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise ApiError(400, "response_format of type json_schema needs a json_schema.", param="response_format")
        schema = (fmt.json_schema.schema_ if fmt.json_schema is not None else None) or {"type": "object"}
        params = params.model_copy(update={"json_schema": schema, "grammar_string": ""})
    overrides = {key: value for key, value in {
        "mode": request.mode or "instruct", "character": request.character,
        "instruction_template": request.instruction_template, "user_name": request.user_name,
        "user_bio": request.user_bio, "chat_instruct_command": request.chat_instruct_command,
    }.items() if value}
    chat = services.chat_settings(model).model_copy(update={"system_message": "", **overrides})
    choice = request.tool_choice
    return ChatRequest(
        messages=chat_messages(request), chat=chat, params=params,
        tools=[t.model_dump(exclude_none=True) for t in request.tools or []],
        tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice,
        continue_last=request.continue_, model=model, template=request.instruction_template_str, fit="refuse",
        new_user_message=True, source="api", template_variables=template_variables(request)), warnings


#: Names the chat template's render sets itself; chat_template_kwargs may not replace them.
_RENDER_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "bos_token",
                 "eos_token", "chat_template", "conversations"}


def template_variables(request: Any) -> dict[str, Any]:
    """The body's variables for the chat template: chat_template_kwargs, then enable_thinking and
    reasoning_effort when set (a reasoning model's switches; a template that does not read them ignores them)."""
    variables = dict(request.chat_template_kwargs or {})
    bad = sorted(name for name in variables if name in _RENDER_NAMES or not name.isidentifier())
    if bad:
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(map(repr, bad))}: the template's render "
                            "sets these itself (or they are not variable names).", param="chat_template_kwargs")
    if request.enable_thinking is not None:
        variables["enable_thinking"] = request.enable_thinking
    if request.reasoning_effort is not None:
        variables["reasoning_effort"] = request.reasoning_effort
    return variables
