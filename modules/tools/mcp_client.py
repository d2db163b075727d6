"""MCP servers as tools, through the official `mcp` SDK: a command over stdio (the SDK starts it and stops it) or
a streamable HTTP endpoint.

The SDK is async (anyio) and the chat runs in plain threads, so each McpConnection owns an event loop on a thread
of its own (anyio's blocking portal). The whole session lives in one task of that loop, entered and left there as
anyio's cancel scopes require; calls are tasks of the same loop started from the caller's thread, and a call that
takes too long is cancelled in the loop (the SDK then tells the server), not just abandoned."""
from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import jsonschema
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from modules.errors import ToolError
from modules.settings import McpServerSettings
from modules.tools.functions import without_titles
from modules.tools.spec import ToolSpec

log = logging.getLogger(__name__)

#: Seconds closing a session may take (the SDK gives a stdio server 2 s to exit, then terminates it).
CLOSE_TIMEOUT_S = 10.0


class McpConnection:
    """One open session with one MCP server. `open()` connects and lists the tools; `call()` runs one; `close()`
    ends the session (and a stdio server's process). Safe to call from several threads at once."""

    def __init__(self, config: McpServerSettings):
        self.config = config
        self.tools: list[ToolSpec] = []
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._session_task: concurrent.futures.Future[None] | None = None
        self._ready: concurrent.futures.Future[Client] = concurrent.futures.Future()
        self._client: Client | None = None
        self._stop: anyio.Event | None = None

    # --- lifetime -----------------------------------------------------------------------------------------------
    def open(self) -> list[ToolSpec]:
        """Connect and list the server's tools; a ToolError (failed) naming the server if either fails or takes
        longer than its startup_timeout (nothing is left running then)."""
        self._portal_cm = anyio.from_thread.start_blocking_portal(name=f"mcp-{self.config.name}")
        self._portal = self._portal_cm.__enter__()
        self._session_task = self._portal.start_task_soon(self._session)
        done, _ = concurrent.futures.wait([self._ready, self._session_task], timeout=self.config.startup_timeout,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        try:
            if not done:
                raise ToolError(f"MCP server {self.config.name!r} did not answer within "
                                f"{self.config.startup_timeout:g} s", kind="failed")
            if not self._ready.done():  # the session task ended before it was ready
                self._session_task.result()
                raise ToolError(f"MCP server {self.config.name!r} closed the connection", kind="failed")
            self._client = self._ready.result()
            self.tools = self._await(self._list_tools(), timeout_s=self.config.startup_timeout, what="listing tools")
        except BaseException as exc:
            self.close()
            if isinstance(exc, ToolError):
                raise
            raise ToolError(f"MCP server {self.config.name!r} could not be reached: {_reason(exc)}",
                            kind="failed") from None
        return self.tools

    def close(self) -> None:
        """End the session and the loop thread (idempotent)."""
        if self._portal is not None and self._session_task is not None:
            task = self._session_task
            try:
                if self._client is not None and self._stop is not None:
                    self._portal.call(self._stop.set)  # a connected session ends as the SDK ends it
                else:
                    task.cancel()  # still connecting: stop trying
                task.result(timeout=CLOSE_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                log.info("MCP server %s did not close within %g s; its session is cancelled", self.config.name,
                         CLOSE_TIMEOUT_S)
                task.cancel()
            except BaseException as exc:  # a server that fails on the way out is still closed
                if not isinstance(exc, concurrent.futures.CancelledError):
                    log.info("closing MCP server %s: %s", self.config.name, _reason(exc))
        if self._portal_cm is not None:
            try:
                self._portal_cm.__exit__(None, None, None)
            except BaseException as exc:
                log.info("stopping the loop of MCP server %s: %s", self.config.name, _reason(exc))
        self._portal_cm = self._portal = self._session_task = self._client = None

    def __enter__(self) -> McpConnection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _session(self) -> None:
        """The session's task: connect, hand the client over, and keep everything open until close()."""
        self._stop = anyio.Event()
        try:
            async with self._connected() as client:
                self._ready.set_result(client)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(_reason(exc)))
            raise

    @asynccontextmanager
    async def _connected(self) -> AsyncIterator[Client]:
        config = self.config
        async with AsyncExitStack() as stack:
            if config.url is not None:
                http = await stack.enter_async_context(httpx2.AsyncClient(
                    headers=config.headers, timeout=httpx2.Timeout(30.0, read=300.0)))
                transport = streamable_http_client(config.url, http_client=http)
            else:
                assert config.command is not None
                transport = stdio_client(StdioServerParameters(
                    command=config.command, args=config.args, env=config.env or None,
                    cwd=str(config.cwd) if config.cwd else None))
            yield await stack.enter_async_context(Client(transport))

    # --- tools --------------------------------------------------------------------------------------------------
    async def _list_tools(self) -> list[ToolSpec]:
        assert self._client is not None
        specs: list[ToolSpec] = []
        cursor: str | None = None
        for _ in range(100):  # pages; a server that pages forever cannot hang the start
            page = await self._client.list_tools(cursor=cursor)
            specs.extend(ToolSpec(name=self.config.tool_prefix + tool.name, description=tool.description or "",
                                  parameters=without_titles(tool.input_schema),
                                  needs_approval=self.config.needs_approval, source=f"mcp:{self.config.name}")
                         for tool in page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return specs

    def call(self, spec: ToolSpec, arguments: dict[str, Any], *, timeout_s: float) -> Any:
        """Run the server's tool `spec` names; its text (or structured content) or a ToolError."""
        if self._client is None:
            raise ToolError(f"MCP server {self.config.name!r} is not connected", kind="failed")
        name = spec.name.removeprefix(self.config.tool_prefix)
        client = self._client
        result = self._await(client.call_tool(name, arguments), timeout_s=timeout_s, what=spec.name)
        return _result_value(result, spec.name)

    def _await(self, coroutine: Any, *, timeout_s: float, what: str) -> Any:
        assert self._portal is not None
        future = self._portal.start_task_soon(_run, coroutine)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(f"{what} timed out after {timeout_s:g} s", kind="timed_out") from None


async def _run(coroutine: Any) -> Any:
    return await coroutine


def _result_value(result: CallToolResult, name: str) -> Any:
    """The content blocks' text (what the server writes for a model to read; non-text blocks are named), or the
    structured content when there are no blocks."""
    if result.is_error:
        raise ToolError(f"{name} failed: {_text(result) or 'the server gave no reason'}", kind="failed")
    if not result.content and result.structured_content is not None:
        return result.structured_content
    return _text(result)


def _text(result: CallToolResult) -> str:
    parts = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        else:
            kind = getattr(block, "type", type(block).__name__)
            mime = getattr(block, "mime_type", None)
            parts.append(f"[{kind}{': ' + mime if mime else ''} content, not shown]")
    return "\n".join(parts)


def _reason(exc: BaseException) -> str:
    """An exception as one line, looking inside the exception groups anyio's task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class McpTool:
    """One tool of an MCP server: the arguments are checked against the server's own schema before the call."""

    def __init__(self, connection: McpConnection, spec: ToolSpec):
        self.connection = connection
        self.spec = spec
        self._validator = _validator(spec.parameters)

    def invoke(self, arguments: dict[str, Any], *, timeout_s: float) -> Any:
        if self._validator is not None:
            problem = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
            if problem is not None:
                where = ".".join(str(part) for part in problem.absolute_path)
                raise ToolError(f"bad arguments for {self.spec.name}: {where + ': ' if where else ''}"
                                f"{problem.message}", kind="bad_arguments")
        return self.connection.call(self.spec, arguments, timeout_s=timeout_s)


def _validator(schema: dict[str, Any]) -> Any:
    """A validator for the server's schema (its own draft, 2020-12 when it names none); None when the schema
    itself is broken, so the server judges the arguments."""
    cls: Callable[..., Any] = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        log.info("an MCP tool's input schema is not a valid JSON schema; its arguments go unchecked")
        return None
    return cls(schema)
