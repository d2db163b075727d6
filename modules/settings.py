"""One typed Settings object, built from defaults < user_data/settings.yaml < command-line flags.

Flags are generated from the fields (and from every loader's options type), so a new setting or loader option is
one line in its model and appears in `--help`, in settings.yaml and, later, in the UI.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from loaders.base import BUILTIN_LOADERS, LoaderOptions
from modules.cli import ArgumentParser
from modules.errors import ConfigError, describe_validation_error
from modules.extensions import apply_extension_flags, extension_flags
from modules.generation_params import GenerationParams

DEFAULT_SETTINGS_FILE = Path("user_data/settings.yaml")


class ChatSettings(BaseModel):
    """Chat defaults the Chat tab starts with (and "Save UI defaults" writes)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["chat", "chat-instruct", "instruct"] = Field(
        "instruct", description="instruct: the model's chat template; chat: character roleplay; chat-instruct: "
                                "the template wraps a roleplay command.")
    character: str = Field("Assistant", description="Character used in chat modes.")
    user_name: str = Field("You", description="Your name in chat modes.")
    user_bio: str = Field("", description="Your persona, given to the character.")
    instruction_template: str = Field("", description="Template from instruction-templates/; empty = the model's.")
    system_message: str = Field("", description="System message for instruct mode.")
    chat_instruct_command: str = Field("", description="Command wrapping chat-instruct mode; empty = the default.")
    custom_stopping_strings: list[str] = Field(default_factory=list, description="Extra stop strings for chat.")
    truncation_length: int = Field(0, ge=0, description="Prompt budget in tokens; 0 = the model's context.")
    enable_thinking: Literal["default", "on", "off"] = Field(
        "default", description="Models that think (Qwen3 and the like): on/off is passed to the chat template as "
                               "enable_thinking; default leaves it to the template.")
    reasoning_effort: Literal["default", "low", "medium", "high"] = Field(
        "default", description="Passed to the chat template as reasoning_effort (gpt-oss and the like); default "
                               "leaves it to the template.")


