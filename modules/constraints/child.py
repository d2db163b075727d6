"""The compiler process (modules.constraints.worker starts it): `python -m modules.constraints.child FD BUDGET`
talks over the socket FD and may map BUDGET bytes more than it holds once set up."""
from __future__ import annotations

import gc
import importlib
import resource
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from modules.errors import ConstraintError


def serve(conn: Connection, memory_budget: int) -> None:
    """Answer ("setup", "module:function", argument) with ("ready",) and ("compile", kind, text) with ("ok",
    payload) or ("refused", message), until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in the server's terminal is for the server
    compile_one: Callable[[str, str], Any] | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "setup":
            compile_one = None
            gc.collect()
            _limit_memory(None)
            try:
                module, name = message[1].split(":")
                compile_one = getattr(importlib.import_module(module), name)(message[2])
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            _limit_memory(memory_budget)
            conn.send(("ready",))
        elif message[0] == "compile":
            kind, text = message[1], message[2]
            try:
                conn.send(("ok", compile_one(kind, text)))
            except ConstraintError as exc:
                conn.send(("refused", str(exc)))
            except MemoryError:
                conn.send(("refused", _too_big(kind, memory_budget)))
            except Exception as exc:
                if "bad_alloc" in str(exc):  # C++ ran out of the memory its limit allows
                    conn.send(("refused", _too_big(kind, memory_budget)))
                else:
                    conn.send(("refused", f"{kind} could not be compiled: {type(exc).__name__}: {exc}"))


def _too_big(kind: str, budget: int) -> str:
    return f"{kind} needs more than the {budget / 2**30:g} GiB of memory its compiler may use; it is refused."


def _limit_memory(budget: int | None) -> None:
    """Cap this process's address space at what it maps now plus `budget` (None lifts the cap, up to the hard
    limit). Measured from now because the compiler's libraries (torch, through xgrammar) map gigabytes of
    address space they never touch."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if budget is None:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:  # not Linux: no way to measure, so no cap
        return
    soft = mapped + budget
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
