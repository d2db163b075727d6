"""What POST /v1/responses answers: the response object (OpenAI's Responses API shape, as the `openai` SDK's
types.responses read it), its output items (a reasoning item with the model's thinking, an assistant message with
output_text and its logprobs when asked, function_call items), and the same reply as streamed events, from
response.created to response.completed (or response.incomplete when max_output_tokens cut it)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from extensions.openai.completions import chat_logprobs
from extensions.openai.errors import api_error_from
from extensions.openai.responses_store import ResponseStore, StoredResponse
from extensions.openai.streaming import (CallArguments, CallStart, GenerationRun, HeldBackText, ReasoningPiece,
                                         ReplyEvent, TextPiece, sse)
from modules.generation_params import GenerationParams, TokenEvent


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(ident: str, text: str, status: str = "completed",
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": ident, "type": "message", "role": "assistant", "status": status,
            "content": [] if status == "in_progress" else [output_text(text, logprobs)]}


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def reasoning_item(ident: str, text: str, status: str = "completed") -> dict[str, Any]:
    """The model's thinking as the Responses API's reasoning item: the raw text as one reasoning_text part of
    `content` (as OpenAI's open-weight models' servers give it); `summary` stays empty, nothing summarises it."""
    return {"id": ident, "type": "reasoning", "status": status, "summary": [],
            "content": [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]}


def call_item(ident: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": ident, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def text_logprobs(tokens: list[TokenEvent], top: int | None) -> list[dict[str, Any]]:
    """The tokens' logprobs as output_text's `logprobs` (token, logprob, bytes, top_logprobs: the chat
    completions route's entries); [] when the request asked for none (`top` None)."""
    found = chat_logprobs(tokens, top)
    return [item.model_dump() for item in found.content or []] if found is not None else []


@dataclass
class Reply:
    """A finished reply as a response shows and keeps it: the answer (None when it is calls alone), the calls
    (the chat completions route's form), the thinking (None: none) and how many tokens wrote it."""

    content: str | None
    calls: list[dict[str, Any]]
    reasoning: str | None = None
    reasoning_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # the answer's, when asked for

    def output(self) -> list[dict[str, Any]]:
        """Its output items: the thinking as a reasoning item, the text as one assistant message (when it has
        text, or no calls), then one function_call item per call."""
        items = [] if self.reasoning is None else [reasoning_item(item_id("rs"), self.reasoning)]
        if self.content is not None:
            items.append(message_item(item_id("msg"), self.content, logprobs=self.logprobs))
        return items + [call_item(item_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"])
                        for c in self.calls]

    def message(self) -> dict[str, Any]:
        """The reply as the chat message a later request (previous_response_id) reads; its thinking as
        reasoning_content, which reaches the model only where the chat template renders it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                                     for c in self.calls]
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
             error: dict[str, Any] | None = None, reasoning_tokens: int = 0) -> dict[str, Any]:
        """The response object; `run` (when finished) gives its usage."""
        usage = None
        if run is not None:
            stats = run.generation.stats
            usage = {"input_tokens": stats.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": stats.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                     "total_tokens": stats.prompt_tokens + stats.completion_tokens}
        return {"id": self.ident, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "temperature": self.params.temperature, "top_p": self.params.top_p,
                "max_output_tokens": self.params.max_new_tokens, "usage": usage,
                "store": self.store is not None, **self.request}

    def finish(self, run: GenerationRun, output: list[dict[str, Any]], reply: Reply) -> dict[str, Any]:
        """The finished response (completed, or incomplete when the token limit cut a reply without calls),
        kept in the store unless the request said not to."""
        cut = run.generation.stats.finish_reason == "length" and not reply.calls
        response = self.body("incomplete" if cut else "completed", output, run,
                             reasoning_tokens=reply.reasoning_tokens)
        if self.store is not None:
            self.store.put(self.ident, StoredResponse(response, [*self.conversation, reply.message()]))
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
    """A streamed reply (thinking, content pieces, tool calls and their arguments) as the output item events:
    the thinking as a reasoning item (its text as response.reasoning_text.delta events; closed when the answer
    or a call begins), the text as one message item (opened at its first piece, closed when a call begins or the
    reply ends; each delta with its tokens' logprobs when asked), each call as a function_call item whose
    arguments arrive as deltas and which is closed at the end, when the reply tells which calls were finished."""

    def __init__(self, events: _Events, top_logprobs: int | None):
        self.event = events
        self.top = top_logprobs
        self.output: list[dict[str, Any]] = []  # every item opened, in output order
        self.text: str | None = None  # the message's text (None: no message yet)
        self.reasoning: str | None = None  # the thinking's text (None: no reasoning item)
        self.logprobs: list[dict[str, Any]] = []  # the message's
        self._message: dict[str, Any] | None = None  # the open message item
        self._thinking: dict[str, Any] | None = None  # the open reasoning item
        self._calls: dict[int, _Call] = {}  # by the call's place among the reply's calls

    def of(self, event: ReplyEvent) -> list[str]:
        if isinstance(event, ReasoningPiece):
            opened = self._open_reasoning() if self._thinking is None else []
            self.reasoning = (self.reasoning or "") + event.text
            return opened + [self.event("response.reasoning_text.delta", item_id=self._thinking["id"],
                                        output_index=self._index(self._thinking), content_index=0,
                                        delta=event.text)]
        closed = self._close_reasoning()
        if isinstance(event, TextPiece):
            opened = self._open_message() if self._message is None else []
            self.text = (self.text or "") + event.text
            logprobs = text_logprobs(event.tokens, self.top)  # the answer's tokens that wrote this piece
            self.logprobs += logprobs
            return closed + opened + [self.event("response.output_text.delta", item_id=self._message["id"],
                                                 output_index=self._index(self._message), content_index=0,
                                                 delta=event.text, logprobs=logprobs)]
        if isinstance(event, CallStart):
            closed += self._close_message()
            item = call_item(item_id("fc"), event.id, event.name, "", status="in_progress")
            self._calls[event.index] = _Call(len(self.output), item)
            self.output.append(item)
            return closed + [self.event("response.output_item.added", output_index=len(self.output) - 1,
                                        item=dict(item))]
        assert isinstance(event, CallArguments)
        call = self._calls[event.index]
        call.item["arguments"] += event.text
        return closed + [self.event("response.function_call_arguments.delta", item_id=call.item["id"],
                                    output_index=call.output_index, delta=event.text)]

    def close(self, calls: list[dict[str, Any]]) -> list[str]:
        """The closing events of every open item; `calls` are the reply's finished calls (a call not among them
        was cut off: its item ends incomplete). A reply with neither text nor calls is an empty message."""
        events = self._close_reasoning()
        events += self._open_message() if self._message is None and self.text is None and not self._calls else []
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

    def _open_reasoning(self) -> list[str]:
        self._thinking = reasoning_item(item_id("rs"), "", status="in_progress")
        self.reasoning = ""
        self.output.append(self._thinking)
        index = len(self.output) - 1
        return [self.event("response.output_item.added", output_index=index, item=dict(self._thinking)),
                self.event("response.content_part.added", item_id=self._thinking["id"], output_index=index,
                           content_index=0, part={"type": "reasoning_text", "text": ""})]

    def _close_reasoning(self) -> list[str]:
        item = self._thinking
        if item is None:
            return []
        self._thinking = None
        index, text = self._index(item), self.reasoning or ""
        item.update(reasoning_item(item["id"], text))
        return [self.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=text),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part={"type": "reasoning_text", "text": text}),
                self.event("response.output_item.done", output_index=index, item=dict(item))]

    def _open_message(self) -> list[str]:
        self._message = message_item(item_id("msg"), "", status="in_progress")
        self.text = ""
        self.output.append(self._message)
        index = len(self.output) - 1
        return [self.event("response.output_item.added", output_index=index, item=dict(self._message)),
                self.event("response.content_part.added", item_id=self._message["id"], output_index=index,
                           content_index=0, part=output_text(""))]

    def _close_message(self) -> list[str]:
        message = self._message
        if message is None:
            return []
        self._message = None
        index, text = self._index(message), self.text or ""
        part = output_text(text, self.logprobs)
        message.update(status="completed", content=[part])
        return [self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                           text=text, logprobs=self.logprobs),
                self.event("response.content_part.done", item_id=message["id"], output_index=index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=dict(message))]


async def stream_response(draft: ResponseDraft, reply: HeldBackText, run: GenerationRun,
                          top_logprobs: int | None = None) -> AsyncIterator[str]:
    """The response's events: created and in_progress, the output items' events as the reply is written, then
    completed (or incomplete), or an error and response.failed when generation fails on the way. `reply` streams
    the thinking too (ReasoningPiece); `top_logprobs` (None: none asked) gives each text delta its logprobs."""
    event = _Events()
    yield event("response.created", response=draft.body("in_progress", []))
    yield event("response.in_progress", response=draft.body("in_progress", []))
    items = _OutputEvents(event, top_logprobs)
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
        done = Reply(items.text if items.text or not calls else None, calls, items.reasoning,
                     reply.reasoning_tokens)
        response = draft.finish(run, items.output, done)
        yield event(f"response.{response['status']}", response=response)
    except Exception as exc:
        error = api_error_from(exc, where="a streamed /v1/responses reply")
        yield event("error", code=error.code, message=error.message, param=error.param)
        failure = {"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": error.message}
        yield event("response.failed", response=draft.body("failed", items.output, error=failure))
