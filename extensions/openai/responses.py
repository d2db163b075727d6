"""POST /v1/responses: OpenAI's Responses API (input items, instructions, function tools, streaming events,
previous_response_id), mapped onto the same chat path as /v1/chat/completions; GET and DELETE
/v1/responses/{id} for the responses the server keeps (responses_store.py)."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from extensions.openai.completions import STREAMED, ChatPlan, api_state, first_chunk, start_run, warnings_header
from extensions.openai.errors import ApiError, api_error_from, documented_errors, validation_error
from extensions.openai.mapping import check_template_str
from extensions.openai.protocol import ChatCompletionRequest
from extensions.openai.protocol_responses import (DeletedResponse, InputItem, ResponseObject, ResponsesRequest,
                                                  ToolChoiceFunction)
from extensions.openai.responses_output import Reply, ResponseDraft, item_id, stream_response, text_logprobs
from extensions.openai.streaming import guarded, reply_tokens
from extensions.openai.target import resolve_target
from modules.chat.request import ChatReply
from modules.errors import WorkbenchError

router = APIRouter(responses=documented_errors())

#: Fields this route reads itself; the knobs and unknown fields go on to the chat request (and its warnings).
_OWN_FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "seed", "tools",
               "tool_choice", "parallel_tool_calls", "previous_response_id", "store", "stream", "stream_options",
               "metadata", "text", "truncation", "user", "background", "conversation", "reasoning", "include",
               "top_logprobs"}
#: The include value that asks for output_text's logprobs.
LOGPROBS = "message.output_text.logprobs"
_TEXT_PARTS = ("input_text", "output_text", "text")


# --- input items -> chat messages ---------------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    """A call's output as text: a string, or a list of text parts."""
    parts = _chat_parts(content, where, media=False)
    return parts if isinstance(parts, str) else "".join(part["text"] for part in parts)


def _chat_parts(content: Any, where: str, *, media: bool = True) -> str | list[dict[str, Any]]:
    """A message's content as the chat completions route takes it: a string stays one; Responses parts become
    its parts (input_text -> text, input_image -> image_url, input_file -> file), so images and files take the
    one chat path as they do there (modules.chat.images, modules.chat.attachments). Only text parts: one string.
    `media` False: text parts only (a function call's output)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts.", param=where)
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.{number}"
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif media and kind == "input_image":
            parts.append(_image_part(part, at))
        elif media and kind == "input_file":
            parts.append(_file_part(part, at))
        else:
            what = "input_text, input_image and input_file" if media else "input_text"
            raise ApiError(400, f"Content parts of type {kind or '(not a part)'} are not supported here ({at}); "
                                f"send {what} parts.", param=at)
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An input_image as an image_url part; only its image_url (a base64 data URL, which the core checks) is read:
    this server keeps no uploaded files and fetches nothing."""
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        why = "file_id is not supported: this server keeps no uploaded files" if part.get("file_id") \
            else "it has no image_url"
        raise ApiError(400, f"{where} (an input_image) cannot be read: {why}. Send the image inline as image_url, "
                            "a data URL (data:image/png;base64,...).", param=where)
    return {"type": "image_url", "image_url": {"url": url}}


