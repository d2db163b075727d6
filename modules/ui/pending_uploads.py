"""What the Chat tab's upload buttons share (📎 Attach, 🖼 Image): the items waiting to go with the next message, the
Markdown list that shows them and a button that takes them back. Each kind says how its list looks (`shown`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr


@dataclass
class PendingPanel:
    button: gr.UploadButton
    pending: gr.State  # the items going with the next message
    listing: gr.Markdown
    clear: gr.Button
    #: (pending, listing, clear) updates for a list of waiting items
    shown: Callable[[list[Any]], tuple[Any, Any, Any]]

    @property
    def inputs(self) -> list[Any]:
        return [self.pending]

    def read(self, data: dict[Any, Any]) -> list[Any]:
        return list(data[self.pending] or [])

    @property
    def turn_outputs(self) -> list[Any]:
        return [self.pending, self.listing, self.clear]

    def turn_values(self, sent: bool) -> tuple[Any, Any, Any]:
        """Once the message went (`sent`), its items are no longer waiting."""
        return self.shown([]) if sent else (gr.skip(), gr.skip(), gr.skip())


def build_pending_panel(button: gr.UploadButton, shown: Callable[[list[Any]], tuple[Any, Any, Any]], *,
                        clear_label: str, elem_id: str, min_width: int) -> PendingPanel:
    """The list of items waiting for the next message (place it under the message box) and its Remove button."""
    pending = gr.State([])
    with gr.Row(equal_height=True):
        listing = gr.Markdown(visible=False, elem_id=elem_id)
        clear = gr.Button(clear_label, size="sm", scale=0, min_width=min_width, visible=False,
                          elem_id=f"{elem_id}-clear")
    return PendingPanel(button, pending, listing, clear, shown)


def escape_markdown(text: str) -> str:
    """Text (a file name) shown in Markdown as written."""
    return "".join(f"\\{c}" if c in "\\`*_{}[]()#+-.!|<>~" else c for c in text)
