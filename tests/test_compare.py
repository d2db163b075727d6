"""python -m modules.compare on two GGUF types of the starter (the Q4_K_M that test_quantize's fixture makes and the
original Q4_1): one table with a number in every cell, the run saved as JSON and CSV that agree, answers side by
side; a Stop ends it; bad input is one line and exit 2; a memory budget (what the web UI's --memory-budget leaves
beside its loaded models) refuses a model that needs more before anything loads. Timings are checked for being
measured, never for speed."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import FRANCE, ROOT
from modules.compare import CSV_COLUMNS, budget_beside, compare
from modules.errors import Cancelled, ConfigError
from modules.model_manager import ModelManager
from modules.quantize.job import Progress
from modules.starter import STARTER_GGUF


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modules.compare", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def run(quantized_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    user_data = tmp_path_factory.mktemp("user_data")
    models = [quantized_models["q4_k_m"].name, STARTER_GGUF]
    result = run_compare(*models, "--model-dir", str(quantized_models["dir"]), "--user-data-dir", str(user_data),
                         "--prompts", FRANCE, "Name three primary colors.", "--max-tokens", "256",
                         "--max-new-tokens", "16", "--option", "n_ctx=1024", "--option", "parallel=1")
    assert result.returncode == 0, result.stderr
    saved = sorted((user_data / "comparisons").iterdir())
    return {"result": result, "models": models, "dir": quantized_models["dir"], "saved": saved}


@pytest.mark.slow
def test_the_run_is_saved_as_json_and_csv_that_agree(run: dict):
    assert [p.suffix for p in run["saved"]] == [".csv", ".json"]
    assert run["saved"][0].stem == run["saved"][1].stem
    document = json.loads(run["saved"][1].read_text(encoding="utf-8"))
    assert document["prompts"] == [FRANCE, "Name three primary colors."]
    rows = document["rows"]
    assert [row["model"] for row in rows] == run["models"]
    with run["saved"][0].open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [line["model"] for line in table] == run["models"]
    for row, line in zip(rows, table):
        assert float(line["perplexity"]) == row["perplexity"]
        assert [line["answer_1"], line["answer_2"]] == row["answers"]
    assert not [p for p in run["saved"][0].parent.iterdir() if p.name.startswith(".")]  # atomic: no temp files


@pytest.mark.slow
def test_every_measurement_is_sane(run: dict):
    rows = json.loads(run["saved"][1].read_text(encoding="utf-8"))["rows"]
    for row in rows:
        assert row["loader"] == "llama.cpp"
        assert row["file_bytes"] == (run["dir"] / row["model"]).stat().st_size
        assert row["rss_delta_bytes"] > 0
        assert row["load_seconds"] > 0
        assert row["prompt_tokens_per_s"] > 0 and row["generation_tokens_per_s"] > 0
        assert 1 < row["perplexity"] < 500 and row["perplexity_tokens"] == 255
        assert "Paris" in row["answers"][0]
        assert all(answer.strip() for answer in row["answers"])
    assert rows[0]["file_bytes"] != rows[1]["file_bytes"]


@pytest.mark.slow
def test_the_table_has_a_number_in_every_cell_and_the_answers_side_by_side(run: dict):
    out = run["result"].stdout.splitlines()
    header = [cell.strip() for cell in out[0].split("|")]
    assert header[:3] == ["model", "loader", "file"] and header[-1] == "perplexity"
    for model, line in zip(run["models"], out[2:4]):
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[0] == model and len(cells) == len(header)
        assert all(any(ch.isdigit() for ch in cell) for cell in cells[2:]), line
    answers = out[out.index(f"Q1: {FRANCE}") + 1:][:2]
    assert [a.strip().split(":")[0] for a in answers] == run["models"]
    assert "saved" in out[-1]


@pytest.mark.slow
def test_stop_ends_the_comparison(starter_gguf: Path, verdict_text: str):
    cancel = threading.Event()
    steps: list[str] = []

    def stop_after_loading(progress: Progress) -> None:
        steps.append(progress.stage)
        if progress.stage.endswith("speed"):
            cancel.set()

    with pytest.raises(Cancelled):
        compare([STARTER_GGUF, STARTER_GGUF], model_dir=starter_gguf.parent, text=verdict_text,
                loader_options={"n_ctx": 512, "parallel": 1}, progress=stop_after_loading, cancel=cancel)
    assert steps == ["0:load", "0:speed"]


@pytest.mark.parametrize(("args", "words"), [
    (["no-such-model.gguf"], ["no-such-model.gguf"]),
    ([STARTER_GGUF, "--option", "no_such_option=1"], ["no_such_option"]),
    ([STARTER_GGUF, "--text", "no-such.txt"], ["no-such.txt"]),
    ([STARTER_GGUF, "--max-new-tokens", "0"], ["--max-new-tokens"]),
    ([], ["MODEL"]),
], ids=["model", "option", "text", "tokens", "none"])
def test_bad_input_is_one_line_and_exit_2(starter_gguf: Path, args: list[str], words: list[str]):
    result = run_compare(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_csv_columns_cover_every_measurement():
    from dataclasses import fields

    from modules.compare import Row

    assert set(CSV_COLUMNS) == {f.name for f in fields(Row)} - {"answers"}


@pytest.mark.slow
def test_the_memory_budget_bounds_a_comparison_beside_the_loaded_models(starter_gguf: Path, verdict_text: str,
                                                                          tmp_path: Path):
    manager = ModelManager(starter_gguf.parent, tmp_path, loader_options={"n_ctx": 512, "parallel": 1})
    try:
        manager.load(STARTER_GGUF)
        used = manager.pool.memory_used()
        assert used > 0
        assert budget_beside(manager, 0) == 0  # no budget: no limit
        assert budget_beside(manager, used + 2**20) == 2**20
        with pytest.raises(ConfigError, match="take all of the memory budget"):
            budget_beside(manager, used)
        steps: list[str] = []
        with pytest.raises(ConfigError, match=rf"{re.escape(STARTER_GGUF)} needs about .* GiB, more than the"):
            compare([STARTER_GGUF], model_dir=starter_gguf.parent, text=verdict_text, memory_budget=2**20,
                    progress=lambda progress: steps.append(progress.stage))
        assert steps == []  # refused before anything loaded
    finally:
        manager.close()