def _file_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An input_file as a file part (file_data, base64 or a data URL, with its filename), read into text by the
    core as the chat completions route reads one."""
    data = part.get("file_data")
    if not isinstance(data, str) or not data:
        why = ("file_id is not supported: this server keeps no uploaded files" if part.get("file_id") else
               "file_url is not supported: this server fetches nothing" if part.get("file_url") else
               "it has no file_data")
        raise ApiError(400, f"{where} (an input_file) cannot be read: {why}. Send the file inline as file_data "
                            "(base64, or a data URL such as data:application/pdf;base64,...) with its filename.",
                       param=where)
    name = part.get("filename")
    return {"type": "file", "file": {"file_data": data, **({"filename": name} if isinstance(name, str) else {})}}


def _reasoning_text(item: InputItem, where: str) -> str:
    """A reasoning item's thinking: its reasoning_text parts (`content`), else its summary_text parts (`summary`);
    "" when it has neither (only encrypted_content, which this server cannot read)."""
    texts: list[str] = []
    for field, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = getattr(item, field)
        if parts is None:
            continue
        if not isinstance(parts, list):
            raise ApiError(400, f"{where}.{field} (of a reasoning item) must be a list of {kind} parts.",
                           param=f"{where}.{field}")
        for number, part in enumerate(parts):
            if not isinstance(part, dict) or part.get("type") != kind or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.{field}.{number} must be a {kind} part with its text.",
                               param=f"{where}.{field}.{number}")
            texts.append(part["text"])
        if texts:
            break
    return "\n\n".join(text for text in texts if text)


def _think(message: dict[str, Any], reasoning: str | None) -> None:
    """Give an assistant message the thinking of the reasoning items before it (as reasoning_content)."""
    if reasoning:
        earlier = message.get("reasoning_content")
        message["reasoning_content"] = f"{earlier}\n\n{reasoning}" if earlier else reasoning


def input_messages(items: str | list[InputItem] | None) -> list[dict[str, Any]]:
    """The request's input as chat messages: a string is one user message; a message's input_image and input_file
    parts become image_url and file parts (as /v1/chat/completions takes them); function_call items become the
    assistant's tool_calls (joined to the assistant message before them), function_call_output items tool
    messages. A reasoning item's thinking becomes the reasoning_content of the assistant output that follows it
    (a message or a function_call), as a chat message's is: the chat template renders it or leaves it out. One
    that no assistant output follows answers nothing and is left out."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None  # the thinking of reasoning items not yet given to an assistant message
    for number, item in enumerate(items):
        where = f"input.{number}"
        if item.type == "message":
            if item.role is None:
                raise ApiError(400, f"{where} is a message without a role.", param=f"{where}.role")
            messages.append({"role": item.role, "content": _chat_parts(item.content, f"{where}.content")})
            if item.role == "assistant":
                _think(messages[-1], reasoning)
        elif item.type == "function_call":
            if not item.call_id or not item.name or item.arguments is None:
                raise ApiError(400, f"{where} (a function_call) needs call_id, name and arguments.", param=where)
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            _think(messages[-1], reasoning)
        elif item.type == "function_call_output":
            if not item.call_id:
                raise ApiError(400, f"{where} (a function_call_output) needs the call_id it answers.",
                               param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text_of(item.output, f"{where}.output")})
        elif item.type == "reasoning":
            thought = _reasoning_text(item, where)
            reasoning = f"{reasoning}\n\n{thought}" if reasoning and thought else (reasoning or thought)
            continue
        else:
            raise ApiError(400, f"{item.type} items are not supported ({where}); send messages, function_call, "
                                "function_call_output and reasoning items.", param=f"{where}.type")
        reasoning = None
    return messages


def to_chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completions body the same reply would be asked with: instructions as the first system message,
    function tools, text.format as response_format, max_output_tokens as max_tokens, reasoning.effort as
    reasoning_effort, logprobs when include names them (or top_logprobs asks some), the knobs as they are."""
    if body.instructions:
        messages = [{"role": "system", "content": body.instructions}, *messages]
    data: dict[str, Any] = {"messages": messages, "max_tokens": body.max_output_tokens, "model": body.model,
                            "user": body.user}
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    if body.reasoning is not None and body.reasoning.effort is not None:
        data["reasoning_effort"] = body.reasoning.effort
    if LOGPROBS in (body.include or []) or (body.top_logprobs or 0) > 0:
        data.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    tools = []
    for number, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise ApiError(400, f"Only function tools are supported (tools.{number} is a {tool.type} tool).",
                           param=f"tools.{number}.type")
        if not tool.name:
            raise ApiError(400, f"tools.{number} needs a name.", param=f"tools.{number}.name")
        tools.append({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                       "parameters": tool.parameters, "strict": tool.strict}})
    if tools:
        data["tools"] = tools
    choice = body.tool_choice  # the core refuses one that needs tools when there are none
    data["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                           if isinstance(choice, ToolChoiceFunction) else choice)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        data["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name or "response", "description": fmt.description,
                                                   "schema": fmt.schema_ or {"type": "object"},
                                                   "strict": fmt.strict}}
    for name in body.model_fields_set - _OWN_FIELDS:  # GenerationParams knobs, lora, keep_alive, preset
        data[name] = getattr(body, name)
    data.update(body.model_extra or {})
    try:
        return ChatCompletionRequest(**data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def echoed(body: ResponsesRequest, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's fields a response object repeats."""
    choice = body.tool_choice
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    thinking = body.reasoning
    return {"instructions": body.instructions, "previous_response_id": body.previous_response_id,
            "metadata": body.metadata or {}, "user": body.user, "truncation": body.truncation or "disabled",
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction) else (choice or "auto"),
            "tools": [{"type": "function", **t["function"]} for t in tools],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "reasoning": {"effort": thinking.effort, "summary": thinking.summary or thinking.generate_summary}
            if thinking is not None else None,
            "top_logprobs": body.top_logprobs}


