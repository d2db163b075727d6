"""Tool calls read out of a reply, whole or while it is being written.

One scanner knows the formats models write calls in: Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, Mistral
`[TOOL_CALLS][...]`, Llama 3 `<|python_tag|>{...}`, `<functioncall>{...}`, `<function=name>{...}</function>`,
and JSON calls (`{"name", "arguments" or "parameters"}`, OpenAI's `{"type": "function", "function": {...}}`, or a
list of them) bare or in a ``` fence. Run on a finished reply (`final=True`) it gives the calls; run on a reply
still being written it gives how far the reply is surely text, and each call as far as it is written: its name
once complete, and the raw text of its arguments object, which a stream can pass on as it grows.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

#: What a call section may begin with. "{" and "[" begin bare JSON calls.
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<functioncall>", "<function=", "```")
_CANDIDATE = re.compile(r"[<\[{`]")
_FENCE_HEAD = re.compile(r"[\w+-]*[ \t]*\n?[ \t\r\n]*")
_FUNCTION_TAG = re.compile(r"<function=([\w.-]*)(>?)")
_WHITESPACE = " \t\r\n"
_DECODER = json.JSONDecoder()


@dataclass
class CallDraft:
    """One tool call as far as the reply has written it."""

    name: str | None = None  # once its JSON string is complete
    arguments: str = ""  # the raw text of its arguments object so far (empty until it begins)
    streams: bool = False  # the arguments are an object, whose text can be passed on as it is written
    complete: bool = False  # the call is written out
    call: dict[str, Any] | None = None  # the finished call (OpenAI's form), once complete


@dataclass
class ReplyScan:
    """`text[:content_end]` is content whatever comes next; `calls` are the calls from `section` on."""

    content_end: int
    calls: list[CallDraft] = field(default_factory=list)
    section: int | None = None


def scan_reply(text: str, names: set[str], *, final: bool = False, start: int = 0) -> ReplyScan:
    """Where the calls to the functions in `names` begin in `text`, and the calls. A reply being written
    (`final=False`) keeps back what may still become a call: a marker's first characters, an unfinished JSON
    value, trailing whitespace. A finished reply has only whole, valid calls. `start` skips a beginning known to
    be content (an earlier scan's content_end)."""
    position = start
    while (match := _CANDIDATE.search(text, position)) is not None:
        at = match.start()
        calls, resume = _section_at(text, at, names, final)
        if calls is not None:
            return ReplyScan(len(text[:at].rstrip()), calls, at)
        position = max(resume, at + 1)
    return ReplyScan(len(text) if final else len(text.rstrip()))


class ContentSoFar:
    """The part of a reply being written that is surely its content, for a preview (the Chat tab's): what is, or
    may still become, a call's markup is held back, so a reader never sees it as text. `names` are the functions
    offered (None or empty: all is text). Called with the reply's text each time it grows."""

    def __init__(self, names: set[str] | None):
        self.names = names
        self._sure = 0  # characters known to be content: the next scan starts there

    def __call__(self, text: str) -> str:
        if not self.names:
            return text
        scan = scan_reply(text, self.names, start=self._sure)
        if scan.section is None:
            self._sure = scan.content_end
        return text[:scan.content_end]


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """(the content, the tool calls) of a finished reply: the content is the text before the first call (the
    whole text when there is none). Only functions in `names` count."""
    scan = scan_reply(text, names, final=True)
    if not scan.calls:
        return text, []
    return text[:scan.content_end], [draft.call for draft in scan.calls if draft.call is not None]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- one call section -------------------------------------------------------------------------------------------
Found = tuple[list[CallDraft] | None, int]  # (the calls, [] while they may still come, None: no call here; resume)


def _section_at(text: str, at: int, names: set[str], final: bool) -> Found:
    for marker in _MARKERS:
        if text.startswith(marker, at):
            return _after_marker(text, at, marker, names, final)
        if not final and len(text) - at < len(marker) and marker.startswith(text[at:]):
            return [], at  # the beginning of a marker: wait for the rest
    if text[at] in "{[":
        return _json_calls(text, at, names, final)
    return None, at + 1


def _after_marker(text: str, at: int, marker: str, names: set[str], final: bool) -> Found:
    position = at + len(marker)
    if marker == "<function=":
        return _function_tags(text, at, names, final)
    if marker == "```":
        position = _FENCE_HEAD.match(text, position).end()  # type: ignore[union-attr]
        if position >= len(text):
            return (None if final else []), at + 1
        if text[position] not in "{[":
            return None, position
        calls, _ = _json_calls(text, position, names, final)
        return calls, at + 1
    drafts: list[CallDraft] = []
    while True:
        position = _skip_ws(text, position)
        if position >= len(text):
            return (drafts or None) if final else drafts, at + 1
        calls, end = _json_calls(text, position, names, final)
        if calls is None:
            return drafts or None, at + 1
        drafts += calls
        if marker != "<tool_call>" or not calls or not calls[-1].complete:
            return drafts, at + 1
        position = _skip_ws(text, end)  # Hermes: </tool_call>, then maybe another <tool_call>
        if text.startswith("</tool_call>", position):
            position = _skip_ws(text, position + len("</tool_call>"))
        if not text.startswith("<tool_call>", position):
            return drafts, at + 1
        position += len("<tool_call>")


def _function_tags(text: str, at: int, names: set[str], final: bool) -> Found:
    """`<function=name>{arguments}</function>`, once or several times."""
    drafts: list[CallDraft] = []
    position = at
    while True:
        tag = _FUNCTION_TAG.match(text, position)
        if tag is None:
            return drafts or None, at + 1
        if not tag.group(2):  # the name is still being written
            return (drafts or None) if final or tag.end() < len(text) else drafts, at + 1
        name = tag.group(1)
        if name not in names:
            return drafts or None, at + 1
        position = _skip_ws(text, tag.end())
        if position >= len(text):
            return (drafts or None) if final else [*drafts, CallDraft(name=name)], at + 1
        if text[position] != "{":
            return drafts or None, at + 1
        try:
            value, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            if final or not _valid_prefix(text, position):
                return drafts or None, at + 1
            return [*drafts, CallDraft(name=name, arguments=text[position:], streams=True)], at + 1
        call = _call(name, value, names)
        if call is None:
            return drafts or None, at + 1
        drafts.append(CallDraft(name, text[position:end], True, True, call))
        position = _skip_ws(text, end)
        if text.startswith("</function>", position):
            position = _skip_ws(text, position + len("</function>"))
        if not text.startswith("<function=", position):
            return drafts, at + 1


def _json_calls(text: str, at: int, names: set[str], final: bool) -> Found:
    """The calls in the JSON value opening at `at` (an object or a list of objects)."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        if final or not _valid_prefix(text, at):
            return None, at + 1
        return _drafts(text, at, names), at + 1
    calls = _from_json(value, names)
    if not calls:
        return None, end
    drafts = _drafts(text, at, names) or []
    if len(drafts) != len(calls):  # a shape the raw text cannot be followed in: the calls as parsed
        drafts = [CallDraft(c["function"]["name"]) for c in calls]
    for draft, call in zip(drafts, calls):
        draft.complete, draft.call = True, call
    return drafts, end


def _drafts(text: str, at: int, names: set[str]) -> list[CallDraft] | None:
    """The calls of a JSON value (valid, perhaps unfinished) as far as written; None when it cannot be calls."""
    if text[at] == "{":
        draft = _draft(text, at, names)
        return None if draft is None else [draft]
    drafts = []
    for _, start, _end in _children(text, at)[0]:
        draft = _draft(text, start, names) if text[start] == "{" else None
        if draft is None:
            return None
        drafts.append(draft)
    return drafts


def _draft(text: str, at: int, names: set[str]) -> CallDraft | None:
    members, end = _children(text, at)
    found = {key: (start, stop) for key, start, stop in members}
    if "function" in found and text[found["function"][0]] == "{":  # {"type": "function", "function": {...}}
        return _draft(text, found["function"][0], names)
    draft = CallDraft()
    if "name" in found:
        start, stop = found["name"]
        if stop is not None:
            draft.name = json.loads(text[start:stop])
            if draft.name not in names:
                return None
    key = "arguments" if "arguments" in found else "parameters" if "parameters" in found else None
    if key is not None:
        start, stop = found[key]
        draft.streams = text[start] == "{"
        if draft.streams:
            draft.arguments = text[start:stop]
    return draft


def _children(text: str, at: int) -> tuple[list[tuple[str | None, int, int | None]], int | None]:
    """The members of the JSON object (or the items of the list) opening at `at`: (key, where the value begins,
    where it ends or None while it is being written), and where the whole value ends (None: not yet). The text
    from `at` is valid JSON or the beginning of it."""
    closer = "}" if text[at] == "{" else "]"
    children: list[tuple[str | None, int, int | None]] = []
    position = _skip_ws(text, at + 1)
    if text.startswith(closer, position):
        return children, position + 1
    while position < len(text):
        key = None
        if closer == "}":
            try:
                key, position = _DECODER.raw_decode(text, position)
            except json.JSONDecodeError:
                return children, None
            position = _skip_ws(text, _skip_ws(text, position) + 1)  # past the colon
        if position >= len(text):
            return children, None
        start = position
        try:
            _, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            children.append((key, start, None))
            return children, None
        children.append((key, start, position))
        position = _skip_ws(text, position)
        if text.startswith(closer, position):
            return children, position + 1
        position = _skip_ws(text, position + 1)  # past the comma
    return children, None


def _valid_prefix(text: str, at: int) -> bool:
    """Whether `text[at:]` is the beginning of a JSON value (it may still become a call)."""
    try:
        from_json(text[at:], allow_partial=True)
    except ValueError:
        return False
    return True


def _skip_ws(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


# --- a parsed call ----------------------------------------------------------------------------------------------
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
    return {"id": new_call_id(), "type": "function",
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
