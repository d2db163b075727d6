"""Runs the model's tool calls. Whatever happens (an unknown tool, arguments that are not JSON or do not fit the
schema, a tool that raises or hangs), the caller gets a ToolResult whose text tells the model what went wrong:
a tool never crashes a chat turn."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pydantic_core

from modules.errors import ToolError
from modules.tools.spec import Tool, ToolCall, ToolResult, ToolSpec

log = logging.getLogger(__name__)

#: Longest result handed to the model (characters); a longer one is cut with a note saying so, since it would
#: crowd the context out.
MAX_RESULT_CHARS = 50_000


class ToolRunner:
    """The tools one chat turn may call, and the time each call may take."""

    def __init__(self, tools: Mapping[str, Tool], *, timeout_s: float = 30.0,
                 max_result_chars: int = MAX_RESULT_CHARS):
        self.tools = dict(tools)
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars

    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self.tools.values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        """The tools as the `tools` list of an OpenAI chat request (what chat templates render)."""
        return [spec.to_openai() for spec in self.specs()]

    def spec(self, name: str) -> ToolSpec | None:
        tool = self.tools.get(name)
        return tool.spec if tool is not None else None

    def run(self, call: ToolCall | dict[str, Any]) -> ToolResult:
        """Run one call (a ToolCall or an OpenAI `tool_calls` entry); never raises."""
        if isinstance(call, dict):
            call = ToolCall.from_openai(call)
        try:
            value = self._invoke(call)
        except ToolError as exc:
            return error_result(call, str(exc), kind=exc.kind)
        except (Exception, SystemExit) as exc:  # the tool's own failure is the model's to read, not ours to raise
            log.info("tool %s raised %s", call.name, type(exc).__name__, exc_info=True)
            message = str(exc) or type(exc).__name__
            return error_result(call, f"{call.name} failed: {type(exc).__name__}: {message}", kind="failed")
        return ToolResult(call_id=call.id, name=call.name, content=self._text(value))

    def _invoke(self, call: ToolCall) -> Any:
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            raise ToolError(f"there is no tool named {call.name!r} (tools: {known})", kind="unknown_tool")
        return tool.invoke(call.parsed_arguments(), timeout_s=self.timeout_s)

    def _text(self, value: Any) -> str:
        """A string as it is; anything else as JSON (pydantic models, dataclasses, dates included)."""
        text = value if isinstance(value, str) else pydantic_core.to_json(value, fallback=str).decode()
        if len(text) > self.max_result_chars:
            text = (text[:self.max_result_chars] + f"\n[cut: the result had {len(text)} characters; "
                                                   f"the first {self.max_result_chars} are shown]")
        return text


def error_result(call: ToolCall, message: str, *, kind: str) -> ToolResult:
    """A result telling the model its call failed, and why."""
    return ToolResult(call_id=call.id, name=call.name, content=f"Error: {message}", error=kind)
