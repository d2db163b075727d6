"""One chat turn for the Chat tab: the page's open chat -> modules.chat.request (the one chat path every caller
takes) -> ModelManager -> the chat on disk.

This module only does the page's part: it picks the chat's model (modules.ui.model_choice: the one the page picked,
loaded first when the page may load it), adds and saves the user's message, maps the turn onto a ChatRequest,
streams the reply into the open chat and saves it, recording on the messages which model (and LoRAs) wrote them.
Nothing here imports Gradio, so the same turns can be driven from a test or another front end.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from loaders.batching import Adapter
from modules.chat.attachments import Attachment
from modules.chat.history import ChatHistory, ChatMessage
from modules.chat.image_store import PendingImage, with_images
from modules.chat.model_prompt import chat_character
from modules.chat.reasoning import ReasoningSplitter
from modules.chat.request import ChatRequest, finish_reply, prepare_chat
from modules.errors import ConfigError
from modules.generation_params import GenerationParams
from modules.request_hooks import RequestHooks, with_visible
from modules.services import Services
from modules.settings import ChatSettings
from modules.ui.access import may_administer
from modules.ui.chat_display import THINKING_KEY, chatbot_messages
from modules.ui.model_choice import ModelChoice, find_resident, page_client
from modules.ui.session_state import UiSession
from modules.ui.streaming import stream_batches
from modules.ui.tool_messages import ToolPick, turn_holds_calls

Action = Literal["send", "regenerate", "continue", "impersonate"]


@dataclass
class TurnUpdate:
    """What the page shows while a turn streams: the chat, the text of an impersonation, a status line. A
    `loading` update comes before the turn starts, while the chat's model loads."""

    messages: list[dict[str, Any]]
    impersonation: str | None = None
    status: str = ""
    warnings: list[str] = field(default_factory=list)
    done: bool = False
    loading: bool = False
    #: A tool call waiting for the user's Approve or Deny, described (modules.ui.tool_turns); None: none waits.
    approval: str | None = None


def greeting_messages(services: Services, chat: ChatSettings) -> list[ChatMessage]:
    """The first message of a new chat: the character's greeting in chat modes, nothing in instruct mode."""
    if chat.mode == "instruct":
        return []
    character = chat_character(chat, services.settings.character_dir)
    greeting = character.greeting_message(chat.user_name) if character else None
    return [ChatMessage(**greeting)] if greeting else []


def shown_messages(services: Services, session: UiSession, chat: ChatSettings) -> list[ChatMessage]:
    if session.history is None:
        return greeting_messages(services, chat)
    return list(session.history.messages)


def turn_request(chat: ChatSettings, params: GenerationParams, messages: list[dict[str, Any]], action: Action,
                 text: str = "", *, model: str | None = None,
                 adapters: tuple[Adapter, ...] | None = None) -> ChatRequest:
    """The ChatRequest of a turn on `messages` (the chat as the model reads it: for "send" with the user's message,
    already through the input hooks, at the end; for "regenerate" with or without the reply to replace)."""
    if action == "regenerate" and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return ChatRequest(messages=messages, chat=chat, params=params, continue_last=action == "continue",
                       impersonate=action == "impersonate", impersonate_prefix=text if action == "impersonate" else "",
                       model=model, adapters=adapters, source="ui")


