"""What POST /v1/responses answers: the response object (OpenAI's Responses API shape, as the `openai` SDK's
types.responses read it), its output items (an assistant message with output_text, function_call items), and the
same reply as streamed events, from response.created to response.completed (or response.incomplete when
max_output_tokens cut it)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from extensions.openai.errors import api_error_from
from extensions.openai.responses_store import ResponseStore, StoredResponse
from extensions.openai.streaming import (CallArguments, CallStart, GenerationRun, HeldBackText, ReplyEvent, TextPiece,
                                         sse)
from modules.generation_params import GenerationParams


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(ident: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": ident, "type": "message", "role": "assistant", "status": status,
            "content": [] if status == "in_progress" else [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(ident: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": ident, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def output_items(content: str | None, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A finished reply's output: its text as one assistant message (when it has text, or no calls), then one
    function_call item per call."""
    items = [] if content is None else [message_item(item_id("msg"), content)]
    return items + [call_item(item_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"])
                    for c in calls]


def reply_message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply as the chat message a later request (previous_response_id) reads."""
    message: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function", "function": dict(c["function"])} for c in calls]
    return message


@dataclass
class ResponseDraft:
    """One response being made: what its body echoes of the request, the conversation it answers (for the
    store), and where it is kept once finished (None: `store: false`)."""

    ident: str
    created_at: int
    model: str
    request: dict[str, Any]  # the request's fields the body echoes (instructions, tools, tool_choice, ...)
    params: GenerationParams
    conversation: list[dict[str, Any]]  # without the instructions, which a continuation does not carry over
    store: ResponseStore | None

    def body(self, status: str, output: list[dict[str, Any]], run: GenerationRun | None = None, *,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object; `run` (when finished) gives its usage."""
        usage = None
        if run is not None:
            stats = run.generation.stats
            usage = {"input_tokens": stats.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": stats.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": stats.prompt_tokens + stats.completion_tokens}
        return {"id": self.ident, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "temperature": self.params.temperature, "top_p": self.params.top_p,
                "max_output_tokens": self.params.max_new_tokens, "usage": usage,
                "store": self.store is not None, **self.request}

    def finish(self, run: GenerationRun, output: list[dict[str, Any]], content: str | None,
               calls: list[dict[str, Any]]) -> dict[str, Any]:
        """The finished response (completed, or incomplete when the token limit cut a reply without calls),
        kept in the store unless the request said not to."""
        cut = run.generation.stats.finish_reason == "length" and not calls
        response = self.body("incomplete" if cut else "completed", output, run)
        if self.store is not None:
            self.store.put(self.ident, StoredResponse(response, [*self.conversation, reply_message(content, calls)]))
        return response


# --- streaming --------------------------------------------------------------------------------------------------
class _Events:
    """Server-sent events of one response, numbered in order (`sequence_number`), each under its type's name."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, kind)


@dataclass
class _Call:
    output_index: int
    item: dict[str, Any]


class _OutputEvents:
    """A streamed reply (content pieces, tool calls and their arguments) as the output item events: the text
    as one message item (opened at its first piece, closed when a call begins or the reply ends), each call as a
    function_call item whose arguments arrive as deltas and which is closed at the end, when the reply tells
    which calls were finished."""

    def __init__(self, events: _Events):
        self.event = events
        self.output: list[dict[str, Any]] = []  # every item opened, in output order
        self.text: str | None = None  # the message's text (None: no message yet)
        self._message: dict[str, Any] | None = None  # the open message item
        self._calls: dict[int, _Call] = {}  # by the call's place among the reply's calls

    def of(self, event: ReplyEvent) -> list[str]:
        if isinstance(event, TextPiece):
            opened = self._open_message() if self._message is None else []
            self.text = (self.text or "") + event.text
            return opened + [self.event("response.output_text.delta", item_id=self._message["id"],
                                        output_index=self._index(self._message), content_index=0,
                                        delta=event.text, logprobs=[])]
        if isinstance(event, CallStart):
            closed = self._close_message()
            item = call_item(item_id("fc"), event.id, event.name, "", status="in_progress")
            self._calls[event.index] = _Call(len(self.output), item)
            self.output.append(item)
            return closed + [self.event("response.output_item.added", output_index=len(self.output) - 1,
                                        item=dict(item))]
        assert isinstance(event, CallArguments)
        call = self._calls[event.index]
        call.item["arguments"] += event.text
        return [self.event("response.function_call_arguments.delta", item_id=call.item["id"],
                           output_index=call.output_index, delta=event.text)]

    def close(self, calls: list[dict[str, Any]]) -> list[str]:
        """The closing events of every open item; `calls` are the reply's finished calls (a call not among them
        was cut off: its item ends incomplete). A reply with neither text nor calls is an empty message."""
        events = self._open_message() if self._message is None and not self._calls else []
        events += self._close_message()
        finished = {c["id"] for c in calls}
        for call in self._calls.values():
            item = call.item
            item["status"] = "completed" if item["call_id"] in finished else "incomplete"
            events += [self.event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=call.output_index, arguments=item["arguments"]),
                       self.event("response.output_item.done", output_index=call.output_index, item=dict(item))]
        return events

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _open_message(self) -> list[str]:
        self._message = message_item(item_id("msg"), "", status="in_progress")
        self.text = ""
        self.output.append(self._message)
        index = len(self.output) - 1
        return [self.event("response.output_item.added", output_index=index, item=dict(self._message)),
                self.event("response.content_part.added", item_id=self._message["id"], output_index=index,
                           content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _close_message(self) -> list[str]:
        message = self._message
        if message is None:
            return []
        self._message = None
        index, text = self._index(message), self.text or ""
        message.update(status="completed", content=[output_text(text)])
        part = {"type": "output_text", "text": text, "annotations": []}
        return [self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=message["id"], output_index=index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=dict(message))]


async def stream_response(draft: ResponseDraft, reply: HeldBackText, run: GenerationRun) -> AsyncIterator[str]:
    """The response's events: created and in_progress, the output items' events as the reply is written, then
    completed (or incomplete), or an error and response.failed when generation fails on the way."""
    event = _Events()
    yield event("response.created", response=draft.body("in_progress", []))
    yield event("response.in_progress", response=draft.body("in_progress", []))
    items = _OutputEvents(event)
    try:
        async for piece in reply.events():
            for text in items.of(piece):
                yield text
        rest, calls = reply.finish()
        for piece in rest:
            for text in items.of(piece):
                yield text
        for text in items.close(calls):
            yield text
        response = draft.finish(run, items.output, items.text if items.text or not calls else None, calls)
        yield event(f"response.{response['status']}", response=response)
    except Exception as exc:
        error = api_error_from(exc, where="a streamed /v1/responses reply")
        yield event("error", code=error.code, message=error.message, param=error.param)
        failure = {"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": error.message}
        yield event("response.failed", response=draft.body("failed", items.output, error=failure))
