"""One home for turning user-supplied names into paths that stay inside their folder."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from modules.errors import NotFound, PathError

_DRIVE = re.compile(r"^[A-Za-z]:")
#: The longest file name (one path component) and path, in bytes, that POSIX file systems accept; a longer name
#: makes the OS raise ENAMETOOLONG, so it is refused here as bad input instead.
NAME_MAX = 255
PATH_MAX = 4096


def resolve_inside(base: str | os.PathLike[str], name: str, *, what: str = "file", must_exist: bool = False) -> Path:
    """Return `base/name`, refusing names that are absolute, climb out with '..' or use backslashes (Windows
    separators), so a name typed into the UI or sent to the API can only reach entries of `base`.

    `name` may contain '/' to reach into sub-folders (a model folder, a character sub-folder), never above `base`.
    Symlinks placed in `base` by its owner are followed on purpose: linking models in from a shared disk is
    common, and only the owner of the folder can create them."""
    if not isinstance(name, str) or not name.strip():
        raise PathError(f"The {what} name is empty.")
    if "\x00" in name:
        raise PathError(f"The {what} name {_shown(name)} contains a NUL byte.")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise PathError(f"The {what} name {_shown(name)} is not valid Unicode (it holds a lone surrogate).") from None
    if len(encoded) >= PATH_MAX or any(len(part.encode("utf-8")) > NAME_MAX for part in name.split("/")):
        raise PathError(f"The {what} name {_shown(name)} is too long ({len(encoded)} bytes; a file name may have "
                        f"at most {NAME_MAX}).")
    if "\\" in name or _DRIVE.match(name) or name.startswith(("/", "~")):
        raise PathError(f"The {what} name {_shown(name)} is not a plain name inside {base}: absolute paths, '~' and "
                        "backslashes are refused.")
    parts = Path(name).parts
    if any(part == ".." for part in parts):
        raise PathError(f"The {what} name {_shown(name)} climbs out of its folder with '..'; it is refused.")
    root = Path(os.path.abspath(base))
    target = Path(os.path.normpath(root / name))
    if target == root or root not in target.parents:
        raise PathError(f"The {what} name {_shown(name)} names no {what} inside {root}.")
    if len(os.fsencode(target)) >= PATH_MAX:
        raise PathError(f"The {what} name {_shown(name)} makes a path longer than the file system accepts.")
    if must_exist and not target.exists():
        raise NotFound(f"No {what} named {_shown(name)} in {root}.")
    return target


def _shown(name: str, limit: int = 80) -> str:
    """A name as messages quote it: repr, cut short so a huge name never floods a log line or an answer."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write through a temporary file in the same folder and rename it over the target, so that a crash
    leaves either the old file or the new one, never half of one."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
