"""One-file Python tools: each `*.py` file of a folder (user_data/tools/ by default) is imported, and its public
functions (no leading underscore, defined in the file itself, or the names in its `__all__`) become tools.

Loading a tool file runs its code, with the rights of the web UI's process: only put files there you trust, as
you would an extension. A file that fails to import, or a function that cannot be a tool, is reported as a
ToolProblem (file, line, reason) and the other tools load anyway."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType

from modules.tools.functions import PythonTool, ToolDefinitionError
from modules.tools.spec import ToolProblem, ToolSet

#: The shipped example tools (a safe calculator, the current date and time), offered beside the user's own.
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def tool_files(folder: Path) -> list[Path]:
    """The tool files of `folder`, by name: `*.py`, leaving out names starting with '_' or '.'."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.py") if path.is_file() and not path.name.startswith(("_", ".")))


def load_folder(folder: Path) -> ToolSet:
    """The tools of every file in `folder`; a name two files define is kept from the first file (by name)."""
    found = ToolSet()
    for path in tool_files(folder):
        loaded = load_file(path)
        found.problems.extend(loaded.problems)
        for name, tool in loaded.tools.items():
            if name in found.tools:
                found.problems.append(ToolProblem(str(path), f"tool {name!r} is also defined in "
                                                             f"{found.tools[name].spec.source}; this one is left out"))
            else:
                found.tools[name] = tool
    return found


def load_file(path: Path) -> ToolSet:
    """Import one tool file and make a tool of each of its public functions."""
    found = ToolSet()
    try:
        module = _import(path)
    except Exception as exc:  # any error in the user's file is reported, never raised into the app
        found.problems.append(ToolProblem(str(path), _import_failure(exc, path)))
        return found
    except SystemExit as exc:
        found.problems.append(ToolProblem(str(path), f"it called sys.exit({exc.code!r}) while loading"))
        return found
    for name, function in public_functions(module):
        try:
            found.tools[name] = PythonTool(function, source=str(path))
        except ToolDefinitionError as exc:
            found.problems.append(ToolProblem(f"{path}:{_line(function)}", f"{name} is not a tool: {exc}"))
    return found


def public_functions(module: ModuleType) -> list[tuple[str, object]]:
    """The functions a tool file offers: those listed in `__all__`, else each function defined in the file whose
    name has no leading underscore (imported helpers such as `from math import sqrt` are not tools)."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return [(name, getattr(module, name)) for name in names
                if inspect.isfunction(getattr(module, name, None))]
    return [(name, value) for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")]


def _import(path: Path) -> ModuleType:
    """Import `path` under a name of its own (registered, so dataclasses and pydantic models in it resolve their
    types); importing it again replaces the previous module."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"workbench_tool_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_failure(exc: Exception, path: Path) -> str:
    """The error as a person reads it: its type and message, and the line of the tool file it happened on."""
    if isinstance(exc, SyntaxError):
        return f"line {exc.lineno}: SyntaxError: {exc.msg}"
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    where = f"line {lines[-1]}: " if lines else ""
    return f"{where}{type(exc).__name__}: {exc}"


def _line(function: object) -> int:
    code = getattr(function, "__code__", None)
    return code.co_firstlineno if code is not None else 0
