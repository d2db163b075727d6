"""POST /v1/completions and POST /v1/chat/completions: thin handlers over the ModelManager (chat through the core's
one chat path, modules.chat.request), with SSE streaming."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from extensions.openai.errors import ApiError, api_error_from, documented_errors
from extensions.openai.mapping import build_params, chat_request, check_template_str, check_token_ids
from extensions.openai.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                        ChoiceLogprobs, ChunkChoice, CompletionChoice, CompletionLogprobs,
                                        CompletionRequest, CompletionResponse, CompletionTokensDetails, Delta,
                                        DeltaFunction, DeltaToolCall, LogprobItem, ResponseMessage, ToolCall,
                                        TopLogprob, Usage)
from extensions.openai.streaming import (CallStart, ClientGone, GenerationRun, HeldBackText, ReasoningPiece,
                                        ReplyEvent, TextPiece, guarded, reply_tokens, sse)
from extensions.openai.target import Target, resolve_target
from loaders.base import ImagePrompt
from modules.chat.reasoning import ReasoningSplitter
from modules.chat.request import ChatReply, PreparedChat, finish_reply, prepare_chat
from modules.errors import WorkbenchError
from modules.generation_params import GenerationParams, TokenEvent
from modules.request_hooks import RequestHooks

ERRORS = documented_errors()
#: One server-sent event (its `data` holds a JSON chunk, or [DONE]).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **ERRORS}
router = APIRouter(responses=ERRORS)


def api_state(request: Request) -> Any:
    return request.app.state.api


# --- running generations --------------------------------------------------------------------------------------------
async def start_run(services: Any, request: Request, prompt: str | list[int] | ImagePrompt, params: GenerationParams,
                    add_bos: bool | None = None, *, target: Target) -> GenerationRun:
    """A queued generation for the request on its target model, made in a worker thread (it tokenizes the prompt
    and may compile a grammar: never on the event loop). A prompt that does not fit the context is refused, never
    cut."""
    resident = services.manager.resident(target.model)
    model = resident.model if resident is not None else None
    if model is not None and params.max_new_tokens >= model.context_length:
        raise ApiError(400, f"max_tokens ({params.max_new_tokens}) must be below the context length "
                            f"({model.context_length}) to leave room for the prompt.", param="max_tokens",
                       code="context_length_exceeded")
    try:
        generation = await run_in_threadpool(services.manager.generate, prompt, params, add_bos=add_bos,
                                             cut_to_fit=False, **target.generate_options())
    except WorkbenchError as exc:
        raise api_error_from(exc) from None
    return GenerationRun(generation, request)


async def first_chunk(run: GenerationRun) -> Any:
    """Wait for the run's first chunk (or its end) so that errors before the first token answer as HTTP errors."""
    try:
        return await run.next_chunk()
    except ClientGone:
        raise
    except WorkbenchError as exc:
        raise api_error_from(exc) from None


def seeded(params: GenerationParams, index: int) -> GenerationParams:
    """The params of choice `index`: a given seed moves on by one per choice so the n choices differ."""
    if index == 0 or params.seed < 0:
        return params
    return params.model_copy(update={"seed": params.seed + index})


def finish_reason(run: GenerationRun) -> str:
    reason = run.generation.stats.finish_reason
    return "length" if reason == "length" else "stop"


def usage_of(runs: list[GenerationRun], reasoning_tokens: int | None = None) -> Usage:
    """The runs' usage; a chat reply's also counts the tokens that wrote its thinking (`reasoning_tokens`, of all
    its choices), which /v1/completions, whose text is not split, leaves out."""
    prompt = runs[0].generation.stats.prompt_tokens if runs else 0
    completion = sum(r.generation.stats.completion_tokens for r in runs)
    details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 completion_tokens_details=details)


def warnings_header(warnings: list[str]) -> dict[str, str]:
    """The warnings as one header. A header holds printable ASCII only: other characters become escapes (\\u65e5)
    and control characters spaces, so text a client sent (an unknown field's name) can neither break the answer
    nor add a header of its own."""
    if not warnings:
        return {}
    text = " | ".join(warnings).encode("ascii", "backslashreplace").decode("ascii")
    return {"x-workbench-warnings": "".join(c if " " <= c <= "~" else " " for c in text)[:4000]}


