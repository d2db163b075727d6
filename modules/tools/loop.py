"""The tool loop of one chat turn: generate -> the reply's tool calls -> run them -> hand the results back ->
generate again, until the model answers without calling a tool or the turn's rounds are used up.

It knows nothing of prompts, templates or models. The caller passes `generate`, a callable that takes the
conversation so far (OpenAI-style message dicts, tool results included) and returns the model's reply as an
assistant message dict: {"role": "assistant", "content": str, "tool_calls": [OpenAI tool_calls entries]} where
`tool_calls` is absent or empty when the model called nothing. Parsing the calls out of the generated text (in
the model's own chat-template format) is the caller's job, as is streaming the text while it is generated; any
other keys of the reply (reasoning, metadata) are kept as they are.

Usage::

    loop = ToolLoop(generate, runner, max_rounds=settings.tool_max_rounds, approve=ask_the_user)
    for message in loop.run(messages):   # each new message: assistant replies and tool results, in order
        show(message)
    loop.outcome                          # "answered" or "round_limit"

A turn may also go on from where an earlier one stopped: `continue_last` (the first generation continues the
conversation's last reply, and its reply takes that reply's place) or `pending` (calls of the last reply that
have no result yet, run before the model is asked again).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

from modules.tools.runner import ToolRunner, error_result
from modules.tools.spec import ToolCall, ToolResult, ToolSpec

log = logging.getLogger(__name__)

Generate = Callable[[list[dict[str, Any]]], dict[str, Any]]
#: Asked before each call of a tool marked as needing approval; True runs it, False answers the model that the
#: user declined. It may block (a UI waits for the click).
Approve = Callable[[ToolCall, ToolSpec], bool]


class ToolLoop:
    """Drives `generate` and a ToolRunner for at most `max_rounds` rounds of tool calls. A reply that still calls
    tools after the last round gets an error result for each call ("not run: the limit ... was reached") so the
    conversation stays well-formed (every call answered), and the loop ends with outcome "round_limit"."""

    def __init__(self, generate: Generate, runner: ToolRunner, *, max_rounds: int,
                 approve: Approve | None = None):
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.generate = generate
        self.runner = runner
        self.max_rounds = max_rounds
        self.approve = approve
        #: Rounds of tool calls that ran.
        self.rounds = 0
        #: Each call's result, in the order their messages were yielded (their error kinds, for a UI).
        self.results: list[ToolResult] = []
        self.outcome: Literal["answered", "round_limit"] | None = None

    def run(self, messages: list[dict[str, Any]], *, continue_last: bool = False,
            pending: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
        """Yield each message the turn adds (replies and tool results); `messages` itself is not changed.
        `continue_last`: `generate` continues the last message (a reply cut short), and the reply it returns (the
        whole reply) replaces that message, the first one yielded. `pending`: OpenAI tool_calls entries of the last
        reply that have no result yet; they run first, as the turn's first round."""
        conversation = list(messages)
        calls = [ToolCall.from_openai(call) for call in pending or []]
        while True:
            if not calls:
                reply = self.generate(list(conversation))
                if continue_last:
                    conversation[-1], continue_last = reply, False
                else:
                    conversation.append(reply)
                yield reply
                calls = [ToolCall.from_openai(call) for call in reply.get("tool_calls") or []]
            if not calls:
                self.outcome = "answered"
                return
            over = self.rounds >= self.max_rounds
            for call in calls:
                result = self._refused_for_limit(call) if over else self._run(call)
                self.results.append(result)
                message = result.to_message()
                conversation.append(message)
                yield message
            if over:
                self.outcome = "round_limit"
                return
            self.rounds += 1
            calls = []

    def _run(self, call: ToolCall) -> ToolResult:
        spec = self.runner.spec(call.name)
        if spec is not None and spec.needs_approval and not self._approved(call, spec):
            return error_result(call, f"the user declined this call of {call.name}", kind="declined")
        return self.runner.run(call)

    def _approved(self, call: ToolCall, spec: ToolSpec) -> bool:
        if self.approve is None:
            return False
        try:
            return bool(self.approve(call, spec))
        except Exception:  # an approval that cannot be asked is a refusal, never a crashed turn
            log.warning("asking approval for %s failed; the call is declined", call.name, exc_info=True)
            return False

    def _refused_for_limit(self, call: ToolCall) -> ToolResult:
        return error_result(call, f"not run: the limit of {self.max_rounds} rounds of tool calls in one turn "
                                  "was reached", kind="round_limit")
