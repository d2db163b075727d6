"""The API's shared request pieces (the GenerationParams knobs every generation request accepts, LoRA references,
limits) and OpenAI's requests and responses (completions, chat, models, embeddings, the error object) as pydantic
models. Anthropic's Messages: protocol_anthropic.py; the Responses API: protocol_responses.py; text-generation-webui's
internal routes and /predict: protocol_internal.py.

Generation requests also accept every GenerationParams knob under its own name (text-generation-webui's names:
`min_p`, `top_k`, `repetition_penalty`, `dry_multiplier`, `ban_eos_token`, `custom_token_bans`, `grammar_string`,
`sampler_priority`, ...) plus `preset`; unknown fields are accepted and reported back as warnings.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from extensions.openai import client_fields
from modules.generation_params import GenerationParams

MAX_N = 8  # most choices one request may ask for (each is a full generation on the one model)
#: Most entries of a list or map knob (stop strings, token bans, logit_bias, ...): each one is checked at every
#: generated token, so thousands would slow every token down.
MAX_ITEMS = 1024
MAX_STOPS = 64  # most stop strings (stop, stopping_strings, stop_sequences)
MAX_TOOLS = 128
MAX_LORAS = 16  # most LoRAs one request may name
INT32_MAX = 2**31 - 1  # integer knobs reach the native samplers as 32-bit ints

#: Knobs named like an OpenAI field with another meaning or type; the request models declare those themselves.
_OPENAI_NAMED = {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                 "stop"}


#: text-generation-webui (and SillyTavern) send these as one string: "1, 2, 3", one sampler per line, JSON text;
#: GenerationParams' validators read that form.
_TEXT_TOO = {"custom_token_bans", "sampler_priority", "json_schema", "dry_sequence_breakers"}


def _knob_fields() -> dict[str, Any]:
    fields = {}
    for name, info in GenerationParams.model_fields.items():
        if name in _OPENAI_NAMED:
            continue
        bounds = list(info.metadata)  # the knob's own bounds come last, so they win over these
        if info.annotation is int:
            bounds.insert(0, Field(ge=-INT32_MAX - 1, le=INT32_MAX))
        elif get_origin(info.annotation) in (list, dict):
            bounds.insert(0, Field(max_length=MAX_ITEMS))
        annotation = Annotated[info.annotation, *bounds] if bounds else info.annotation
        if name in _TEXT_TOO:
            annotation = annotation | str
        if name == "mirostat_mode":  # Literal[0, 1, 2] would let `true` pass as 1
            annotation = Annotated[int, Field(ge=0, le=2)]
        if name == "repetition_penalty_range":  # -1 (the whole context) becomes 0 in GenerationParams
            annotation = Annotated[int, Field(ge=-1, le=INT32_MAX)]
        fields[name] = (Optional[annotation], Field(None, description=info.description))
    return fields


class LoraRef(BaseModel):
    """One LoRA of a request's `lora` list: by `name` (a folder of loras/), or by `id` as llama.cpp's server
    writes it (the LoRA's place in /v1/internal/lora/list; a name is accepted there too), with its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None = Field(None, min_length=1)
    id: Annotated[int, Field(ge=0)] | str | None = None
    scale: float = Field(1.0, ge=-100, le=100)

    @model_validator(mode="after")
    def _one_name(self) -> LoraRef:
        if (self.name is None) == (self.id is None):
            raise ValueError("give a LoRA's name or its id (one of the two)")
        return self


class _Extras(BaseModel):
    # strict: a JSON value of the wrong type is refused (400), never coerced ("5" is not 5, true is not 1)
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    preset: str | None = Field(None, description="A preset from presets/ to start from.")
    stopping_strings: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="text-generation-webui's name for extra stops.")
    lora: str | Annotated[list[str | LoraRef], Field(max_length=MAX_LORAS)] | None = Field(
        None, description="LoRAs for this request only, instead of the model's own: a name, a list of names, or "
                          "[{\"name\" (or llama.cpp's \"id\"), \"scale\"}]; [] runs the bare model.")
    keep_alive: float | str | None = Field(
        None, description="How long the model stays loaded once idle after this request (Ollama's): a duration "
                          "(\"5m\", \"1h30m\"), seconds, 0 = unload after this request, -1 = keep loaded.")

    @model_validator(mode="before")
    @classmethod
    def _other_backends(cls, data: Any) -> Any:
        """Other backends' names for our knobs (SillyTavern sends `rep_pen`, `typical`, `n_predict`, ...)."""
        return client_fields.normalise(data)


#: Every GenerationParams knob as an optional field (None = from the preset).
GenerationKnobs = create_model("GenerationKnobs", __base__=_Extras, **_knob_fields())


class StrictModel(BaseModel):
    """A request part that refuses unknown fields and values of the wrong type."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


# --- errors -----------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    error_id: str | None = Field(None, description="On a 500: the id the server's log line carries too.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- shared pieces ----------------------------------------------------------------------------------------------
class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # of the completion tokens, those that wrote the thinking (<think>...</think>)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # chat completions only


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


Stop = Annotated[str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None,
                 Field(description=f"Strings that end the reply (at most {MAX_STOPS}).")]
LogitBias = Annotated[Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_ITEMS)] | None,
                      Field(description="Token id (as a string) -> bias added to its logit.")]


#: The efforts OpenAI's SDK names; each reaches the chat template as `reasoning_effort`, as it is.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class _SamplingRequest(GenerationKnobs):  # type: ignore[misc, valid-type]
    model: str | None = Field(None, description="A model in models/; empty = the loaded one.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100, description="0 to 2 in OpenAI's API; text-generation-"
                                      "webui's clients (SillyTavern: up to 5) send more.")
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    user: str | None = None


# --- /v1/completions --------------------------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1,
                                                                  description="Text or token ids to continue.")
    suffix: str | None = Field(None, description="Text after the insertion (fill-in-the-middle models only).")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    warnings: list[str] | None = None


# --- /v1/chat/completions ---------------------------------------------------------------------------------------
class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # text-generation-webui's chat fields
    mode: Literal["instruct", "chat", "chat-instruct"] | None = None
    character: str | None = None
    instruction_template: str | None = Field(None, description="A template from instruction-templates/.")
    instruction_template_str: str | None = Field(None, description="A Jinja chat template to use instead.")
    user_name: str | None = Field(None, alias="name1")
    user_bio: str | None = None
    chat_instruct_command: str | None = None
    continue_: bool = Field(False, description="Continue the last assistant message instead of answering.")
    # reasoning models: variables for the chat template (vLLM's and llama.cpp's chat_template_kwargs)
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="Passed to the chat template as reasoning_effort (templates that read it: gpt-oss...).")
    enable_thinking: bool | None = Field(
        None, description="Passed to the chat template as enable_thinking (Qwen3 and the like): false asks the "
                          "model to answer without thinking.")
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_ITEMS)] | None = Field(
        None, description="More variables for the chat template, e.g. {\"enable_thinking\": false}.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobItem(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobItem] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # the model's thinking (<think>...</think>), apart from its answer
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    warnings: list[str] | None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- /v1/models -------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "workbench"
    resident: bool = Field(False, description="Loaded now: a request naming it is answered without a load.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- /v1/embeddings ---------------------------------------------------------------------------------------------
class EmbeddingRequest(StrictModel):
    input: str | Annotated[list[str], Field(max_length=2048)] = Field(
        min_length=1, description="Text or texts (at most 2048) to embed (token arrays are not accepted).")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
