"""Shared fixtures. Models come from models/ (placed by ./run_tests.sh); a missing one fails loudly, never skips."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Tests run PyTorch in pytest's main thread (the app never does: modules/cpu_threads.py). Its OpenMP workers then
# spin between calls and starve llama.cpp's threads on a small machine: the llama.cpp tests ran 5-10x slower after
# a module that used torch. Idle workers sleep instead; set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from modules.chat.templates import render_chat  # noqa: E402
from modules.starter import STARTER_GGUF, STARTER_HF_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models"
DATA_DIR = ROOT / "data"
RESTORE_DATA = "data/ ships with the repository: restore it with git"
FRANCE = "What is the capital of France? Answer in one short sentence."


def _require(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}", pytrace=False)
    return path


def wait_until(condition: Callable[[], Any], what: str, *, timeout_s: float = 120.0) -> None:
    """Poll `condition` until it holds; fail naming `what` when it still does not after `timeout_s`. The
    deadline only bounds a hang: passing never depends on how fast the machine is."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s:.0f} s", pytrace=False)
        time.sleep(0.01)


def instruction_prompts(template: str, records: list[dict]) -> list[str]:
    """Alpaca-style records (instruction, input) as single user turns in the model's chat template."""
    out = []
    for record in records:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        out.append(render_chat(template, [{"role": "user", "content": user}], add_generation_prompt=True))
    return out


def greedy_answers(manager: Any, records: list[dict], params: Any) -> list[str]:
    """The loaded model's answers to `records` (see instruction_prompts) under `params`."""
    return [manager.complete(p, params, add_bos=False).text
            for p in instruction_prompts(manager.model.chat_template, records)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A browser test is a slow test: `-m "not slow"` leaves every one out."""
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def starter_gguf() -> Path:
    return _require(MODEL_DIR / STARTER_GGUF, "run ./run_tests.sh (it places the starter model)")


@pytest.fixture(scope="session")
def starter_hf() -> Path:
    return _require(MODEL_DIR / STARTER_HF_DIR / "config.json", "run ./run_tests.sh (it converts the starter model)"
                    ).parent


@pytest.fixture(scope="session")
def instruction_data() -> list[dict]:
    return json.loads(_require(DATA_DIR / "instruction-data.json", RESTORE_DATA).read_text())


@pytest.fixture(scope="session")
def verdict_text() -> str:
    """A short story as raw text (data/the-verdict.txt): real prose with dashes, quotes and paragraphs."""
    return _require(DATA_DIR / "the-verdict.txt", RESTORE_DATA).read_text(encoding="utf-8")


def save_tiny_llama(folder: Path, tokenizer_source: Path, *, initializer_range: float = 0.02, width: int = 64,
                    context: int = 512) -> Path:
    """A 2-layer random Llama (seed 0) `width` wide with the tokenizer of `tokenizer_source`, saved as safetensors in
    `folder`. 256 wide, its rows fit llama.cpp's K-quant blocks and the exllama converters' groups."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=initializer_range)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A 2-layer random Llama with the starter's tokenizer: fast where quality is moot."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", starter_hf)


@pytest.fixture(scope="session")
def tiny_vlm_gguf(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A folder holding the tiny random vision-language model (tests/vision_helpers.py) as llama.cpp reads it: its
    text GGUF and its mmproj GGUF, made by llama.cpp's converter once per session."""
    from vision_helpers import make_tiny_vlm, make_tiny_vlm_gguf

    folder = tmp_path_factory.mktemp("tiny-vlm-gguf")
    make_tiny_vlm_gguf(make_tiny_vlm(folder / "hf", starter_hf), folder / "gguf")
    return folder / "gguf"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module (see ui_helpers.launch_browser)."""
    from playwright.sync_api import sync_playwright

    from ui_helpers import launch_browser

    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """The Services of an app on throwaway folders (empty settings file) with the starter GGUF loaded, one per test
    module; modules that need other settings or models define their own."""
    from modules.services import build_services
    from modules.settings import load_settings

    folder = tmp_path_factory.mktemp("services")
    (folder / "settings.yaml").write_text("")
    services = build_services(load_settings(["--model-dir", str(MODEL_DIR), "--user-data-dir",
                                             str(folder / "user_data"), "--settings", str(folder / "settings.yaml")]))
    services.manager.load(STARTER_GGUF)
    yield services
    services.manager.unload()


@pytest.fixture(scope="module")
def server(workspace):
    """webui.py on the module's `workspace` (a ui_helpers.Workspace), one per test module; a module that needs
    other flags defines its own."""
    from ui_helpers import Server

    server = Server(workspace).start()
    yield server
    server.stop()


@pytest.fixture
def page(browser, server):
    """A fresh browser context on the module's server, one per test."""
    from ui_helpers import open_app

    page, _ = open_app(browser, server.url)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def api(served) -> str:
    """The base URL of the module's `served` (URL, Services) pair; modules that serve otherwise define `api`."""
    return served[0]


@pytest.fixture(scope="module")
def client(api: str):
    """The official openai client on the module's server: no retries, so an error shows as the server sent it."""
    import openai

    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def quantized_models(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path) -> dict:
    """A models folder holding the starter's GGUF and Transformers copy (links) and the Q4_K_M that
    `python -m modules.quantize gguf` made from the Transformers copy: made once for test_quantize and
    test_compare. Returns the folder and the command's result."""
    import subprocess
    import sys

    models = tmp_path_factory.mktemp("quantize") / "models"
    models.mkdir()
    (models / STARTER_GGUF).symlink_to(starter_gguf)
    (models / STARTER_HF_DIR).symlink_to(starter_hf, target_is_directory=True)
    result = subprocess.run([sys.executable, "-m", "modules.quantize", "gguf", STARTER_HF_DIR, "--type", "Q4_K_M",
                             "--model-dir", str(models)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr
    return {"dir": models, "result": result, "q4_k_m": models / f"{STARTER_HF_DIR}.Q4_K_M.gguf"}


#: The GPTQ/AWQ calibration the tests use: 16 samples of at most 256 tokens of data/'s default files. Quantizing the
#: starter takes about a minute either way on 2 cores (GPTQModel's time goes to its 210 layers, not the tokens).
QUANT_CALIBRATION = ("--samples", "16", "--seq-len", "256")


@pytest.fixture(scope="session")
def gptq_models(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> dict:
    """A models folder holding the starter's Transformers copy (a link) and what `python -m modules.quantize` made
    from it on the CPU: GPTQ 4-bit with groups of 128, and AWQ 4-bit (groups of 64: AWQ needs groups that divide
    the starter's 576-wide layers, and picks the largest that does). Made once per session for every module that
    loads them; the commands' results are kept for their output."""
    import subprocess
    import sys

    models = tmp_path_factory.mktemp("gptq") / "models"
    models.mkdir()
    (models / STARTER_HF_DIR).symlink_to(starter_hf, target_is_directory=True)
    results = {}
    for method, extra in (("gptq", ("--group-size", "128")), ("awq", ())):
        results[method] = subprocess.run(
            [sys.executable, "-m", "modules.quantize", method, STARTER_HF_DIR, "--bits", "4", *extra,
             *QUANT_CALIBRATION, "--model-dir", str(models)], cwd=ROOT, capture_output=True, text=True,
            timeout=1800, check=False)
        assert results[method].returncode == 0, results[method].stderr[-3000:]
    return {"dir": models, "results": results, "gptq": models / f"{STARTER_HF_DIR}-GPTQ-4bit-g128",
            "awq": models / f"{STARTER_HF_DIR}-AWQ-4bit-g64"}
