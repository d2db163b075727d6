"""Tools in the prompt: they go in through the model's own chat template (or, for a template that ignores them, a
Hermes-style system message), and a tool_choice that names a function (or "required") constrains the output with a
JSON schema. Reading the calls back out of a reply is modules.chat.tool_calls'."""
from __future__ import annotations

import json
from typing import Any

from modules.chat.templates import render_chat
from modules.errors import ConfigError, InvalidInput

_FALLBACK_SYSTEM = """\
You can call functions. Their signatures, as JSON schemas, are inside <tools></tools>:
<tools>
{tools}
</tools>
To call a function, answer with only this, for each call:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""


def template_takes_tools(template: str, tools: list[dict[str, Any]], **variables: Any) -> bool:
    """Whether the chat template renders the tools itself (it mentions the first function's name)."""
    name = tools[0]["function"]["name"]
    probe = [{"role": "user", "content": "Hi."}]
    try:
        return name in render_chat(template, probe, tools=tools, add_generation_prompt=True, **variables)
    except ConfigError:
        return False


def with_fallback_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tell a model whose template ignores tools about them in the system message, and turn earlier tool calls and
    results into text it can read."""
    text = _FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': _args(c)})}"
                              "\n</tool_call>" for c in message["tool_calls"])
            content = (message.get("content") or "") + calls
            thinking = {"reasoning_content": message["reasoning_content"]} if message.get("reasoning_content") else {}
            out.append({"role": "assistant", "content": content, **thinking})  # a template may render the thinking
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n"
                                                   "</tool_response>"})
        else:
            out.append(message)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as Transformers chat templates expect them: tool call arguments as objects."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"type": "function", "id": c.get("id"),
                      "function": {"name": c["function"]["name"], "arguments": _args(c)}}
                     for c in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def _args(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def constraint_schema(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any] | None:
    """A JSON schema forcing a call: of the named function, or (for "required") of any of them."""
    if choice in (None, "auto", "none"):
        return None
    if isinstance(choice, dict):
        wanted = choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == wanted]
        if not chosen:
            raise InvalidInput(f"tool_choice names {wanted!r}, which is not among the tools.", field="tool_choice")
    else:
        chosen = tools
    variants = [{"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": t["function"].get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tool_dicts(tools: list[Any] | None) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools or []]
