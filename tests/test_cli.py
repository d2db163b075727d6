"""The command line for scripts: completion on stdout, errors on stderr with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from conftest import FRANCE, ROOT
from modules.starter import STARTER_GGUF


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modules.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, input=stdin, timeout=300)


@pytest.mark.slow  # a model load and a generation in a child process
def test_chat_answer_is_printed(starter_gguf: Path):
    result = run_cli("--model", STARTER_GGUF, "--chat", "--temperature", "0", "--prompt", FRANCE)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow  # two model loads and generations in child processes
def test_preset_seed_and_length_flags(starter_gguf: Path):
    args = ("--model", STARTER_GGUF, "--preset", "Creative", "--seed", "5", "--max-new-tokens", "12",
            "--prompt", "Once upon a time")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


@pytest.mark.slow  # a model load and a constrained generation in a child process
def test_json_schema_file_constrains_the_output(starter_gguf: Path, tmp_path: Path):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    result = run_cli("--model", STARTER_GGUF, "--chat", "--json-schema", str(schema_file), "--temperature", "0",
                     "--max-new-tokens", "60", "--prompt", FRANCE)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)


def test_prompt_from_stdin(starter_gguf: Path):
    result = run_cli("--model", STARTER_GGUF, "--max-new-tokens", "3", "--prompt", "-", stdin="Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_errors_go_to_stderr_with_exit_2():
    for args in (["--model", "no-such-model.gguf", "--prompt", "x"],
                 ["--model", "../../etc/passwd", "--prompt", "x"],
                 ["--model", STARTER_GGUF, "--preset", "NoSuchPreset", "--prompt", "x"]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
        assert result.stdout == ""
