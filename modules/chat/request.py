"""One chat turn, whoever asks for it: the Chat tab (modules.ui.chat_runner), /v1/chat/completions, /v1/messages and
/predict (extensions/openai) and the command line (modules.generate).

A caller maps its own input onto a `ChatRequest`; `prepare_chat` turns that into what the ModelManager generates
from (the prompt, the parameters with every stop string merged, the extensions' hook state, warnings) and
`finish_reply` turns the generated text into the reply (its thinking apart from its answer, output hooks, tool
calls). Nothing else assembles a turn,
so the same messages and settings give the same prompt and stops from every caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from loaders.base import Capability, ImageData, ImagePrompt, LoadedModel
from loaders.batching import Adapter
from modules.chat.attachment_fit import build_with_attachments
from modules.chat.attachments import render_messages
from modules.chat.images import has_images, image_counter, images_in_prompt, take_images
from modules.chat.model_prompt import build_model_prompt
from modules.chat.prompt import PromptResult
from modules.chat.reasoning import prompt_opens_thinking, split_reasoning
from modules.chat.tool_calls import parse_tool_calls
from modules.chat.tool_prompt import constraint_schema
from modules.errors import ImagesUnsupported, InvalidInput
from modules.generation_params import GenerationParams
from modules.request_hooks import RequestHooks
from modules.settings import ChatSettings
from modules.training.formatting import alpaca_chat_segments, alpaca_prompt

#: How the conversation becomes text: the chat template (of the settings or the model), or the Alpaca layout
#: training writes (modules.training.formatting), for models and LoRAs trained on it.
PromptFormat = Literal["chat_template", "alpaca"]

#: Where a reply in the Alpaca layout ends when the model writes no end-of-sequence token: the next block.
ALPACA_STOP_STRINGS = ("\n### ", "### Instruction:")


@dataclass
class ChatRequest:
    """What to answer and how. `messages` are OpenAI-style dicts (role, content, tool_calls, tool_call_id),
    oldest first, ending with the message to answer (or the reply to continue); a content list holds text parts
    and image_url parts with data URLs (modules.chat.images, for a vision model); in the Alpaca layout a user
    message may carry `input`, the record's "### Input:" block. A message may carry `attachments`: files read into
    text (modules.chat.attachments), written into its text here; a file too large for the context is refused."""

    messages: list[dict[str, Any]]
    chat: ChatSettings
    params: GenerationParams
    #: OpenAI function tools the reply may call, and OpenAI's tool_choice ("auto", "none", "required" or
    #: {"type": "function", "function": {"name": ...}}: a call is forced by a JSON schema).
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    continue_last: bool = False
    impersonate: bool = False
    impersonate_prefix: str = ""
    #: The resident model (None: the default one) whose template and tokenizer build the prompt, and the LoRAs
    #: the reply runs with (None: the model's own).
    model: str | None = None
    adapters: tuple[Adapter, ...] | None = None
    #: A Jinja chat template given inline (the API's instruction_template_str), over the chat settings' choice.
    template: str | None = None
    prompt_format: PromptFormat = "chat_template"
    #: drop_oldest: leave out the oldest turns to fit the context (the Chat tab); refuse: a conversation too long
    #: is a ContextLengthExceeded (the API, as OpenAI does).
    fit: Literal["drop_oldest", "refuse"] = "drop_oldest"
    #: The last user message is new: extensions' chat_input/input hooks apply to it here. The Chat tab applies
    #: them itself when it saves the message (the chat keeps what the model read and what it shows).
    new_user_message: bool = False
    #: Who asks ("ui", "api", "cli"), for the extensions' state.
    source: str = "ui"
    #: Variables for the chat template's render (the API's chat_template_kwargs, reasoning_effort...), over the
    #: ones the chat settings imply (enable_thinking, reasoning_effort; see template_variables()).
    template_variables: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedChat:
    """What a turn generates from. `params.stop` holds the caller's stops, the template's (or the Alpaca
    layout's) and chat.custom_stopping_strings; `warnings` are for the person (a default template, turns left
    out, a message cut to fit)."""

    prompt: str
    params: GenerationParams
    add_bos: bool | None  # False: the template wrote the BOS token itself
    hooks: RequestHooks
    warnings: list[str]
    context: int  # the context length in force (the model's, or chat.truncation_length when shorter)
    prompt_tokens: int | None  # when counted (fit="drop_oldest", or an extension's prompt)
    dropped_messages: int
    tool_names: set[str] | None  # the functions the reply may call (None: no tools)
    forced_tool: bool  # tool_choice forces a call
    model: str | None
    adapters: tuple[Adapter, ...] | None
    #: Whether the reply's thinking is read apart from its answer (not for an impersonation: that is the user's
    #: text), and the tags the prompt already opened it with (the reply starts inside the thinking).
    parse_reasoning: bool = True
    thinking_opened: tuple[str, str] | None = None
    #: The images the prompt reads, one per image marker in it, in order (a vision model's; empty: none).
    images: tuple[ImageData, ...] = ()

    @property
    def model_prompt(self) -> str | ImagePrompt:
        """What the ModelManager generates from: the prompt text, with its images when it has some."""
        return ImagePrompt(self.prompt, self.images) if self.images else self.prompt

    @property
    def state(self) -> dict[str, Any]:
        """The extensions' state for this request (after state_modifier)."""
        return self.hooks.state

    def generate(self, manager: Any, *, params: GenerationParams | None = None, **options: Any) -> Any:
        """The ModelManager's Generation for this prompt (`params` replace the prepared ones, e.g. another seed;
        `options` are generate()'s others: client, keep_alive, cut_to_fit)."""
        return manager.generate(self.model_prompt, params or self.params, add_bos=self.add_bos, model=self.model,
                                adapters=self.adapters, **options)


