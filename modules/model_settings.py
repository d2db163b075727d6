"""Per-model settings: `user_data/models.yaml` (text-generation-webui's config-user.yaml) gives a model, by name or
glob, its loader, loader options, preset, chat template and aliases, so every load path (start-up, the Model tab, the
API's load route, just-in-time loads) loads it the same way and requests get its preset and template.

    SmolLM2-135M-Instruct.Q4_1.gguf:   # an exact name in models/
      n_ctx: 4096                      # loader options, by their flags' names (--n-ctx)
      parallel: 4
      preset: Creative                 # a name in presets/
      template: ChatML                 # a name in instruction-templates/, or Jinja text
      aliases: [smol]                  # other names requests may use
    "*.gguf":                          # a glob: every GGUF file (case does not matter)
      n_gpu_layers: -1
    big-llama:                         # a remote engine, served under this name
      loader: remote
      remote_url: http://10.0.0.5:8000/v1
      remote_model: meta-llama/Llama-3.1-70B-Instruct
      remote_api_key: sk-...

Globs apply in file order (a later one wins), then the exact entry on top. The file is read again whenever it
changes on disk; a bad key or value is a ConfigError naming the file, the entry and the key. Nothing here loads a
model or imports Gradio: modules.model_manager applies what `resolve` returns.
"""
from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loaders.base import LoaderOptions, LoaderRegistry
from modules.chat.files import dump_yaml
from modules.errors import ConfigError, ModelLoadError, WorkbenchError, describe_validation_error
from modules.paths import atomic_write_text

MODELS_FILE = "models.yaml"
_GLOB_CHARS = frozenset("*?[")


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


def is_jinja(template: str) -> bool:
    """A template written inline (Jinja text) rather than the name of one in instruction-templates/."""
    return "{{" in template or "{%" in template


