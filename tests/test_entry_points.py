"""Every entry point a user runs (webui.py, python -m modules.generate, download_model.py, python -m
modules.training.run) answers bad input with one line on stderr and exit status 2: never a traceback, never exit 1.
Each case runs the real command in a subprocess; none of them gets as far as loading a model."""
from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT
from modules.starter import STARTER_GGUF, STARTER_HF_DIR


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # A check that regressed would start the UI (or a download): the timeout ends that as a failure.
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=240)


def assert_bad_input(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, nothing on stdout, and one stderr line that names the problem (each of `words`)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- webui.py ---------------------------------------------------------------------------------------------------
def webui(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """webui.py with its own empty settings file and user data, on a free port unless the flags name one."""
    settings = tmp_path / "settings.yaml"
    if not settings.exists():
        settings.write_text("{}\n")
    base = ["--settings", str(settings), "--user-data-dir", str(tmp_path / "user_data")]
    if "--listen-port" not in flags:
        base += ["--listen-port", str(free_port())]
    return run("webui.py", *base, *flags)


@pytest.mark.parametrize(("flags", "words"), [
    (["--listen-port", "0"], ["listen_port"]),
    (["--listen-port", "70000"], ["listen_port"]),
    (["--n-ctx", "-5"], ["n_ctx"]),
    (["--n-ctx", "abc"], ["--n-ctx", "abc"]),
    (["--dtype", "float7"], ["--dtype", "float7"]),
    (["--api", "--api-port", "0"], ["port"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--preset", "NoSuchPreset"], ["NoSuchPreset"]),
    (["--model", "no-such-model.gguf"], ["no-such-model.gguf"]),
    (["--model", "../../etc/passwd"], ["passwd"]),
    (["--loader", "no-such-loader"], ["no-such-loader"]),
    (["--lora", "no-such-lora"], ["no-such-lora"]),
    (["--extensions", "no_such_extension"], ["no_such_extension"]),
    (["--gradio-auth", "no-colon"], ["user:password"]),
    (["--listen", "--listen-host", "999.1.1.1"], ["999.1.1.1"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value[0].startswith("--") else None)
def test_webui_refuses_a_bad_flag(tmp_path: Path, flags: list[str], words: list[str]):
    assert_bad_input(webui(tmp_path, *flags), *words)


def test_webui_refuses_a_port_in_use(tmp_path: Path, busy_port: int):
    assert_bad_input(webui(tmp_path, "--listen-port", str(busy_port)), str(busy_port))


@pytest.mark.parametrize(("text", "words"), [
    ("listen_port: [1\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["mapping"]),
    ("no_such_setting: 1\n", ["no_such_setting"]),
    ("loader_options:\n  n_ctx: -5\n", ["n_ctx"]),
    ("generation:\n  temperature: -1\n", ["temperature"]),
    ("chat:\n  mode: shouting\n", ["chat.mode"]),
], ids=["yaml", "list", "unknown key", "loader option", "generation", "chat"])
def test_webui_refuses_a_malformed_settings_file(tmp_path: Path, text: str, words: list[str]):
    settings = tmp_path / "settings.yaml"
    settings.write_text(text)
    assert_bad_input(webui(tmp_path), str(settings), *words)


def test_webui_refuses_a_settings_file_that_is_missing(tmp_path: Path):
    assert_bad_input(run("webui.py", "--settings", str(tmp_path / "missing.yaml")), "missing.yaml")


# --- python -m modules.generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "words"), [
    (["--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--max-new-tokens", "abc"], ["--max-new-tokens", "abc"]),
    (["--option", "n_ctx"], ["n_ctx", "KEY=VALUE"]),
    (["--option", "n_ctx=-5"], ["n_ctx"]),
    (["--json-schema", "README.md"], ["README.md"]),
    (["--grammar", "no-such-file.gbnf"], ["no-such-file.gbnf"]),
    (["--grammar", "README.md"], ["grammar_string"]),  # a file that is no grammar: llama.cpp's parser says why
    (["--loader", "no-such-loader"], ["no-such-loader"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value[0].startswith("--") else None)
def test_generate_refuses_bad_flags(starter_gguf: Path, flags: list[str], words: list[str]):
    assert_bad_input(run("-m", "modules.generate", "--model", STARTER_GGUF, *flags, "--prompt", "hi"), *words)


def test_generate_requires_a_model():
    assert_bad_input(run("-m", "modules.generate", "--prompt", "hi"), "--model")


def test_generate_refuses_a_binary_schema_file(starter_gguf: Path, tmp_path: Path):
    schema = tmp_path / "schema.json"
    schema.write_bytes(b"\xff\xfe\x00binary")
    assert_bad_input(run("-m", "modules.generate", "--model", STARTER_GGUF, "--json-schema", str(schema),
                         "--prompt", "hi"), "schema.json")


# --- download_model.py --------------------------------------------------------------------------------------------
def test_download_refuses_bad_input(tmp_path: Path):
    assert_bad_input(run("download_model.py"), "repo")
    assert_bad_input(run("download_model.py", "not a repo id"), "ORG/NAME")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_bad_input(run("download_model.py", "starter", "--model-dir", str(a_file)), "a-file")
    assert_bad_input(run("download_model.py", "org/name", "--model-dir", "/proc/no-such-folder"),
                     "no-such-folder")


# --- python -m modules.training.run -------------------------------------------------------------------------------
def training_config(tmp_path: Path, *, base_model: str = STARTER_HF_DIR, train_file: str = "data.json",
                    extra: str = "") -> Path:
    """A run folder in tmp_path whose config names `base_model` and `train_file`; folders stay under tmp_path."""
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True, exist_ok=True)
    (tmp_path / "datasets").mkdir(exist_ok=True)
    (tmp_path / "datasets" / "data.json").write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."}]')
    config = run_dir / "config.yaml"
    config.write_text(f"name: r1\nbase_model: {base_model}\ndataset:\n  train_file: {train_file}\n{extra}"
                      f"folders:\n  models: {ROOT / 'models'}\n  loras: {tmp_path / 'loras'}\n"
                      f"  datasets: {tmp_path / 'datasets'}\n  runs: {tmp_path / 'runs'}\n")
    return config


def test_training_job_refuses_a_bad_config_value_and_says_so_in_the_status(tmp_path: Path):
    import json

    config = training_config(tmp_path, extra="train:\n  learning_rate: -1\n")
    assert_bad_input(run("-m", "modules.training.run", str(config)), "train.learning_rate")
    status = json.loads((config.parent / "status.json").read_text())
    assert status["state"] == "failed" and "learning_rate" in status["message"]


@pytest.mark.slow  # the missing model and data are found once the job has imported torch
def test_training_job_refuses_bad_files(tmp_path: Path, starter_hf: Path):
    assert_bad_input(run("-m", "modules.training.run"), "config")
    assert_bad_input(run("-m", "modules.training.run", str(tmp_path / "missing.yaml")), "missing.yaml")
    assert not (tmp_path / "status.json").exists()  # not a run folder: nothing is written there
    config = training_config(tmp_path)
    config.write_text("name: [\n")
    assert_bad_input(run("-m", "modules.training.run", str(config)), "not valid YAML")
    config.write_bytes(b"\xff\xfe\x00binary")
    assert_bad_input(run("-m", "modules.training.run", str(config)), "UTF-8")
    config = training_config(tmp_path, base_model="no-such-model")
    assert_bad_input(run("-m", "modules.training.run", str(config)), "no-such-model")
    config = training_config(tmp_path, train_file="no-such-data.json")
    assert_bad_input(run("-m", "modules.training.run", str(config)), "no-such-data.json")


# --- bench/*.py ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("script", "package", "requirements"), [
    ("ui.py", "playwright", "requirements-test.txt"),
    ("api.py", "httpx", "requirements.txt"),
    ("generation.py", "llama_cpp", "requirements.txt"),
    ("openmp_threads.py", "transformers", "requirements.txt"),
    ("training.py", "peft", "requirements.txt"),
])
def test_a_bench_names_the_requirements_file_of_a_missing_package(script: str, package: str, requirements: str):
    """Run as `python bench/SCRIPT` is, with `package` made unimportable (as where it was never installed)."""
    path = f"bench/{script}"
    hidden = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.path.insert(0, 'bench'); "
              f"sys.argv = [{path!r}]; runpy.run_path({path!r}, run_name='__main__')")
    assert_bad_input(run("-c", hidden), path, package, f"pip install -r {requirements}")
