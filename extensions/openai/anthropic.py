"""POST /v1/messages: Anthropic's Messages API (text, system prompt, streaming events, tool use, a prefilled
reply to continue) and POST /v1/messages/count_tokens, mapped onto the same chat path as /v1/chat/completions."""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from extensions.openai.completions import (STREAMED, ChatPlan, api_state, first_chunk, start_run,
                                           warnings_header)
from extensions.openai.errors import ApiError, api_error_from, documented_errors, validation_error
from extensions.openai.mapping import check_template_str
from extensions.openai.protocol import ChatCompletionRequest
from extensions.openai.protocol_anthropic import (AnthropicBlock, AnthropicUsage, MessagesCountRequest, MessagesRequest,
                                                  MessagesResponse, MessagesTokenCount)
from extensions.openai.streaming import (CallStart, GenerationRun, ReasoningPiece, ReplyEvent, TextPiece, guarded,
                                        sse)
from extensions.openai.target import resolve_target
from modules.errors import WorkbenchError

ANTHROPIC_ERRORS = documented_errors(anthropic=True)
router = APIRouter(responses=ANTHROPIC_ERRORS)
_OWN_FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "stream",
               "tools", "tool_choice", "metadata", "lora", "keep_alive", "thinking"}


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for block in content:
        kind = block.type if isinstance(block, AnthropicBlock) else block.get("type")
        if kind != "text":
            raise ApiError(400, f"Only text blocks are supported in {where} (got a {kind} block).", param=where)
        texts.append(block.text if isinstance(block, AnthropicBlock) else block.get("text", ""))
    return "".join(texts)


def _image_part(block: AnthropicBlock, where: str) -> dict[str, Any]:
    """An image block with a base64 source as OpenAI's image_url part (a data URL); a url source is refused, as
    on /v1/chat/completions: the server fetches nothing."""
    extra = block.model_extra or {}
    source = extra.get("source") if isinstance(extra.get("source"), dict) else {}
    if source.get("type") != "base64" or not isinstance(source.get("data"), str):
        raise ApiError(400, f"An image block's source must be of type base64 with its data (got "
                            f"{source.get('type') or 'none'}): this server does not fetch images from URLs.",
                       param=where)
    return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type') or ''};base64,{source['data']}"}}


def _document_part(block: AnthropicBlock, where: str) -> dict[str, Any]:
    """A document block (a base64 or plain-text source, its title the file's name) as OpenAI's file content part,
    which the chat path reads as an attachment (modules.chat.attachments)."""
    extra = block.model_extra or {}
    source = extra.get("source") if isinstance(extra.get("source"), dict) else {}
    kind, media, data = source.get("type"), str(source.get("media_type") or ""), source.get("data")
    if kind == "text" and isinstance(data, str):
        data = base64.b64encode(data.encode("utf-8")).decode("ascii")
        media = media or "text/plain"
    elif kind != "base64" or not isinstance(data, str):
        raise ApiError(400, f"A document block's source must be of type base64 or text with its data (got "
                            f"{kind or 'none'}).", param=where)
    title = extra.get("title") if isinstance(extra.get("title"), str) else None
    return {"type": "file", "file": {"filename": title or "document", "file_data": f"data:{media};base64,{data}"}}