def stream_error(exc: BaseException) -> str:
    """The error event that ends a stream already under way (a bug is logged under the id it carries)."""
    return sse(api_error_from(exc, where="a streamed reply").body())


# --- /v1/completions --------------------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
             responses=STREAMED)
async def completions(body: CompletionRequest, request: Request) -> Any:
    services = api_state(request).services
    target = await resolve_target(request, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "Send one prompt per request (a list of several prompts is not supported).",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, (str, list)) and len(prompt) == 0:
        raise ApiError(400, "The prompt is empty.", param="prompt")
    if isinstance(prompt, list):
        await run_in_threadpool(check_token_ids, services.manager, prompt, "prompt", target.model)
    if body.best_of not in (None, body.n):
        raise ApiError(400, "best_of is not supported (ask for n choices instead).", param="best_of")
    params, warnings = build_params(services, body, max_tokens=body.max_tokens, logprobs=body.logprobs or 0,
                                    model=target.model)
    hooks = RequestHooks(services, params, source="api")  # state_modifier and input_modifier
    params = hooks.params
    if isinstance(prompt, str):
        prompt = hooks.prompt_text(prompt)
    if body.suffix:
        prompt = await run_in_threadpool(fill_in_the_middle, services, prompt, body.suffix, target.model)
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else await run_in_threadpool(services.manager.decode, prompt,
                                                                              model=target.model)
    run = await start_run(services, request, prompt, params, target=target.for_choice(0, body.n))
    first = await first_chunk(run)
    warnings += run.generation.warnings
    created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(guarded(_stream_completion(services, request, body, run, first, prompt, params,
                                                            echo, ident, created, target), [run]),
                                 media_type="text/event-stream", headers=warnings_header(warnings))
    runs = [run]
    await run.collect()
    for index in range(1, body.n):
        more = await start_run(services, request, prompt, seeded(params, index),
                               target=target.for_choice(index, body.n))
        runs.append(more)
        await more.collect()
    choices = [CompletionChoice(index=i, text=echo + r.generation.text, finish_reason=finish_reason(r),
                                logprobs=None if body.logprobs is None else completion_logprobs(r.tokens, len(echo)))
               for i, r in enumerate(runs)]
    response = CompletionResponse(id=ident, created=created, model=target.name, choices=choices,
                                  usage=usage_of(runs), warnings=warnings or None)
    return JSONResponse(response.model_dump(exclude_none=True), headers=warnings_header(warnings))


async def _stream_completion(services: Any, request: Request, body: CompletionRequest, run: GenerationRun, first: Any,
                             prompt: Any, params: GenerationParams, echo: str, ident: str, created: int,
                             target: Target) -> AsyncIterator[str]:
    runs, model = [run], target.name
    try:
        for index in range(body.n):
            if index:
                run = await start_run(services, request, prompt, seeded(params, index),
                                      target=target.for_choice(index, body.n))
                runs.append(run)
                first = await run.next_chunk()
            offset = 0
            if echo:
                yield sse(CompletionResponse(id=ident, created=created, model=model, choices=[
                    CompletionChoice(index=index, text=echo)]))
                offset = len(echo)
            chunk = first
            while chunk is not None:
                logprobs = completion_logprobs(chunk.tokens, offset) if body.logprobs is not None else None
                offset += len(chunk.text)
                yield sse(CompletionResponse(id=ident, created=created, model=model, choices=[
                    CompletionChoice(index=index, text=chunk.text, logprobs=logprobs)]))
                chunk = await run.next_chunk(watch_disconnect=False)
            yield sse(CompletionResponse(id=ident, created=created, model=model, choices=[
                CompletionChoice(index=index, text="", finish_reason=finish_reason(run))]))
        if body.stream_options and body.stream_options.include_usage:
            yield sse(CompletionResponse(id=ident, created=created, model=model, choices=[], usage=usage_of(runs)))
    except Exception as exc:
        yield stream_error(exc)
    yield "data: [DONE]\n\n"


