"""The operator's controls in the page. With --multi-user, the widgets that change what every page shares (the
loaded model and its LoRAs, downloads, training jobs, merges and exports, extensions, the settings file) are drawn
hidden and shown once the page's session says that its user may use them (modules.ui.access.may_administer).
Hiding only tidies the page: each of their handlers also calls access.refuse_unless_admin, since Gradio events can
be called over HTTP without the page."""
from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.blocks import Block

from modules.ui.access import may_administer
from modules.ui.common import UiContext


def operator_only(ctx: UiContext, *blocks: Block) -> None:
    """Hide `blocks` from a page that may not use the operator's controls. They start hidden with --multi-user
    (who the page belongs to is known only once its session exists) and a session listener shows them to an
    admin. Give only blocks whose visibility nothing else changes."""
    settings = ctx.services.settings
    for block in blocks:
        block.visible = may_administer(settings, None)

    def show(data: dict[Any, Any]) -> Any:
        session = data[ctx.session]
        updates = [gr.update(visible=may_administer(settings, session.user if session else None)) for _ in blocks]
        return updates[0] if len(updates) == 1 else updates

    ctx.session_listeners.append((show, {ctx.session}, list(blocks)))
