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

    @hookspec(firstresult=True)
    def custom_generate_chat_prompt(self, messages: list[dict[str, Any]], state: dict[str, Any], services: Any,
                                    params: Any) -> str | None:
        """Build the whole chat prompt yourself; None leaves it to the next extension or to modules.chat."""

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
        self.server: Any = None  # the API server serving it, when the API is on
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
            params = self._params(name, getattr(module, "params", None))
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

    def _params(self, name: str, params: Any) -> Any:
        """The extension's params with settings.yaml's `extensions.<name>` values on top (validated)."""
        overrides = self.param_overrides.get(name) or {}
        if isinstance(params, BaseModel):
            unknown = [key for key in overrides if key not in type(params).model_fields]
            if unknown:
                raise ValueError(f"unknown params {unknown} in settings (extensions.{name}); known: "
                                 f"{sorted(type(params).model_fields)}")
            try:
                return type(params).model_validate({**params.model_dump(), **overrides})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"bad params in settings (extensions.{name}): {problems}") from None
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
def enabled_names(settings: Any) -> list[str]:
    """The extensions to enable: --extensions / settings.yaml, plus `openai` when --api is on."""
    names = list(settings.extensions)
    if settings.api and "openai" not in names:
        names.append("openai")
    return names


def start_extensions(services: Any, *, serve: bool = True) -> ExtensionRegistry:
    """Enable the extensions the settings name, run their setup hooks on one FastAPI app, attach their logits
    processors to every model the manager loads, and serve the app on --api-port when the API is on.
    Failures become messages in services.startup_messages; the app always goes on."""
    settings = services.settings
    registry = ExtensionRegistry(param_overrides=settings.extension_params)
    services.extensions = registry
    names = enabled_names(settings)
    registry.enable_all(names)
    if not registry.enabled:
        services.startup_messages.extend(registry.messages())
        return registry
    from fastapi import FastAPI

    app = FastAPI(title="LLM workbench API", version="1")
    registry.app = app
    registry.setup(app, services)
    services.manager.on_change(lambda event, _info: registry.attach_logits_processors(services, services.manager.model)
                               if event == "loaded" else None)
    registry.attach_logits_processors(services, services.manager.model)
    if serve and "openai" in registry.enabled:
        from extensions.openai.server import serve_app

        server = serve_app(app, settings.host, settings.api_port)
        registry.server = server
        log.info("API on http://%s:%d/v1", settings.host, server.port)
    services.startup_messages.extend(registry.messages())
    return registry


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
    for name in enabled_names(settings):
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
