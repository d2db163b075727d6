"""Chat tab: a streaming chatbot over modules/chat, with the chat actions, the chat's model and LoRAs, the chat
settings, past chats and characters (the last two in their own files). Turns run through modules.ui.chat_runner.

The model picker holds the page's choice; opening a chat shows the model (and LoRAs) its last turn ran with."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.chat.history import ChatMessage
from modules.errors import ChatChangedError, ConfigError
from modules.settings import ChatSettings
from modules.ui.character_panel import build_character_panel
from modules.ui.chat_attachments import AttachmentsPanel, build_attach_button, build_attachments_panel, wire_attachments
from modules.ui.chat_display import LATEX_DELIMITERS, owner_of
from modules.ui.chat_histories_panel import build_chat_histories_panel
from modules.ui.chat_images import ImagesPanel, build_image_button, build_images_panel, wire_images
from modules.ui.chat_message_controls import build_message_controls, wire_message_controls
from modules.ui.chat_runner import Action, run_turn, shown_messages
from modules.ui.chat_tools import ToolsPanel, build_tool_approval, build_tools_panel, wire_chat_pick
from modules.ui.chat_view import ChatView, refused, show
from modules.ui.common import UiContext, session_of, stream_locked, user_errors, warn
from modules.ui.model_choice import ModelChoice
from modules.ui.model_picker import ModelPicker, build_model_picker, picker_updates, refreshed
from modules.ui.session_state import UiSession


def build_chat_tab(ctx: UiContext) -> ChatView:
    with gr.Row():
        with gr.Column(scale=5):
            # editable="all": the pencil on every message (modules.ui.chat_message_controls saves the edit)
            chatbot = gr.Chatbot(elem_id="chatbot", height=560, buttons=["copy"], label="Chat",
                                 feedback_options=None, placeholder="Send a message to start.", editable="all",
                                 latex_delimiters=LATEX_DELIMITERS)
            message_controls = build_message_controls()  # ‹ n/m ›, Regenerate from here
            with gr.Row(equal_height=True):
                status = gr.Markdown(elem_id="chat-status")
                reload = gr.Button("Reload chat", size="sm", scale=0, min_width=120, visible=False,
                                   elem_id="chat-reload")
            approval = build_tool_approval()  # Approve / Deny, while a tool call waits for them
            with gr.Row(equal_height=True):
                # One line that grows to 12: Gradio's textbox sends on Enter (its submit event) only when
                # lines == 1; a taller box would send on Shift+Enter instead. Shift+Enter breaks the line.
                message = gr.Textbox(show_label=False, placeholder="Send a message (Enter; Shift+Enter: new line)",
                                     lines=1, max_lines=12, scale=8, elem_id="chat-input")
                with gr.Column(scale=1, min_width=110):
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                    attach = build_attach_button()
                    image = build_image_button()
            files = build_attachments_panel(attach)  # the files going with the next message
            images = build_images_panel(image)  # the images going with the next message
            with gr.Row():
                regenerate = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
                continue_ = gr.Button("Continue", size="sm", elem_id="chat-continue")
                impersonate = gr.Button("Impersonate", size="sm", elem_id="chat-impersonate")
                remove_last = gr.Button("Remove last", size="sm", elem_id="chat-remove-last")
                replace_last = gr.Button("Replace last reply", size="sm", elem_id="chat-replace-last")
            with gr.Row():
                copy_last = gr.Button("Copy last reply", size="sm", elem_id="chat-copy-last")
                dummy_message = gr.Button("Send dummy message", size="sm", elem_id="chat-dummy-message")
                dummy_reply = gr.Button("Send dummy reply", size="sm", elem_id="chat-dummy-reply")
                new_chat = gr.Button("Start new chat", size="sm", elem_id="chat-new")
                branch = gr.Button("Branch here", size="sm", elem_id="chat-branch")
        with gr.Column(scale=2, min_width=280):
            picker = build_model_picker(ctx, "chat", what="this chat")
            tools = build_tools_panel(ctx, approval)
            ctx.chat.render(["mode", "character", "enable_thinking"])
            with gr.Accordion("You and the instructions", open=False):
                ctx.chat.render(["user_name", "user_bio", "system_message", "chat_instruct_command",
                                 "reasoning_effort"])
            chats = build_chat_histories_panel(ctx, chatbot)
            view = ChatView(chatbot, chats, status, message, reload)
            build_character_panel(ctx, view)
    turns = _wire_turns(ctx, view, picker, tools, files, images, send, regenerate, continue_, impersonate, stop)
    wire_attachments(ctx, files, status, picker.read, picker.inputs)
    wire_images(ctx, images, status, picker.read, picker.inputs)
    wire_message_controls(ctx, view, message_controls, *turns)
    wire_chat_pick(ctx, tools, chats)
    _wire_edits(ctx, view, remove_last, replace_last, copy_last, dummy_message, dummy_reply, new_chat, branch)
    _wire_reload(ctx, view)
    ctx.session_listeners.append((lambda data: _on_start(ctx, data), {ctx.session, *ctx.chat.inputs},
                                  [chatbot, chats, status, *picker.inputs]))
    # Whatever opened another chat (past chats, a character, a new chat, a delete) changed the chats list's value.
    chats.change(user_errors(lambda session, chat_id: _chat_choice(ctx, session, chat_id)), [ctx.session, chats],
                 picker.inputs, show_progress="hidden")
    return view


def _on_start(ctx: UiContext, data: dict[Any, Any]) -> tuple[Any, ...]:
    """Open the latest chat of a new page, show its model, and say what is loaded (also the page's "ready"
    sign)."""
    session = data[ctx.session]
    warn(session.open_latest())
    messages, chats = show(ctx, session, ctx.read_chat(data))
    info = ctx.services.manager.info()
    notes = [f"Ready: {info.name} ({info.loader})"] if info else []
    notes += ctx.services.startup_messages
    recorded = ModelChoice.of_chat(session.history.messages) if session.history is not None else None
    return (messages, chats, " · ".join(notes) or "No model loaded: load one in the Model tab.",
            *picker_updates(ctx, session, recorded))


def _chat_choice(ctx: UiContext, session: UiSession | None, chat_id: str | None) -> list[Any]:
    """The pickers once the chats list names another chat: the model and LoRAs its last turn ran with; a chat
    that records none (new, or older than the picker) keeps the page's choice. The chat is read from the list's
    value, not from the session: a pick in the list reaches this handler and the one that opens the chat at
    once."""
    if session is None or not chat_id:
        return [gr.skip(), gr.skip(), gr.skip()]
    history = session.history
    if history is None or history.id != chat_id:
        try:
            history = session.store.load(session.character, chat_id)
        except (ConfigError, OSError):  # gone or damaged: the panel that opened it says so
            return [gr.skip(), gr.skip(), gr.skip()]
    recorded = ModelChoice.of_chat(history.messages)
    if recorded is None:
        return [gr.skip(), gr.skip(), gr.skip()]
    return picker_updates(ctx, session, recorded)


def _wire_turns(ctx: UiContext, view: ChatView, picker: ModelPicker, tools: ToolsPanel, files: AttachmentsPanel,
                images: ImagesPanel, send: gr.Button, regenerate: gr.Button, continue_: gr.Button,
                impersonate: gr.Button, stop: gr.Button) -> tuple[Any, Any, list[Any], list[gr.Button]]:
    """Wire the turn buttons; returns (the turn handler factory, its inputs, its outputs, the buttons it locks)
    for other controls that start a turn."""
    inputs = {*ctx.generation_inputs, view.message, *picker.inputs, *tools.inputs, *files.inputs, *images.inputs}
    outputs = [view.chatbot, view.message, view.status, view.chats, view.reload, picker.model, *tools.turn_outputs,
               *files.turn_outputs, *images.turn_outputs]

    def turn(action: Action):
        @user_errors
        def handler(data: dict[Any, Any]) -> Iterator[tuple[Any, ...]]:
            session = session_of(data[ctx.session])
            chat, params = ctx.read_chat(data), ctx.read_params(data)
            text = data[view.message]
            first, started = True, False  # the box is cleared once the turn starts (after a load of its model)
            try:
                for update in run_turn(ctx.services, session, chat, params, action, text, picker.read(data),
                                       tools.read(data), files.read(data) if action == "send" else None,
                                       images.read(data) if action == "send" else None):
                    warn(update.warnings)
                    if update.impersonation is not None:
                        box = update.impersonation
                    else:
                        box = "" if not started and not update.loading and action == "send" else gr.skip()
                    started = started or not update.loading
                    chats = show(ctx, session, chat)[1] if update.done else gr.skip()
                    reload = gr.update(visible=False) if first else gr.skip()
                    models = refreshed(ctx, session, data[picker.model]) if update.done else gr.skip()
                    first = False
                    sent = action == "send" and isinstance(box, str) and not box  # its files went with it
                    yield (update.messages, box, update.status, chats, reload, models, *tools.turn_values(update),
                           *files.turn_values(sent), *images.turn_values(sent))
            except ChatChangedError as exc:  # the typed message stays in the box; a reply was kept as a copy
                yield (gr.skip(), gr.skip(), *refused(ctx, session, chat, exc), gr.skip(), *tools.turn_values(None),
                       *files.turn_values(False), *images.turn_values(False))
        handler.__name__ = f"chat_{action}"
        return handler

    lock = [send, regenerate, continue_, impersonate]
    for button, action in zip(lock, ("send", "regenerate", "continue", "impersonate")):
        stream_locked(button.click, turn(action), inputs, outputs, lock)
    stream_locked(view.message.submit, turn("send"), inputs, outputs, lock)
    stop.click(lambda session: session.stop() if session else None, ctx.session, None, queue=False)
    return turn, inputs, outputs, lock


def _wire_edits(ctx: UiContext, view: ChatView, remove_last: gr.Button, replace_last: gr.Button,
                copy_last: gr.Button, dummy_message: gr.Button, dummy_reply: gr.Button, new_chat: gr.Button,
                branch: gr.Button) -> None:
    inputs = {ctx.session, view.message, *ctx.chat.inputs}
    store_outputs = [view.chatbot, view.chats, view.message, view.status, view.reload]

    def edit(change):
        @user_errors
        def handler(data: dict[Any, Any]) -> tuple[Any, Any, Any, Any, Any]:
            session = session_of(data[ctx.session])
            if session.busy:
                raise ConfigError("A reply is still being written: wait for it or press Stop.")
            chat = ctx.read_chat(data)
            before = session.history.model_copy(deep=True) if session.history is not None else None
            try:
                box = change(session, chat, data[view.message])
                if session.history is not None:
                    session.history = session.store.save(session.history)
            except ChatChangedError as exc:  # the page keeps its chat as it was; typed text stays in the box
                session.history = before
                status, chats, reload = refused(ctx, session, chat, exc)
                return gr.skip(), chats, gr.skip(), status, reload
            messages, chats = show(ctx, session, chat)
            return messages, chats, box, gr.skip(), gr.skip()
        handler.__name__ = change.__name__
        return handler

    def remove(session: UiSession, chat: ChatSettings, text: str) -> Any:
        """Remove the last exchange (back to and including the last user message); its text returns to the box."""
        history = _history(session)
        while history.messages:
            message = history.messages.pop()
            if message.role == "user":
                return message.content
        return gr.skip()

    def replace(session: UiSession, chat: ChatSettings, text: str) -> Any:
        history = _history(session)
        if not history.messages or history.messages[-1].role != "assistant":
            raise ConfigError("The chat does not end with a reply to replace.")
        if not text.strip():
            raise ConfigError("Type the new reply in the message box first.")
        history.edit_message(len(history.messages) - 1, text)
        return ""

    def copy(session: UiSession, chat: ChatSettings, text: str) -> Any:
        replies = [m for m in shown_messages(ctx.services, session, chat) if m.role == "assistant"]
        if not replies:
            raise ConfigError("There is no reply to copy yet.")
        return replies[-1].content

    def dummy(role: str):
        def add(session: UiSession, chat: ChatSettings, text: str) -> Any:
            if not text.strip():
                raise ConfigError("Type the message to add in the message box first.")
            if session.history is None:
                session.history = session.store.new(
                    session.character, [*shown_messages(ctx.services, session, chat),
                                        ChatMessage(role=role, content=text)], mode=chat.mode)
            else:
                session.history.messages.append(ChatMessage(role=role, content=text))
            return ""
        add.__name__ = f"dummy_{role}"
        return add

    def start_new(session: UiSession, chat: ChatSettings, text: str) -> Any:
        session.history, session.selected = None, None
        return gr.skip()

    def branch_here(session: UiSession, chat: ChatSettings, text: str) -> Any:
        history = _history(session)
        upto = session.selected if session.selected is not None else len(history.messages) - 1
        session.history = session.store.branch(session.character, history.id, upto)
        session.selected = None
        gr.Info(f"Branched at message {upto + 1}: you are now in the copy.")
        return gr.skip()

    for button, change in ((remove_last, remove), (replace_last, replace), (copy_last, copy),
                           (dummy_message, dummy("user")), (dummy_reply, dummy("assistant")),
                           (new_chat, start_new), (branch, branch_here)):
        button.click(edit(change), inputs, store_outputs)

    def pick(session: UiSession | None, event: gr.SelectData) -> None:
        if session is not None:
            index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            owner = owner_of(session.history.messages, int(index)) if session.history is not None else None
            session.selected = owner.index if owner is not None else None  # the stored message, not the entry

    view.chatbot.select(pick, ctx.session, None, queue=False)
    view.chatbot.clear(edit(start_new), inputs, store_outputs)  # the chatbot's bin icon starts a new chat
    ctx.chat.components["mode"].input(
        user_errors(lambda data: show(ctx, session_of(data[ctx.session]), ctx.read_chat(data))[0]),
        {ctx.session, *ctx.chat.inputs}, view.chatbot)


def _wire_reload(ctx: UiContext, view: ChatView) -> None:
    """The Reload chat button: show the open chat as it is on disk now (after another page changed it)."""

    @user_errors
    def reload_chat(data: dict[Any, Any]) -> tuple[Any, Any, str, Any]:
        session = session_of(data[ctx.session])
        if session.busy:
            raise ConfigError("A reply is still being written: wait for it or press Stop.")
        if session.history is not None:
            try:
                session.history = session.store.load(session.character, session.history.id)
            except ConfigError as exc:  # deleted (or damaged) in the meantime
                warn([str(exc)])
                warn(session.open_latest())
        session.selected = None
        messages, chats = show(ctx, session, ctx.read_chat(data))
        return messages, chats, "Reloaded: this is the chat as saved.", gr.update(visible=False)

    view.reload.click(reload_chat, {ctx.session, *ctx.chat.inputs},
                      [view.chatbot, view.chats, view.status, view.reload])


def _history(session: UiSession):
    if session.history is None or not session.history.messages:
        raise ConfigError("This chat has no messages yet.")
    return session.history
