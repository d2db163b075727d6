"""python -m modules.quantize gguf: the starter's Transformers copy becomes a Q4_K_M GGUF that llama.cpp loads, that
answers like the original and scores a perplexity close to the original GGUF's; an importance matrix makes the
very-low-bit types possible; the output is never overwritten unasked; a Stop removes everything; bad input is one
line and exit 2."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import FRANCE, ROOT, instruction_prompts, save_tiny_llama
from modules.errors import Cancelled, NotEnoughSpace
from modules.generation_params import GenerationParams
from modules.quantize.gguf import Source, estimate_bytes, make_gguf
from modules.quantize.job import Progress, check_free_space
from modules.starter import STARTER_GGUF, STARTER_HF_DIR

#: Perplexity on the first 512 tokens of data/the-verdict.txt (one window), measured with llama-cpp-python 0.3.36:
#: original Q4_1 50.20, this Q4_K_M 53.14 (1.059x), an F16 conversion 49.88 (on 1024 tokens, windows of 512 moved
#: by 256: 39.18, 40.56 (1.035x), 39.02). A Q4_K_M within 1.15x of the original file is a sound conversion; a broken
#: one (wrong tokenizer, mangled weights) is off by far more.
PERPLEXITY_FACTOR = 1.15
GREEDY = GenerationParams(do_sample=False, max_new_tokens=24, seed=1)


def quantize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modules.quantize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def assert_bad_input(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def measured(quantized_models: dict) -> dict:
    """Greedy answer and perplexity of the new Q4_K_M and of the original Q4_1, each loaded once."""
    from modules.model_manager import ModelManager
    from modules.training.perplexity import evaluate_perplexity

    text = (ROOT / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    manager = ModelManager(quantized_models["dir"], ROOT / "loras")
    out = {}
    for name in (quantized_models["q4_k_m"].name, STARTER_GGUF):
        manager.load(name, None, {"n_ctx": 2048, "parallel": 1})
        prompt = instruction_prompts(manager.model.chat_template, [{"instruction": FRANCE, "input": ""}])[0]
        answer = manager.complete(prompt, GREEDY, add_bos=False).text
        score = evaluate_perplexity(manager, text, source="the-verdict", context_length=512, stride=512,
                                    max_tokens=512)
        out[name] = {"loader": manager.info().loader, "answer": answer, "perplexity": score.perplexity}
        manager.unload()
    manager.close()
    return out


@pytest.mark.slow
def test_the_output_is_named_for_its_type_and_is_that_type(quantized_models: dict):
    from gguf import GGUFReader

    q4 = quantized_models["q4_k_m"]
    result = quantized_models["result"]
    assert q4.is_file() and f"wrote {q4}" in result.stdout
    assert "convert: 0%" in result.stderr and "quantize: 100%" in result.stderr  # progress as it went
    reader = GGUFReader(q4)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    weights = (quantized_models["dir"] / STARTER_HF_DIR / "model.safetensors").stat().st_size
    assert q4.stat().st_size < weights / 2
    assert hidden_leftovers(quantized_models["dir"]) == []  # no .part files left behind


@pytest.mark.slow
def test_llama_cpp_loads_it_and_it_names_paris(measured: dict, quantized_models: dict):
    row = measured[quantized_models["q4_k_m"].name]
    assert row["loader"] == "llama.cpp"
    assert "Paris" in row["answer"]
    assert "Paris" in measured[STARTER_GGUF]["answer"]


@pytest.mark.slow
def test_its_perplexity_is_close_to_the_original_gguf(measured: dict, quantized_models: dict):
    new = measured[quantized_models["q4_k_m"].name]["perplexity"]
    original = measured[STARTER_GGUF]["perplexity"]
    assert 1 < original < 200
    assert new <= original * PERPLEXITY_FACTOR, (new, original)


@pytest.mark.slow
def test_an_existing_output_is_kept_unless_overwrite_is_asked(quantized_models: dict):
    q4 = quantized_models["q4_k_m"]
    before = q4.stat()
    result = quantize("gguf", STARTER_HF_DIR, "--type", "Q4_K_M", "--model-dir", str(quantized_models["dir"]))
    assert_bad_input(result, q4.name, "already exists", "--overwrite")
    after = q4.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize(("args", "words"), [
    (["gguf", STARTER_HF_DIR, "--type", "Q9_X"], ["Q9_X", "Q4_K_M"]),
    (["gguf", STARTER_HF_DIR], ["--type"]),
    (["gguf", "no-such-model", "--type", "Q4_0"], ["no-such-model"]),
    (["gguf", "../models", "--type", "Q4_0"], [".."]),
    (["gguf", STARTER_HF_DIR, "--type", "Q4_0", "--output", "sub/x"], ["sub/x"]),
    (["gguf", STARTER_GGUF, "--type", "Q4_0"], ["already quantized"]),
    (["gguf", STARTER_HF_DIR, "--type", "IQ2_XS"], ["IQ2_XS", "importance matrix"]),
    (["gguf", STARTER_HF_DIR, "--type", "F16", "--imatrix", "data/the-verdict.txt"], ["quantized types"]),
    (["gguf", STARTER_HF_DIR, "--type", "Q4_0", "--imatrix", "no-such.txt"], ["no-such.txt"]),
    (["exl2", STARTER_HF_DIR], ["exl2"]),
], ids=["type", "no type", "missing model", "escape", "output path", "quantized source", "needs imatrix",
        "imatrix for float", "calibration file", "format"])
def test_bad_input_is_one_line_and_exit_2(starter_gguf: Path, starter_hf: Path, args: list[str], words: list[str]):
    assert_bad_input(quantize(*args), *words)


def test_a_short_disk_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(NotEnoughSpace, match="free"):
        check_free_space(tmp_path, 1 << 60, "Writing x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_disk_estimate_is_near_the_real_size(quantized_models: dict):
    from modules.quantize.gguf import inspect_source

    source = inspect_source(quantized_models["dir"] / STARTER_HF_DIR)
    output, peak = estimate_bytes(source, "Q4_K_M")
    real = quantized_models["q4_k_m"].stat().st_size
    assert 0.7 * real < output < 1.3 * real
    assert peak > output + source.parameters  # the F16 intermediate is counted too
    assert estimate_bytes(Source(source.path, True, source.parameters, source.tensors), "Q8_0")[1] < peak * 2


# --- a tiny model of another size: importance matrix, progress and Stop ----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A 2-layer random Llama whose rows are multiples of 256 (so IQ2_XS applies to its blocks), saved in a
    models folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "models" / "tiny-llama", starter_hf, width=256)


@pytest.mark.slow
def test_an_importance_matrix_makes_iq2_xs_and_llama_cpp_loads_it(tiny: Path):
    from modules.model_manager import ModelManager

    reports: list[Progress] = []
    calibration = (ROOT / "data" / "the-verdict.txt").read_text(encoding="utf-8")[:3000]
    out = make_gguf(tiny, tiny.parent / "tiny-llama.IQ2_XS.gguf", "iq2_xs", calibration=calibration,
                    imatrix_chunk=128, progress=reports.append)
    assert reports[0].stage == "convert" and reports[-1].fraction == 1.0
    assert list(dict.fromkeys(p.stage for p in reports)) == ["convert", "imatrix", "quantize"]
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions)
    assert any(p.eta is not None for p in reports)
    assert hidden_leftovers(tiny.parent) == []
    manager = ModelManager(tiny.parent, ROOT / "loras")
    manager.load(out.name, None, {"n_ctx": 256, "parallel": 1})
    assert manager.info().loader == "llama.cpp"
    assert manager.complete("Once upon a time", GenerationParams(do_sample=False, max_new_tokens=4)).stats \
        .completion_tokens > 0
    manager.close()


@pytest.mark.slow
def test_stop_kills_the_converter_and_keeps_nothing(tiny: Path):
    cancel = threading.Event()

    def stop_once_started(progress: Progress) -> None:
        if progress.fraction > 0:
            cancel.set()

    target = tiny.parent / "tiny-llama.Q8_0.gguf"
    with pytest.raises(Cancelled):
        make_gguf(tiny, target, "Q8_0", progress=stop_once_started, cancel=cancel)
    assert not target.exists()
    assert hidden_leftovers(tiny.parent) == []