def to_openai_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = _text_of(body.system, "system")
    if system:
        messages.append({"role": "system", "content": system})
    for number, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts, calls, thinking, files, images = [], [], [], [], []
        for block in message.content:
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "image" and message.role == "user":  # in its place among the texts
                images.append((len(texts), _image_part(block, f"messages.{number}.content")))
            elif block.type == "document" and message.role == "user":
                files.append(_document_part(block, f"messages.{number}.content"))
            elif block.type == "thinking" and message.role == "assistant":  # templates that want it render it
                thinking.append(str((block.model_extra or {}).get("thinking") or ""))
            elif block.type == "tool_use" and message.role == "assistant":
                calls.append({"id": block.id or f"toolu_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": block.name or "", "arguments": json.dumps(block.input or {})}})
            elif block.type == "tool_result" and message.role == "user":
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                 "content": _text_of(block.content, f"messages.{number}.content")})
            elif block.type in ("thinking", "redacted_thinking"):
                continue  # a user's, or redacted: nothing to read
            else:
                raise ApiError(400, f"{block.type} blocks are not supported in {message.role} messages.",
                               param=f"messages.{number}.content")
        if texts or calls or files or images or not message.content:
            entry: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if images:  # text and image_url parts in the blocks' order (modules.chat.images reads them)
                parts: list[dict[str, Any]] = [{"type": "text", "text": text} for text in texts]
                for offset, (position, part) in enumerate(images):
                    parts.insert(position + offset, part)
                entry["content"] = parts
            if files:  # read as the message's attachments by the chat path
                content = entry["content"]
                entry["content"] = [*files, *(content if isinstance(content, list) else
                                              [{"type": "text", "text": content}])]
            if calls:
                entry["tool_calls"] = calls
            if any(thinking):
                entry["reasoning_content"] = "\n\n".join(t for t in thinking if t)
            messages.append(entry)
    return messages


def prefills(body: MessagesRequest) -> bool:
    """Whether the conversation ends with the assistant's words, which the reply continues (Anthropic's prefill)."""
    last = body.messages[-1]
    if last.role != "assistant":
        return False
    return isinstance(last.content, str) or all(block.type == "text" for block in last.content)