class McpServerSettings(BaseModel):
    """One MCP server whose tools the chat may use (modules/tools/mcp_client.py): a command started over stdio
    (command, args, env, cwd) or a streamable HTTP endpoint (url, headers)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Name shown with the server's tools.")
    command: str | None = Field(None, description="stdio: the program that runs the server.")
    args: list[str] = Field(default_factory=list, description="stdio: its arguments.")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: environment variables added to ours.")
    cwd: Path | None = Field(None, description="stdio: its working folder.")
    url: str | None = Field(None, pattern=r"^https?://", description="Streamable HTTP: the endpoint, e.g. "
                                                                     "http://127.0.0.1:8000/mcp.")
    headers: dict[str, str] = Field(default_factory=dict, description="Streamable HTTP: headers sent with every "
                                                                      "request (e.g. Authorization).")
    tool_prefix: str = Field("", pattern=r"^[A-Za-z0-9_-]*$", description="Put before each tool name the model "
                             "sees, when two servers (or a server and a tool file) name a tool alike.")
    needs_approval: bool = Field(False, description="Ask the user before each call of this server's tools.")
    startup_timeout: float = Field(30, gt=0, description="Seconds to connect and list the tools.")

    @model_validator(mode="after")
    def _one_transport(self) -> "McpServerSettings":
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r} needs either a command (stdio) or a url (streamable HTTP)")
        return self


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model ------------------------------------------------------------------------------------------------
    model: str | None = Field(None, description="Model to load at start (a name in --model-dir).")
    loader: str | None = Field(None, description="Force a loader (llama.cpp, exllamav2, exllamav3, transformers, "
                                                 "remote, or one an extension adds); default: from the path.")
    lora: list[str] = Field(default_factory=list, description="LoRA adapters (names in --lora-dir) to apply.")
    model_dir: Path = Field(Path("models"), description="Folder of models.")
    lora_dir: Path = Field(Path("loras"), description="Folder of LoRA adapters.")
    preset_dir: Path = Field(Path("presets"), description="Folder of generation presets.")
    character_dir: Path = Field(Path("characters"), description="Folder of characters.")
    template_dir: Path = Field(Path("instruction-templates"), description="Folder of instruction templates.")
    user_data_dir: Path = Field(Path("user_data"), description="Folder of chat histories and user files.")
    training_dir: Path = Field(Path("training"), description="Folder of training datasets (datasets/) and runs "
                                                             "(runs/).")
    loader_options: dict[str, Any] = Field(default_factory=dict, description="Loader options (see the flags).")
    # --- serving several requests and models ---------------------------------------------------------------------
    max_models: int = Field(1, ge=0, description="Models kept loaded at once; loading one more unloads the least "
                                                 "recently used idle one (0: no limit).")
    memory_budget: str = Field("0", description="Memory the loaded models may take together, e.g. 12GiB; loading "
                                                "past it unloads the least recently used idle model (0: no limit).")
    idle_unload: float = Field(0, ge=0, description="Unload a model nobody used for this many seconds (0: never).")
    max_queue: int = Field(64, ge=0, description="Requests that may wait per model; more are refused with 503 "
                                                 "and Retry-After (0: no limit).")
    # --- generation and chat defaults -------------------------------------------------------------------------
    preset: str = Field("Default", description="Generation preset (a name in --preset-dir).")
    generation: dict[str, Any] = Field(default_factory=dict, description="GenerationParams overriding the preset.")
    chat: ChatSettings = Field(default_factory=ChatSettings)
    # --- tools in the chat (modules/tools) --------------------------------------------------------------------
    tools_dir: Path = Field(Path("user_data/tools"), description="Folder of one-file Python tools; their code "
                                                                 "runs when they are loaded.")
    tool_timeout: float = Field(30, gt=0, description="Seconds a tool call may take; then the model gets a "
                                                      "'timed out' error result.")
    tool_max_rounds: int = Field(5, ge=1, description="Rounds of tool calls one chat turn may make.")
    mcp_servers: list[McpServerSettings] = Field(default_factory=list, description="MCP servers whose tools the "
                                                 "chat may use (settings.yaml only).")
    # --- web UI -----------------------------------------------------------------------------------------------
    listen: bool = Field(False, description="Listen on the network (0.0.0.0 or --listen-host), not just 127.0.0.1.")
    listen_host: str | None = Field(None, description="Address to bind with --listen.")
    listen_port: int = Field(7860, ge=1, le=65535, description="Web UI port.")
    share: bool = Field(False, description="Ask Gradio for a public share link (off by default).")
    gradio_auth: str | None = Field(None, description="Protect the UI: user:password (comma-separate several).")
    gradio_auth_path: Path | None = Field(None, description="File of user:password lines protecting the UI.")
    multi_user: bool = Field(False, description="Each browser session keeps its own chats and state.")
    dark_theme: bool = Field(False, description="Start the UI in dark mode.")
    admin_users: list[str] = Field(default_factory=list, description="Signed-in users (--gradio-auth) who get "
                                   "the operator's controls with --multi-user (extensions, Save UI defaults).")
    admin_ui: bool = Field(False, description="With --multi-user, give every page the operator's controls "
                                              "(a single-operator setup).")
    # --- extensions (the API is one: `--api` and its flags are declared by extensions/openai) ------------------
    extensions: list[str] = Field(default_factory=list, description="Extensions to enable (names in extensions/).")
    extension_params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                        description="Parameters per extension.")
    # --- misc -------------------------------------------------------------------------------------------------
    settings: Path | None = Field(None, description="Settings YAML to read (default: user_data/settings.yaml).")
    verbose: bool = Field(False, description="Log more (prompts, timings).")
    #: The settings and loader options ("loader_options.NAME") given on the command line: they win over the
    #: per-model settings of models.yaml too (modules.model_settings), which settings.yaml does not.
    _command_line: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @field_validator("extensions", mode="before")
    @classmethod
    def _extension_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _extensions_mapping(cls, data: Any) -> Any:
        """settings.yaml may write `extensions: {name: {param: value}}`, which enables each named extension
        (unless it says `enabled: false`) and sets its params; the flags extensions declare (`api: true`,
        `api_port: 5001`) may also be written at the top level, as on the command line."""
        if isinstance(data, dict) and isinstance(data.get("extensions"), str):
            data = {**data, "extensions": [data["extensions"]]}
        if isinstance(data, dict) and isinstance(data.get("extensions"), dict):
            mapping = data["extensions"]
            data = dict(data)
            params = dict(data.get("extension_params") or {})
            enabled = []
            for name, values in mapping.items():
                values = dict(values or {})
                if values.pop("enabled", True):
                    enabled.append(name)
                params[name] = {**params.get(name, {}), **values}
            data["extensions"] = enabled
            data["extension_params"] = params
        if isinstance(data, dict):
            data = apply_extension_flags(data, extension_flags())
        return data

    @model_validator(mode="after")
    def _valid_extension_params(self) -> "Settings":
        """Check the params given to each built-in extension against its Params model now, so a bad value stops
        the start with the key named instead of disabling the extension later."""
        from modules.extensions import BUILTIN_DIR, ExtensionRegistry

        finder = ExtensionRegistry([BUILTIN_DIR], param_overrides=self.extension_params)
        available = finder.available()
        for name in self.extension_params:
            if name in available:
                try:
                    module = finder.import_package(name)
                except Exception:  # reported, with its reason, when the extension is enabled
                    continue
                finder.validated_params(name, module)  # a ValueError names the key
        return self

    @field_validator("mcp_servers")
    @classmethod
    def _unique_servers(cls, value: list[McpServerSettings]) -> list[McpServerSettings]:
        names = [server.name for server in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"MCP server names must differ; {twice} appear more than once")
        return value

    @field_validator("memory_budget")
    @classmethod
    def _a_size(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGTkmgt]i?[Bb]?)?\s*", value):
            raise ValueError(f"{value!r} is not a size (for example 12GiB, 800MiB or 0)")
        return value

    @field_validator("generation")
    @classmethod
    def _valid_generation(cls, value: dict[str, Any]) -> dict[str, Any]:
        GenerationParams(**value)  # raises with the bad key named
        return value

    @field_validator("loader_options")
    @classmethod
    def _valid_loader_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Names and values: each loader checks the options it declares now, so `--n-ctx -5` stops the start with
        the key named instead of failing the first load."""
        known = all_loader_option_fields()
        unknown = [key for key in value if key not in known]
        if unknown:
            raise ValueError(f"unknown loader option(s) {unknown}; known: {sorted(known)}")
        for name, options in loader_option_types().items():
            declared = {key: item for key, item in value.items() if key in options.model_fields}
            try:
                options(**declared)
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, f"{name} loader")) from None
        return value

    def from_command_line(self, name: str) -> bool:
        """Whether the setting `name` (or "loader_options.NAME") was given as a flag."""
        return name in self._command_line

    @property
    def command_line_loader_options(self) -> dict[str, Any]:
        """The loader options given as flags."""
        return {k: v for k, v in self.loader_options.items() if self.from_command_line(f"loader_options.{k}")}

    @property
    def memory_budget_bytes(self) -> int:
        return parse_size(self.memory_budget)

    @property
    def host(self) -> str:
        if not self.listen:
            return "127.0.0.1"
        return self.listen_host or "0.0.0.0"