def run_turn(services: Services, session: UiSession, chat: ChatSettings, params: GenerationParams,
             action: Action, text: str = "", choice: ModelChoice | None = None,
             tools: ToolPick | None = None, attachments: list[Attachment] | None = None,
             images: list[PendingImage] | None = None) -> Iterator[TurnUpdate]:
    """Stream one turn, answered by the model `choice` names (loaded first when it is not resident and the page
    may load models; else refused, before anything is saved). The chat is saved when the user's message is added
    and again when the reply ends (also when it is stopped: a cut reply is kept); both record the model and LoRAs.
    Extensions' hooks apply (modules.extensions). With `tools` (the page's pick, recorded on the turn's messages)
    Send, Regenerate and Continue run through the tool loop (modules.ui.tool_turns): the model's calls run, the
    replies keep their thinking; Impersonate writes the user's text and offers no tools. `attachments` go with a
    message sent (kept on it; files too large for the context are refused before it is saved), and so do `images`
    (stored in the chats' images folder and read by the model before the text; a model that reads no images
    refuses them before anything is saved).

    Another page may have the same chat open: each save merges what it added meanwhile, or raises
    ChatChangedError. Until a save succeeds `session.history` keeps the chat as it was, so a refused message is
    nowhere but in the caller's input box (which it clears only once the turn starts), and a refused reply is
    kept as a new chat named in the error (a reply has no box to wait in, and writing it again takes time)."""
    if session.busy:
        raise ConfigError("A reply is still being written on this page: wait for it or press Stop.")
    manager, choice = services.manager, choice or ModelChoice()
    resident = find_resident(manager, choice.model, may_load=may_administer(services.settings, session.user))
    adapters = choice.adapters(manager)  # a LoRA that is gone is refused before a model loads for it
    if resident is None:
        yield TurnUpdate(_show(session.history, chat, services, session), status=f"Loading {choice.model}…",
                         loading=True)
        resident = manager.ensure(str(choice.model))
    name = resident.name
    stamp = choice.stamp(name) if tools is None else {**choice.stamp(name), **tools.stamp()}
    hooks = RequestHooks(services, params, chat, source="ui")
    manager.check_constraint(hooks.params, model=name)  # a refused grammar must not leave the message unanswered
    folder = session.store.images(session.character)
    if (attachments or images) and action == "send":
        # files that do not fit the context, and images for a model that reads none, are refused before anything
        # is kept
        before = [m.model_dump(include={"role", "content"}) for m in greeting_messages(services, chat)] \
            if session.history is None else session.history.prompt_messages(folder)
        content = with_images(text, [image.part() for image in images or []])
        prepare_chat(services, turn_request(chat, params, [*before, {"role": "user", "content": content,
                                                                     "attachments": attachments or []}],
                                            "send", model=name, adapters=adapters), hooks=hooks)
    # Send, Regenerate and Continue run the tool loop when tools are picked (modules.ui.tool_turns); Impersonate
    # never does: the model writes the user's next message into the box, and a user's message calls no tools.
    # Regenerate of a turn with calls takes the loop's way with none picked too: the turn is replaced by a plain
    # reply, as a turn with calls is when tools are picked (not given the new text as an alternative)
    replaces_calls = action == "regenerate" and session.history is not None \
        and turn_holds_calls(session.history.messages)
    with_tools = action != "impersonate" and ((tools is not None and bool(tools.names)) or replaces_calls)
    history = _prepare(services, session, chat, action, text, hooks, stamp, attachments or [], images or [],
                       with_tools=with_tools)
    prompt_messages = history.prompt_messages(folder) if history is not None else [
        m.model_dump(include={"role", "content"}) for m in greeting_messages(services, chat)]
    if with_tools:
        from modules.ui.tool_turns import run_tool_turn  # it builds on this module
        yield from run_tool_turn(services, session, chat, params, history, hooks, tools or ToolPick(), action,
                                 choice=choice, model=name, adapters=adapters, stamp=stamp)
        return
    impersonate = action == "impersonate"
    base = prompt_messages[-1]["content"] if action == "continue" else text if impersonate else ""
    prepared = prepare_chat(services, turn_request(chat, params, prompt_messages, action, text, model=name,
                                                   adapters=adapters), hooks=hooks)
    generation = prepared.generate(manager, client=page_client(session))
    warnings = prepared.warnings + generation.warnings
    added = history is not None and action in ("send", "regenerate") and history.messages[-1].role != "assistant"
    if added:
        history.messages.append(ChatMessage(role="assistant", content=""))

    def head(tokens: int | None) -> str:
        line = (f"Model: {choice.describe(name)} · Prompt: {tokens if tokens is not None else '?'} of "
                f"{prepared.context} tokens")
        if prepared.dropped_messages:
            line += f" ({prepared.dropped_messages} oldest messages left out to fit)"
        return line

    status_head = head(prepared.prompt_tokens)
    session.generation = generation
    set_reply = reply_setter(history, action, stamp)
    # the reply's thinking streams apart from its answer (modules.chat.reasoning), as finish_reply reads it
    split = ReasoningSplitter(prepared.thinking_opened) if prepared.parse_reasoning else None
    if split is not None:
        split.feed(base)
    reply, tokens, failed = "", [], True
    try:
        for batch in stream_batches(generation):  # the first one shows the user's message (and the first words)
            for chunk in batch:
                reply += chunk.text
                tokens.extend(chunk.tokens)
                if split is not None:
                    split.feed(chunk.text)
            if not impersonate:
                if split is None:
                    set_reply(base + reply, None)
                else:
                    set_reply(split.content, None, split.reasoning, thinking=split.thinking)
            yield TurnUpdate(_show(history, chat, services, session),
                             impersonation=base + reply if impersonate else None,
                             status=status_head + " · writing…", warnings=warnings)
            warnings = []
        failed = False
    finally:
        generation.cancel()  # no-op once it ended; stops it when the page went away mid-reply
        session.generation = None
        if history is not None and not impersonate:
            if failed and added and not reply:  # it failed (or the page left) before a word: no empty reply kept
                history.messages.pop()
            else:
                finished = finish_reply(prepared, base + reply, tokens)
                set_reply(finished.answer if finished.answer is not None else base + reply, finished.shown,
                          finished.reasoning)
            session.history = session.store.save(history, keep_copy_on_conflict=True)
    stats = generation.stats
    ending = {"cancelled": " · stopped", "length": " · hit max_new_tokens", "error": " · failed"}.get(
        stats.finish_reason, "")
    status = (f"{status_head} · reply: {stats.completion_tokens} tokens in {stats.seconds:.1f} s "
              f"({stats.tokens_per_second:.1f} tokens/s){ending}")
    yield TurnUpdate(_show(session.history, chat, services, session),
                     impersonation=base + reply if impersonate else None, status=status, done=True)


