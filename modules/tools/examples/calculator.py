"""Example tool: a calculator the model can trust for arithmetic.

The expression is parsed with `ast` and walked over an allow-list of nodes (numbers, + - * / // % **, unary
signs, parentheses, a few math functions and constants); anything else (names, attributes, strings, calls of
other functions, comprehensions) is refused. Nothing is passed to eval or exec. Powers, factorials and integer
results are bounded, so `9**9**9` is refused instead of freezing the process.

Copy this file into user_data/tools/ to change it: a tool there with the same name replaces this one.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

#: Longest expression accepted (characters), and largest integer result (bits: about 3,000 decimal digits).
MAX_LENGTH = 1000
MAX_BITS = 10_000
MAX_FACTORIAL = 1000

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(n: float) -> int:
    if n != int(n) or n < 0:
        raise ValueError("factorial takes a whole number that is not negative")
    if n > MAX_FACTORIAL:
        raise ValueError(f"factorial is limited to n <= {MAX_FACTORIAL}")
    return math.factorial(int(n))


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "hypot": math.hypot, "degrees": math.degrees, "radians": math.radians,
    "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round, "min": min, "max": max,
    "factorial": _factorial,
}


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression and return its value, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 3".

    Args:
        expression: Numbers, + - * / // % ** and parentheses; the functions sqrt, exp, log, log10, log2, sin, cos,
            tan, asin, acos, atan, atan2, hypot, degrees, radians, floor, ceil, abs, round, min, max, factorial;
            the constants pi, e and tau. Angles are in radians.
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("the result is too large") from None
    except RecursionError:
        raise ValueError("the expression is nested too deeply") from None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise ValueError(f"unknown name {node.id!r} (constants: {', '.join(_CONSTANTS)})")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _call(node)
    raise ValueError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _call(node: ast.Call) -> int | float:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        shown = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
        raise ValueError(f"unknown function {shown!r} (functions: {', '.join(_FUNCTIONS)})")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ValueError(f"{node.func.id} takes plain arguments only")
    arguments = [_value(arg) for arg in node.args]
    try:
        return _bounded(_FUNCTIONS[node.func.id](*arguments))
    except TypeError as exc:
        raise ValueError(f"{node.func.id}: {exc}") from None


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power whose integer result would pass MAX_BITS before computing it (floats overflow by
    themselves, which calculate() reports)."""
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log2(abs(base)) > MAX_BITS):
        raise ValueError(f"the power is too large (results are limited to {MAX_BITS} bits)")


def _bounded(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is a complex number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(f"the result is too large (limited to {MAX_BITS} bits)")
    return value