class ModelEntry(BaseModel):
    """One entry of models.yaml as written; its loader options are written flat beside these keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loader: str | None = Field(None, description="The loader (llama.cpp, transformers, remote, ...).")
    preset: str | None = Field(None, description="Generation preset for requests to this model.")
    template: str | None = Field(None, description="Chat template: a name in instruction-templates/ or Jinja.")
    aliases: list[str] = Field(default_factory=list, description="Other names requests may use for this model.")
    options: dict[str, Any] = Field(default_factory=dict, description="Loader options.")

    @field_validator("loader", "preset", "template")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave the key out instead)")
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _alias_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("aliases")
    @classmethod
    def _plain_aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not alias.strip() or is_glob(alias):
                raise ValueError(f"{alias!r} is not a plain name (no globs, not empty)")
        return value

    def written(self) -> dict[str, Any]:
        """The entry as the file holds it (options flat, empty keys left out)."""
        data: dict[str, Any] = {"loader": self.loader, **self.options, "preset": self.preset,
                                "template": self.template, "aliases": self.aliases or None}
        return {key: value for key, value in data.items() if value is not None}


#: Keys of an entry that are not loader options.
ENTRY_KEYS = tuple(name for name in ModelEntry.model_fields if name != "options")


@dataclass(frozen=True)
class ModelSpec:
    """What models.yaml says for one name, entries merged: the name it stands for (an alias resolved), and the
    loader, options, preset and template to use where the caller does not choose them."""

    name: str
    loader: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    template: str | None = None
    aliases: tuple[str, ...] = ()
    #: The entries that applied, in the order they did.
    entries: tuple[str, ...] = ()
    #: key -> the entry that set it (for messages that say where a bad value came from).
    origin: dict[str, str] = field(default_factory=dict)


class ModelSettings:
    """The models.yaml of one app. `registry` gives the loaders whose options an entry may set (extensions add
    theirs); `preset_dir` and `template_dir` hold the presets and templates entries name."""

    def __init__(self, path: Path, registry: LoaderRegistry, *, preset_dir: Path, template_dir: Path):
        self.path = Path(path)
        self.registry = registry
        self.preset_dir = Path(preset_dir)
        self.template_dir = Path(template_dir)
        self._lock = threading.Lock()  # the cached entries
        self._write_lock = threading.Lock()  # one save at a time: each reads what the last one wrote
        self._text: str | None = None
        self._entries: dict[str, ModelEntry] = {}

    # --- reading -----------------------------------------------------------------------------------------------
    def entries(self) -> dict[str, ModelEntry]:
        """The entries in file order (none when there is no file), parsed again whenever the text changed: the
        file is small, and a change within the file system's timestamp granularity must not be missed."""
        text = self._read_text() if self.path.is_file() else None
        with self._lock:
            if text != self._text:
                self._entries = self._parse(text) if text is not None else {}
                self._text = text
            return self._entries

    def _read_text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read {self.path}: {exc.strerror}.") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path} is not UTF-8 text.") from None

    def _parse(self, text: str) -> dict[str, ModelEntry]:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.path} is not valid YAML: {exc}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path} must map model names (or globs such as '*.gguf') to their settings, "
                              f"not hold a {type(data).__name__}.")
        types = self._option_types()
        entries: dict[str, ModelEntry] = {}
        for key, raw in data.items():
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(f"{self.path}: {key!r} is not a model name; write names as text.")
            entries[key] = self._entry(key, raw, types)
        self._check_aliases(entries)
        return entries

    def _entry(self, name: str, raw: Any, types: dict[str, type[LoaderOptions]]) -> ModelEntry:
        where = f"{self.path}, model {name!r}"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings ({', '.join(ENTRY_KEYS)} and loader "
                              f"options), not {type(raw).__name__}.")
        known_options = {key for options in types.values() for key in options.model_fields}
        unknown = [str(key) for key in raw if key not in ENTRY_KEYS and key not in known_options]
        if unknown:
            raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; an entry takes "
                              f"{', '.join(ENTRY_KEYS)} and loader options ({', '.join(sorted(known_options))}).")
        fields = {key: value for key, value in raw.items() if key in ENTRY_KEYS}
        options = {key: value for key, value in raw.items() if key not in ENTRY_KEYS}
        try:
            entry = ModelEntry(**fields, options=options)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, where)) from None
        if entry.aliases and is_glob(name):
            raise ConfigError(f"{where}: bad value for 'aliases': a glob names many models, so it cannot have "
                              "aliases; give them on an exact name.")
        if entry.template is not None and is_jinja(entry.template):
            from modules.chat.templates import validate_template

            try:
                validate_template(entry.template)
            except ConfigError as exc:
                raise ConfigError(f"{where}: bad value for 'template': {exc}") from None
        self._check_options(where, entry, types)
        return entry.model_copy(update={"loader": self._loader_name(entry.loader)}) if entry.loader else entry

    def _check_options(self, where: str, entry: ModelEntry, types: dict[str, type[LoaderOptions]]) -> None:
        """Each option must belong to the entry's loader (any loader's, without one) and hold a value it takes. A
        loader this registry does not know yet (an extension's) has its options checked when it loads."""
        declaring = types
        if entry.loader is not None:
            loader = self._loader_name(entry.loader)
            if loader not in types:
                return
            declaring = {loader: types[loader]}
            foreign = [key for key in entry.options if key not in types[loader].model_fields]
            if foreign:
                raise ConfigError(f"{where}: {', '.join(map(repr, foreign))} is not an option of the {loader} "
                                  "loader.")
        for loader, options in declaring.items():
            values = {key: value for key, value in entry.options.items() if key in options.model_fields}
            if not values:
                continue
            try:
                options(**values)
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(exc, f"{where} ({loader} options)")) from None

    def _check_aliases(self, entries: dict[str, ModelEntry]) -> None:
        owner: dict[str, str] = {}
        for name, entry in entries.items():
            for alias in entry.aliases:
                if alias in entries and alias != name:
                    raise ConfigError(f"{self.path}, model {name!r}: the alias {alias!r} is also an entry's name.")
                if alias in owner and owner[alias] != name:
                    raise ConfigError(f"{self.path}, model {name!r}: the alias {alias!r} is also given to "
                                      f"{owner[alias]!r}.")
                owner[alias] = name

    def _option_types(self) -> dict[str, type[LoaderOptions]]:
        types: dict[str, type[LoaderOptions]] = {}
        for name in self.registry.names:
            try:
                types[name] = self.registry.get(name).Options
            except ModelLoadError:  # not installed here: its options cannot be checked
                continue
        return types

    def _loader_name(self, loader: str) -> str:
        """The registry's name for `loader` (its aliases, such as llamacpp, resolved); as written when unknown."""
        try:
            return self.registry.get(loader).name
        except WorkbenchError:
            return loader

    # --- resolving a name --------------------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        """The entry name an alias stands for; any other name as given. Raises ConfigError for a bad file."""
        entries = self.entries()
        if name in entries:
            return name
        return next((key for key, entry in entries.items() if name in entry.aliases), name)

    def resolve(self, name: str, *, own_entry: bool = True) -> ModelSpec:
        """What applies to `name` (or the model an alias names): matching globs in file order, then its exact
        entry (left out with `own_entry` False: what it would get without one)."""
        entries = self.entries()
        name = self.canonical(name)
        base = PurePosixPath(name).name
        chosen = [key for key in entries if key != name and is_glob(key)
                  and (_glob_match(base, key) or _glob_match(name, key))]
        if own_entry and name in entries:
            chosen.append(name)
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key in chosen:
            entry = entries[key]
            for item in ("loader", "preset", "template"):
                if getattr(entry, item) is not None:
                    values[item] = getattr(entry, item)
                    origin[item] = key
            options.update(entry.options)
            origin.update({option: key for option in entry.options})
        aliases = tuple(entries[name].aliases) if own_entry and name in entries else ()
        return ModelSpec(name, options=options, aliases=aliases, entries=tuple(chosen), origin=origin, **values)

    def configured_names(self, *, local_files: bool | None = None) -> list[str]:
        """Exact names with an entry (globs left out); with `local_files` False only those whose loader serves
        no file in models/ (remote engines), which a model list should show since no file does."""
        names = []
        for key, entry in self.entries().items():
            if is_glob(key):
                continue
            if local_files is not None:
                try:
                    local = self.registry.get(entry.loader).local_files if entry.loader else True
                except WorkbenchError:
                    continue
                if local != local_files:
                    continue
            names.append(key)
        return names

    def template_text(self, spec: ModelSpec) -> str | None:
        """The Jinja text of the spec's template (loaded from instruction-templates/ when it is a name)."""
        if spec.template is None:
            return None
        if is_jinja(spec.template):
            return spec.template
        from modules.chat.templates import load_template

        try:
            return load_template(spec.template, templates_dir=self.template_dir)
        except WorkbenchError as exc:
            raise ConfigError(f"{self.path}, model {spec.origin.get('template', spec.name)!r}: bad value for "
                              f"'template': {exc}") from None

    def check_preset(self, spec: ModelSpec) -> None:
        """Raise ConfigError, naming this file and the entry, when the spec's preset is missing or broken."""
        if spec.preset is None:
            return
        from modules.presets import load_preset

        try:
            load_preset(self.preset_dir, spec.preset)
        except WorkbenchError as exc:
            raise ConfigError(f"{self.path}, model {spec.origin.get('preset', spec.name)!r}: bad value for "
                              f"'preset': {exc}") from None

    def check(self) -> None:
        """Read the file and check what its entries name (presets, templates): at start-up, so that a typo stops
        the start instead of the first request to that model."""
        for name, entry in self.entries().items():
            spec = ModelSpec(name, preset=entry.preset, template=entry.template)
            self.check_preset(spec)
            self.template_text(spec)

    # --- writing -----------------------------------------------------------------------------------------------
    def save(self, name: str, entry: ModelEntry) -> None:
        """Write `entry` under `name` (replacing its entry), atomically. The other entries, and comments outside
        the replaced entry, stay as written. The new file is checked first: a bad entry writes nothing."""
        if not name.strip():
            raise ConfigError("Pick a model to save settings for.")
        with self._write_lock:
            text = self._read_text() if self.path.is_file() else ""
            new_text = _spliced(text, name, entry.written(), self.path)
            self._parse(new_text)
            atomic_write_text(self.path, new_text)


def _glob_match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())


def _spliced(text: str, name: str, entry: dict[str, Any], path: Path) -> str:
    """`text` with the top-level entry `name` replaced by `entry` (appended when it has none); every other line
    is kept as written."""
    block = dump_yaml({name: entry or None})
    try:
        root = yaml.compose(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML, so it was not changed: {exc}") from None
    lines = text.splitlines(keepends=True)
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == name:
                start, end = key_node.start_mark.line, _last_line(value_node, key_node.start_mark.line) + 1
                return "".join(lines[:start]) + block + "".join(lines[end:])
    elif root is not None and not (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        raise ConfigError(f"{path} must map model names to their settings; it was not changed.")
    separator = "" if not text or text.endswith("\n") else "\n"
    return text + separator + block


def _last_line(node: yaml.Node, start: int) -> int:
    """The last line (0-based) holding part of `node`'s value, so that comments after it stay where they are."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        mark = node.end_mark
        line = mark.line - 1 if mark.column == 0 and mark.line > node.start_mark.line else mark.line
        return max(line, start)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    return max([start, *(_last_line(child, start) for child in children)])
