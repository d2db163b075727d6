"""Past chats (in the Chat tab): switch, rename, delete (after a confirmation), export and upload chats of the
current character, through modules.chat.history.HistoryStore.

An exported chat goes to the browser in the page's own event answer and is saved from there as a download: no
copy is written where Gradio serves files, so no URL exists that another user (or nobody signed in) could fetch.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.ui.chat_view import show
from modules.ui.common import Confirm, UiContext, session_of, user_errors
from modules.errors import ConfigError

#: Saves {name, text} as a file through the browser's own download.
DOWNLOAD_JS = """(file) => {
  if (!file || !file.text) return;
  const url = URL.createObjectURL(new Blob([file.text], {type: "application/json"}));
  const link = Object.assign(document.createElement("a"), {href: url, download: file.name});
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}"""


def build_chat_histories_panel(ctx: UiContext, chatbot: gr.Chatbot) -> gr.Dropdown:
    with gr.Accordion("Past chats", open=True):
        chats = gr.Dropdown(choices=[], value=None, label="Past chats", elem_id="chat-history-select",
                            info="Chats of the current character, newest first.")
        with gr.Row(equal_height=True):
            new_name = gr.Textbox(show_label=False, placeholder="New name", scale=3, elem_id="chat-rename-name")
            rename = gr.Button("Rename", size="sm", scale=1, elem_id="chat-rename")
        delete = Confirm.build("Delete chat", elem_id="chat-delete")
        with gr.Row():
            export = gr.Button("Export", size="sm", elem_id="chat-export")
            upload = gr.UploadButton("Upload", size="sm", file_types=[".json"], type="binary",
                                     elem_id="chat-upload")
        exported = gr.JSON(visible=False, elem_id="chat-exported")  # {name, text} for the browser to save
    inputs = {ctx.session, chats, new_name, *ctx.chat.inputs}
    outputs = [chatbot, chats]

    def current(data: dict[Any, Any]) -> tuple[Any, str]:
        session = session_of(data[ctx.session])
        chat_id = data[chats] or (session.history.id if session.history is not None else None)
        if not chat_id:
            raise ConfigError("Pick a chat first.")
        return session, chat_id

    @user_errors
    def on_pick(data: dict[Any, Any]) -> tuple[Any, Any]:
        session, chat_id = current(data)
        session.history, session.selected = session.store.load(session.character, chat_id), None
        return show(ctx, session, ctx.read_chat(data))

    @user_errors
    def on_rename(data: dict[Any, Any]) -> tuple[Any, Any, str]:
        session, chat_id = current(data)
        renamed = session.store.rename(session.character, chat_id, data[new_name])
        if session.history is not None and session.history.id == chat_id:
            session.history = renamed
        return (*show(ctx, session, ctx.read_chat(data)), "")

    @user_errors
    def on_delete(data: dict[Any, Any]) -> tuple[Any, Any]:
        session, chat_id = current(data)
        session.store.delete(session.character, chat_id)
        gr.Info("Chat deleted.")
        if session.history is not None and session.history.id == chat_id:
            session.open_latest()
        return show(ctx, session, ctx.read_chat(data))

    @user_errors
    def on_export(data: dict[Any, Any]) -> dict[str, str]:
        session, chat_id = current(data)
        text = session.store.export(session.character, chat_id).decode("utf-8")
        return {"name": f"{session.character}-{chat_id}.json", "text": text}

    @user_errors
    def on_upload(data: dict[Any, Any]) -> tuple[Any, Any]:
        session = session_of(data[ctx.session])
        session.history = session.store.import_history(session.character, data[upload])
        gr.Info("Chat uploaded.")
        return show(ctx, session, ctx.read_chat(data))

    chats.input(on_pick, inputs, outputs)
    rename.click(on_rename, inputs, [*outputs, new_name])
    delete.yes.click(on_delete, inputs, outputs)
    export.click(on_export, inputs, exported, api_name="export_chat").success(None, exported, None, js=DOWNLOAD_JS)
    upload.upload(on_upload, {*inputs, upload}, outputs)
    return chats