def completion_logprobs(tokens: list[TokenEvent], offset: int) -> CompletionLogprobs:
    texts, offsets, position = [], [], offset
    for token in tokens:
        texts.append(token.text)
        offsets.append(position)
        position += len(token.text)
    return CompletionLogprobs(tokens=texts, token_logprobs=[t.logprob for t in tokens], text_offset=offsets,
                              top_logprobs=[{top.token: top.logprob for top in t.top_logprobs} for t in tokens])


def fill_in_the_middle(services: Any, prompt: Any, suffix: str, model: str | None = None) -> str:
    """A prefix-suffix-middle prompt for models whose vocabulary has StarCoder-style FIM tokens."""
    if not isinstance(prompt, str):
        raise ApiError(400, "suffix needs a text prompt.", param="suffix")
    manager = services.manager
    markers = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    try:
        single = all(len(manager.encode(marker, model=model)) == 1 for marker in markers)
    except WorkbenchError:
        single = False
    if not single:
        raise ApiError(400, "suffix (fill in the middle) needs a model with <fim_prefix>/<fim_suffix>/<fim_middle> "
                            "tokens; the loaded model has none.", param="suffix")
    return f"<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>"


# --- /v1/chat/completions ---------------------------------------------------------------------------------------------
class ChatPlan:
    """A chat body prepared by the core (modules.chat.request) for the resident model `model_name` (None: the
    default one), with what the API's answer adds: the warnings about the body and the logprobs asked for. `fit`:
    a conversation too long for the context is refused (OpenAI's chat completions), or its oldest turns are left
    out (the Responses API's truncation "auto")."""

    def __init__(self, services: Any, body: ChatCompletionRequest, model_name: str | None = None, *,
                 fit: Literal["refuse", "drop_oldest"] = "refuse"):
        request, warnings = chat_request(services, body, model_name)
        request.fit = fit
        self.prepared: PreparedChat = prepare_chat(services, request)
        self.warnings = warnings + self.prepared.warnings
        self.top_logprobs = (body.top_logprobs or 0) if body.logprobs else None

    @property
    def prompt(self) -> str | ImagePrompt:
        """What the model generates from: the prompt text, with the request's images when it has some."""
        return self.prepared.model_prompt

    @property
    def params(self) -> GenerationParams:
        return self.prepared.params

    @property
    def add_bos(self) -> bool | None:
        return self.prepared.add_bos

    def reply_stream(self, run: GenerationRun, first: Any, *, reasoning: bool = False) -> HeldBackText:
        """The run's reply as a stream of content and tool calls, its thinking kept out of the content (and sent
        as ReasoningPiece events with `reasoning`)."""
        prepared = self.prepared
        splitter = ReasoningSplitter(prepared.thinking_opened) if prepared.parse_reasoning else None
        return HeldBackText(run, first, prepared.tool_names, forced=prepared.forced_tool, splitter=splitter,
                            reasoning=reasoning)

    def reply(self, run: GenerationRun) -> ChatReply:
        """The finished run's reply: content, tool calls and reasoning (the core's finish_reply)."""
        return finish_reply(self.prepared, run.generation.text, run.tokens)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_none=True,
             responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    services = api_state(request).services
    check_template_str(api_state(request).params, body)
    target = await resolve_target(request, body)
    try:
        plan = await run_in_threadpool(ChatPlan, services, body, target.model)
    except WorkbenchError as exc:
        raise api_error_from(exc, "messages") from None
    run = await start_run(services, request, plan.prompt, plan.params, plan.add_bos,
                          target=target.for_choice(0, body.n))
    first = await first_chunk(run)
    warnings = plan.warnings + run.generation.warnings
    created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(guarded(_stream_chat(services, request, body, plan, run, first, ident, created,
                                                      target), [run]),
                                 media_type="text/event-stream", headers=warnings_header(warnings))
    runs = [run]
    await run.collect()
    for index in range(1, body.n):
        more = await start_run(services, request, plan.prompt, seeded(plan.params, index), plan.add_bos,
                               target=target.for_choice(index, body.n))
        runs.append(more)
        await more.collect()
    choices, reasoning_tokens = [], 0
    for index, item in enumerate(runs):
        reply = plan.reply(item)
        thinking, answer = reply_tokens(reply, item.tokens)  # logprobs are the content's tokens'
        reasoning_tokens += len(thinking)
        calls = reply.tool_calls
        reason = "tool_calls" if calls else finish_reason(item)
        choices.append(ChatChoice(index=index, finish_reason=reason,
                                  message=ResponseMessage(content=reply.content, reasoning_content=reply.reasoning,
                                                          tool_calls=[ToolCall(**c) for c in calls] or None),
                                  logprobs=chat_logprobs(answer, plan.top_logprobs)))
    response = ChatCompletionResponse(id=ident, created=created, model=target.name, choices=choices,
                                      usage=usage_of(runs, reasoning_tokens), warnings=warnings or None)
    return JSONResponse(response.model_dump(exclude_none=True), headers=warnings_header(warnings))