def finished_reply(reply: ChatReply, tokens: list[Any], top_logprobs: int | None) -> Reply:
    """A finished chat reply as the response shows it: the tokens before its answer wrote the thinking
    (reasoning_tokens); the answer's (up to its first call) give output_text's logprobs when asked."""
    thinking, answer = reply_tokens(reply, tokens)
    return Reply(reply.content, reply.tool_calls, reply.reasoning, len(thinking), text_logprobs(answer, top_logprobs))


# --- routes -------------------------------------------------------------------------------------------------------
@router.post("/v1/responses", response_model=ResponseObject, response_model_exclude_none=True,
             responses=STREAMED)
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    state = api_state(request)
    if body.background:
        raise ApiError(400, "background responses are not supported: leave background out (or false).",
                       param="background")
    if body.conversation is not None:
        raise ApiError(400, "conversation objects are not supported: continue a response with "
                            "previous_response_id instead.", param="conversation")
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        previous = state.responses.get(body.previous_response_id)
        if previous is None:
            raise ApiError(404, f"Previous response with id {body.previous_response_id[:100]!r} not found (this "
                                "server keeps responses in memory while it runs, unless made with store: false).",
                           param="previous_response_id", code="previous_response_not_found")
        history = [dict(m) for m in previous.messages]
    conversation = history + input_messages(body.input)
    if not conversation:
        raise ApiError(400, "input is empty: send a string or at least one input item.", param="input")
    chat_body = to_chat_request(body, conversation)
    check_template_str(state.params, chat_body)
    target = await resolve_target(request, body)
    fit = "drop_oldest" if body.truncation == "auto" else "refuse"
    try:
        plan = await run_in_threadpool(ChatPlan, state.services, chat_body, target.model, fit=fit)
    except WorkbenchError as exc:
        error = api_error_from(exc, "input")
        if error.param and error.param.startswith("messages"):  # the chat path names the chat route's field
            error.param = "input"
        raise error from None
    run = await start_run(state.services, request, plan.prompt, plan.params, plan.add_bos, target=target)
    first = await first_chunk(run)
    warnings = plan.warnings + run.generation.warnings
    tools = [t.model_dump(exclude_none=True) for t in chat_body.tools or []]
    draft = ResponseDraft(item_id("resp"), int(time.time()), target.name, echoed(body, tools), plan.params,
                          conversation, None if body.store is False else state.responses)
    if body.stream:
        events = stream_response(draft, plan.reply_stream(run, first, reasoning=True), run, plan.top_logprobs)
        return StreamingResponse(guarded(events, [run]), media_type="text/event-stream",
                                 headers=warnings_header(warnings))
    await run.collect()
    reply = finished_reply(plan.reply(run), run.tokens, plan.top_logprobs)
    response = draft.finish(run, reply.output(), reply)
    if warnings:
        response = {**response, "warnings": warnings}  # in this answer only, not in the kept copy
    return JSONResponse(response, headers=warnings_header(warnings))


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, request: Request) -> Any:
    stored = api_state(request).responses.get(response_id)
    if stored is None:
        raise ApiError(404, f"No response with id {response_id[:100]!r} (this server keeps responses in memory "
                            "while it runs, unless made with store: false).", code="not_found")
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request) -> Any:
    if not api_state(request).responses.delete(response_id):
        raise ApiError(404, f"No response with id {response_id[:100]!r}.", code="not_found")
    return JSONResponse(DeletedResponse(id=response_id).model_dump())
