"""A Chat tab turn with tools: the user's message -> generate -> the reply's tool calls (read by the one chat
path's finish_reply from the model's own tool format) -> run them (modules.tools.ToolLoop over the services'
Toolbox) -> generate again, until the model answers or the turn's rounds (settings.tool_max_rounds) are used up.

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
from modules.chat.request import finish_reply, prepare_chat
from modules.generation_params import GenerationParams, GenerationStats
from modules.request_hooks import RequestHooks, with_visible
from modules.services import Services
from modules.settings import ChatSettings
from modules.tools.loop import ToolLoop
from modules.tools.runner import ToolRunner
from modules.tools.spec import ToolCall, ToolSpec
from modules.ui.chat_runner import TurnUpdate, chatbot_messages, turn_request
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
    Reports go to `events`: ("start", warnings), ("text", reply so far), ("message", message, error kind),
    ("approval", call, spec), ("done", outcome) or ("error", exception)."""

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
                  history: ChatHistory, hooks: RequestHooks, pick: ToolPick, *, choice: ModelChoice, model: str,
                  adapters: tuple[Adapter, ...] | None, stamp: dict[str, Any]) -> Iterator[TurnUpdate]:
    """Answer the user's message that ends `history` (saved already) with the tools of `pick`, streaming the
    replies and adding each reply, call and result to the chat, which is saved when the turn ends (also when it
    is stopped or fails: what was said so far is kept)."""
    offered, warnings = offered_tools(services, pick)
    runner = offered or ToolRunner({})  # none of the picked tools is offered now: a turn without tools
    tools = runner.openai_tools()
    turn = ToolTurn()
    rounds: list[_Round] = []

    def generate(conversation: list[dict[str, Any]]) -> dict[str, Any]:
        if turn.stopped.is_set():
            raise TurnStopped
        first = not rounds
        request = turn_request(chat, params, [{k: m[k] for k in _PROMPT_KEYS if k in m} for m in conversation],
                               "send", model=model, adapters=adapters)
        request.tools = tools
        request.tool_choice = (pick.use if first else "auto") if tools else None
        prepared = prepare_chat(services, request, hooks=hooks)
        generation = prepared.generate(services.manager, client=page_client(session))
        if not turn.own(session, generation):
            generation.cancel()
            raise TurnStopped
        current = _Round(prepared.prompt_tokens, prepared.context, prepared.dropped_messages)
        rounds.append(current)
        turn.events.put(("start", prepared.warnings + generation.warnings))
        text, tokens = "", []
        try:
            for batch in stream_batches(generation):
                for chunk in batch:
                    text += chunk.text
                    tokens.extend(chunk.tokens)
                turn.events.put(("text", text))
        finally:
            generation.cancel()  # no-op once it ended
        current.stats = generation.stats
        reply = finish_reply(prepared, text, tokens)
        if reply.tool_calls and generation.stats.finish_reason != "cancelled" and not turn.stopped.is_set():
            return {"role": "assistant", "content": reply.content or "", "tool_calls": reply.tool_calls}
        return {"role": "assistant", "content": text, "visible": reply.shown}

    loop = ToolLoop(generate, runner, max_rounds=services.settings.tool_max_rounds, approve=turn.ask)
    folder = session.store.images(session.character)  # the images the chat's messages carry

    def work() -> None:
        try:
            for message in loop.run(history.prompt_messages(folder)):
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
    preview: int | None = None  # the index of the reply being written, shown but not yet a message of the chat
    outcome = None
    try:
        worker.start()
        while True:
            event = turn.events.get()
            kind = event[0]
            if kind == "start":
                warnings += event[1]
                history.messages.append(ChatMessage.model_construct(role="assistant", content="", metadata={}))
                preview = len(history.messages) - 1
                line = status.writing()
            elif kind == "text":
                history.messages[preview] = ChatMessage.model_construct(role="assistant", content=event[1],
                                                                        metadata={})
                line = status.writing()
            elif kind == "message":
                if preview is not None and event[1]["role"] == "assistant":
                    history.messages.pop(preview)
                    preview = None
                history.messages.append(_chat_message(event[1], event[2], stamp))
                line = status.running(event[1]) if event[1]["role"] == "assistant" else status.writing()
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
        if preview is not None:  # a reply cut short (the turn ended abnormally): kept, unless it is empty
            cut = history.messages.pop(preview)
            if cut.content:
                history.messages.append(ChatMessage(role="assistant", content=cut.content, metadata=dict(stamp)))
        session.history = session.store.save(history, keep_copy_on_conflict=True)
    yield TurnUpdate(chatbot_messages(session.history.messages, folder), status=status.done(outcome, services),
                     done=True)


def _chat_message(message: dict[str, Any], error: str | None, stamp: dict[str, Any]) -> ChatMessage:
    """A message the loop added, as the chat keeps it: OpenAI's form, the turn's stamp (model, LoRAs, tools) on
    the replies, the error kind on a failed result, the shown text of a reply an extension changed."""
    if message["role"] == "tool":
        return ChatMessage(role="tool", content=message["content"], name=message.get("name"),
                           tool_call_id=message.get("tool_call_id"),
                           metadata={TOOL_ERROR_KEY: error} if error else {})
    if message.get("tool_calls"):
        return ChatMessage(role="assistant", content=message["content"], tool_calls=message["tool_calls"],
                           metadata=dict(stamp))
    content = message["content"]
    return ChatMessage(role="assistant", content=content,
                       metadata={**with_visible({}, content, message.get("visible", content)), **stamp})


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
