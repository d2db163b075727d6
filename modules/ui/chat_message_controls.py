"""The Chat tab's controls on single messages: edit any message in place (the Chatbot's pencil, user and assistant
messages alike, and a reply's thinking), browse a reply's kept alternatives (‹ 2/3 ›), and regenerate from a
message picked in the chat.

Editing changes the message where it stands and drops nothing, as in text-generation-webui and LM Studio; the model
reads the edited text from the next turn on. "Regenerate from here" on a picked message writes a new reply after
it (on a reply: a new alternative of it); the messages after it are dropped from this chat, after the page asks
(it names how many; "Branch here" keeps a copy of the chat as it was). The alternatives browsed are the picked
reply's, or the last reply's; the one shown is the one saved and the one the model reads."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.chat.history import ChatHistory
from modules.errors import ConfigError
from modules.ui.chat_display import owner_of, swipe_position, swipe_target
from modules.ui.chat_view import ChatView, show
from modules.ui.common import UiContext, session_of, stream_locked, user_errors
from modules.ui.session_state import UiSession


@dataclass
class MessageControls:
    previous: gr.Button
    position: gr.Markdown
    next: gr.Button
    from_here: gr.Button
    question: gr.Markdown  # "Regenerating from message 3 drops the 2 messages after it."
    yes: gr.Button
    no: gr.Button

    @property
    def swipe_outputs(self) -> list[Any]:
        return [self.previous, self.position, self.next]


def build_message_controls() -> MessageControls:
    """The widgets, placed under the chat: ‹ n/m › for the alternatives, Regenerate from here and its question."""
    with gr.Row(equal_height=True):
        previous = gr.Button("‹", size="sm", scale=0, min_width=44, visible=False, elem_id="chat-swipe-previous")
        position = gr.Markdown(visible=False, elem_id="chat-swipe-position")
        following = gr.Button("›", size="sm", scale=0, min_width=44, visible=False, elem_id="chat-swipe-next")
        from_here = gr.Button("Regenerate from here", size="sm", scale=0, min_width=180,
                              elem_id="chat-regenerate-here")
    with gr.Row(equal_height=True):
        question = gr.Markdown(visible=False, elem_id="chat-regenerate-here-question")
        yes = gr.Button("Drop them and regenerate", variant="stop", size="sm", scale=0, min_width=200,
                        visible=False, elem_id="chat-regenerate-here-yes")
        no = gr.Button("Cancel", size="sm", scale=0, min_width=90, visible=False, elem_id="chat-regenerate-here-no")
    return MessageControls(previous, position, following, from_here, question, yes, no)


def swipe_updates(session: UiSession | None) -> list[Any]:
    """‹ n/m ›, shown for the browsed reply when it has more than one alternative."""
    messages = session.history.messages if session is not None and session.history is not None else []
    target = swipe_target(messages, session.selected if session is not None else None)
    shown, count = swipe_position(messages[target]) if target is not None else (1, 1)
    visible = count > 1
    return [gr.update(visible=visible, interactive=shown > 1),
            gr.update(visible=visible, value=f"Reply {shown}/{count}"),
            gr.update(visible=visible, interactive=shown < count)]


def wire_message_controls(ctx: UiContext, view: ChatView, controls: MessageControls,
                          turn: Callable[[str], Callable[..., Iterator[tuple[Any, ...]]]], turn_inputs: Any,
                          turn_outputs: list[Any], lock: list[gr.Button]) -> None:
    """Wire the controls; `turn(action)` is the Chat tab's turn handler (over `turn_inputs` and `turn_outputs`,
    with the `lock` buttons disabled while it streams)."""
    inputs = {ctx.session, *ctx.chat.inputs}

    def refreshed(session: UiSession, data: dict[Any, Any]) -> list[Any]:
        return [*show(ctx, session, ctx.read_chat(data)), *swipe_updates(session)]

    @user_errors
    def edited(data: dict[Any, Any], event: gr.EditData) -> list[Any]:
        session = session_of(data[ctx.session])
        history = _idle_history(session)
        index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        owner = owner_of(history.messages, int(index))
        if owner is None:
            raise ConfigError("That message is no longer in this chat: reload it.")
        message = history.messages[owner.index]
        text = event.value if isinstance(event.value, str) else str(event.value)
        before = history.model_copy(deep=True)
        if owner.part == "reasoning":
            history.edit_reasoning(owner.index, text.strip() or None)
        elif owner.part == "attachment":
            raise ConfigError("An attached file cannot be edited: edit the message's text, or send the file again.")
        elif owner.part == "image":
            raise ConfigError("An image cannot be edited: edit the message's text, or send the image again.")
        elif message.role == "tool" or message.tool_calls:
            raise ConfigError("A tool call or a tool's result cannot be edited.")
        else:
            history.edit_message(owner.index, text)
        try:
            session.history = session.store.save(history)
        except Exception:
            session.history = before
            raise
        return refreshed(session, data)

    view.chatbot.edit(edited, inputs, [view.chatbot, view.chats, *controls.swipe_outputs])

    def browse(step: int):
        @user_errors
        def handler(data: dict[Any, Any]) -> list[Any]:
            session = session_of(data[ctx.session])
            history = _idle_history(session)
            target = swipe_target(history.messages, session.selected)
            if target is None or not history.messages[target].swipes:
                raise ConfigError("This reply has no other alternatives: Regenerate makes one.")
            choice = history.messages[target].swipe_index + step
            if 0 <= choice < len(history.messages[target].swipes):
                history.select_swipe(target, choice)
                session.history = session.store.save(history)
            return refreshed(session, data)
        handler.__name__ = "previous_alternative" if step < 0 else "next_alternative"
        return handler

    for button, step in ((controls.previous, -1), (controls.next, 1)):
        button.click(browse(step), inputs, [view.chatbot, view.chats, *controls.swipe_outputs])
    # whatever changed the chat (a turn, an edit, another chat opened, a message picked) may change its alternatives
    view.chatbot.change(lambda session: swipe_updates(session), ctx.session, controls.swipe_outputs,
                        queue=False, show_progress="hidden", trigger_mode="always_last")
    def picked(session: UiSession | None, event: gr.SelectData) -> list[Any]:
        """The Chat tab records the pick too; both record the same message, so neither waits for the other."""
        if session is not None and session.history is not None:
            index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            owner = owner_of(session.history.messages, int(index))
            session.selected = owner.index if owner is not None else None
        return swipe_updates(session)

    view.chatbot.select(picked, ctx.session, controls.swipe_outputs, queue=False, show_progress="hidden")

    question = [controls.question, controls.yes, controls.no, controls.from_here]
    hidden = [gr.update(visible=False), gr.update(visible=False), gr.update(visible=False), gr.update(visible=True)]

    @user_errors
    def ask(data: dict[Any, Any]) -> list[Any]:
        session = session_of(data[ctx.session])
        history = _idle_history(session)
        picked = _picked(session, history)
        after = len(history.messages) - picked - 1
        if after:
            text = (f"Regenerating from message {picked + 1} drops the {after} message{'s' if after != 1 else ''} "
                    "after it (Branch here keeps a copy of the chat as it is).")
        else:
            text = f"Regenerate from message {picked + 1}? Nothing comes after it."
        return [gr.update(visible=True, value=text),
                gr.update(visible=True, value="Drop them and regenerate" if after else "Regenerate"),
                gr.update(visible=True), gr.update(visible=False)]

    regenerate = turn("regenerate")

    @user_errors
    def from_here(data: dict[Any, Any]) -> Iterator[tuple[Any, ...]]:
        session = session_of(data[ctx.session])
        history = _idle_history(session).model_copy(deep=True)
        picked = _picked(session, history)
        if history.truncate_after(picked):
            session.history = session.store.save(history)
        session.selected = None
        yield from regenerate(data)
    from_here.__name__ = "regenerate_from_here"

    controls.from_here.click(ask, inputs, question, queue=False, show_progress="hidden")
    controls.no.click(lambda: hidden, None, question, queue=False)
    controls.yes.click(lambda: hidden, None, question, queue=False)
    stream_locked(controls.yes.click, from_here, turn_inputs, turn_outputs, lock)


def _idle_history(session: UiSession) -> ChatHistory:
    if session.busy:
        raise ConfigError("A reply is still being written: wait for it or press Stop.")
    if session.history is None or not session.history.messages:
        raise ConfigError("This chat has no messages yet.")
    return session.history


def _picked(session: UiSession, history: ChatHistory) -> int:
    """The message picked in the chat to regenerate from (a user message, or a reply that answers one)."""
    picked = session.selected
    if picked is None or not 0 <= picked < len(history.messages):
        raise ConfigError("Click the message to regenerate from in the chat first.")
    message = history.messages[picked]
    if message.role == "assistant" and not any(m.role == "user" for m in history.messages[:picked]):
        raise ConfigError("That reply answers no message of yours: pick a message of yours or a later reply.")
    if message.role not in ("user", "assistant") or message.tool_calls:
        raise ConfigError("Pick a message of yours or a reply of the model to regenerate from.")
    return picked