def to_chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    data: dict[str, Any] = {"messages": to_openai_messages(body), "max_tokens": body.max_tokens,
                            "stop": body.stop_sequences or None, "continue_": prefills(body)}
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    for name in body.model_fields_set - _OWN_FIELDS:  # the GenerationParams knobs (top_k, min_p, ...)
        data[name] = getattr(body, name)
    data.update({k: v for k, v in (body.model_extra or {}).items()})
    if body.thinking is not None:
        data["enable_thinking"] = body.thinking.type == "enabled"
    choice = body.tool_choice
    if choice is not None and choice.type == "tool" and not choice.name:
        raise ApiError(400, "tool_choice of type 'tool' needs a name.", param="tool_choice")
    if body.tools and (choice is None or choice.type != "none"):
        data["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in body.tools]
        if choice is not None and choice.type == "any":
            data["tool_choice"] = "required"
        elif choice is not None and choice.type == "tool":
            data["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    try:
        return ChatCompletionRequest(**data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def stop_reason(run: GenerationRun, calls: list[Any], stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence: "stop_sequence" only for one of the caller's own sequences
    (the chat template's end-of-turn strings are "end_turn")."""
    if calls:
        return "tool_use", None
    stats = run.generation.stats
    if stats.stop_string is not None and stats.stop_string in (stop_sequences or []):
        return "stop_sequence", stats.stop_string
    return ("max_tokens" if stats.finish_reason == "length" else "end_turn"), None


def content_blocks(content: str | None, calls: list[dict[str, Any]],
                   reasoning: str | None = None) -> list[dict[str, Any]]:
    """The reply as Anthropic's content blocks: its thinking (a thinking block, unsigned: this server signs
    nothing), its text, its tool calls."""
    blocks: list[dict[str, Any]] = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning \
        else []
    blocks += [{"type": "text", "text": content}] if content else []
    for call in calls:
        blocks.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                       "input": json.loads(call["function"]["arguments"])})
    return blocks


def tool_use_id(call_id: str) -> str:
    """Anthropic's id for a tool call (toolu_...) from its OpenAI one (call_...)."""
    return "toolu_" + call_id.removeprefix("call_")


@router.post("/v1/messages", response_model=MessagesResponse, responses={**STREAMED, **ANTHROPIC_ERRORS})
async def messages(body: MessagesRequest, request: Request) -> Any:
    services = api_state(request).services
    chat_request = to_chat_request(body)
    check_template_str(api_state(request).params, chat_request)
    target = await resolve_target(request, body)
    model_name = target.name
    try:
        plan = await run_in_threadpool(ChatPlan, services, chat_request, target.model)
    except WorkbenchError as exc:
        raise api_error_from(exc, "messages") from None
    run = await start_run(services, request, plan.prompt, plan.params, plan.add_bos, target=target)
    first = await first_chunk(run)
    warnings = plan.warnings + run.generation.warnings
    ident = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(guarded(_stream(plan, run, first, ident, model_name, body.stop_sequences), [run]),
                                 media_type="text/event-stream", headers=warnings_header(warnings))
    await run.collect()
    reply = plan.reply(run)
    calls = reply.tool_calls
    stats = run.generation.stats
    reason, sequence = stop_reason(run, calls, body.stop_sequences)
    response = MessagesResponse(id=ident, model=model_name, content=content_blocks(reply.content, calls,
                                                                                   reply.reasoning),
                                stop_reason=reason, stop_sequence=sequence,
                                usage=AnthropicUsage(input_tokens=stats.prompt_tokens,
                                                     output_tokens=stats.completion_tokens))
    return JSONResponse(response.model_dump(), headers=warnings_header(warnings))


@router.post("/v1/messages/count_tokens", response_model=MessagesTokenCount)
async def count_tokens(body: MessagesCountRequest, request: Request) -> Any:
    """Anthropic's token count: the tokens of the prompt /v1/messages would build for the same body (system,
    messages and tools), as its usage.input_tokens counts them."""
    services = api_state(request).services
    # a reply of one token: the whole conversation is counted, as far as the context holds it
    chat_request = to_chat_request(body.model_copy(update={"max_tokens": body.max_tokens or 1}))
    check_template_str(api_state(request).params, chat_request)
    model = (await resolve_target(request, body)).model

    def count() -> tuple[int, list[str]]:
        plan = ChatPlan(services, chat_request, model)
        return (services.manager.prompt_token_count(plan.prompt, plan.params, add_bos=plan.add_bos, model=model),
                plan.warnings)

    try:
        tokens, warnings = await run_in_threadpool(count)
    except WorkbenchError as exc:
        raise api_error_from(exc, "messages") from None
    return JSONResponse(MessagesTokenCount(input_tokens=tokens).model_dump(), headers=warnings_header(warnings))


async def _stream(plan: ChatPlan, run: GenerationRun, first: Any, ident: str, model: str,
                  stop_sequences: list[str] | None) -> AsyncIterator[str]:
    stats = run.generation.stats
    message = {"id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": stats.prompt_tokens, "output_tokens": 0}}
    yield sse({"type": "message_start", "message": message}, "message_start")
    yield sse({"type": "ping"}, "ping")
    blocks = _BlockEvents()
    try:
        stream = plan.reply_stream(run, first, reasoning=True)
        async for event in stream.events():
            for text in blocks.of(event):
                yield text
        rest, calls = stream.finish()
        for event in rest:
            for text in blocks.of(event):
                yield text
        for text in blocks.close():
            yield text
        reason, sequence = stop_reason(run, calls, stop_sequences)
        yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"output_tokens": stats.completion_tokens}}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")
    except Exception as exc:
        yield sse(api_error_from(exc, where="a streamed /v1/messages reply").body(anthropic=True), "error")


class _BlockEvents:
    """A streamed reply as Anthropic's content block events: a thinking block (thinking_delta pieces), a text
    block, then one tool_use block per call whose input arrives as input_json_delta pieces. One block is open at a
    time."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the open block's type

    def of(self, event: ReplyEvent) -> list[str]:
        if isinstance(event, ReasoningPiece):
            events = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "",
                                                                     "signature": ""})
            return events + [self._delta({"type": "thinking_delta", "thinking": event.text})]
        if isinstance(event, TextPiece):
            events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
            return events + [self._delta({"type": "text_delta", "text": event.text})]
        if isinstance(event, CallStart):
            return self._start({"type": "tool_use", "id": tool_use_id(event.id), "name": event.name, "input": {}})
        return [self._delta({"type": "input_json_delta", "partial_json": event.text})]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")]

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.index += 1
        self.open = block["type"]
        return events + [sse({"type": "content_block_start", "index": self.index, "content_block": block},
                             "content_block_start")]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta")
