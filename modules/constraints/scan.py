"""Static bounds of a GBNF grammar or a regular expression, found in one pass over its characters.

No recursion: a hostile input nests as deep as it likes and this still runs in a loop with a list for a stack.
It does not parse (the compiler's own parser does that, in the trial compile); it only measures what makes
parsers and compilers blow up: nesting, repetition counts, rules and alternatives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from modules.constraints import limits
from modules.errors import ConstraintError

_COUNTS = re.compile(r"\{\s*(\d+)\s*(?:(,)\s*(\d*)\s*)?\}")


@dataclass
class Measure:
    """What a scan found (each part already checked against its limit)."""

    text_repeat: int = 0
    rules: int = 0
    alternatives: int = 0


def scan(text: str, dialect: Literal["gbnf", "regex"], what: str, measure: Measure | None = None) -> Measure:
    """Measure `text`, raising ConstraintError (named by `what`, e.g. "grammar_string") at the first bound it
    exceeds. `measure` carries the totals across several texts (the patterns of one schema)."""
    measure = measure or Measure()
    stack: list[int] = []  # where each open parenthesis is
    last_atom: int | None = None  # where the atom a quantifier would repeat starts
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if dialect == "gbnf" and char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if char in " \t\r\n" and dialect == "gbnf":
            i += 1
            continue
        if dialect == "gbnf" and char == '"':
            i, last_atom = _skip_quoted(text, i), i
            continue
        if char == "[":
            i, last_atom = _skip_class(text, i), i
            continue
        if char == "\\" and dialect == "regex":
            i, last_atom = min(i + 2, n), i
            continue
        if char == "(":
            stack.append(i)
            if len(stack) > limits.MAX_NESTING_DEPTH:
                raise ConstraintError(f"{what}: parentheses nest deeper than the limit of "
                                      f"{limits.MAX_NESTING_DEPTH} levels (at character {i}).")
            last_atom = None
            i += 1
            continue
        if char == ")":
            last_atom = stack.pop() if stack else None  # unbalanced: the compiler's parser reports it
            i += 1
            continue
        if char == "{":
            match = _COUNTS.match(text, i)
            if match is None:
                last_atom, i = i, i + 1  # a literal brace in a regex; the GBNF parser rejects it
                continue
            low, _, high = match.groups()
            count = max(int(low), int(high) if high else 0)
            snippet = _snippet(text, last_atom if last_atom is not None else i, match.end())
            if count > limits.MAX_TEXT_REPEAT:
                raise ConstraintError(f"{what}: {snippet} repeats more than the limit of {limits.MAX_TEXT_REPEAT} "
                                      "times.")
            measure.text_repeat += count
            if measure.text_repeat > limits.MAX_TEXT_REPEAT:
                raise ConstraintError(f"{what}: its repetition counts add up to more than the limit of "
                                      f"{limits.MAX_TEXT_REPEAT} (at {snippet}).")
            i = match.end()
            continue
        if char == "|":
            measure.alternatives += 1
            if dialect == "gbnf" and measure.alternatives > limits.MAX_GRAMMAR_ALTERNATIVES:
                raise ConstraintError(f"{what}: more than the limit of {limits.MAX_GRAMMAR_ALTERNATIVES} "
                                      "alternatives (|).")
            last_atom = None
            i += 1
            continue
        if dialect == "gbnf" and text.startswith("::=", i):
            measure.rules += 1
            if measure.rules > limits.MAX_GRAMMAR_RULES:
                raise ConstraintError(f"{what}: more than the limit of {limits.MAX_GRAMMAR_RULES} rules.")
            last_atom = None
            i += 3
            continue
        if char in "*+?":
            i += 1
            continue
        start = i  # an identifier (GBNF) or a literal character (regex)
        i += 1
        if dialect == "gbnf":
            while i < n and (text[i].isalnum() or text[i] in "-_"):
                i += 1
        last_atom = start
    return measure


def _skip_quoted(text: str, i: int) -> int:
    """The index after the string literal that starts at `i` (or the end of an unterminated one)."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        elif text[i] == "\n":
            return i
        else:
            i += 1
    return len(text)


def _skip_class(text: str, i: int) -> int:
    """The index after the character class that starts at `i` (`[...]`, with escapes)."""
    i += 1
    if i < len(text) and text[i] == "^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1  # a leading ] is a member
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == "]":
            return i + 1
        else:
            i += 1
    return len(text)


def _snippet(text: str, start: int, end: int) -> str:
    piece = text[start:end]
    return piece if len(piece) <= 40 else f"{piece[:16]}…{piece[-20:]}"
