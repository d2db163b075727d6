"""Characters (in the Chat tab): switch, edit, save and delete characters in characters/, and import
TavernAI / SillyTavern PNG cards or JSON/YAML characters, through modules.chat.characters."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from modules.chat.characters import (Character, character_picture, delete_character, import_character,
                                     list_characters, load_character, save_character)
from modules.errors import ConfigError
from modules.ui.chat_view import ChatView, show
from modules.ui.common import Confirm, UiContext, session_of, user_errors, warn


def build_character_panel(ctx: UiContext, view: ChatView) -> None:
    folder = ctx.services.settings.character_dir
    dropdown = ctx.chat.components["character"]
    mode = ctx.chat.components["mode"]
    with gr.Accordion("Character", open=False, elem_id="character-panel"):
        picture = gr.Image(type="filepath", label="Picture", height=160, elem_id="character-picture")
        name = gr.Textbox(label="Name", elem_id="character-name")
        greeting = gr.Textbox(label="Greeting", lines=3, max_lines=12, elem_id="character-greeting")
        context = gr.Textbox(label="Context", lines=4, max_lines=20, elem_id="character-context",
                             info="Who the character is; {{char}} and {{user}} become the two names.")
        examples = gr.Textbox(label="Example dialogue", lines=3, max_lines=20, elem_id="character-examples")
        save = gr.Button("Save character", size="sm", elem_id="character-save")
        delete = Confirm.build("Delete character", elem_id="character-delete")
        card = gr.File(label="Import a TavernAI / SillyTavern card (PNG) or a JSON / YAML character",
                       file_types=[".png", ".json", ".yaml", ".yml"], type="binary", elem_id="character-import")
    editor = [name, greeting, context, examples, picture]
    outputs = [*view.outputs, dropdown, mode, *editor]

    def editor_values(character_name: str) -> list[Any]:
        if not character_name:
            return ["", "", "", "", None]
        character = load_character(character_name, characters_dir=folder)
        image = character_picture(character_name, characters_dir=folder)
        return [character.name, character.greeting, character.context, character.example_dialogue,
                str(image) if image else None]

    def switch(data: dict[Any, Any], character_name: str, *, mode_value: Any = None) -> list[Any]:
        session = session_of(data[ctx.session])
        session.character = character_name
        warn(session.open_latest())
        values = {**data, dropdown: character_name}
        if mode_value is not None:
            values[mode] = mode_value
        chatbot, chats = show(ctx, session, ctx.read_chat(values))
        choices = gr.update(choices=list_characters(folder), value=character_name)
        return [chatbot, chats, choices, mode_value if mode_value is not None else gr.skip(),
                *editor_values(character_name)]

    inputs = {ctx.session, *ctx.chat.inputs, *editor, card}

    @user_errors
    def on_pick(data: dict[Any, Any]) -> list[Any]:
        return switch(data, data[dropdown])

    @user_errors
    def on_save(data: dict[Any, Any]) -> list[Any]:
        character_name = data[name].strip()
        if not character_name:
            raise ConfigError("Give the character a name first.")
        current = data[picture]
        old = character_picture(character_name, characters_dir=folder) if character_name in list_characters(
            folder) else None
        new_picture = Path(current).read_bytes() if current and (old is None or Path(current) != old) else None
        character = Character(name=character_name, greeting=data[greeting], context=data[context],
                               example_dialogue=data[examples],
                               picture=old.name if old is not None and new_picture is None else None)
        save_character(character_name, character, picture=new_picture, characters_dir=folder)
        gr.Info(f"Saved {character_name}.")
        return switch(data, character_name)

    @user_errors
    def on_delete(data: dict[Any, Any]) -> list[Any]:
        delete_character(data[dropdown], characters_dir=folder)
        remaining = list_characters(folder)
        gr.Info(f"Deleted {data[dropdown]}.")
        return switch(data, remaining[0] if remaining else "")

    @user_errors
    def on_import(data: dict[Any, Any]) -> list[Any]:
        if not data[card]:
            return [gr.skip()] * len(outputs)
        imported = import_character(data[card], characters_dir=folder)
        gr.Info(f"Imported {imported}; chat mode switched to 'chat'.")
        mode_value = "chat" if data[mode] == "instruct" else data[mode]
        return switch(data, imported, mode_value=mode_value)

    dropdown.change(on_pick, inputs, outputs)  # also when an extension (the gallery) sets it
    save.click(on_save, inputs, outputs)
    delete.yes.click(on_delete, inputs, outputs)
    card.upload(on_import, inputs, outputs)
    ctx.session_listeners.append((user_errors(lambda data: editor_values(data[dropdown])), {dropdown}, editor))
