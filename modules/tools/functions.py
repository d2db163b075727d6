"""A typed Python function with a docstring becomes a tool: pydantic builds the arguments model (and so the JSON
schema the model sees, and the validation of what it sends), docstring_parser reads the description and each
argument's text (Google, NumPy, reST or Epydoc style). MCPServer does the same with pydantic; its helper is
private to the SDK, so this is the few lines it takes over pydantic's public `create_model`.

A call runs on a thread of its own, so a tool that hangs is left behind after `timeout_s` and the model gets a
"timed out" error; Python cannot stop a thread, so such a call goes on in the background until it returns."""
from __future__ import annotations

import asyncio
import inspect
import re
import threading
import typing
from collections.abc import Callable
from typing import Any

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from modules.errors import ToolError, validation_problems
from modules.tools.spec import ToolSpec

#: Longest tool name OpenAI-style function calling accepts (and the characters it allows).
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class ToolDefinitionError(ValueError):
    """A function cannot be a tool (no docstring, a parameter without a type hint, ...)."""


class PythonTool:
    """A tool backed by a Python function."""

    def __init__(self, function: Callable[..., Any], *, name: str | None = None, source: str = ""):
        self.function = function
        self.arguments_model = arguments_model(function)
        self.spec = ToolSpec(name=name or function.__name__, description=describe(function),
                             parameters=schema_of(self.arguments_model),
                             needs_approval=bool(getattr(function, "needs_approval", False)), source=source)
        _check_name(self.spec.name)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the function's parameters, converted to their types; ToolError when they do not fit."""
        try:
            checked = self.arguments_model.model_validate(arguments)
        except ValidationError as exc:
            raise ToolError(f"bad arguments for {self.spec.name}: {'; '.join(validation_problems(exc))}",
                            kind="bad_arguments") from None
        return {name: getattr(checked, name) for name in type(checked).model_fields}

    def invoke(self, arguments: dict[str, Any], *, timeout_s: float) -> Any:
        kwargs = self.validate(arguments)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                value = self.function(**kwargs)
                if inspect.isawaitable(value):
                    value = asyncio.run(_awaited(value))
                outcome["value"] = value
            except BaseException as exc:  # handed to the caller's thread, which reports it
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"tool-{self.spec.name}", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise ToolError(f"{self.spec.name} timed out after {timeout_s:g} s", kind="timed_out")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")


async def _awaited(value: Any) -> Any:
    return await value


def arguments_model(function: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of the function's parameters: their type hints, defaults and docstring descriptions.
    Unknown arguments are refused (extra="forbid"), so a misspelt argument is an error rather than ignored."""
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:
        raise ToolDefinitionError(f"its type hints cannot be read ({exc})") from None
    described = {param.arg_name: _unwrapped(param.description) for param in _docstring(function).params}
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise ToolDefinitionError(f"parameter {parameter.name!r} is {parameter.kind.description}; a tool takes "
                                      "named parameters only")
        if parameter.name not in hints:
            raise ToolDefinitionError(f"parameter {parameter.name!r} has no type hint")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], Field(default, description=described.get(parameter.name)))
    try:
        return create_model(f"{function.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    except Exception as exc:  # a hint pydantic cannot turn into a schema
        raise ToolDefinitionError(f"its parameters cannot be described as JSON ({exc})") from None


def describe(function: Callable[..., Any]) -> str:
    """The docstring's text without its Args/Returns sections: what the model reads to decide on a call."""
    doc = _docstring(function)
    text = _unwrapped("\n\n".join(part for part in (doc.short_description, doc.long_description) if part))
    if not text:
        raise ToolDefinitionError("it has no docstring (the model needs one to know what the tool does; name "
                                  "helpers that are not tools with a leading underscore)")
    return text


def _unwrapped(text: str | None) -> str | None:
    """Docstring text with its line wrapping undone (paragraphs kept): the model reads it, not an editor."""
    if text is None:
        return None
    paragraphs = (" ".join(part.split()) for part in re.split(r"\n\s*\n", text))
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of an arguments model, without the titles pydantic adds to every node (noise in a prompt:
    the property names already say it)."""
    schema = without_titles(model.model_json_schema())
    schema.setdefault("properties", {})
    return schema


def without_titles(node: Any) -> Any:
    """A JSON schema without its "title" keywords (properties named "title" are kept)."""
    if isinstance(node, list):
        return [without_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {name: without_titles(sub) for name, sub in value.items()}  # names, not keywords
        else:
            out[key] = without_titles(value)
    return out


def _docstring(function: Callable[..., Any]) -> docstring_parser.Docstring:
    return docstring_parser.parse(inspect.getdoc(function) or "")


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ToolDefinitionError(f"the tool name {name!r} must be 1 to 64 letters, digits, '_' or '-'")
