"""Tools for the tests of tools in the Chat tab (tests/test_tool_turns.py, tests/test_ui_tools.py), copied into a
test's tools folder. Each takes arguments the starter model fills in reliably when a call is forced (whole numbers,
or none), so the tests see a real model call them."""
from pathlib import Path

from modules.tools import needs_approval


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


@needs_approval
def clear_notes() -> str:
    """Delete all of the user's notes."""
    Path(__file__).with_name("notes-cleared").write_text("yes")  # the test checks a declined call never ran
    return "All notes deleted."


def read_sensor() -> str:
    """Read the temperature sensor in the greenhouse."""
    raise RuntimeError("the sensor is offline")
