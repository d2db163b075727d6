"""What the command-line entry points share: bad input ends in one line on stderr and exit status 2.

webui.py, download_model.py, `python -m modules.generate` and `python -m modules.training.run` promise that
contract. argparse's own errors (usage text plus the message) and the core's multi-line messages (a YAML parser's
pointer lines, for instance) are folded into that one line here, so scripts can read the status and a person the
line. A traceback is left for what is not bad input: a bug.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from modules.errors import ConfigError

#: The exit status of every entry point for bad input (a flag, a file, a name): argparse's own choice.
BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad or missing argument as one line (usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(text.split())


def report(exc: BaseException) -> int:
    """Print `exc` as one `error:` line on stderr; returns BAD_INPUT for the caller to exit with."""
    print(f"error: {one_line(str(exc))}", file=sys.stderr)
    return BAD_INPUT


def parse_loader_options(pairs: list[str]) -> dict[str, object]:
    """Repeated `--option KEY=VALUE` flags as a dict; values are parsed as JSON when they are JSON."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
