"""Characters: the shipped ones load, files round-trip, Tavern/SillyTavern cards (PNG v1 and v2, JSON) import with
their picture, bad cards get clear errors, and names never leave the characters folder."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules.chat.characters import (Character, character_picture, delete_character, import_character,
                                     list_characters, load_character, parse_character_card, save_character)
from modules.errors import ConfigError, PathError

V1 = {"name": "Rook", "description": "{{char}} is a chess-playing android.", "personality": "calm, precise",
      "scenario": "A park in the rain.", "first_mes": "Care for a game, {{user}}?",
      "mes_example": "<START>\r\n{{user}}: Do you ever lose?\r\n{{char}}: Once. On purpose."}


def png(text_chunks: dict[str, str] | None = None, colour: str = "red") -> bytes:
    info = PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_with_chunk_after_image_data(key: str, value: str) -> bytes:
    """SillyTavern writes its `chara` chunk right before IEND, after the pixels."""
    data = png()
    body = key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def b64(card: dict) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode()


def test_shipped_characters_load() -> None:
    assert {"Assistant", "Captain Mira"} <= set(list_characters())
    assistant = load_character("Assistant")
    assert assistant.name == "Assistant" and assistant.context and assistant.greeting
    mira = load_character("Captain Mira")
    assert mira.example_dialogue.startswith("{{user}}:")
    assert "{{user}}" not in mira.greeting_message("Sam")["content"]


def test_save_list_load_delete_round_trip(tmp_path: Path) -> None:
    character = Character(name="Nell", greeting="Hi {{user}}!", context="{{char}} runs a bakery.\nShe is kind.",
                          example_dialogue="{{user}}: Bread?\n{{char}}: Always.")
    picture = png(colour="blue")
    save_character("Nell", character, picture=picture, characters_dir=tmp_path)
    assert list_characters(tmp_path) == ["Nell"]
    loaded = load_character("Nell", characters_dir=tmp_path)
    assert loaded == Character(name="Nell", greeting="Hi {{user}}!", context="{{char}} runs a bakery.\nShe is kind.",
                               example_dialogue="{{user}}: Bread?\n{{char}}: Always.", picture="Nell.png")
    assert character_picture("Nell", characters_dir=tmp_path).read_bytes() == picture
    assert "context: |" in (tmp_path / "Nell.yaml").read_text()  # readable block text, as tgw writes it
    delete_character("Nell", characters_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_text_generation_webui_and_pygmalion_files_load(tmp_path: Path) -> None:
    (tmp_path / "Old.yaml").write_text("name: Old\ngreeting: Hello\ncontext: Old context.\n")
    assert load_character("Old", characters_dir=tmp_path).context == "Old context."
    (tmp_path / "Pyg.json").write_text(json.dumps({"char_name": "Pyg", "char_persona": "Shy.",
                                                   "char_greeting": "Oh, hi.", "world_scenario": "A library."}))
    pyg = load_character("Pyg", characters_dir=tmp_path)
    assert (pyg.name, pyg.greeting, pyg.context) == ("Pyg", "Oh, hi.", "Pyg's Persona: Shy.\nScenario: A library.")


def test_bad_character_files_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "Typo.yaml").write_text("name: Typo\ncontxt: oops\n")
    with pytest.raises(ConfigError, match="contxt"):
        load_character("Typo", characters_dir=tmp_path)
    (tmp_path / "List.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="List.yaml"):
        load_character("List", characters_dir=tmp_path)
    (tmp_path / "Num.yaml").write_text("name: Num\ncontext: 5\n")
    with pytest.raises(ConfigError, match="'context' must be text"):
        load_character("Num", characters_dir=tmp_path)
    with pytest.raises(ConfigError, match="No character named 'Ghost'"):
        load_character("Ghost", characters_dir=tmp_path)
    delete_character("Typo", characters_dir=tmp_path)  # a broken file can still be deleted
    assert not (tmp_path / "Typo.yaml").exists()


def test_png_v1_card_imports_with_its_picture(tmp_path: Path) -> None:
    card = png({"chara": b64(V1)})
    name = import_character(card, characters_dir=tmp_path)
    assert name == "Rook"
    rook = load_character("Rook", characters_dir=tmp_path)
    assert rook.greeting == "Care for a game, {{user}}?"
    assert "{{char}} is a chess-playing android." in rook.context
    assert "personality: calm, precise" in rook.context and "Scenario: A park in the rain." in rook.context
    assert rook.example_dialogue == "{{user}}: Do you ever lose?\n{{char}}: Once. On purpose."
    assert character_picture("Rook", characters_dir=tmp_path).read_bytes() == card  # the card is the picture
    # A second import never overwrites the first.
    assert import_character(card, characters_dir=tmp_path) == "Rook_001"
    assert load_character("Rook", characters_dir=tmp_path) == rook


def test_png_v2_card_with_chunk_after_image_data(tmp_path: Path) -> None:
    v2 = {"spec": "chara_card_v2", "spec_version": "2.0",
          "data": {**V1, "name": "Rook Two", "system_prompt": "Write vividly.", "alternate_greetings": ["Yo"]}}
    character, picture = parse_character_card(png_with_chunk_after_image_data("chara", b64(v2)))
    assert character.name == "Rook Two" and character.context.startswith("Write vividly.")
    assert picture is not None and Image.open(io.BytesIO(picture)).size == (8, 8)


def test_json_cards_import_without_picture(tmp_path: Path) -> None:
    v2 = {"spec": "chara_card_v2", "data": V1}
    name = import_character(json.dumps(v2).encode(), characters_dir=tmp_path)
    assert load_character(name, characters_dir=tmp_path).greeting == V1["first_mes"]
    assert character_picture(name, characters_dir=tmp_path) is None
    own = parse_character_card(b"name: Plain\ngreeting: Hey\ncontext: Plain context.\n")[0]
    assert own == Character(name="Plain", greeting="Hey", context="Plain context.")


@pytest.mark.parametrize("data, message", [
    (png(), "no 'chara' text chunk"),
    (png({"chara": "%%% not base64 %%%"}), "not base64-encoded JSON"),
    (png({"chara": base64.b64encode(b"[1, 2]").decode()}), "does not hold a JSON object"),
    (png({"chara": b64({"spec": "chara_card_v2", "spec_version": "2.0"})}), "no 'data' object"),
    (png({"chara": b64({**V1, "name": ""})}), "no 'name'"),
    (png({"chara": b64({**V1, "first_mes": ["a", "list"]})}), "'first_mes' must be text"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot be read"),
    (b"\xff\xfe\x00garbage", "neither a PNG card nor UTF-8"),
    (b"[1, 2, 3]", "does not hold a character"),
])
def test_bad_cards_get_clear_errors(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        import_character(data, characters_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_picture_must_be_an_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an image"):
        save_character("X", Character(name="X"), picture=b"not an image", characters_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "..\\x", "sub/x", "~x"])
def test_character_names_cannot_escape(tmp_path: Path, name: str) -> None:
    inner = tmp_path / "characters"
    inner.mkdir()
    (tmp_path / "x.yaml").write_text("name: Outside\n")
    with pytest.raises(PathError):
        load_character(name, characters_dir=inner)
    with pytest.raises(PathError):
        save_character(name, Character(name="Evil"), characters_dir=inner)
    with pytest.raises(PathError):
        delete_character(name, characters_dir=inner)
    assert (tmp_path / "x.yaml").read_text() == "name: Outside\n" and list(inner.iterdir()) == []
    (inner / "Evil.yaml").write_text("name: Evil\npicture: ../x.yaml\n")
    with pytest.raises(ConfigError, match="plain file name"):
        load_character("Evil", characters_dir=inner)


def test_characters_folder_reached_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_character("Nell", Character(name="Nell", context="Bakes."), characters_dir=tmp_path / "link")
    assert load_character("Nell", characters_dir=tmp_path / "link").context == "Bakes."
    assert (tmp_path / "real" / "Nell.yaml").is_file()
