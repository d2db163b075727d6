"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as pydantic models: requests, the
response and the error object Anthropic's SDK reads. Generation knobs: protocol.GenerationKnobs."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from extensions.openai.protocol import MAX_STOPS, MAX_TOOLS, GenerationKnobs, StrictModel


# --- errors -----------------------------------------------------------------------------------------------------
class AnthropicErrorDetail(BaseModel):
    type: str
    message: str
    error_id: str | None = Field(None, description="On a 500: the id the server's log line carries too.")


class AnthropicErrorResponse(BaseModel):
    """Errors of the routes under /v1/messages, in Anthropic's shape."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


# --- /v1/messages (Anthropic) -----------------------------------------------------------------------------------
class AnthropicBlock(BaseModel):
    """A content block: text, tool_use (id, name, input) or tool_result (tool_use_id, content)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "document"]
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class AnthropicMessage(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AnthropicToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(StrictModel):
    """Extended thinking: "enabled" or "disabled" reach the chat template as enable_thinking (budget_tokens is
    accepted; the reply's max_tokens bounds the thinking)."""

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=0)


class MessagesRequest(GenerationKnobs):  # type: ignore[misc, valid-type]
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicBlock] | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: AnthropicThinking | None = None


class MessagesCountRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int | None = Field(None, ge=1)  # type: ignore[assignment]


class MessagesTokenCount(BaseModel):
    input_tokens: int


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage
