"""Every tool the chat can offer, gathered once: the shipped examples (modules/tools/examples), the one-file
tools of the tools folder (user_data/tools/; a file there may replace an example of the same name) and the tools
of the MCP servers the settings list. What could not be offered is kept in `problems`, for the UI to list."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modules.errors import ToolError
from modules.settings import McpServerSettings, Settings
from modules.tools.folder import EXAMPLES_DIR, load_folder
from modules.tools.loop import Approve, Generate, ToolLoop
from modules.tools.runner import ToolRunner
from modules.tools.spec import Tool, ToolProblem, ToolSpec


class Toolbox:
    """Owns the open MCP sessions: call close() when done (the app does at shutdown)."""

    def __init__(self, *, tools_dir: Path | None, mcp_servers: Iterable[McpServerSettings] = (),
                 timeout_s: float = 30.0, max_rounds: int = 5, examples: bool = True):
        self.tools_dir = tools_dir
        self.mcp_servers = list(mcp_servers)
        self.timeout_s = timeout_s
        self.max_rounds = max_rounds
        self.examples = examples
        self._lock = threading.Lock()
        self._file_tools: dict[str, Tool] = {}
        self._file_problems: list[ToolProblem] = []
        self._mcp_tools: dict[str, Tool] = {}
        self._mcp_problems: list[ToolProblem] = []
        self._connections: list[Any] = []
        self._connecting: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Toolbox:
        return cls(tools_dir=settings.tools_dir, mcp_servers=settings.mcp_servers, timeout_s=settings.tool_timeout,
                   max_rounds=settings.tool_max_rounds)

    def open(self) -> Toolbox:
        """Read the tool files and connect the MCP servers."""
        self.load_files()
        self.connect()
        return self

    def start(self) -> Toolbox:
        """Read the tool files now and connect the MCP servers on a thread of their own (the app's start-up), so a
        slow or dead server does not hold the app up: its tools appear once it is connected, and a server that
        fails is one of the `problems`, never an error."""
        self.load_files()
        if self.mcp_servers:
            import modules.tools.mcp_client  # noqa: F401  imported here, not beside a model loading in the main thread
            self._connecting = threading.Thread(target=self.connect, name="mcp-connect", daemon=True)
            self._connecting.start()
        return self

    @property
    def connecting(self) -> bool:
        """Whether the MCP servers started by `start()` are still being connected."""
        return self._connecting is not None and self._connecting.is_alive()

    # --- gathering ----------------------------------------------------------------------------------------------
    def load_files(self) -> None:
        """(Re)read the examples and the tools folder; this runs the files' code (see modules/tools/folder.py)."""
        tools: dict[str, Tool] = {}
        problems: list[ToolProblem] = []
        for folder in ([EXAMPLES_DIR] if self.examples else []) + ([self.tools_dir] if self.tools_dir else []):
            found = load_folder(folder)
            tools.update(found.tools)  # the tools folder's own come last: they replace examples of the same name
            problems.extend(found.problems)
        with self._lock:
            self._file_tools, self._file_problems = tools, problems

    def connect(self) -> None:
        """Connect each MCP server of the settings (again); one that fails is a problem, not an error."""
        from modules.tools.mcp_client import McpConnection, McpTool  # the SDK loads only when servers are listed

        self.disconnect()
        tools: dict[str, Tool] = {}
        problems: list[ToolProblem] = []
        connections = []
        for config in self.mcp_servers:
            if self._closed:  # the app is shutting down: connect no more
                break
            connection = McpConnection(config)
            try:
                specs = connection.open()
            except ToolError as exc:
                problems.append(ToolProblem(f"mcp:{config.name}", str(exc)))
                continue
            connections.append(connection)
            for spec in specs:
                clash = tools.get(spec.name) or self._file_tools.get(spec.name)
                if clash is not None:
                    problems.append(ToolProblem(f"mcp:{config.name}", f"tool {spec.name!r} is also defined by "
                                                f"{clash.spec.source}; this one is left out (set tool_prefix)"))
                    continue
                tools[spec.name] = McpTool(connection, spec)
        with self._lock:
            closed = self._closed
            if not closed:
                self._mcp_tools, self._mcp_problems, self._connections = tools, problems, connections
        if closed:  # closed while connecting: what was opened meanwhile goes too
            for connection in connections:
                connection.close()

    def disconnect(self) -> None:
        with self._lock:
            connections, self._connections, self._mcp_tools = self._connections, [], {}
        for connection in connections:
            connection.close()

    def close(self) -> None:
        """Close the MCP sessions (a stdio server's process ends); a server still connecting is closed as soon
        as its connection attempt returns."""
        with self._lock:
            self._closed = True
        self.disconnect()

    def __enter__(self) -> Toolbox:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what the chat uses -------------------------------------------------------------------------------------
    @property
    def tools(self) -> dict[str, Tool]:
        with self._lock:
            return {**self._file_tools, **self._mcp_tools}

    @property
    def problems(self) -> list[ToolProblem]:
        with self._lock:
            return [*self._file_problems, *self._mcp_problems]

    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self.tools.values()]

    def runner(self, names: Iterable[str] | None = None) -> ToolRunner:
        """A runner over the tools named (all when None); a name that is not offered is a ToolError."""
        tools = self.tools
        if names is not None:
            names = list(names)
            missing = [name for name in names if name not in tools]
            if missing:
                raise ToolError(f"no tool named {', '.join(map(repr, missing))} (tools: "
                                f"{', '.join(sorted(tools)) or 'none'})", kind="unknown_tool")
            tools = {name: tools[name] for name in names}
        return ToolRunner(tools, timeout_s=self.timeout_s)

    def loop(self, generate: Generate, *, names: Iterable[str] | None = None,
             approve: Approve | None = None) -> ToolLoop:
        """A ToolLoop for one chat turn over the tools named, with the settings' timeout and rounds."""
        return ToolLoop(generate, self.runner(names), max_rounds=self.max_rounds, approve=approve)
