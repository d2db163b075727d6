"""Tools in the Chat tab, the parts that are not widgets: the tools a page picked for its chat (ToolPick, recorded
on the messages of each turn so that reopening the chat restores the pick) and how tool calls and their results
show in the chatbot (collapsible blocks: Gradio's message metadata with a title). Nothing here imports Gradio.

A turn's calls and results are kept in the chat history in OpenAI's form (an assistant message with
`tool_calls`, then one `tool` message per call), which is what the model's template reads on the next turn."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from modules.chat.history import ChatMessage

#: Metadata keys of a turn's messages: the tools the page offered the model, and whether a call was required.
TOOLS_KEY = "tools"
TOOL_USE_KEY = "tool_use"
#: Metadata key of a tool message whose call failed: the error's kind (modules.tools: failed, timed_out,
#: bad_arguments, unknown_tool, declined, round_limit).
TOOL_ERROR_KEY = "tool_error"

#: auto: the model decides whether to call a tool; required: its first step of the turn must be a call (forced
#: by a JSON schema), after which it answers freely, so a turn cannot loop on calls it was forced to make.
ToolUse = Literal["auto", "required"]
TOOL_USES: tuple[ToolUse, ...] = ("auto", "required")

#: Longest call shown in a block's title; the whole call is in the block.
_TITLE_CHARS = 80


@dataclass(frozen=True)
class ToolPick:
    """The tools one page offers the model in its chat, and how."""

    names: tuple[str, ...] = ()
    use: ToolUse = "auto"

    @classmethod
    def of(cls, names: Sequence[str] | None, use: str | None) -> ToolPick:
        return cls(tuple(dict.fromkeys(names or ())), use if use in TOOL_USES else "auto")  # type: ignore[arg-type]

    def stamp(self) -> dict[str, Any]:
        """What the messages of a turn record of the pick (an empty pick too: a chat whose tools were put away
        reopens without them)."""
        return {TOOLS_KEY: list(self.names), TOOL_USE_KEY: self.use}

    @classmethod
    def of_chat(cls, messages: Sequence[ChatMessage]) -> ToolPick | None:
        """The pick of the chat's last turn that records one; None for a chat that records none (new, or older
        than tools in the chat)."""
        for message in reversed(messages):
            names = message.metadata.get(TOOLS_KEY)
            if isinstance(names, list) and all(isinstance(name, str) for name in names):
                return cls.of(names, message.metadata.get(TOOL_USE_KEY))
        return None


def turn_holds_calls(messages: Sequence[ChatMessage]) -> bool:
    """Whether the chat's last turn (what follows its last user message) holds tool calls or their results."""
    users = [number for number, message in enumerate(messages) if message.role == "user"]
    return any(m.tool_calls or m.role == "tool" for m in messages[users[-1] + 1 if users else 0:])


def tool_entries(messages: Sequence[ChatMessage]) -> dict[int, dict[str, Any]]:
    """The chatbot entries of the chat's tool messages, by index: each assistant message that calls tools and
    each tool result becomes a collapsible block (one entry per stored message, so indices still match). A call
    not answered yet shows as pending (a spinner, open)."""
    answered = {m.tool_call_id for m in messages if m.role == "tool" and m.tool_call_id}
    entries: dict[int, dict[str, Any]] = {}
    for index, message in enumerate(messages):
        if message.role == "assistant" and message.tool_calls:
            pending = any(call.get("id") not in answered for call in message.tool_calls)
            entries[index] = call_entry(message, pending=pending)
        elif message.role == "tool":
            entries[index] = result_entry(message)
    return entries


def call_entry(message: ChatMessage, *, pending: bool = False) -> dict[str, Any]:
    """An assistant message's tool calls as a block: the calls in its title (shortened), whole in the block after
    any text the model wrote before them."""
    calls = [call_text(call) for call in message.tool_calls or []]
    title = "🛠️ " + "; ".join(calls)
    if len(title) > _TITLE_CHARS:
        title = title[:_TITLE_CHARS - 1] + "…"
    body = fenced("\n".join(calls))
    if message.content.strip():
        body = f"{message.content.strip()}\n\n{body}"
    return {"role": "assistant", "content": body,
            "metadata": {"title": title, "status": "pending" if pending else "done"}}


def result_entry(message: ChatMessage) -> dict[str, Any]:
    """A tool's result as a block titled with the tool and the outcome: its text (or the error the model got)."""
    name = message.name or "tool"
    error = message.metadata.get(TOOL_ERROR_KEY)
    if error == "declined":
        title = f"🚫 {name}: declined"
    elif error:
        title = f"⚠️ {name}: error ({error})"
    else:
        title = f"✅ {name}: result"
    return {"role": "assistant", "content": fenced(message.content),
            "metadata": {"title": title, "status": "done"}}


def call_text(call: dict[str, Any]) -> str:
    """`name({"argument": value})`: a call as the model made it."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"{function.get('name', '?')}({arguments})"
    return f"{function.get('name', '?')}({json.dumps(arguments, ensure_ascii=False)})"


def fenced(text: str) -> str:
    """`text` in a Markdown code block whose fence no run of backticks inside it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"
