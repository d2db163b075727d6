"""What a bench script needs before it starts. A missing package or program is one line on stderr naming what to
install, and exit status 2 (the contract of the entry points, modules/cli.py), instead of an ImportError from deep
inside the script: the first set-up command (./start_linux.sh) installs requirements.txt only, and the benches
that drive a browser also need requirements-test.txt and Debian's Chromium."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import NoReturn

from modules.cli import BAD_INPUT  # the caller put the repository on sys.path; this imports no third party


def need_packages(*packages: str, requirements: str) -> None:
    """Stop unless every top-level package in `packages` can be imported; `requirements` installs them."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        _stop(f"{', '.join(missing)} (not installed): pip install -r {requirements}")


def need_program(path: str, install: str) -> None:
    """Stop unless the program at `path` exists; `install` is the command that installs it."""
    if not Path(path).exists():
        _stop(f"{path} (missing): {install}")


def _stop(what: str) -> NoReturn:
    script = Path(sys.argv[0]).name or "this bench"
    print(f"error: bench/{script} needs {what}", file=sys.stderr)
    raise SystemExit(BAD_INPUT)