async def _stream_chat(services: Any, request: Request, body: ChatCompletionRequest, plan: ChatPlan,
                       run: GenerationRun, first: Any, ident: str, created: int, target: Target
                       ) -> AsyncIterator[str]:
    model = target.name

    def chunk(index: int, delta: Delta, reason: str | None = None, logprobs: Any = None) -> str:
        return sse(ChatCompletionChunk(id=ident, created=created, model=model, choices=[
            ChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)]))

    runs, reasoning_tokens = [run], 0
    try:
        for index in range(body.n):
            if index:
                run = await start_run(services, request, plan.prompt, seeded(plan.params, index), plan.add_bos,
                                      target=target.for_choice(index, body.n))
                runs.append(run)
                first = await run.next_chunk()
            yield chunk(index, Delta(role="assistant", content=""))
            stream = plan.reply_stream(run, first, reasoning=True)
            async for event in stream.events():
                yield chunk(index, reply_delta(event), logprobs=event_logprobs(event, plan.top_logprobs))
            rest, calls = stream.finish()
            for event in rest:
                yield chunk(index, reply_delta(event), logprobs=event_logprobs(event, plan.top_logprobs))
            reasoning_tokens += stream.reasoning_tokens
            yield chunk(index, Delta(), "tool_calls" if calls else finish_reason(run))
        if body.stream_options and body.stream_options.include_usage:
            yield sse(ChatCompletionChunk(id=ident, created=created, model=model, choices=[],
                                          usage=usage_of(runs, reasoning_tokens)))
    except Exception as exc:
        yield stream_error(exc)
    yield "data: [DONE]\n\n"


def reply_delta(event: ReplyEvent) -> Delta:
    """OpenAI's delta for a piece of a streamed reply: content, thinking (reasoning_content, as vLLM and
    llama.cpp's server send it), a tool call's start (id, type, name and empty arguments), or more of its
    arguments."""
    if isinstance(event, TextPiece):
        return Delta(content=event.text)
    if isinstance(event, ReasoningPiece):
        return Delta(reasoning_content=event.text)
    if isinstance(event, CallStart):
        return Delta(tool_calls=[DeltaToolCall(index=event.index, id=event.id, type="function",
                                               function=DeltaFunction(name=event.name, arguments=""))])
    return Delta(tool_calls=[DeltaToolCall(index=event.index, function=DeltaFunction(arguments=event.text))])


def event_logprobs(event: ReplyEvent, top: int | None) -> ChoiceLogprobs | None:
    """A content delta's logprobs: those of the answer's tokens that wrote it (HeldBackText leaves the thinking's
    out); other deltas carry none."""
    return chat_logprobs(event.tokens, top) if isinstance(event, TextPiece) else None


def chat_logprobs(tokens: list[TokenEvent], top: int | None) -> ChoiceLogprobs | None:
    if top is None:
        return None
    items = [LogprobItem(token=t.text, logprob=t.logprob if t.logprob is not None else 0.0,
                         bytes=list(t.text.encode("utf-8")),
                         top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.token.encode("utf-8")))
                                       for a in t.top_logprobs[:top]]) for t in tokens]
    return ChoiceLogprobs(content=items)
