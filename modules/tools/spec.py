"""The shapes every kind of tool shares: what the model is told about a tool (ToolSpec, an OpenAI function tool),
a call the model made (ToolCall) and what it gets back (ToolResult), and the small protocol a runnable tool
implements (Tool). Python tool files and MCP servers both end up as these, so the runner and the chat path never
care where a tool came from."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from modules.errors import ToolError

F = TypeVar("F", bound=Callable[..., Any])


def needs_approval(function: F) -> F:
    """Mark a tool function as one the user approves before each call (for tools that change things: send mail,
    delete files). Usage in a tool file::

        from modules.tools import needs_approval

        @needs_approval
        def delete_note(name: str) -> str:
            ...
    """
    function.needs_approval = True  # type: ignore[attr-defined]
    return function


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it (name, description, JSON schema of its arguments), plus where it came from and
    whether a person approves each call."""

    name: str
    description: str
    parameters: dict[str, Any]
    needs_approval: bool = False
    #: Where the tool lives, for people: a file path, or "mcp:<server>".
    source: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI function-tool object chat templates and the API take."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: its id (echoed in the result), the tool's name and its arguments as the model
    wrote them (a JSON string, or an already parsed object)."""

    id: str
    name: str
    arguments: str | dict[str, Any]

    @classmethod
    def from_openai(cls, call: dict[str, Any]) -> ToolCall:
        """From an OpenAI `tool_calls` entry: {"id", "type": "function", "function": {"name", "arguments"}}."""
        function = call.get("function") or {}
        return cls(id=str(call.get("id") or ""), name=str(function.get("name") or ""),
                   arguments=function.get("arguments") if function.get("arguments") is not None else {})

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object; a ToolError (bad_arguments) when they are not a JSON object."""
        arguments = self.arguments
        if isinstance(arguments, str):
            if not arguments.strip():
                return {}
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ToolError(f"the arguments of {self.name} are not valid JSON ({exc.msg} at character "
                                f"{exc.pos})", kind="bad_arguments") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"the arguments of {self.name} must be a JSON object, not {type(arguments).__name__}",
                            kind="bad_arguments")
        return arguments


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: text for the model (JSON for structured results), and the error's kind when it failed
    (the text then starts with "Error: " and says why, so the model can react)."""

    call_id: str
    name: str
    content: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_message(self) -> dict[str, Any]:
        """The chat message that hands the result to the model (OpenAI's "tool" role)."""
        return {"role": "tool", "tool_call_id": self.call_id, "name": self.name, "content": self.content}


class Tool(Protocol):
    """A runnable tool. `invoke` checks the arguments against `spec.parameters` (ToolError bad_arguments), runs
    the tool for at most `timeout_s` seconds (ToolError timed_out) and returns its value (a string, or anything
    JSON can show); any other exception is the tool's own failure."""

    spec: ToolSpec

    def invoke(self, arguments: dict[str, Any], *, timeout_s: float) -> Any: ...


@dataclass
class ToolProblem:
    """A tool file, function or MCP server that could not be offered, and why (shown in the UI's tool list)."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class ToolSet:
    """Tools by name, and the problems met while gathering them."""

    tools: dict[str, Tool] = field(default_factory=dict)
    problems: list[ToolProblem] = field(default_factory=list)
