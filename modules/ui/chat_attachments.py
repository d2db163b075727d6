"""The Chat tab's attachments: an Attach button beside the message box for text, Markdown, code, PDF, DOCX and HTML
files, the files waiting to go with the next message (name, kind, size and the tokens each adds on the chat's
model) and a way to take them back. A file is read into text when it is attached (modules.chat.attachments), so a
file that cannot be read, or that alone would not fit the context, is refused at once with the reason; the files go
with the next message sent and are kept with it in the chat (modules.ui.chat_display shows them on it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from modules.chat.attachment_fit import check_files_fit
from modules.chat.attachments import (
    ACCEPTED_EXTENSIONS,
    KIND_LABELS,
    MAX_FILE_BYTES,
    Attachment,
    format_size,
    read_attachment,
)
from modules.errors import ConfigError, InvalidInput, WorkbenchError
from modules.ui.common import UiContext, session_of, user_errors
from modules.ui.model_choice import ModelChoice
from modules.ui.pending_uploads import PendingPanel, build_pending_panel, escape_markdown

#: The most files one message may carry.
MAX_FILES = 10


AttachmentsPanel = PendingPanel  # the waiting files (Attachment)


def build_attach_button() -> gr.UploadButton:
    """The Attach button; place it beside the message box."""
    return gr.UploadButton("📎 Attach", file_count="multiple", file_types=ACCEPTED_EXTENSIONS, type="filepath",
                           size="sm", elem_id="chat-attach")


def build_attachments_panel(button: gr.UploadButton) -> AttachmentsPanel:
    """The list of files waiting for the next message (place it under the message box) and its Remove button."""
    return build_pending_panel(button, _shown, clear_label="Remove files", elem_id="chat-attachments", min_width=130)


def wire_attachments(ctx: UiContext, panel: AttachmentsPanel, status: gr.Markdown, model: Any,
                     model_inputs: list[Any]) -> None:
    """Read the files the button uploads into the waiting list, counted on the page's model (`model(data)` gives
    its ModelChoice from `model_inputs`); `status`, the chat's status line, says what they add to the prompt."""
    button, pending, listing, clear = panel.button, panel.pending, panel.listing, panel.clear

    @user_errors
    def attach(data: dict[Any, Any]) -> tuple[Any, ...]:
        session_of(data[ctx.session])
        paths = data[button] or []
        files = [*panel.read(data), *(_read(path) for path in (paths if isinstance(paths, list) else [paths]))]
        if len(files) > MAX_FILES:
            raise InvalidInput(f"A message may carry up to {MAX_FILES} files; {len(files)} were attached.")
        counts = _counts(ctx, data, model(data), files)
        total = sum(counts) if counts is not None else None
        note = (f"Attached: {len(files)} file(s), {total:,} tokens of the prompt." if total is not None
                else f"Attached: {len(files)} file(s).")
        return *_shown(files, counts), note

    button.upload(attach, {ctx.session, button, pending, *ctx.generation_inputs, *model_inputs},
                  [pending, listing, clear, status])
    clear.click(lambda: (*_shown([]), "Files removed."), None, [pending, listing, clear, status], queue=False)


def _read(path: str | Path) -> Attachment:
    """The file an upload left at `path` (Gradio's temporary copy, named as the user's file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"The uploaded file {path.name} is gone: {exc}") from None
    if size > MAX_FILE_BYTES:  # refused before it is read into memory
        raise InvalidInput(f"{path.name} is {format_size(size)}; files up to {format_size(MAX_FILE_BYTES)} can be "
                           "attached.")
    return read_attachment(path.name, path.read_bytes())


def _counts(ctx: UiContext, data: dict[Any, Any], choice: ModelChoice, files: list[Attachment]) -> list[int] | None:
    """The tokens each file adds on the page's model, refusing files that alone do not fit its context; None when
    the model is not loaded (they are counted, and checked, when the message is sent)."""
    manager = ctx.services.manager
    try:
        loaded = manager.require_model(choice.model)
    except WorkbenchError:
        return None
    chat, params = ctx.read_chat(data), ctx.read_params(data)
    context = min(loaded.context_length, chat.truncation_length or loaded.context_length)
    return check_files_fit(loaded, files, context=context, max_new_tokens=params.max_new_tokens)


def _shown(files: list[Attachment], counts: list[int] | None = None) -> tuple[Any, Any, Any]:
    """(the waiting files, their list, the Remove button)."""
    if not files:
        return [], gr.update(value="", visible=False), gr.update(visible=False)
    lines = []
    for number, file in enumerate(files):
        tokens = f" · {counts[number]:,} tokens" if counts is not None else ""
        size = format_size(file.size)
        lines.append(f"📎 **{escape_markdown(file.name)}** ({KIND_LABELS[file.kind]}, {size}{tokens})")
    text = "Going with your next message:  \n" + "  \n".join(lines)
    return files, gr.update(value=text, visible=True), gr.update(visible=True)
