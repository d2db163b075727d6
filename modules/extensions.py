"""Extensions: pluggy hook specifications and the registry that loads `extensions/<name>/` packages by name.

An extension is a package whose `__init__.py` defines hook functions decorated with `@hookimpl` and, optionally, a
`params` object (a pydantic model instance or a dict) that `settings.yaml` overrides (`extensions.<name>.<key>`).
Every hook may take `params` (the extension's own, after overrides) and `services` (the app's Services); an
extension never reaches the app through a global module.

The registry calls hook implementations itself, one extension at a time, so that modifier hooks chain (each sees
the previous extension's result) and so that an extension that raises is reported by name and disabled while
the app goes on. It never installs anything: the start script installs an enabled extension's requirements.txt.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from modules.errors import describe_validation_error

log = logging.getLogger(__name__)

PROJECT = "workbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The extensions shipped with the workbench; imported as the package `extensions.<name>`.
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "extensions"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HookSpecs:
    """What an extension may implement. All arguments are optional in an implementation (pluggy passes only the
    ones it names). `state` is a dict of the request's settings: the GenerationParams fields under their own names
    plus chat keys (mode, character, user_name, ...) and `source` ("ui" or "api")."""

    @hookspec
    def setup(self, app: Any, services: Any, params: Any) -> None:
        """Once at start: start work, add routes to `app` (the FastAPI app served on --api-port)."""

    @hookspec
    def start(self, app: Any, services: Any, params: Any) -> Any:
        """After every extension's setup: serve `app` or start background work. Return a handle with `stop()` (and
        `url` when it serves), or None. The core serves nothing itself: the extension that owns a port does."""

    @hookspec
    def register_loaders(self, loaders: Any, params: Any) -> None:
        """Add loaders to `loaders` (the manager's loaders.base.LoaderRegistry) with `loaders.register(LoaderEntry(
        name, module, class_name))`; they are then offered in the Model tab, --loader and the API's load route."""

    @hookspec
    def ui(self, services: Any, params: Any, components: dict[str, Any]) -> None:
        """Inside the Gradio Blocks of the web UI: add a tab or an accordion. `components` holds named components
        of the app an extension may wire to (for example "character" for the Chat tab's character menu)."""

    @hookspec
    def state_modifier(self, state: dict[str, Any], params: Any) -> dict[str, Any]:
        """Change the request's settings before generation (for example ask for logprobs)."""

    @hookspec
    def chat_input_modifier(self, text: str, visible_text: str, state: dict[str, Any],
                            params: Any) -> tuple[str, str]:
        """Change the user's chat message: (text the model sees, text the chat shows)."""

    @hookspec
    def input_modifier(self, text: str, state: dict[str, Any], params: Any) -> str:
        """Change the text of the user's input (chat message or completion prompt) before the prompt is built."""

    @hookspec
    def history_modifier(self, history: list[dict[str, Any]], params: Any) -> list[dict[str, Any]]:
        """Change the conversation (a list of {"role", "content"} messages) before the prompt is built."""

    @hookspec
    def custom_generate_chat_prompt(self, messages: list[dict[str, Any]], state: dict[str, Any], services: Any,
                                    params: Any) -> str | None:
        """Build the whole chat prompt yourself; None leaves it to the next extension or to modules.chat. The first
        extension (in enabled order) that returns a string wins."""

    @hookspec
    def output_modifier(self, text: str, state: dict[str, Any], tokens: list[Any], params: Any) -> str:
        """Change the finished reply. `tokens` holds its TokenEvents (with logprobs when state asked for them)."""

    @hookspec
    def logits_processor(self, services: Any, params: Any) -> list[Any]:
        """Logits processors (callables `(input_ids, scores) -> scores`, as Transformers takes) to add to
        generation. Honoured by the loaders with the `logits_processors` capability: Transformers only (llama.cpp
        samples natively in C; the remote loader samples on its server)."""


HOOK_NAMES = tuple(name for name in vars(HookSpecs) if not name.startswith("_"))


@dataclass
class Extension:
    name: str
    module: ModuleType
    params: Any
    folder: Path
    hooks: list[str] = field(default_factory=list)

    @property
    def readme(self) -> str:
        path = self.folder / "README.md"
        return path.read_text(encoding="utf-8") if path.is_file() else ""


class ExtensionRegistry:
    """The enabled extensions of one app, in the order they were enabled."""

    def __init__(self, folders: list[Path] | None = None, param_overrides: dict[str, dict[str, Any]] | None = None):
        self.folders = [Path(f) for f in (folders or [BUILTIN_DIR])]
        self.param_overrides = param_overrides or {}
        self.plugins = pluggy.PluginManager(PROJECT)
        self.plugins.add_hookspecs(HookSpecs)
        self.extensions: dict[str, Extension] = {}
        #: name -> why it was disabled; shown to the user (UI messages, log).
        self.errors: dict[str, str] = {}
        self.app: Any = None  # the FastAPI app the setup hooks received (start_extensions)
        #: What the extensions' start hooks returned (servers, workers), by extension name.
        self.handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    # --- loading -------------------------------------------------------------------------------------------------
    def available(self) -> list[str]:
        """Names of the extension packages in the folders (enabled or not)."""
        names = {p.name for folder in self.folders if folder.is_dir() for p in folder.iterdir()
                 if p.is_dir() and (p / "__init__.py").is_file() and _NAME.match(p.name)}
        return sorted(names)

    @property
    def enabled(self) -> list[str]:
        return list(self.extensions)

    def enable(self, name: str) -> bool:
        """Import and register one extension. On failure the error is recorded under its name; returns success."""
        if name in self.extensions:
            return True
        try:
            folder = self._find(name)
            module = self._import(name, folder)
            params = self.validated_params(name, module)
            self.plugins.register(module, name=name)
        except Exception as exc:  # an extension's import may raise anything: report it, go on
            self._fail(name, f"could not be loaded: {type(exc).__name__}: {exc}")
            return False
        hooks = [h.name for h in self.plugins.get_hookcallers(module) or []]
        self.extensions[name] = Extension(name, module, params, folder, hooks)
        self.errors.pop(name, None)
        log.info("extension %s enabled (hooks: %s)", name, ", ".join(hooks) or "none")
        return True

    def enable_all(self, names: list[str]) -> list[str]:
        """Enable each name; returns the messages for those that failed."""
        for name in dict.fromkeys(names):
            self.enable(name)
        return self.messages()

    def disable(self, name: str, reason: str | None = None) -> None:
        extension = self.extensions.pop(name, None)
        if extension is not None and self.plugins.is_registered(extension.module):
            self.plugins.unregister(extension.module)
        if reason:
            self.errors[name] = reason

    def messages(self) -> list[str]:
        return [f"Extension {name!r} {reason}; it is disabled." for name, reason in self.errors.items()]

    def _find(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not an extension name (letters, digits and _ only)")
        for folder in self.folders:
            if (folder / name / "__init__.py").is_file():
                return folder / name
        raise FileNotFoundError(f"no package extensions/{name}/ (available: {', '.join(self.available()) or 'none'})")

    def _import(self, name: str, folder: Path) -> ModuleType:
        if folder.parent.resolve() == BUILTIN_DIR:
            return importlib.import_module(f"extensions.{name}")
        module_name = f"workbench_extension_{name}"
        spec = importlib.util.spec_from_file_location(module_name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module

    def import_package(self, name: str) -> ModuleType:
        """The extension's package, imported (not enabled)."""
        return self._import(name, self._find(name))

    def validated_params(self, name: str, module: ModuleType) -> Any:
        """The extension's params with settings.yaml's `extensions.<name>` values on top; a ValueError names a bad
        or unknown key."""
        params = getattr(module, "params", None)
        overrides = self.param_overrides.get(name) or {}
        if isinstance(params, BaseModel):
            unknown = [key for key in overrides if key not in type(params).model_fields]
            if unknown:
                raise ValueError(f"unknown params {unknown} in settings (extensions.{name}); known: "
                                 f"{sorted(type(params).model_fields)}")
            try:
                return type(params).model_validate({**params.model_dump(), **overrides})
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, f"extensions.{name}")) from None
        if isinstance(params, dict) or params is None:
            merged = dict(params or {})
            unknown = [key for key in overrides if params is not None and key not in merged]
            if unknown:
                raise ValueError(f"unknown params {unknown} in settings (extensions.{name}); known: {sorted(merged)}")
            merged.update(overrides)
            return merged
        raise TypeError(f"params must be a pydantic model or a dict, not {type(params).__name__}")

    def _fail(self, name: str, reason: str) -> None:
        log.error("extension %s %s", name, reason)
        with self._lock:
            self.disable(name, reason)

    # --- calling hooks -------------------------------------------------------------------------------------------
    def _impls(self, hook: str) -> list[tuple[str, Callable[..., Any], tuple[str, ...]]]:
        caller = getattr(self.plugins.hook, hook)
        order = list(self.extensions)
        found = [(impl.plugin_name, impl.function, tuple(impl.argnames)) for impl in caller.get_hookimpls()]
        return sorted(found, key=lambda item: order.index(item[0]) if item[0] in order else len(order))

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call `hook` of every extension that has it, with its own params; (name, result) of those that did not
        raise. One that raises is reported and disabled."""
        results = []
        for name, function, argnames in self._impls(hook):
            extension = self.extensions.get(name)
            if extension is None:
                continue
            available = {**kwargs, "params": extension.params}
            try:
                results.append((name, function(**{arg: available.get(arg) for arg in argnames})))
            except Exception as exc:
                self._fail(name, f"raised in {hook}: {type(exc).__name__}: {exc}")
        return results

    def _chain(self, hook: str, key: str, value: Any, check: Callable[[Any], bool], **kwargs: Any) -> Any:
        """Pass `value` through every extension's `hook` in turn (as argument `key`)."""
        for name, function, argnames in self._impls(hook):
            extension = self.extensions.get(name)
            if extension is None:
                continue
            available = {**kwargs, key: value, "params": extension.params}
            try:
                result = function(**{arg: available.get(arg) for arg in argnames})
            except Exception as exc:
                self._fail(name, f"raised in {hook}: {type(exc).__name__}: {exc}")
                continue
            if result is None:
                continue  # a hook that returns nothing leaves the value as it was
            if not check(result):
                self._fail(name, f"returned a {type(result).__name__} from {hook}, which does not fit")
                continue
            value = result
        return value

    def setup(self, app: Any, services: Any) -> None:
        self.call("setup", app=app, services=services)

    def ui(self, services: Any, components: dict[str, Any] | None = None) -> None:
        self.call("ui", services=services, components=components or {})

    def modify_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return self._chain("state_modifier", "state", state, lambda r: isinstance(r, dict))

    def modify_chat_input(self, text: str, visible_text: str, state: dict[str, Any]) -> tuple[str, str]:
        for name, function, argnames in self._impls("chat_input_modifier"):
            extension = self.extensions.get(name)
            if extension is None:
                continue
            available = {"text": text, "visible_text": visible_text, "state": state, "params": extension.params}
            try:
                result = function(**{arg: available.get(arg) for arg in argnames})
            except Exception as exc:
                self._fail(name, f"raised in chat_input_modifier: {type(exc).__name__}: {exc}")
                continue
            if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(r, str) for r in result):
                text, visible_text = result
            elif result is not None:
                self._fail(name, "returned something other than (text, visible_text) from chat_input_modifier")
        return text, visible_text

    def modify_input(self, text: str, state: dict[str, Any]) -> str:
        return self._chain("input_modifier", "text", text, lambda r: isinstance(r, str), state=state)

    def modify_history(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._chain("history_modifier", "history", history, lambda r: isinstance(r, list))

    def modify_output(self, text: str, state: dict[str, Any], tokens: list[Any] | None = None) -> str:
        return self._chain("output_modifier", "text", text, lambda r: isinstance(r, str), state=state,
                           tokens=tokens or [])

    def custom_chat_prompt(self, messages: list[dict[str, Any]], state: dict[str, Any], services: Any) -> str | None:
        """The first prompt an extension builds (firstresult), or None."""
        for name, result in self.call("custom_generate_chat_prompt", messages=messages, state=state,
                                      services=services):
            if isinstance(result, str):
                return result
            if result is not None:
                self._fail(name, "returned something other than a string from custom_generate_chat_prompt")
        return None

    def logits_processors(self, services: Any) -> list[Any]:
        processors: list[Any] = []
        for name, result in self.call("logits_processor", services=services):
            items = result if isinstance(result, (list, tuple)) else [result]
            bad = [item for item in items if item is not None and not callable(item)]
            if bad:
                self._fail(name, "returned a logits processor that is not callable")
                continue
            processors.extend(item for item in items if item is not None)
        return processors

    def attach_logits_processors(self, services: Any, model: Any) -> None:
        """Give a freshly loaded model the extensions' logits processors, if its loader honours them."""
        from loaders.base import Capability

        if model is None or Capability.LOGITS_PROCESSORS not in model.capabilities:
            return
        model.extra_processors = self.logits_processors(services)


# --- start-up -------------------------------------------------------------------------------------------------
def start_extensions(services: Any, *, serve: bool = True, folders: list[Path] | None = None) -> ExtensionRegistry:
    """Enable the extensions the settings name, let them register loaders, run their setup hooks on one FastAPI
    app, attach their logits processors to every model the manager loads, and (with `serve`) run their start
    hooks, which serve the app where an extension owns a port. Failures become messages in
    services.startup_messages; the app always goes on."""
    settings = services.settings
    registry = ExtensionRegistry(folders, param_overrides=settings.extension_params)
    services.extensions = registry
    registry.enable_all(settings.extensions)
    if not registry.enabled:
        services.startup_messages.extend(registry.messages())
        return registry
    from fastapi import FastAPI

    registry.call("register_loaders", loaders=services.manager.registry)
    app = FastAPI(title="LLM workbench API", version="1")
    registry.app = app
    registry.setup(app, services)

    def attach(event: str, _info: Any) -> None:
        if event == "loaded":  # every resident model (one loaded just now among them) gets the processors
            for resident in services.manager.pool.all():
                registry.attach_logits_processors(services, resident.model)

    services.manager.on_change(attach)
    attach("loaded", None)
    if serve:
        registry.handles = {name: handle for name, handle in registry.call("start", app=app, services=services)
                            if handle is not None}
    services.startup_messages.extend(registry.messages())
    return registry


# --- flags that extensions declare --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtensionFlag:
    """A setting an extension declares for the command line and the top level of settings.yaml: `--api` (enables
    the extension: `param` is None) or `--api-port 5001` (sets `extension_params[extension][param]`). Declared in
    the extension's package as `ENABLE_FLAG = "api"` and as `json_schema_extra={"flag": "api_port"}` on a field
    of its `Params` model, so the core names no extension."""

    name: str  # the settings key; the flag is --name-with-dashes
    extension: str
    param: str | None
    annotation: Any
    description: str


def extension_flags(folders: list[Path] | None = None) -> list[ExtensionFlag]:
    """The flags of every extension package in `folders` (default: the built-in ones). Reading them imports each
    package's __init__ (which therefore must stay light); a package that fails to import declares nothing here
    and is reported when it is enabled."""
    flags: list[ExtensionFlag] = []
    finder = ExtensionRegistry(folders)
    for name in finder.available():
        try:
            module = finder.import_package(name)
        except Exception:  # reported by enable(), with its reason, if the extension is ever enabled
            continue
        enable = getattr(module, "ENABLE_FLAG", None)
        if isinstance(enable, str):
            flags.append(ExtensionFlag(enable, name, None, bool, f"Enable the {name} extension."))
        params = getattr(module, "params", None)
        if isinstance(params, BaseModel):
            for field_name, info in type(params).model_fields.items():
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                if isinstance(extra.get("flag"), str):
                    flags.append(ExtensionFlag(extra["flag"], name, field_name, info.annotation,
                                               f"{info.description or ''} ({name} extension)".strip()))
    return flags


def apply_extension_flags(data: dict[str, Any], flags: list[ExtensionFlag]) -> dict[str, Any]:
    """Move extension flag keys (`api: true`, `api_port: 5001`) of a settings mapping into `extensions` and
    `extension_params`, so that flags and the top-level keys of settings.yaml mean the same as
    `extensions: {openai: {port: 5001}}`."""
    by_name = {flag.name: flag for flag in flags}
    present = [key for key in data if key in by_name]
    if not present:
        return data
    data = dict(data)
    enabled = list(data.get("extensions") or [])
    params = {name: dict(values) for name, values in (data.get("extension_params") or {}).items()}
    for key in present:
        flag, value = by_name[key], data.pop(key)
        if flag.param is None:
            if value and flag.extension not in enabled:
                enabled.append(flag.extension)
            elif not value and flag.extension in enabled:
                enabled.remove(flag.extension)
        else:
            params.setdefault(flag.extension, {})[flag.param] = value
    data["extensions"] = enabled
    data["extension_params"] = params
    return data


# --- the start script asks which requirements to install --------------------------------------------------------
def requirement_files(argv: list[str]) -> list[Path]:
    """requirements.txt of each enabled extension (by the same flags and settings.yaml webui.py reads)."""
    import contextlib
    import io

    from modules.settings import load_settings

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            settings = load_settings(argv)
    except (SystemExit, Exception):  # bad flags or --help: webui.py will say so itself
        return []
    files = []
    for name in settings.extensions:
        if _NAME.match(name) and (BUILTIN_DIR / name / "requirements.txt").is_file():
            files.append(BUILTIN_DIR / name / "requirements.txt")
    return files


if __name__ == "__main__":  # python -m modules.extensions requirements [webui flags...]
    if len(sys.argv) >= 2 and sys.argv[1] == "requirements":
        for path in requirement_files(sys.argv[2:]):
            print(path)
    else:
        print("usage: python -m modules.extensions requirements [webui.py flags]", file=sys.stderr)
        sys.exit(2)