def _prepare(services: Services, session: UiSession, chat: ChatSettings, action: Action, text: str,
             hooks: RequestHooks, stamp: dict[str, Any], attachments: list[Attachment],
             images: list[PendingImage], *, with_tools: bool = False) -> ChatHistory | None:
    """The chat the reply goes into (a copy of the page's open chat), after adding and saving the user's message
    (send, with its `attachments` and `images`, the images stored first; its metadata records `stamp`, the model
    it was sent to) or checking there is something to regenerate or continue (`with_tools`: a chat ending with
    tool results can be continued, the model answering them)."""
    history = session.history.model_copy(deep=True) if session.history is not None else None
    messages = history.messages if history is not None else greeting_messages(services, chat)
    if action == "send":
        if not text.strip() and not attachments and not images:
            raise ConfigError("Type a message first.")
        model_text, visible = hooks.user_text(text)
        folder = session.store.images(session.character)
        user = ChatMessage(role="user", content=model_text, metadata=with_visible(stamp, model_text, visible),
                           attachments=attachments, images=[folder.save(image) for image in images])
        if history is None:
            history = session.store.new(session.character, [*messages, user], mode=chat.mode)
        else:
            history.messages.append(user)
            history = session.store.save(history)
        session.history = history.model_copy(deep=True)  # the reply streams into `history` alone
    elif action == "regenerate":
        if history is None or not any(m.role == "user" for m in messages):
            raise ConfigError("There is no message to regenerate a reply for.")
    elif action == "continue":
        last = messages[-1].role if history is not None and messages else None
        if last == "tool" and not with_tools:
            raise ConfigError("The chat ends with a tool's result: pick tools (the Tools panel) and Continue to "
                              "have the model answer it.")
        if last not in ("assistant", "tool"):
            raise ConfigError("There is no reply at the end of the chat to continue.")
    return history


def reply_setter(history: ChatHistory | None, action: Action, stamp: dict[str, Any]):
    """A function `set_reply(text, visible, reasoning=None, thinking=False)` that shows `text` (and the
    thinking `reasoning`) as the last reply: `visible` None while it streams (`thinking`: the model is still
    thinking), and the text to show (after extensions' output_modifier) when it ends, when the reply's metadata
    records `stamp` (the model that wrote it). A regenerated reply streams over a preview of the last message
    and, when it ends, becomes a new alternative ("swipe") of it, with its own thinking. A continued reply keeps
    its thinking."""
    if history is None:
        return lambda text, visible, reasoning=None, thinking=False: None
    index = len(history.messages) - 1
    original = history.messages[index]

    def set_reply(text: str, visible: str | None, reasoning: str | None = None, thinking: bool = False) -> None:
        if action == "continue" and reasoning is None:
            reasoning = original.reasoning_content
        if visible is None:  # streaming: a preview, stored nowhere
            history.messages[index] = ChatMessage.model_construct(**{
                **dict(original), "content": text, "reasoning_content": reasoning,
                "metadata": {THINKING_KEY: "pending"} if thinking else {}})
            return
        history.messages[index] = original
        if action != "regenerate" or not original.content:
            history.edit_message(index, text)
            history.edit_reasoning(index, reasoning)
        elif (text or reasoning) and (text, reasoning) != (original.content, original.reasoning_content):
            history.add_swipe(index, text, reasoning)
        else:
            return
        message = history.messages[index]
        history.messages[index] = message.model_copy(
            update={"metadata": {**with_visible(message.metadata, text, visible), **stamp}})

    return set_reply


def _show(history: ChatHistory | None, chat: ChatSettings, services: Services,
          session: UiSession) -> list[dict[str, Any]]:
    messages = history.messages if history is not None else greeting_messages(services, chat)
    # modules.ui.chat_display: thinking, tool calls and results, files and images as blocks
    return chatbot_messages(messages, session.store.images(session.character))
