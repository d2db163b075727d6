"""The trial compile: a grammar or schema is compiled first in a child process, where a segfault, a stack
overflow, running out of memory or never finishing costs that process only.

One child is kept alive and reused (starting one imports the compiler and reads the model's vocabulary, seconds);
it is killed after a timeout, started afresh after a crash, and stopped after limits.IDLE_SECONDS unused. What the child runs is named by a TrialCompiler,
which each loader builds for its model (`LoadedModel.constraint_compiler()`): a function
the child calls once to read the vocabulary, which returns the function that compiles one constraint.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from modules.constraints import limits
from modules.errors import ConstraintError, GenerationError

#: What a child's compile function returns: None, or something the parent's `adopt` can use (a serialised
#: compiled grammar), which must pickle.
Payload = Any


@dataclass(frozen=True)
class TrialCompiler:
    """How to trial-compile constraints for one model.

    `setup` names a function ("package.module:function") the child calls once with `argument`; it returns the
    function `compile(kind, text) -> Payload` that raises ConstraintError for a constraint the compiler refuses.
    `key` names what setup reads (the vocabulary): the child is set up again when it changes, and verdicts are
    cached under it. `adopt`, called in the server process with (kind, text, payload) after a trial succeeds,
    lets the loader keep the child's result instead of compiling again; it never travels to the child."""

    key: str
    setup: str
    argument: Any = None
    adopt: Callable[[str, str, Payload], None] | None = None


class CompileWorker:
    """The child process and the conversation with it. Thread-safe: callers take turns."""

    def __init__(self, *, compile_seconds: float = limits.COMPILE_SECONDS,
                 start_seconds: float = limits.START_SECONDS, memory_budget: int = limits.MEMORY_BUDGET_BYTES,
                 idle_seconds: float = limits.IDLE_SECONDS):
        self.compile_seconds = compile_seconds
        self.start_seconds = start_seconds
        self.memory_budget = memory_budget
        self.idle_seconds = idle_seconds
        #: Compiles the child was asked for since this worker was made (tests read it to see the cache work).
        self.trials = 0
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None
        self._key: str | None = None

    def compile(self, compiler: TrialCompiler, kind: str, text: str) -> Payload:
        """The child's payload for `text`, or ConstraintError when the compiler refused it, crashed on it, or
        did not finish within compile_seconds."""
        with self._lock:
            self._ready(compiler)
            self.trials += 1
            self._conn.send(("compile", kind, text))
            answer = self._answer(self.compile_seconds, kind)
            timer = threading.Timer(self.idle_seconds, self._stop_if_idle, args=(self.trials,))
            timer.daemon = True
            timer.start()
        if answer[0] == "ok":
            return answer[1]
        raise ConstraintError(answer[1])

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop_if_idle(self, trials: int) -> None:
        """Stop the child if no compile came after the one numbered `trials` (its memory goes back; the next
        compile starts a new one)."""
        with self._lock:
            if self.trials == trials:
                self._stop()

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    # --- the child's life ------------------------------------------------------------------------------------
    def _ready(self, compiler: TrialCompiler) -> None:
        if self._process is None or self._process.poll() is not None:
            self._stop()
            self._process, self._conn = _start_child(self.memory_budget)
        if self._key != compiler.key:
            self._key = None
            self._conn.send(("setup", compiler.setup, compiler.argument))
            answer = self._answer(self.start_seconds, "the model's vocabulary", setup=True)
            if answer[0] != "ready":
                self._stop()
                raise GenerationError(f"The grammar compiler could not start: {answer[1]}")
            self._key = compiler.key

    def _answer(self, seconds: float, kind: str, *, setup: bool = False) -> tuple[str, Any]:
        """The child's next message; a timeout or the child's death becomes a refusal (a GenerationError while
        setting up, when no user input is involved)."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self._conn.poll(min(max(remaining, 0), 0.5)):
                    return self._conn.recv()
            except (EOFError, OSError):
                pass  # the child died; its exit status says how
            if self._process.poll() is not None or remaining <= 0:
                break
        code = self._process.poll()
        self._stop()
        if setup:
            why = f"it took longer than {seconds:g} s" if code is None else f"it {_death(code)}"
            raise GenerationError(f"The grammar compiler could not read {kind}: {why}.")
        if code is None:
            return ("refused", f"{kind} could not be compiled within {seconds:g} s; it is refused (make it "
                               "smaller: fewer or shorter bounded strings, smaller enums, less nesting).")
        return ("refused", f"{kind} made the grammar compiler fail: it {_death(code)}; it is refused.")

    def _stop(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = self._key = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()


def _start_child(memory_budget: int) -> tuple[subprocess.Popen, Connection]:
    """A fresh interpreter running modules.constraints.child, and our end of the socket it listens on. Not
    multiprocessing's spawn: that runs the parent's main script again in the child, which a script without a
    main guard cannot survive."""
    ours, theirs = socket.socketpair()
    try:
        paths = [str(Path(__file__).resolve().parents[2]), *(p for p in sys.path if p)]  # the project, and ours
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        process = subprocess.Popen([sys.executable, "-m", "modules.constraints.child", str(theirs.fileno()),
                                    str(memory_budget)],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=environment)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, Connection(ours.detach())


def _death(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed ({name})"
    return f"stopped (exit status {code})"
