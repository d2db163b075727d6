"""Characters for chat modes: YAML files in `characters/` (text-generation-webui's format), their pictures, and
import of TavernAI / SillyTavern cards (PNG with a base64 JSON `chara` text chunk, or plain JSON).

The user's own persona (name and bio) is not a character: it lives in the chat settings.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from modules.chat.files import dump_yaml, file_in
from modules.errors import ConfigError, NotFound
from modules.paths import atomic_write_bytes, atomic_write_text

DEFAULT_CHARACTERS_DIR = Path(__file__).resolve().parents[2] / "characters"

_DATA_SUFFIXES = (".yaml", ".yml", ".json")
_PICTURE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
# Keys text-generation-webui and Pygmalion-era files use besides ours; read, never written.
_LEGACY_KEYS = {"bot", "char_name", "char_persona", "char_greeting", "world_scenario", "your_name", "user",
                "example_dialogue", "<|bot|>", "<|user|>"}


@dataclass
class Character:
    name: str
    greeting: str = ""
    context: str = ""  # who the character is; {{char}} and {{user}} are replaced at prompt time
    example_dialogue: str = ""
    picture: str | None = None  # an image file inside the characters folder

    def greeting_message(self, user_name: str) -> dict[str, str] | None:
        """The first assistant message of a new chat with this character, or None if it has no greeting."""
        if not self.greeting.strip():
            return None
        return {"role": "assistant", "content": replace_placeholders(self.greeting, user_name, self.name)}


def replace_placeholders(text: str, user_name: str, character_name: str) -> str:
    """{{user}}/{{char}} (any case) and <USER>/<BOT> in character texts become the two names."""
    text = re.sub(r"\{\{user\}\}", lambda _: user_name, text, flags=re.IGNORECASE)
    text = re.sub(r"\{\{char\}\}", lambda _: character_name, text, flags=re.IGNORECASE)
    return text.replace("<USER>", user_name).replace("<BOT>", character_name)


# --- files in characters/ ---------------------------------------------------------------------------------------


def list_characters(characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR) -> list[str]:
    folder = Path(characters_dir)
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.iterdir() if p.suffix in _DATA_SUFFIXES and p.is_file()}
    return sorted(names, key=str.lower)


def _data_path(name: str, folder: str | os.PathLike[str]) -> Path | None:
    for suffix in _DATA_SUFFIXES:
        path = file_in(folder, name, suffix, what="character")
        if path.is_file():
            return path
    return None


def load_character(name: str, *, characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR) -> Character:
    path = _data_path(name, characters_dir)
    if path is None:
        raise NotFound(f"No character named {name!r} in {characters_dir}.")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The character file {path.name} cannot be read: {exc}") from None
    character = character_from_dict(data, source=path.name, default_name=name)
    if character.picture is None:
        character.picture = next((f"{name}{s}" for s in _PICTURE_SUFFIXES.values()
                                  if (path.parent / f"{name}{s}").is_file()), None)
    return character


def character_from_dict(data: Any, *, source: str, default_name: str = "") -> Character:
    """Read our format, text-generation-webui's, Pygmalion's, or a Tavern card's dict; `source` names it in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} does not hold a character: expected a mapping of fields.")
    if _is_tavern(data):
        return _from_tavern(data, source)
    unknown = set(data) - {f for f in Character.__dataclass_fields__} - _LEGACY_KEYS
    if unknown:
        raise ConfigError(f"{source} has unknown character field(s): {', '.join(sorted(map(str, unknown)))}. "
                          "Known: name, greeting, context, example_dialogue, picture.")
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: the field '{key}' must be text.")
    name = next((data[k] for k in ("name", "bot", "char_name", "<|bot|>") if data.get(k)), default_name)
    if not name.strip():
        raise ConfigError(f"{source} has no 'name'.")
    context = data.get("context") or ""
    if not context and (data.get("char_persona") or data.get("world_scenario")):  # Pygmalion
        context = "\n".join(p for p in (f"{name}'s Persona: {data['char_persona']}" if data.get("char_persona")
                                        else "", f"Scenario: {data['world_scenario']}"
                                        if data.get("world_scenario") else "") if p)
    picture = data.get("picture") or None
    if picture is not None and ("/" in picture or "\\" in picture or picture.startswith(".")):
        raise ConfigError(f"{source}: 'picture' must be a plain file name inside the characters folder.")
    return Character(name=name.strip(), greeting=_text(data.get("greeting") or data.get("char_greeting")),
                     context=_text(context), example_dialogue=_text(data.get("example_dialogue")), picture=picture)


def save_character(name: str, character: Character, *, picture: bytes | None = None,
                   characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR) -> Path:
    """Write `<name>.yaml` (and `<name>.png|jpg|webp` from `picture`) atomically; returns the YAML path."""
    path = file_in(characters_dir, name, ".yaml", what="character")
    if not character.name.strip():
        raise ConfigError("A character needs a name.")
    if picture is not None:
        suffix = _picture_suffix(picture)
        picture_path = file_in(characters_dir, name, suffix, what="character picture")
        atomic_write_bytes(picture_path, picture)
        character.picture = picture_path.name
    data = {k: v for k, v in asdict(character).items() if v}
    atomic_write_text(path, dump_yaml(data))
    for other in (".yml", ".json"):  # one file per character
        stale = path.with_suffix(other)
        if stale.is_file():
            stale.unlink()
    return path