def parse_size(text: str) -> int:
    """Bytes of a size such as "12GiB", "800MB", "1.5G" or "0" (binary units: K, M, G, T are powers of 1024)."""
    number = text.strip().rstrip("BbIi").rstrip()
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = units.get(number[-1:].upper(), 1) if number else 1
    if scale != 1:
        number = number[:-1]
    return int(float(number or 0) * scale)


def loader_option_types() -> dict[str, type[LoaderOptions]]:
    return {entry.name: entry.resolve().Options for entry in BUILTIN_LOADERS}


def all_loader_option_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for options in loader_option_types().values():
        fields.update(options.model_fields)
    return fields


# --- YAML -----------------------------------------------------------------------------------------------------
def read_settings_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the settings file {path}: {exc.strerror}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of setting: value, not {type(data).__name__}.")
    return data


# --- command line ---------------------------------------------------------------------------------------------
_SKIP_FLAGS = {"loader_options", "generation", "chat", "extension_params", "mcp_servers"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="webui.py", description="A local LLM workbench: load a model, chat, tune sampling, train LoRAs, and "
                                     "serve an OpenAI-compatible API.",
        argument_default=argparse.SUPPRESS)
    general = parser.add_argument_group("general")
    for name, field in Settings.model_fields.items():
        if name not in _SKIP_FLAGS:
            _add_flag(general, name, field.annotation, field.description or "")
    groups: dict[str, Any] = {}
    for flag in extension_flags():
        if flag.extension not in groups:
            groups[flag.extension] = parser.add_argument_group(f"{flag.extension} extension")
        _add_flag(groups[flag.extension], flag.name, flag.annotation, flag.description)
    seen: set[str] = set()
    for loader_name, options in loader_option_types().items():
        group = parser.add_argument_group(f"{loader_name} loader options")
        for name, field in options.model_fields.items():
            if name in seen or name in Settings.model_fields:
                continue
            seen.add(name)
            _add_flag(group, name, field.annotation, field.description or "", dest=f"loader_options.{name}")
    return parser


