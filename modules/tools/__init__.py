"""Tools the model can call in a chat: one-file Python tools (folder.py, functions.py; shipped examples in
examples/), MCP servers through the official SDK (mcp_client.py), all gathered by the Toolbox (toolbox.py), run
by the ToolRunner (runner.py: validation, timeout, errors as results) and driven turn by turn by the ToolLoop
(loop.py). Nothing here imports Gradio or the chat modules.

Tool files import only what they need from here: `from modules.tools import needs_approval`."""
from modules.tools.spec import ToolCall, ToolResult, ToolSpec, needs_approval

__all__ = ["ToolCall", "ToolResult", "ToolSpec", "needs_approval"]
