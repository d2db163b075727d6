"""Function calling: tools go into the prompt through the model's own chat template (or, for a template that
ignores them, a Hermes-style system message), tool calls are parsed out of the formats models write, and a
tool_choice that names a function (or "required") constrains the output with a JSON schema."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from modules.chat.templates import render_chat
from modules.errors import ConfigError

#: How replies that are tool calls begin, in the formats of common templates.
OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function=", "<functioncall>", "```", "{", "[")

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
            out.append({"role": "assistant", "content": content})
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
            raise ValueError(f"tool_choice names {wanted!r}, which is not among the tools")
    else:
        chosen = tools
    variants = [{"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": t["function"].get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _call(name: Any, arguments: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _from_json(value: Any, names: set[str]) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return []
        if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
            item = item["function"]
        call = _call(item.get("name"), item.get("arguments", item.get("parameters")), names)
        if call is None:
            return []
        calls.append(call)
    return calls


def _json_values(text: str) -> list[Any]:
    """Every JSON value that starts at a '{' or '[' in `text` (decoded greedily, left to right)."""
    decoder = json.JSONDecoder()
    values, index = [], 0
    while True:
        starts = [i for i in (text.find("{", index), text.find("[", index)) if i != -1]
        if not starts:
            return values
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        values.append(value)
        index = end


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """(the content left over, the tool calls) from a reply. Recognises Hermes/Qwen `<tool_call>` blocks, Mistral
    `[TOOL_CALLS]`, Llama 3 `<|python_tag|>` and `<function=name>{...}</function>`, fenced or bare JSON objects
    with `name` and `arguments` (or `parameters`). Only functions in `names` count."""
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, flags=re.S)
    if blocks:
        calls = [c for block in blocks for value in _json_values(block)[:1] for c in _from_json(value, names)]
        if calls:
            return text[:text.find("<tool_call>")].strip(), calls
    for match in re.finditer(r"<function=([\w.-]+)>\s*(\{.*?\})\s*</function>", text, flags=re.S):
        call = _call(match.group(1), match.group(2), names)
        if call is not None:
            return text[:text.find("<function=")].strip(), [call]
    for marker in ("[TOOL_CALLS]", "<|python_tag|>", "<functioncall>"):
        if marker in text:
            head, _, tail = text.partition(marker)
            for value in _json_values(tail)[:1]:
                calls = _from_json(value, names)
                if calls:
                    return head.strip(), calls
    for value in _json_values(text):
        calls = _from_json(value, names)
        if calls:
            start = text.find("```") if "```" in text else min(i for i in (text.find("{"), text.find("[")) if i >= 0)
            return text[:start].strip(), calls
    return text, []


def may_start_tool_call(text: str) -> bool:
    """Whether a reply beginning with `text` could still turn out to be a tool call (hold it back)."""
    stripped = text.lstrip()
    return any(opener.startswith(stripped) or stripped.startswith(opener) for opener in OPENERS)


def tool_dicts(tools: list[Any] | None) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools or []]
