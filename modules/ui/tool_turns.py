"""A Chat tab turn with tools: the user's message -> generate -> the reply's tool calls (read by the one chat
path's finish_reply from the model's own tool format) -> run them (modules.tools.ToolLoop over the services'
Toolbox) -> generate again, until the model answers or the turn's rounds (settings.tool_max_rounds) are used up.
Each reply keeps its thinking apart from its answer (reasoning_content, as a reply without tools does).

Send, Regenerate and Continue all take this path when the page picked tools (chat_runner.run_turn decides, once
for every button): Regenerate answers the last user message again, its tools run again; Continue goes on from
the end of the chat: a reply cut short is continued (a call it completes runs), calls left without results run,
and after tool results the model answers. Impersonate never does: it writes the user's next message into the
box, and a user's message calls no tools.

The ToolLoop calls `generate` and the approval callback and waits for them, while the page must be updated as
the text streams and while a call waits for the user's Approve or Deny. So the loop runs on a thread of its own
(ToolTurn) and reports to the page's handler through a queue; the handler (run_tool_turn, a generator like
chat_runner.run_turn) turns the reports into the chat's messages and TurnUpdates. Stop, or the page going away,
stops the turn: the reply being written ends, a call waiting for approval is declined, no round follows.

Nothing here imports Gradio."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loaders.batching import Adapter
from modules.chat.history import ChatHistory, ChatMessage
from modules.chat.reasoning import ReasoningSplitter
from modules.chat.request import finish_reply, prepare_chat
from modules.chat.tool_calls import ContentSoFar
from modules.generation_params import GenerationParams, GenerationStats
from modules.request_hooks import RequestHooks, visible_text
from modules.services import Services
from modules.settings import ChatSettings
from modules.tools.loop import ToolLoop
from modules.tools.runner import ToolRunner
from modules.tools.spec import ToolCall, ToolSpec
from modules.ui.chat_runner import Action, TurnUpdate, chatbot_messages, reply_setter, turn_request
from modules.ui.model_choice import ModelChoice, page_client
from modules.ui.session_state import UiSession
from modules.ui.streaming import stream_batches
from modules.ui.tool_messages import TOOL_ERROR_KEY, ToolPick, call_text

log = logging.getLogger(__name__)

#: The keys of a message the prompt reads (the loop's own keys stay out of it).
_PROMPT_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "attachments")


class TurnStopped(Exception):
    """Stop was pressed (or the page went away) between two steps of the loop: no further round."""


class ToolTurn:
    """The running loop of one page's turn, as Stop and the Approve/Deny buttons reach it (UiSession.tool_turn).
    Reports go to `events`: ("start", warnings, continues the last reply), ("text", answer so far, thinking so far,
    still thinking), ("message", message, error kind), ("approval", call, spec), ("done", outcome) or ("error",
    exception)."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self._approved = False
        self.pending: ToolCall | None = None

    def ask(self, call: ToolCall, spec: ToolSpec) -> bool:
        """The ToolLoop's approval callback: report the call and wait for answer() (or stop())."""
        with self._lock:
            if self.stopped.is_set():
                return False
            self._decided.clear()
            self._approved, self.pending = False, call
        self.events.put(("approval", call, spec))
        self._decided.wait()
        with self._lock:
            self.pending = None
            return self._approved and not self.stopped.is_set()

    def answer(self, approved: bool) -> bool:
        """The user's decision on the call waiting for approval; False when none waits."""
        with self._lock:
            if self.pending is None or self._decided.is_set():
                return False
            self._approved = approved
            self._decided.set()
            return True

    def own(self, session: UiSession, generation: Any) -> bool:
        """Make `generation` the page's (for Stop) unless the turn was stopped: then it must not start."""
        with self._lock:
            if self.stopped.is_set():
                return False
            session.generation = generation
            return True

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            self._decided.set()  # a call waiting for approval is declined