def _add_flag(group: Any, name: str, annotation: Any, help_text: str, *, dest: str | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    base, is_list = _unwrap(annotation)
    kwargs: dict[str, Any] = {"dest": dest or name, "help": help_text}
    if base is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(base) is Literal:
        kwargs["choices"] = list(typing.get_args(base))
        base = type(kwargs["choices"][0])
    if base is Path:
        base = str
    kwargs["type"] = base if base in (int, float, str) else str
    if "choices" not in kwargs:
        kwargs["metavar"] = name.upper()
    if is_list:
        kwargs["nargs"] = "+"
    group.add_argument(flag, **kwargs)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) for annotations like `int | None`, `list[str]`, `Literal[...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags, read the settings file they name (or the default one), and merge: flags win."""
    args = vars(build_parser().parse_args(argv))
    flags: dict[str, Any] = {}
    loader_flags: dict[str, Any] = {}
    for key, value in args.items():
        if key.startswith("loader_options."):
            loader_flags[key.split(".", 1)[1]] = value
        else:
            flags[key] = value
    settings_path = Path(flags["settings"]) if flags.get("settings") else DEFAULT_SETTINGS_FILE
    from_file: dict[str, Any] = {}
    if settings_path.exists():
        from_file = read_settings_file(settings_path)
    elif flags.get("settings"):
        raise ConfigError(f"The settings file {settings_path} does not exist.")
    try:
        base = Settings(**from_file)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(settings_path))) from None
    merged = base.model_dump()
    merged.update(flags)
    merged["loader_options"] = {**base.loader_options, **loader_flags}
    merged["settings"] = settings_path
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "command line")) from None
    settings._command_line = frozenset(flags) | {f"loader_options.{k}" for k in loader_flags}
    return settings


def save_settings(settings: Settings, path: Path, *, only: set[str] | None = None) -> None:
    """Write the settings that differ from the defaults (or the keys in `only`) to `path`, atomically."""
    from modules.paths import atomic_write_text

    defaults = Settings().model_dump(mode="json")
    current = settings.model_dump(mode="json")
    keys = only if only is not None else {k for k in current if current[k] != defaults[k] and k != "settings"}
    existing = read_settings_file(path) if path.is_file() else {}
    existing.update({k: current[k] for k in sorted(keys)})
    atomic_write_text(path, yaml.safe_dump(existing, sort_keys=False, allow_unicode=True))
