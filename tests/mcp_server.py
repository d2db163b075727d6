"""A tiny MCP server written with the official SDK (MCPServer, FastMCP's name in mcp 2), for tests/test_tools_mcp.py.

Run over stdio: `python tests/mcp_server.py`. Over streamable HTTP: `python -m uvicorn mcp_server:app` from tests/
(the app serves /mcp)."""
from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("workbench-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capital letters."""
    return text.upper()


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the reason given (a ToolError: the SDK hands its message to the client)."""
    raise ToolError(reason)


@server.tool()
def sleep(seconds: float) -> str:
    """Sleep, then say so (blocks the server's worker thread)."""
    time.sleep(seconds)
    return "slept"


@server.tool()
def environment(name: str) -> str:
    """The value of one of the server's environment variables ("" when unset)."""
    return os.environ.get(name, "")


@server.tool()
def header(name: str, ctx: Context) -> str:
    """The value of one header of the HTTP request that carried this call ("" when absent or not over HTTP)."""
    return (ctx.headers or {}).get(name.lower(), "")


app = server.streamable_http_app()

if __name__ == "__main__":
    print("mcp test server on stdio", file=sys.stderr)
    server.run("stdio")