@dataclass
class _Start:
    """Where a turn starts in its chat: the index its messages begin at, the turn Regenerate took out (None for
    Send and Continue), whether the first generation continues the last reply, the calls left without results."""

    index: int
    replaced: list[ChatMessage] | None = None
    continue_last: bool = False
    pending: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, history: ChatHistory, action: Action) -> _Start:
        """The start of an `action` turn on `history`, taking out the turn Regenerate writes again."""
        messages = history.messages
        if action == "regenerate":
            user = max(i for i, m in enumerate(messages) if m.role == "user")  # run_turn checked there is one
            replaced = messages[user + 1:]
            del messages[user + 1:]
            return cls(user + 1, replaced)
        if action == "continue":
            last = messages[-1]
            pending = unanswered_calls(messages)
            return cls(len(messages), continue_last=last.role == "assistant" and not last.tool_calls,
                       pending=pending)
        return cls(len(messages))


def unanswered_calls(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The calls of the chat's last reply with calls that have no result yet, when only their results follow it
    (a turn stopped while its tools ran)."""
    tail = len(messages)
    while tail and messages[tail - 1].role == "tool":
        tail -= 1
    if not tail or messages[tail - 1].role != "assistant" or not messages[tail - 1].tool_calls:
        return []
    answered = {m.tool_call_id for m in messages[tail:]}
    return [call for call in messages[tail - 1].tool_calls or [] if call.get("id") not in answered]


@dataclass
class _Round:
    """One generation of the turn, for the status line."""

    prompt_tokens: int | None
    context: int
    dropped: int
    stats: GenerationStats | None = None


def offered_tools(services: Services, pick: ToolPick) -> tuple[ToolRunner | None, list[str]]:
    """A runner over the picked tools the toolbox still offers (None when none), and warnings naming those it
    no longer offers (a tool file removed, an MCP server gone)."""
    toolbox = services.toolbox
    tools = toolbox.tools if toolbox is not None else {}
    names = [name for name in pick.names if name in tools]
    gone = [name for name in pick.names if name not in tools]
    warnings = [f"Tools no longer offered, left out of this turn: {', '.join(gone)}."] if gone else []
    if not names or toolbox is None:
        return None, warnings
    return toolbox.runner(names), warnings


def run_tool_turn(services: Services, session: UiSession, chat: ChatSettings, params: GenerationParams,
                  history: ChatHistory, hooks: RequestHooks, pick: ToolPick, action: Action = "send", *,
                  choice: ModelChoice, model: str, adapters: tuple[Adapter, ...] | None,
                  stamp: dict[str, Any]) -> Iterator[TurnUpdate]:
    """Run an `action` turn (send, regenerate or continue) on `history` (the page's chat, a copy; for Send the
    user's message ends it, saved already) with the tools of `pick`, streaming the replies and adding each reply
    (with its thinking), call and result to the chat, which is saved when the turn ends (also when it is stopped
    or fails: what was said so far is kept).

    Regenerate writes the answer to the last user message again: the turn after it is taken out and the tools run
    again. A plain reply written again as a plain reply becomes a new alternative of it, as without tools; a turn
    with calls (before or now) is replaced by the new one. The old turn stays when the new one wrote nothing."""
    offered, warnings = offered_tools(services, pick)
    runner = offered or ToolRunner({})  # none of the picked tools is offered now: a turn without tools
    tools = runner.openai_tools()
    turn = ToolTurn()
    rounds: list[_Round] = []
    start = _Start.of(history, action)

    def generate(conversation: list[dict[str, Any]]) -> dict[str, Any]:
        if turn.stopped.is_set():
            raise TurnStopped
        first = not rounds
        continuing = first and start.continue_last
        request = turn_request(chat, params, [{k: m[k] for k in _PROMPT_KEYS if k in m} for m in conversation],
                               "continue" if continuing else "send", model=model, adapters=adapters)
        request.tools = tools
        # "required" forces the first step of a new answer; a continuation goes on as the model likes
        request.tool_choice = (pick.use if first and action != "continue" else "auto") if tools else None
        prepared = prepare_chat(services, request, hooks=hooks)
        generation = prepared.generate(services.manager, client=page_client(session))
        if not turn.own(session, generation):
            generation.cancel()
            raise TurnStopped
        current = _Round(prepared.prompt_tokens, prepared.context, prepared.dropped_messages)
        rounds.append(current)
        turn.events.put(("start", prepared.warnings + generation.warnings, continuing))
        base = conversation[-1]["content"] if continuing else ""
        # the thinking streams apart from the answer (modules.chat.reasoning), as finish_reply reads it
        split = ReasoningSplitter(prepared.thinking_opened) if prepared.parse_reasoning else None
        if split is not None:
            split.feed(base)
        text, tokens = "", []
        content = ContentSoFar(prepared.tool_names)  # a call's markup is shown as its block, not as text
        try:
            for batch in stream_batches(generation):
                for chunk in batch:
                    text += chunk.text
                    tokens.extend(chunk.tokens)
                    if split is not None:
                        split.feed(chunk.text)
                turn.events.put(("text", content(split.content), split.reasoning, split.thinking)
                                if split is not None else ("text", content(base + text), None, False))
        finally:
            generation.cancel()  # no-op once it ended
        current.stats = generation.stats
        reply = finish_reply(prepared, base + text, tokens)
        ran = generation.stats.finish_reason != "cancelled" and not turn.stopped.is_set()
        message = {**reply.message(calls=ran), "visible": reply.shown}
        if continuing and message["reasoning_content"] is None:  # a continued reply keeps its thinking
            message["reasoning_content"] = conversation[-1].get("reasoning_content")
        return message

    loop = ToolLoop(generate, runner, max_rounds=services.settings.tool_max_rounds, approve=turn.ask)
    folder = session.store.images(session.character)  # the images the chat's messages carry

    def work() -> None:
        try:
            for message in loop.run(history.prompt_messages(folder), continue_last=start.continue_last,
                                    pending=start.pending):
                kind = loop.results[-1].error if message["role"] == "tool" else None
                turn.events.put(("message", message, kind))
            turn.events.put(("done", loop.outcome))
        except TurnStopped:
            turn.events.put(("done", "stopped"))
        except BaseException as exc:  # noqa: BLE001  handed to the page's handler, which raises it there
            turn.events.put(("error", exc))

    status = _Status(choice.describe(model), rounds)
    session.tool_turn = turn
    worker = threading.Thread(target=work, name=f"tool-turn-{session.session_id[:8]}", daemon=True)
    # the reply being written: shown (a preview) until the loop hands it over, then a message of the chat
    writing: _Writing | None = None
    outcome = None
    try:
        worker.start()
        while True:
            event = turn.events.get()
            kind = event[0]
            if kind == "start":
                warnings += event[1]
                writing = _Writing(history, stamp, continuing=event[2])
                line = status.writing()
            elif kind == "text":
                writing.show(*event[1:])
                line = status.writing()
            elif kind == "message":
                message = event[1]
                if message["role"] == "assistant" and writing is not None:
                    writing.keep(message)
                    writing = None
                else:
                    history.messages.append(_tool_message(message, event[2]))
                line = status.running(message) if message["role"] == "assistant" else status.writing()
            elif kind == "approval":
                call, spec = event[1], event[2]
                line = status.waiting(call)
                yield TurnUpdate(chatbot_messages(history.messages, folder), status=line, warnings=warnings,
                                 approval=f"**{spec.name}** asks to run: `{call_text(_openai(call))}`")
                warnings = []
                continue
            elif kind == "error":
                raise event[1]
            else:
                outcome = event[1]
                break
            yield TurnUpdate(chatbot_messages(history.messages, folder), status=line, warnings=warnings)
            warnings = []
    finally:
        turn.stop()  # no-op once the loop ended; else (Stop, the page gone, an error) it ends after this step
        generation = session.generation  # the worker sets no other from now on (ToolTurn.own)
        if generation is not None:
            generation.cancel()
        session.generation, session.tool_turn = None, None
        if writing is not None:  # a reply cut short (the turn ended abnormally): kept, unless it is empty
            writing.cut()
        if start.replaced is not None:
            _settle_regenerated(history, start, stamp)
        session.history = session.store.save(history, keep_copy_on_conflict=True)
    yield TurnUpdate(chatbot_messages(session.history.messages, folder), status=status.done(outcome, services),
                     done=True)


class _Writing:
    """The reply being written, in the chat: a new last message (or, continuing, the last reply), shown as it
    streams with its thinking apart (chat_runner.reply_setter) and kept, with the turn's stamp, once done."""

    def __init__(self, history: ChatHistory, stamp: dict[str, Any], *, continuing: bool):
        if not continuing:
            history.messages.append(ChatMessage(role="assistant", content=""))
        self.history, self.index, self.continuing = history, len(history.messages) - 1, continuing
        self.original = history.messages[self.index]
        self.set_reply = reply_setter(history, "continue" if continuing else "send", stamp)
        self.shown: tuple[str, str | None] | None = None

    def show(self, content: str, reasoning: str | None, thinking: bool) -> None:
        self.shown = (content, reasoning)
        self.set_reply(content, None, reasoning, thinking=thinking)

    def keep(self, message: dict[str, Any]) -> None:
        """The reply as the loop hands it over: its answer (or the text before its calls), thinking and calls."""
        content, calls = message["content"], message.get("tool_calls")
        self.set_reply(content, content if calls else message.get("visible", content),
                       message.get("reasoning_content"))
        if calls:
            kept = self.history.messages[self.index]
            self.history.messages[self.index] = kept.model_copy(update={"tool_calls": calls})

    def cut(self) -> None:
        """Keep what was shown of a reply the loop never handed over: a new one unless it is empty, a continued
        one as far as it got."""
        if self.shown is not None and (self.shown[0] or self.shown[1] is not None):
            self.set_reply(self.shown[0], self.shown[0], self.shown[1])
        elif self.continuing:
            self.history.messages[self.index] = self.original
        else:
            self.history.messages.pop(self.index)


def _settle_regenerated(history: ChatHistory, start: _Start, stamp: dict[str, Any]) -> None:
    """After Regenerate: a plain reply written again as a plain reply becomes a new alternative of the old one (as
    without tools); a new turn with calls (or one replacing calls) stays as it is; when the new turn wrote
    nothing, the old one is put back."""
    new, old = history.messages[start.index:], start.replaced or []
    if not new:
        history.messages.extend(old)
    elif len(new) == 1 and len(old) == 1 and new[0].role == old[0].role == "assistant" \
            and not new[0].tool_calls and not old[0].tool_calls:
        reply = new[0]
        history.messages[start.index:] = old
        reply_setter(history, "regenerate", stamp)(reply.content, visible_text(reply.content, reply.metadata),
                                                   reply.reasoning_content)


def _tool_message(message: dict[str, Any], error: str | None) -> ChatMessage:
    """A tool's result as the chat keeps it: OpenAI's form, the error kind on a failed result."""
    return ChatMessage(role="tool", content=message["content"], name=message.get("name"),
                       tool_call_id=message.get("tool_call_id"), metadata={TOOL_ERROR_KEY: error} if error else {})


def _openai(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class _Status:
    """The status line of a turn with tools: the model and prompt of its latest round, what it does now."""

    def __init__(self, model: str, rounds: list[_Round]):
        self.model = model
        self.rounds = rounds
        self.calls = 0

    def head(self) -> str:
        if not self.rounds:
            return f"Model: {self.model}"
        last = self.rounds[-1]
        line = (f"Model: {self.model} · Prompt: {last.prompt_tokens if last.prompt_tokens is not None else '?'} "
                f"of {last.context} tokens")
        if last.dropped:
            line += f" ({last.dropped} oldest messages left out to fit)"
        return line

    def writing(self) -> str:
        step = f" · step {len(self.rounds)}" if len(self.rounds) > 1 else ""
        return f"{self.head()}{step} · writing…"

    def running(self, message: dict[str, Any]) -> str:
        calls = message.get("tool_calls") or []
        self.calls += len(calls)
        if not calls:
            return self.writing()
        return f"{self.head()} · running {', '.join(c['function']['name'] for c in calls)}…"

    def waiting(self, call: ToolCall) -> str:
        return f"{self.head()} · waiting for your approval of {call.name}"

    def done(self, outcome: str | None, services: Services) -> str:
        finished = [r.stats for r in self.rounds if r.stats is not None]
        tokens = sum(s.completion_tokens for s in finished)
        seconds = sum(s.seconds for s in finished)
        line = (f"{self.head()} · reply: {tokens} tokens in {seconds:.1f} s "
                f"({tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s)")
        if self.calls:
            line += f" · {self.calls} tool call{'s' if self.calls != 1 else ''}"
        last = finished[-1].finish_reason if finished else None
        if outcome == "round_limit":
            line += (f" · stopped: the limit of {services.settings.tool_max_rounds} rounds of tool calls "
                     "(tool_max_rounds) was reached")
        elif outcome == "stopped" or last == "cancelled":
            line += " · stopped"
        elif last == "length":
            line += " · hit max_new_tokens"
        elif last == "error" or outcome is None:
            line += " · failed"
        return line
