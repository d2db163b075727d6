"""MCP servers in the tool list (modules/tools/mcp_client.py): their settings, and real servers
(tests/mcp_server.py, written with the official SDK) over stdio and streamable HTTP, called through our client
beside the tool files; a server that cannot be reached or started is a listed problem, not a crash."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import ValidationError

from modules.settings import Settings
from modules.tools.runner import ToolRunner
from modules.tools.toolbox import Toolbox
from tests.conftest import wait_until
from tests.test_tools import call, write_tool
from tests.ui_helpers import free_port

MCP_SERVER = Path(__file__).resolve().parent / "mcp_server.py"


# --- settings ---------------------------------------------------------------------------------------------------
def test_tool_settings() -> None:
    settings = Settings(mcp_servers=[{"name": "files", "command": "npx", "args": ["-y", "server"]},
                                     {"name": "web", "url": "https://example.org/mcp",
                                      "headers": {"Authorization": "Bearer x"}}])
    assert (settings.tools_dir, settings.tool_timeout, settings.tool_max_rounds) == (Path("user_data/tools"), 30, 5)
    assert settings.mcp_servers[1].headers == {"Authorization": "Bearer x"}
    for bad, message in [([{"name": "x"}], "needs either a command"),
                         ([{"name": "x", "command": "a", "url": "http://h"}], "needs either a command"),
                         ([{"name": "x", "command": "a"}, {"name": "x", "command": "b"}], "must differ"),
                         ([{"name": "x", "url": "ftp://h"}], "should match"),
                         ([{"name": "x", "command": "a", "port": 1}], "Extra inputs")]:
        with pytest.raises(ValidationError, match=message):
            Settings(mcp_servers=bad)


def test_the_session_tab_hides_mcp_headers_and_environment() -> None:
    from modules.ui.session_tab import settings_yaml

    shown = settings_yaml(Settings(mcp_servers=[
        {"name": "web", "url": "https://example.org/mcp", "headers": {"Authorization": "Bearer hunter2"}},
        {"name": "git", "command": "mcp-git", "env": {"GITHUB_TOKEN": "ghp_hunter3"}}]))
    assert "hunter" not in shown
    assert "Authorization: (set)" in shown and "GITHUB_TOKEN: (set)" in shown and "command: mcp-git" in shown


# --- MCP servers --------------------------------------------------------------------------------------------------
def server_processes() -> list[psutil.Process]:
    """Our running children that run the test MCP server."""
    return [child for child in psutil.Process().children(recursive=True)
            if child.is_running() and str(MCP_SERVER) in " ".join(child.cmdline())]


def check_round_trip(toolbox: Toolbox, prefix: str = "") -> None:
    """The test server's tools are listed beside the examples, and called through our client."""
    runner = toolbox.runner()
    assert {f"{prefix}add", f"{prefix}shout", f"{prefix}fail", "calculate"} <= set(runner.tools)
    spec = runner.spec(f"{prefix}add")
    assert spec.description == "Add two whole numbers."
    assert spec.parameters["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    assert spec.source.startswith("mcp:")
    assert call(runner, f"{prefix}add", {"a": 2, "b": 40}).content == "42"
    assert call(runner, f"{prefix}shout", {"text": "hello"}).content == "HELLO"
    failed = call(runner, f"{prefix}fail", {"reason": "no network"})
    assert failed.error == "failed" and "no network" in failed.content
    bad = call(runner, f"{prefix}add", {"a": "two", "b": 2})
    assert bad.error == "bad_arguments" and "'two' is not of type 'integer'" in bad.content
    slow = ToolRunner(runner.tools, timeout_s=0.5)
    assert call(slow, f"{prefix}sleep", {"seconds": 5}).content == f"Error: {prefix}sleep timed out after 0.5 s"
    assert call(runner, f"{prefix}add", {"a": 1, "b": 1}).content == "2"  # the session goes on


@pytest.mark.slow
def test_mcp_server_over_stdio(tmp_path: Path) -> None:
    write_tool(tmp_path, "mine.py", '''
        def add(x: int) -> int:
            """A local tool whose name the server also uses."""
            return x
    ''')
    servers = [{"name": "plain", "command": sys.executable, "args": [str(MCP_SERVER)],
                "env": {"WORKBENCH_TEST": "from settings"}},
               {"name": "prefixed", "command": sys.executable, "args": [str(MCP_SERVER)], "tool_prefix": "t_"}]
    settings = Settings(tools_dir=tmp_path, mcp_servers=servers, tool_timeout=20)
    toolbox = Toolbox.from_settings(settings).open()
    try:
        assert len(server_processes()) == 2
        clash = [str(p) for p in toolbox.problems if "'add' is also defined" in p.message]
        assert clash == [(f"mcp:plain: tool 'add' is also defined by {tmp_path / 'mine.py'}; this one is left out "
                          "(set tool_prefix)")]
        assert toolbox.tools["add"].spec.source == str(tmp_path / "mine.py")
        check_round_trip(toolbox, prefix="t_")
        runner = toolbox.runner(["environment", "shout"])
        assert call(runner, "environment", {"name": "WORKBENCH_TEST"}).content == "from settings"
    finally:
        toolbox.close()
    assert server_processes() == []
    assert toolbox.tools.keys() == {"add", "calculate", "current_datetime"}


@pytest.fixture
def http_server():
    """The test server under uvicorn on a free port, ready once it answers HTTP."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "mcp_server:app", "--app-dir", str(MCP_SERVER.parent),
                                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                "--timeout-graceful-shutdown", "1"])

    def answers() -> bool:
        assert process.poll() is None, "uvicorn exited"
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=2)
        except httpx.TransportError:
            return False
        return True

    try:
        wait_until(answers, "the MCP server under uvicorn answers", timeout_s=60)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_mcp_server_over_streamable_http(http_server: str) -> None:
    servers = [{"name": "web", "url": http_server, "headers": {"X-Workbench": "sent by settings"}}]
    with Toolbox.from_settings(Settings(tools_dir=Path("no such folder"), mcp_servers=servers)) as toolbox:
        assert toolbox.problems == []
        check_round_trip(toolbox)
        assert call(toolbox.runner(), "header", {"name": "X-Workbench"}).content == "sent by settings"


@pytest.mark.slow
def test_an_mcp_server_that_cannot_be_reached_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    servers = [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}/mcp", "startup_timeout": 20},
               {"name": "missing", "command": str(tmp_path / "no-such-program")},
               {"name": "mute", "command": sys.executable, "args": ["-c", "import time; time.sleep(60)"],
                "startup_timeout": 1},
               {"name": "crash", "command": sys.executable, "args": ["-c", "raise SystemExit(2)"]}]
    with Toolbox.from_settings(Settings(tools_dir=tmp_path, mcp_servers=servers)) as toolbox:
        problems = {p.source: p.message for p in toolbox.problems}
        assert problems == {
            "mcp:gone": "MCP server 'gone' could not be reached: ConnectError: All connection attempts failed",
            "mcp:missing": "MCP server 'missing' could not be reached: FileNotFoundError: [Errno 2] No such file or "
                           f"directory: '{tmp_path / 'no-such-program'}'",
            "mcp:mute": "MCP server 'mute' did not answer within 1 s",
            "mcp:crash": "MCP server 'crash' could not be reached: MCPError: Connection closed"}
        assert sorted(toolbox.tools) == ["calculate", "current_datetime"]
    # the servers' processes are gone (other children of the test process, such as a grammar compiler kept by an
    # earlier test module, are not this toolbox's)
    servers = [child.cmdline() for child in psutil.Process().children(recursive=True)
               if child.is_running() and "time.sleep(60)" in child.cmdline()]
    assert servers == []
