"""Errors a user can act on.

Every error raised on purpose by the core derives from WorkbenchError and carries a message meant for a person:
the UI shows it as is, the API maps it to an OpenAI error object, the CLI prints it to stderr.
"""
from __future__ import annotations

from typing import Any


class WorkbenchError(Exception):
    """Base class: `str(error)` is the message to show."""

    #: OpenAI-style error type and HTTP status the API uses for this error.
    error_type = "invalid_request_error"
    status_code = 400


class ConfigError(WorkbenchError):
    """A settings file, flag, preset or option holds a bad key or value."""


class ConstraintError(ConfigError):
    """A grammar_string or json_schema was refused: too large, invalid, or its compiler failed or timed out
    (modules.constraints)."""


class PathError(WorkbenchError):
    """A user-supplied name would leave its folder, is too long for the file system, or names nothing."""


class NotFound(PathError, ConfigError):
    """A name (model, LoRA, preset, character, instruction template, ...) that names nothing in its folder. Also a
    ConfigError: such a name often comes from settings, and callers that catch bad settings catch it too."""

    status_code = 404


class InvalidInput(WorkbenchError):
    """A request's own value cannot be used as given (an empty prompt, a token id outside the vocabulary).
    `field` names the request's field it is about, when one is (the API reports it as the error's param)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class ContextLengthExceeded(InvalidInput):
    """The prompt and the tokens asked for do not fit the model's context. The numbers are kept for callers that
    show them their own way; `prompt_tokens` is a lower bound when `exact` is False (counted without tokenizing)."""

    def __init__(self, *, context: int, prompt_tokens: int, max_new_tokens: int, exact: bool = True,
                 what: str = "the prompt"):
        has = "has" if exact else "has at least"
        super().__init__(f"This model's context is {context} tokens; {what} {has} {prompt_tokens} tokens and "
                         f"max_tokens asks {max_new_tokens}. Shorten the prompt or lower max_tokens.")
        self.context = context
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.exact = exact


class ImagesUnsupported(InvalidInput):
    """A message carries an image and the model it goes to reads none (no vision, or its loader has no image
    support set up)."""

    def __init__(self, model: str, detail: str = ""):
        super().__init__(f"{model} reads no images: {detail or 'it is not a vision model here'}. Send text only, "
                         "or load a vision-language model: a Transformers folder whose config.json has a "
                         "vision_config, or a GGUF model with its mmproj*.gguf beside it.", field="messages")
        self.model = model


class ModelLoadError(WorkbenchError):
    """A model could not be loaded; nothing was left half-loaded."""


class LoaderUnavailable(ModelLoadError):
    """A loader this machine cannot run: its library is not installed or the hardware it needs is absent (the
    EXL2/EXL3 loaders without a CUDA GPU). `loader` names it; nothing was loaded."""

    def __init__(self, message: str, *, loader: str):
        super().__init__(message)
        self.loader = loader


class NoModelLoaded(WorkbenchError):
    """No model is loaded, so nothing can generate or tokenize."""

    error_type = "server_error"
    status_code = 503


class ModelLoading(NoModelLoaded):
    """A model is being loaded: asking again shortly will work. `name` and `since` (time.time()) say which and
    since when."""

    def __init__(self, message: str, *, name: str, since: float):
        super().__init__(message)
        self.name = name
        self.since = since


class UnsupportedParameter(WorkbenchError):
    """A generation knob was set that the loaded loader cannot honour."""


class GenerationError(WorkbenchError):
    error_type = "server_error"
    status_code = 500


class Overloaded(WorkbenchError):
    """Too many requests are waiting for a model (--max-queue): try again shortly."""

    error_type = "server_error"
    status_code = 503


class BusyError(WorkbenchError):
    """The model manager refused work (for example a swap while a request runs)."""

    error_type = "server_error"
    status_code = 409


class AccessDenied(WorkbenchError):
    """The signed-in user (or a page without one) may not do this: an operator's action in --multi-user mode."""

    error_type = "permission_error"
    status_code = 403


def validation_problems(exc: Any, *, limit: int = 5) -> list[str]:
    """One phrase per problem of a pydantic ValidationError ("unknown key 'x'", "bad value for 'a.b': why"), for
    every caller that turns one into a message for a person (settings, presets, loader options, extension params,
    chat files, API requests)."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif error["type"] == "missing":
            problems.append(f"'{key}' is required")
        elif key:
            problems.append(f"bad value for '{key}': {message}")
        else:
            problems.append(message)
    unique = list(dict.fromkeys(problems))
    return unique[:limit] + (["..."] if len(unique) > limit else [])


def describe_validation_error(exc: Any, source: str = "") -> str:
    """A pydantic ValidationError as one line: `source: problem; problem`."""
    text = "; ".join(validation_problems(exc))
    return f"{source}: {text}" if source else text


class ChatChangedError(WorkbenchError):
    """A chat's file changed in another page (or process) since this page read it, in a way that cannot be merged
    with this page's change; the file was left as the other page wrote it. `kept_id` names the new chat that holds
    this page's version when the caller asked for one to be kept."""

    status_code = 409

    def __init__(self, message: str, *, chat_id: str, kept_id: str | None = None):
        super().__init__(message)
        self.chat_id = chat_id
        self.kept_id = kept_id


class ToolError(WorkbenchError):
    """A tool call could not be run (modules/tools). The chat turn never sees it raised: the tool runner turns it
    into an error result for the model. `kind` says why: unknown_tool, bad_arguments, timed_out, failed,
    declined (approval refused) or round_limit (the turn's rounds of tool calls were used up)."""

    def __init__(self, message: str, *, kind: str):
        super().__init__(message)
        self.kind = kind


class ConversionError(WorkbenchError):
    """A model conversion or quantization step (llama.cpp's converters or quantizer, a LoRA merge) failed; the
    message says which step and why."""

    error_type = "server_error"
    status_code = 500


class NotEnoughSpace(WorkbenchError):
    """The disk (or memory) a job needs is not free: refused before it starts, with the numbers."""

    error_type = "server_error"
    status_code = 507


class Cancelled(WorkbenchError):
    """A long job (quantization, comparison) was stopped by its caller; what it had written is removed."""

    status_code = 409