@dataclass
class ChatReply:
    text: str  # as generated
    shown: str  # the answer (without its thinking) after the extensions' output hooks
    content: str | None  # `shown` before the first tool call (None when the reply is calls alone)
    tool_calls: list[dict[str, Any]]  # OpenAI's form: {"id", "type": "function", "function": {name, arguments}}
    reasoning: str | None = None  # the thinking the reply opened with (modules.chat.reasoning), None: none
    answer: str | None = None  # the answer as generated (`text` without the thinking)

    def message(self, *, calls: bool = True) -> dict[str, Any]:
        """The reply as a conversation keeps it (OpenAI's form): its tool calls and the text before them (unless
        `calls` is False: a reply cut short keeps its text), else its answer; its thinking apart, as
        reasoning_content, which a chat template renders back only when it reads that field."""
        if calls and self.tool_calls:
            return {"role": "assistant", "content": self.content or "", "tool_calls": self.tool_calls,
                    "reasoning_content": self.reasoning}
        return {"role": "assistant", "content": self.answer if self.answer is not None else self.text,
                "reasoning_content": self.reasoning}


def template_variables(chat: ChatSettings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the chat template's render gets besides the messages: enable_thinking and reasoning_effort when the
    chat settings set them (their "default" leaves the template's own), then `extra` (a request's own)."""
    variables: dict[str, Any] = {}
    if chat.enable_thinking != "default":
        variables["enable_thinking"] = chat.enable_thinking == "on"
    if chat.reasoning_effort != "default":
        variables["reasoning_effort"] = chat.reasoning_effort
    return {**variables, **(extra or {})}


def prepare_chat(services: Any, request: ChatRequest, *, hooks: RequestHooks | None = None) -> PreparedChat:
    """The prompt and parameters for `request` on its model. `hooks` made earlier by the caller (the Chat tab needs
    their parameters and input hooks before it saves the user's message) are used as they are; else they are
    made here (state_modifier runs once either way)."""
    model = services.manager.require_model(request.model)
    marker = model.image_marker if Capability.VISION in model.capabilities else None
    if marker is None and has_images(request.messages):
        raise ImagesUnsupported(model.name)
    request_messages, images = take_images(request.messages, marker)
    hooks = hooks or RequestHooks(services, request.params, request.chat, source=request.source)
    params = hooks.params
    tools = request.tools if request.tool_choice != "none" else []
    if request.tool_choice == "required" and not tools:
        raise InvalidInput("tool_choice is 'required' but no tools were given.", field="tool_choice")
    schema = constraint_schema(tools, request.tool_choice)
    if schema is not None:
        params = params.model_copy(update={"json_schema": schema, "grammar_string": ""})
    messages = hooks.last_user_message(request_messages) if request.new_user_message else request_messages
    messages = hooks.history(messages)
    attached, messages = messages, render_messages(messages)  # files written into their messages' text
    context = min(model.context_length, request.chat.truncation_length or model.context_length)
    # the prompt's count, for fitting it and for the person: each image as the tokens it takes on this model
    count = image_counter(model, marker, images) if marker and images else model.token_count
    custom = None
    if request.prompt_format == "chat_template" and not (request.continue_last or request.impersonate):
        custom = hooks.custom_prompt(messages)
    warnings: list[str] = []
    if custom is not None:  # an extension built the whole prompt
        counted = count(custom) if Capability.TOKENIZE in model.capabilities else None
        result = PromptResult(custom, messages, prompt_tokens=counted)
    elif request.prompt_format == "alpaca":
        result = PromptResult(_alpaca_text(model, request, messages), messages,
                              stop_strings=list(ALPACA_STOP_STRINGS))
    else:
        def build(conversation: list[dict[str, Any]], cut_last: bool) -> Any:
            return build_model_prompt(
                model, request.chat, conversation, max_new_tokens=params.max_new_tokens,
                template_dir=services.settings.template_dir, characters_dir=services.settings.character_dir,
                template_override=request.template, tools=tools or None, continue_last=request.continue_last,
                impersonate=request.impersonate, impersonate_prefix=request.impersonate_prefix,
                drop_old_messages=request.fit == "drop_oldest", truncate_last_message=cut_last,
                template_variables=template_variables(request.chat, request.template_variables),
                count_tokens=count)

        built = build_with_attachments(model, attached, build, context=context, max_new_tokens=params.max_new_tokens,
                                       refuse=request.fit == "refuse", count_tokens=count)
        result, warnings, context = built.result, built.warnings, built.context
    stops = list(dict.fromkeys([*params.stop, *result.stop_strings, *request.chat.custom_stopping_strings]))
    names = {t["function"]["name"] for t in tools} if tools else None
    return PreparedChat(prompt=result.prompt, params=params.model_copy(update={"stop": stops}),
                        add_bos=False if result.starts_with_bos else None, hooks=hooks, warnings=warnings,
                        context=context, prompt_tokens=result.prompt_tokens, dropped_messages=result.dropped_messages,
                        tool_names=names, forced_tool=bool(tools) and request.tool_choice not in (None, "auto"),
                        model=request.model, adapters=request.adapters, parse_reasoning=not request.impersonate,
                        thinking_opened=None if request.continue_last else prompt_opens_thinking(result.prompt),
                        images=images_in_prompt(result.prompt, marker, images) if marker else ())


def finish_reply(prepared: PreparedChat, text: str, tokens: list[Any] | None = None) -> ChatReply:
    """The reply a generation of `prepared` wrote: its thinking apart from its answer (modules.chat.reasoning),
    the extensions' output hooks on the answer, then the tool calls read out of it (in the formats
    modules.chat.tool_calls knows), when the request offered tools."""
    split = split_reasoning(text, prepared.thinking_opened) if prepared.parse_reasoning else None
    answer = split.content if split is not None else text
    reasoning = split.reasoning or None if split is not None else None
    shown = prepared.hooks.output(answer, tokens or [])
    if not prepared.tool_names:
        return ChatReply(text, shown, shown, [], reasoning, answer)
    content, calls = parse_tool_calls(shown, prepared.tool_names)
    return ChatReply(text, shown, (content or None) if calls else shown, calls, reasoning, answer)


def _alpaca_text(model: LoadedModel, request: ChatRequest, messages: list[dict[str, Any]]) -> str:
    """The conversation in the Alpaca layout, written by training's own formatter: one instruction (with its
    input) as training formats an instruction record, a longer conversation as it formats a chat record."""
    if request.continue_last or request.impersonate or request.tools:
        raise InvalidInput("The Alpaca layout answers an instruction: it cannot continue, impersonate or call tools.")
    system = next((m["content"] for m in messages if m["role"] == "system"), None) or None
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise InvalidInput("The Alpaca layout needs the conversation to end with an instruction (a user message).",
                           field="messages")
    if len(turns) == 1:
        return alpaca_prompt(turns[0]["content"], turns[0].get("input") or "", system)
    return "".join(segment.text for segment in alpaca_chat_segments(messages, model.eos_token or ""))
