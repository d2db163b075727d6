"""Tools in the chat (modules/tools): tool files and their schemas, the shipped calculator and clock, the runner's
error results (raise, hang, bad arguments, unknown tool) and the tool loop's rounds and approvals. MCP servers:
test_tools_mcp.py."""
from __future__ import annotations

import ast
import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from modules.tools.examples import calculator
from modules.tools.folder import EXAMPLES_DIR, load_file, load_folder
from modules.tools.loop import ToolLoop
from modules.tools.runner import ToolRunner
from modules.tools.spec import ToolCall
from modules.tools.toolbox import Toolbox


def write_tool(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def call(runner: ToolRunner, name: str, arguments: Any = None) -> Any:
    """Run one call the way a model's reply gives it (arguments as a JSON string)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return runner.run({"id": "call_1", "type": "function", "function": {"name": name, "arguments": text}})


# --- tool files -----------------------------------------------------------------------------------------------
TYPED_TOOL = '''
    from typing import Literal

    from modules.tools import needs_approval


    def forecast(city: str, days: int = 3, unit: Literal["celsius", "fahrenheit"] = "celsius",
                 hours: list[int] | None = None) -> dict:
        """Tell the weather to come in a city.

        Uses the national service's model.

        Args:
            city: The city, e.g. Paris.
            days: How many days ahead, 1 to 7.
            unit: Temperature unit.
            hours: Hours of the day to report; all when left out.

        Returns:
            The forecast by day.
        """
        return {"city": city, "days": days, "unit": unit, "hours": hours}


    @needs_approval
    def delete_note(name: str) -> str:
        """Delete a note by its name.

        Args:
            name: The note's name.
        """
        return f"deleted {name}"
'''


def test_a_typed_function_with_a_docstring_becomes_a_tool_schema(tmp_path: Path) -> None:
    found = load_file(write_tool(tmp_path, "weather.py", TYPED_TOOL))
    assert found.problems == []
    assert sorted(found.tools) == ["delete_note", "forecast"]
    tool = found.tools["forecast"].spec.to_openai()
    assert tool["type"] == "function"
    function = tool["function"]
    assert function["name"] == "forecast"
    assert function["description"] == "Tell the weather to come in a city.\n\nUses the national service's model."
    parameters = function["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["city"]
    assert parameters["additionalProperties"] is False
    properties = parameters["properties"]
    assert properties["city"] == {"type": "string", "description": "The city, e.g. Paris."}
    assert properties["days"] == {"type": "integer", "default": 3, "description": "How many days ahead, 1 to 7."}
    assert properties["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert properties["unit"]["description"] == "Temperature unit."
    assert {"type": "array", "items": {"type": "integer"}} in properties["hours"]["anyOf"]
    assert "title" not in json.dumps(parameters)
    assert found.tools["forecast"].spec.needs_approval is False
    assert found.tools["delete_note"].spec.needs_approval is True

    runner = ToolRunner(found.tools)
    result = call(runner, "forecast", {"city": "Paris", "days": "2", "hours": [9, 18]})
    assert result.ok
    assert json.loads(result.content) == {"city": "Paris", "days": 2, "unit": "celsius", "hours": [9, 18]}


def test_other_docstring_styles_and_async_functions(tmp_path: Path) -> None:
    found = load_file(write_tool(tmp_path, "styles.py", '''
        import asyncio


        async def wait_and_echo(text: str, delay: float = 0.0) -> str:
            """Echo the text after a delay.

            :param text: What to echo.
            :param delay: Seconds to wait first.
            """
            await asyncio.sleep(delay)
            return text


        def numpy_style(count: int) -> list[int]:
            """Count from zero.

            Parameters
            ----------
            count : int
                How many numbers.
            """
            return list(range(count))
    '''))
    assert found.problems == []
    echo = found.tools["wait_and_echo"].spec
    assert echo.description == "Echo the text after a delay."
    assert echo.parameters["properties"]["text"]["description"] == "What to echo."
    assert echo.parameters["properties"]["delay"]["description"] == "Seconds to wait first."
    assert found.tools["numpy_style"].spec.parameters["properties"]["count"]["description"] == "How many numbers."
    runner = ToolRunner(found.tools)
    assert call(runner, "wait_and_echo", {"text": "hi"}).content == "hi"
    assert call(runner, "numpy_style", {"count": 3}).content == "[0,1,2]"


def test_only_documented_public_functions_of_the_file_are_tools(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "mixed.py", '''
        from math import sqrt


        def _helper(x: int) -> int:
            return x


        def square_root(x: float) -> float:
            """The square root of x."""
            return sqrt(x)


        def undocumented(x: int) -> int:
            return x


        def untyped(x):
            """Has no type hint."""
            return x
    ''')
    found = load_file(path)
    assert list(found.tools) == ["square_root"]
    problems = {problem.message.split(" ")[0]: str(problem) for problem in found.problems}
    assert set(problems) == {"undocumented", "untyped"}
    assert "no docstring" in problems["undocumented"]
    assert f"{path}:14" in problems["undocumented"]
    assert "'x' has no type hint" in problems["untyped"]


def test_a_broken_tool_file_is_reported_and_the_others_still_load(tmp_path: Path) -> None:
    write_tool(tmp_path, "a_syntax.py", "def broken(:\n    pass\n")
    write_tool(tmp_path, "b_raises.py", "x = 1\nimport no_such_module_here\n")
    write_tool(tmp_path, "c_exits.py", "import sys\nsys.exit(3)\n")
    write_tool(tmp_path, "d_good.py", '''
        def echo(text: str) -> str:
            """Say the text back."""
            return text
    ''')
    write_tool(tmp_path, "_private.py", "raise RuntimeError('never imported')\n")
    found = load_folder(tmp_path)
    assert list(found.tools) == ["echo"]
    reported = {Path(problem.source).name: problem.message for problem in found.problems}
    assert reported == {
        "a_syntax.py": "line 1: SyntaxError: invalid syntax",
        "b_raises.py": "line 2: ModuleNotFoundError: No module named 'no_such_module_here'",
        "c_exits.py": "it called sys.exit(3) while loading",
    }


def test_a_tool_file_replaces_the_example_of_the_same_name(tmp_path: Path) -> None:
    write_tool(tmp_path, "my_calculator.py", '''
        def calculate(expression: str) -> str:
            """My own calculator."""
            return "mine"
    ''')
    with Toolbox(tools_dir=tmp_path) as toolbox:
        assert sorted(toolbox.tools) == ["calculate", "current_datetime"]
        assert toolbox.tools["calculate"].spec.description == "My own calculator."
        assert toolbox.problems == []


# --- the shipped examples -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples() -> ToolRunner:
    found = load_folder(EXAMPLES_DIR)
    assert found.problems == []
    return ToolRunner(found.tools, timeout_s=10)


@pytest.mark.parametrize(("expression", "value"), [
    ("2 * (3 + 4) ** 2", 98), ("7 // 2 + 7 % 2", 4), ("-3 ** 2", -9), ("1 / 4", 0.25),
    ("sqrt(16) + factorial(5)", 124.0), ("round(pi, 4)", 3.1416), ("max(2, 9, 4) - min(3, 1)", 8),
    ("2 ** 100", 2**100), ("log10(1000)", 3.0), ("hypot(3, 4)", 5.0),
])
def test_the_calculator_answers(examples: ToolRunner, expression: str, value: float) -> None:
    result = call(examples, "calculate", {"expression": expression})
    assert result.ok, result.content
    assert json.loads(result.content) == pytest.approx(value)


@pytest.mark.parametrize(("expression", "reason"), [
    ("9**9**9", "the power is too large"),
    ("factorial(5000)", "factorial is limited"),
    ("2 ** 20000", "the power is too large"),
    ("10.0 ** 400", "the result is too large"),
    ("x + 1", "unknown name 'x'"),
    ("__import__('os').system('touch HACKED')", "unknown function"),
    ("(1).real", "Attribute is not allowed"),
    ("'a' * 3", "only numbers are allowed"),
    ("True + 1", "only numbers are allowed"),
    ("[x for x in range(9)]", "ListComp is not allowed"),
    ("(lambda: 1)()", "unknown function 'Lambda'"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("sqrt(x=4)", "takes plain arguments only"),
    ("1 / 0", "division by zero"),
    ("2 +", "not an arithmetic expression"),
    ("1" * 1001, "longer than 1000 characters"),
])
def test_the_calculator_refuses(examples: ToolRunner, expression: str, reason: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = call(examples, "calculate", {"expression": expression})
    assert result.error == "failed"
    assert reason in result.content
    assert not (tmp_path / "HACKED").exists()


def test_the_calculator_never_evaluates_code() -> None:
    """No eval, exec or compile anywhere in the calculator: it walks the parsed tree itself."""
    tree = ast.parse(Path(calculator.__file__).read_text())
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_the_clock_tells_the_date_and_time(examples: ToolRunner) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    utc = json.loads(call(examples, "current_datetime", {"timezone": "UTC"}).content)
    after = datetime.now(UTC)
    assert before <= datetime.fromisoformat(utc["datetime"]) <= after
    assert utc["utc_offset"] == "+00:00"
    assert utc["weekday"] == datetime.fromisoformat(utc["datetime"]).strftime("%A")

    tokyo = json.loads(call(examples, "current_datetime", {"timezone": "Asia/Tokyo"}).content)
    assert tokyo["utc_offset"] == "+09:00" and tokyo["timezone"] == "Asia/Tokyo"
    assert datetime.fromisoformat(tokyo["datetime"]).utcoffset() == timedelta(hours=9)

    local = json.loads(call(examples, "current_datetime").content)
    assert datetime.fromisoformat(local["datetime"]).tzinfo is not None

    unknown = call(examples, "current_datetime", {"timezone": "Mars/Olympus_Mons"})
    assert unknown.error == "failed" and "unknown time zone 'Mars/Olympus_Mons'" in unknown.content


# --- the runner: every failure is a result ---------------------------------------------------------------------
FAILING_TOOLS = '''
    import threading

    release = threading.Event()


    def explode(message: str) -> str:
        """Raise an error with the message."""
        raise RuntimeError(message)


    def hang() -> str:
        """Never answers (until the test releases it)."""
        release.wait(60)
        return "released"


    def leave() -> str:
        """Call sys.exit."""
        import sys
        sys.exit(1)


    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b
'''


@pytest.fixture
def failing(tmp_path: Path):
    found = load_file(write_tool(tmp_path, "failing.py", FAILING_TOOLS))
    assert found.problems == []
    yield ToolRunner(found.tools, timeout_s=0.5)
    found.tools["hang"].function.__globals__["release"].set()


def test_a_tool_that_raises_gives_an_error_result(failing: ToolRunner) -> None:
    result = call(failing, "explode", {"message": "the disk is full"})
    assert result.error == "failed"
    assert result.content == "Error: explode failed: RuntimeError: the disk is full"
    assert result.to_message() == {"role": "tool", "tool_call_id": "call_1", "name": "explode",
                                   "content": result.content}
    assert call(failing, "leave").error == "failed"


def test_a_tool_that_hangs_gives_a_timeout_result(failing: ToolRunner) -> None:
    result = call(failing, "hang")
    assert result.error == "timed_out"
    assert result.content == "Error: hang timed out after 0.5 s"
    assert call(failing, "add", {"a": 1, "b": 2}).content == "3"  # the runner goes on


@pytest.mark.parametrize(("arguments", "message"), [
    ({"a": 1}, "bad arguments for add: 'b' is required"),
    ({"a": "one", "b": 2}, "bad arguments for add: bad value for 'a'"),
    ({"a": 1, "b": 2, "c": 3}, "bad arguments for add: unknown key 'c'"),
    ('{"a": 1, "b":', "the arguments of add are not valid JSON"),
    ("[1, 2]", "the arguments of add must be a JSON object, not list"),
])
def test_bad_arguments_give_an_error_result(failing: ToolRunner, arguments: Any, message: str) -> None:
    result = call(failing, "add", arguments)
    assert result.error == "bad_arguments"
    assert result.content.startswith(f"Error: {message}")


def test_an_unknown_tool_gives_an_error_result(failing: ToolRunner) -> None:
    result = call(failing, "rm_rf", {})
    assert result.error == "unknown_tool"
    assert "there is no tool named 'rm_rf'" in result.content and "add" in result.content


def test_a_long_result_is_cut_with_a_note(tmp_path: Path) -> None:
    found = load_file(write_tool(tmp_path, "long.py", '''
        def long_text(n: int) -> str:
            """n times the letter a."""
            return "a" * n
    '''))
    result = call(ToolRunner(found.tools, max_result_chars=100), "long_text", {"n": 1000})
    assert result.content.startswith("a" * 100 + "\n[cut: the result had 1000 characters")


# --- the loop ---------------------------------------------------------------------------------------------------
class Script:
    """A stand-in for the chat path's generate callable: replies given in advance (the loop's own logic is under
    test, not a model), recording the conversation it was shown each time."""

    def __init__(self, *replies: dict[str, Any]):
        self.replies = list(replies)
        self.seen: list[list[dict[str, Any]]] = []

    def __call__(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        self.seen.append(messages)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


def calls(*pairs: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": f"call_{i}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}
                           for i, (name, arguments) in enumerate(pairs)]}


def test_the_loop_runs_calls_feeds_results_and_ends_with_the_answer(examples: ToolRunner) -> None:
    script = Script(calls(("calculate", {"expression": "6 * 7"}), ("current_datetime", {"timezone": "UTC"})),
                    {"role": "assistant", "content": "It is 42."})
    loop = ToolLoop(script, examples, max_rounds=3)
    question = [{"role": "user", "content": "What is 6 times 7?"}]
    added = list(loop.run(question))
    assert [m["role"] for m in added] == ["assistant", "tool", "tool", "assistant"]
    assert added[1] == {"role": "tool", "tool_call_id": "call_0", "name": "calculate", "content": "42"}
    assert added[2]["tool_call_id"] == "call_1" and '"utc_offset":"+00:00"' in added[2]["content"]
    assert script.seen[1] == question + added[:3]
    assert question == [{"role": "user", "content": "What is 6 times 7?"}]
    assert (loop.outcome, loop.rounds) == ("answered", 1)


def test_the_loop_stops_after_its_rounds(examples: ToolRunner) -> None:
    script = Script(calls(("calculate", {"expression": "1 + 1"})))  # calls a tool every time
    loop = ToolLoop(script, examples, max_rounds=2)
    added = list(loop.run([{"role": "user", "content": "Loop forever."}]))
    assert len(script.seen) == 3
    assert [m["content"] for m in added if m["role"] == "tool"] == [
        "2", "2", "Error: not run: the limit of 2 rounds of tool calls in one turn was reached"]
    assert (loop.outcome, loop.rounds) == ("round_limit", 2)


def test_the_loop_goes_on_from_a_cut_reply_or_from_calls_left_without_results(examples: ToolRunner) -> None:
    question = {"role": "user", "content": "What is 6 times 7?"}
    cut = {"role": "assistant", "content": "Let me work it out"}
    whole = {**calls(("calculate", {"expression": "6 * 7"})), "content": "Let me work it out"}
    script = Script(whole, {"role": "assistant", "content": "It is 42."})
    loop = ToolLoop(script, examples, max_rounds=1)
    added = list(loop.run([question, cut], continue_last=True))
    assert script.seen[0] == [question, cut]  # the first generation continues the cut reply...
    assert [m["role"] for m in added] == ["assistant", "tool", "assistant"] and added[0] is whole
    assert script.seen[1] == [question, whole, added[1]]  # ...which the whole reply replaces
    assert added[1]["content"] == "42" and loop.outcome == "answered"

    left = calls(("calculate", {"expression": "2 + 2"}), ("calculate", {"expression": "3 + 3"}))
    answered = {"role": "tool", "tool_call_id": "call_0", "name": "calculate", "content": "4"}
    script = Script({"role": "assistant", "content": "4 and 6."})
    loop = ToolLoop(script, examples, max_rounds=1)
    added = list(loop.run([question, left, answered], pending=left["tool_calls"][1:]))
    assert [m.get("tool_call_id") for m in added] == ["call_1", None]  # the call left over runs, then the model
    assert added[0]["content"] == "6" and script.seen == [[question, left, answered, added[0]]]
    assert (loop.outcome, loop.rounds) == ("answered", 1)


def test_tools_that_need_approval_run_only_when_approved(tmp_path: Path) -> None:
    found = load_file(write_tool(tmp_path, "weather.py", TYPED_TOOL))
    runner = ToolRunner(found.tools)
    asked: list[tuple[str, str]] = []

    def approve(tool_call: ToolCall, spec: Any) -> bool:
        asked.append((tool_call.name, tool_call.arguments))
        return json.loads(tool_call.arguments)["name"] == "old"

    def refuse_by_crashing(tool_call: ToolCall, spec: Any) -> bool:
        raise RuntimeError("the page is gone")

    reply = calls(("delete_note", {"name": "old"}), ("delete_note", {"name": "precious"}),
                  ("forecast", {"city": "Oslo"}))
    answer = {"role": "assistant", "content": "Done."}
    results = [m for m in ToolLoop(Script(reply, answer), runner, max_rounds=1, approve=approve)
               .run([]) if m["role"] == "tool"]
    assert asked == [("delete_note", '{"name": "old"}'), ("delete_note", '{"name": "precious"}')]
    assert results[0]["content"] == "deleted old"
    assert results[1]["content"] == "Error: the user declined this call of delete_note"
    assert json.loads(results[2]["content"])["city"] == "Oslo"

    for approver in (None, refuse_by_crashing):
        results = [m for m in ToolLoop(Script(reply, answer), runner, max_rounds=1, approve=approver).run([])
                   if m["role"] == "tool"]
        assert [m["content"].startswith("Error: the user declined") for m in results] == [True, True, False]
