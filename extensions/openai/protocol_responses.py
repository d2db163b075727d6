"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}) as pydantic models: the request
(input items, tools, text format, and every GenerationParams knob as the other routes take them) and the response
object as /openapi.json documents it."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from extensions.openai.protocol import MAX_TOOLS, GenerationKnobs, ReasoningEffort

#: `include` values of OpenAI's SDK (ResponseIncludable); only message.output_text.logprobs adds anything here.
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content",
                     "message.output_text.logprobs"]


# --- the request ------------------------------------------------------------------------------------------------
class _Open(BaseModel):
    # items a client sends back as it got them (response.output) carry fields we do not read: status, annotations
    model_config = ConfigDict(extra="allow", strict=True)


class InputItem(_Open):
    """An input item: a message (`type` may be left out; content is text or a list of input_text parts, an
    assistant's output_text parts), a function_call the model made, a function_call_output answering it, or a
    reasoning item (the model's thinking: reasoning_text parts in `content`, or summary_text parts in
    `summary`)."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Any = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Any = None
    summary: Any = None


class ResponsesTool(_Open):
    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Open):
    format: TextFormat | None = None


class ReasoningConfig(_Open):
    """`reasoning`: its effort reaches the chat template as reasoning_effort (as chat completions'
    reasoning_effort does); the reasoning item always holds the whole thinking, so `summary` changes nothing."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(GenerationKnobs):  # type: ignore[misc, valid-type]
    """OpenAI's response create body, plus every GenerationParams knob under its own name (as the other routes)."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1, description="Ours: a seed for sampling.")
    tools: Annotated[list[ResponsesTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    reasoning: ReasoningConfig | None = None
    include: Annotated[list[Includable], Field(max_length=16)] | None = Field(
        None, description="\"message.output_text.logprobs\" adds the tokens' logprobs to output_text; the other "
                          "values are accepted and add nothing.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Most likely tokens listed with each token's "
                                                                    "logprob (more than 0 also asks for logprobs).")


class ResponseObject(BaseModel):
    """A response (OpenAI's Responses API): `output` holds a reasoning item (the model's thinking, when it
    thought), an assistant message (its output_text, with logprobs when asked) and function_call items; `usage`
    counts input and output tokens (of these, the thinking's as reasoning_tokens). The rest repeats the
    request."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    truncation: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    store: bool = True
    usage: dict[str, Any] | None = None
    warnings: list[str] | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
