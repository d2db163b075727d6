"""User-supplied names never escape their folder."""
import os
from pathlib import Path

import pytest

from modules.errors import ConfigError, NotFound, PathError
from modules.paths import atomic_write_text, resolve_inside


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "..\\x", "C:\\x", "~/x", "", " ", "a\x00b", ".",
                                  "\ud800", "x" * 256, "é" * 128, "a/" * 2100 + "b"])
def test_traversal_and_odd_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(PathError):
        resolve_inside(tmp_path, name, must_exist=True)


def test_names_too_long_for_the_file_system_are_bad_input_not_os_errors(tmp_path: Path):
    with pytest.raises(OSError):  # what the OS says when asked about such a name
        (tmp_path / ("x" * 5000)).exists()
    with pytest.raises(PathError, match="too long") as error:
        resolve_inside(tmp_path, "x" * 5000, what="preset", must_exist=True)
    assert "5000 characters" in str(error.value) and len(str(error.value)) < 300  # the name is not echoed whole
    assert resolve_inside(tmp_path, "x" * 255).name == "x" * 255  # the longest name a file may have
    deep = tmp_path / "/".join(["d" * 200] * 20)  # a folder whose own path is close to the limit
    with pytest.raises(PathError, match="longer than the file system accepts"):
        resolve_inside(deep, "x" * 200)


def test_symlinks_placed_in_the_folder_are_followed_on_purpose(tmp_path: Path):
    outside = tmp_path / "other-disk"
    outside.mkdir()
    (outside / "weights.gguf").write_bytes(b"GGUF")
    base = tmp_path / "models"
    base.mkdir()
    (base / "linked.gguf").symlink_to(outside / "weights.gguf")
    assert resolve_inside(base, "linked.gguf", must_exist=True).read_bytes() == b"GGUF"
    with pytest.raises(PathError):
        resolve_inside(base, "../other-disk/weights.gguf")


def test_plain_and_nested_names_resolve_inside(tmp_path: Path):
    assert resolve_inside(tmp_path, "model.gguf") == (tmp_path / "model.gguf").resolve()
    assert resolve_inside(tmp_path, "org_model/weights") == (tmp_path / "org_model" / "weights").resolve()
    with pytest.raises(NotFound, match="No file") as missing:
        resolve_inside(tmp_path, "missing", must_exist=True)
    assert isinstance(missing.value, PathError) and isinstance(missing.value, ConfigError)  # caught as either


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "history.json"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]  # no temporary file left behind