def delete_character(name: str, *, characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR) -> None:
    if _data_path(name, characters_dir) is None:
        raise NotFound(f"No character named {name!r} in {characters_dir}.")
    try:
        picture = load_character(name, characters_dir=characters_dir).picture
    except ConfigError:  # a broken file can still be deleted
        picture = None
    doomed = [file_in(characters_dir, name, s, what="character") for s in (*_DATA_SUFFIXES, ".png", ".jpg",
                                                                            ".jpeg", ".webp")]
    if picture:
        doomed.append(file_in(characters_dir, picture, "", what="character picture"))
    for path in doomed:
        if path.is_file():
            path.unlink()


def character_picture(name: str, *, characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR) -> Path | None:
    """The character's picture file, if it has one."""
    character = load_character(name, characters_dir=characters_dir)
    if not character.picture:
        return None
    path = file_in(characters_dir, character.picture, "", what="character picture")
    return path if path.is_file() else None


# --- Tavern / SillyTavern cards ---------------------------------------------------------------------------------


def parse_character_card(data: bytes) -> tuple[Character, bytes | None]:
    """A character from a card's bytes: a PNG with a `chara` (or `ccv3`) chunk, or JSON/YAML text.

    Returns the character and the picture bytes (the PNG itself; None for a text card)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return character_from_dict(_png_card_json(data), source="The PNG card"), data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("The character file is neither a PNG card nor UTF-8 JSON/YAML text.") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"The character file is neither valid JSON nor YAML: {exc}") from None
    return character_from_dict(parsed, source="The character file"), None


def import_character(data: bytes, *, characters_dir: str | os.PathLike[str] = DEFAULT_CHARACTERS_DIR,
                     name: str | None = None) -> str:
    """Parse a card and save it as a new character (never over an existing one); returns its file name."""
    character, picture = parse_character_card(data)
    base = _safe_file_name(name or character.name)
    chosen, number = base, 0
    while _data_path(chosen, characters_dir) is not None:
        number += 1
        chosen = f"{base}_{number:03d}"
    save_character(chosen, character, picture=picture, characters_dir=characters_dir)
    return chosen


def _png_card_json(data: bytes) -> dict[str, Any]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            chunks = dict(image.text)  # reads text chunks after the image data too
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"The PNG card cannot be read: {exc}") from None
    payload = chunks.get("chara") or chunks.get("ccv3")
    if payload is None:
        raise ConfigError("This PNG is not a character card: it has no 'chara' text chunk.")
    try:
        decoded = base64.b64decode(str(payload), validate=True)
        card = json.loads(decoded.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"The PNG card's 'chara' chunk is not base64-encoded JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ConfigError("The PNG card's 'chara' chunk does not hold a JSON object.")
    return card


def _is_tavern(data: dict[str, Any]) -> bool:
    return str(data.get("spec", "")).startswith("chara_card_") or "first_mes" in data or "mes_example" in data


def _from_tavern(data: dict[str, Any], source: str) -> Character:
    """v1 cards hold the fields at the top; v2 (`spec: chara_card_v2`) and v3 hold them under `data`."""
    if str(data.get("spec", "")).startswith("chara_card_"):
        data = data.get("data")
        if not isinstance(data, dict):
            raise ConfigError(f"{source} says spec {data!r} but has no 'data' object.")
    fields = {}
    for key in ("name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: the card field '{key}' must be text.")
        fields[key] = _text(value)
    if not fields["name"]:
        raise ConfigError(f"{source} has no 'name'.")
    context = "\n\n".join(part for part in (
        fields["system_prompt"], fields["description"],
        f"{{{{char}}}}'s personality: {fields['personality']}" if fields["personality"] else "",
        f"Scenario: {fields['scenario']}" if fields["scenario"] else "") if part)
    examples = "\n".join(line for line in fields["mes_example"].split("\n") if line.strip().upper() != "<START>")
    return Character(name=fields["name"], greeting=fields["first_mes"], context=context,
                     example_dialogue=examples.strip())


def _text(value: Any) -> str:
    return (value or "").replace("\r\n", "\n").strip()


def _picture_suffix(picture: bytes) -> str:
    try:
        with Image.open(io.BytesIO(picture)) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"The character picture is not an image: {exc}") from None
    if kind not in _PICTURE_SUFFIXES:
        raise ConfigError(f"The character picture is {kind}; use PNG, JPEG or WEBP.")
    return _PICTURE_SUFFIXES[kind]


def _safe_file_name(name: str) -> str:
    cleaned = re.sub(r"[^\w \-().,']+", "_", name).strip(" ._")
    return cleaned[:100] or "character"

