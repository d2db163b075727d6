"""The Chat tab's tools: which tools of the services' toolbox this chat offers the model (a multi-select, per page,
restored from the chat when it is opened), whether its first step must call one, what could not be offered
(a broken tool file, an MCP server that failed), and the Approve / Deny pair shown while a call of a tool that
needs approval waits. The turns themselves run in modules.ui.tool_turns."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.errors import ConfigError
from modules.services import Services
from modules.ui.access import may_administer
from modules.ui.chat_runner import TurnUpdate
from modules.ui.common import UiContext, session_of, user_errors
from modules.ui.session_state import UiSession
from modules.ui.tool_messages import TOOL_USES, ToolPick

_USE_LABELS = [("Auto: the model decides", "auto"), ("Required: its first step calls a tool", "required")]


@dataclass
class ToolApproval:
    """Shown under the chat while a call waits for the user's decision."""

    box: gr.Column
    question: gr.Markdown
    approve: gr.Button
    deny: gr.Button


@dataclass
class ToolsPanel:
    tools: gr.Dropdown
    use: gr.Radio
    note: gr.Markdown
    refresh: gr.Button
    approval: ToolApproval

    @property
    def inputs(self) -> list[Any]:
        return [self.tools, self.use]

    def read(self, data: dict[Any, Any]) -> ToolPick:
        return ToolPick.of(data[self.tools], data[self.use])

    @property
    def turn_outputs(self) -> list[Any]:
        """What a turn updates besides the chat: the approval box and its question."""
        return [self.approval.box, self.approval.question]

    @staticmethod
    def turn_values(update: TurnUpdate | None) -> tuple[Any, Any]:
        """The approval box for `update` (None: leave it as it is)."""
        if update is None:
            return gr.skip(), gr.skip()
        if update.approval:
            return gr.update(visible=True), update.approval
        return gr.update(visible=False), gr.skip()


def build_tool_approval() -> ToolApproval:
    """The Approve / Deny pair; place it under the chat."""
    with gr.Column(visible=False, variant="panel", elem_id="tool-approval") as box:
        question = gr.Markdown(elem_id="tool-approval-question")
        with gr.Row():
            approve = gr.Button("Approve", variant="primary", size="sm", elem_id="tool-approve")
            deny = gr.Button("Deny", variant="stop", size="sm", elem_id="tool-deny")
    return ToolApproval(box, question, approve, deny)


def build_tools_panel(ctx: UiContext, approval: ToolApproval) -> ToolsPanel:
    """The tools picker (an accordion of the side column)."""
    with gr.Accordion("Tools", open=False, elem_id="chat-tools-panel"):
        tools = gr.Dropdown(choices=tool_choices(ctx.services), value=[], multiselect=True,
                            label="Tools for this chat", elem_id="chat-tools",
                            info="The model may call these; each call and its result show in the chat.")
        use = gr.Radio(_USE_LABELS, value="auto", label="Tool use", elem_id="chat-tool-use")
        note = gr.Markdown(tools_note(ctx.services), elem_id="chat-tools-note")
        refresh = gr.Button("Refresh tools", size="sm", elem_id="chat-tools-refresh")
    panel = ToolsPanel(tools, use, note, refresh, approval)
    _wire(ctx, panel)
    return panel


def tool_choices(services: Services) -> list[tuple[str, str]]:
    """(label, name) of each tool the toolbox offers; tools that ask before each call say so."""
    toolbox = services.toolbox
    if toolbox is None:
        return []
    return [(f"{spec.name} (asks first)" if spec.needs_approval else spec.name, spec.name)
            for spec in sorted(toolbox.specs(), key=lambda spec: spec.name.lower())]


def tools_note(services: Services) -> str:
    """What the picker cannot offer, and why: tool files that failed to load, MCP servers that failed or are
    still connecting."""
    toolbox = services.toolbox
    if toolbox is None:
        return "Tools are off in this app."
    lines = []
    if toolbox.connecting:
        lines.append("MCP servers are still connecting: their tools appear after **Refresh tools**.")
    lines += [f"⚠️ {html.escape(str(problem))}" for problem in toolbox.problems]
    if not toolbox.tools:
        lines.append(f"No tools: put one-file Python tools in `{html.escape(str(toolbox.tools_dir))}`.")
    return "\n\n".join(lines)


def _offered_pick(services: Services, pick: ToolPick) -> tuple[list[str], str]:
    offered = {name for _, name in tool_choices(services)}
    return [name for name in pick.names if name in offered], pick.use


def _wire(ctx: UiContext, panel: ToolsPanel) -> None:
    services = ctx.services

    def listed() -> tuple[Any, str]:
        return gr.update(choices=tool_choices(services)), tools_note(services)

    ctx.session_listeners.append((lambda data: listed(), {ctx.session}, [panel.tools, panel.note]))

    @user_errors
    def refresh(session: UiSession | None) -> tuple[Any, str]:
        """The toolbox's tools now (an MCP server connected since); the operator's page also re-reads the tool
        files (their code runs)."""
        session = session_of(session)
        if services.toolbox is not None and may_administer(services.settings, session.user):
            services.toolbox.load_files()
        return listed()

    panel.refresh.click(refresh, ctx.session, [panel.tools, panel.note])

    def answer(approved: bool):
        @user_errors
        def handler(session: UiSession | None) -> Any:
            turn = session_of(session).tool_turn
            if turn is None or not turn.answer(approved):
                raise ConfigError("No tool call is waiting for approval.")
            return gr.update(visible=False)
        handler.__name__ = "approve_tool" if approved else "deny_tool"
        return handler

    panel.approval.approve.click(answer(True), ctx.session, panel.approval.box, queue=False)
    panel.approval.deny.click(answer(False), ctx.session, panel.approval.box, queue=False)


def wire_chat_pick(ctx: UiContext, panel: ToolsPanel, chats: gr.Dropdown) -> None:
    """Opening a chat (the chats list names it) restores the tools its last turn ran with; a new chat, or one
    that records none, keeps the page's pick."""

    def restore(session: UiSession | None, chat_id: str | None) -> tuple[Any, Any]:
        if session is None or not chat_id:
            return gr.skip(), gr.skip()
        history = session.history
        if history is None or history.id != chat_id:
            try:
                history = session.store.load(session.character, chat_id)
            except (ConfigError, OSError):  # gone or damaged: the panel that opened it says so
                return gr.skip(), gr.skip()
        pick = ToolPick.of_chat(history.messages)
        if pick is None:
            return gr.skip(), gr.skip()
        names, use = _offered_pick(ctx.services, pick)
        return gr.update(value=names), use if use in TOOL_USES else "auto"

    chats.change(restore, [ctx.session, chats], [panel.tools, panel.use], show_progress="hidden")
