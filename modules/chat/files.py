"""Files of the chat package: names a user gives (a character, a template, a chat id) become files directly inside
one folder, and YAML is written in the readable form text-generation-webui uses."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from modules.errors import PathError
from modules.paths import resolve_inside


def file_in(folder: str | os.PathLike[str], name: str, suffix: str, *, what: str) -> Path:
    """`folder/<name><suffix>`, refusing names that leave the folder or reach into a sub-folder.

    Characters, templates and chats are flat lists, so a '/' in their name is refused as well."""
    if isinstance(name, str) and "/" in name:
        raise PathError(f"The {what} name {name!r} contains '/'; {what} names are plain file names.")
    path = resolve_inside(folder, f"{name}{suffix}", what=what)
    if path.parent.resolve() != Path(folder).resolve():
        raise PathError(f"The {what} name {name!r} does not name a file directly inside {folder}.")
    return path


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks."""


_BlockDumper.add_representer(
    str, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data,
                                                      style="|" if "\n" in data else None))


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=10**9)
