"""GPTQ and AWQ: `python -m modules.quantize gptq|awq` makes them from the starter's Transformers copy on the CPU
(conftest's session fixture gptq_models), the Transformers loader recognises and loads them through the
ModelManager, they answer the France question with Paris and score a perplexity near bf16's (one comparison run,
modules.compare, which also shows that the comparison takes them), a LoRA applies to them whole and per request
(rows with and without it in one batch), a LoRA trains on a GPTQ base, and a tiny random Qwen2 goes through GPTQ
too, with progress, an ETA and a Stop that keeps nothing. Bad input is one line and exit 2.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import FRANCE, ROOT
from serving_helpers import chat_ids, start

from modules.errors import Cancelled, ConfigError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.quantize.gptq import QuantSpec, estimate_bytes, inspect_float_source, make_quantized, quant_name
from modules.quantize.job import Progress
from modules.starter import STARTER_HF_DIR

#: Perplexity on the first 512 tokens of data/the-verdict.txt (one window), quantized with 16 samples of at most
#: 256 tokens: bf16 49.9, GPTQ 4-bit g128 60.2 (1.21x), AWQ 4-bit g64 70.9 (1.42x; both AWQ kernels agree, and a
#: plain round-to-nearest with zero points scores 61.2 on this model). A 135M model loses more to 4 bits than a
#: large one (Q4_K_M: 1.06x). Within these factors is a sound quantization; a broken one (wrong packing, a kernel
#: misreading its groups) is off by orders of magnitude.
PERPLEXITY_FACTOR = {"gptq": 1.3, "awq": 1.6}
GREEDY = GenerationParams(do_sample=False, max_new_tokens=12, seed=1)
LORA = "random-lora"


def quantize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modules.quantize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=False)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- what the commands wrote ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_the_output_is_named_for_what_it_is_and_is_it(gptq_models: dict, method: str):
    folder = gptq_models[method]
    result = gptq_models["results"][method]
    assert f"wrote {folder}" in result.stdout
    assert "load: 0%" in result.stderr and "save: 100%" in result.stderr
    quantizing = [line for line in result.stderr.splitlines() if line.startswith("quantize:")]
    assert len(quantizing) >= 5 and "left" in quantizing[-1]  # the bar moved layer by layer, with an ETA
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == \
        (method, 4, 128 if method == "gptq" else 64)
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    weights = (gptq_models["dir"] / STARTER_HF_DIR / "model.safetensors").stat().st_size
    written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert written < weights / 2
    estimate, _ = estimate_bytes(inspect_float_source(gptq_models["dir"] / STARTER_HF_DIR),
                                 QuantSpec(method, 4, config["group_size"]))
    assert 0.8 * written < estimate < 1.25 * written
    assert hidden_leftovers(gptq_models["dir"]) == []


# --- loaded, asked, measured: one comparison run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(gptq_models: dict, verdict_text: str) -> dict:
    """modules.compare on bf16, GPTQ and AWQ: each loaded through the ModelManager with the loader it picks,
    the France question answered greedily, perplexity on the first 512 tokens of The Verdict."""
    from modules.compare import compare

    names = [STARTER_HF_DIR, gptq_models["gptq"].name, gptq_models["awq"].name]
    rows = compare(names, model_dir=gptq_models["dir"], text=verdict_text, prompts=[FRANCE], max_new_tokens=16,
                   max_tokens=512, stride=512, loader_options={"parallel": 1})
    return {row.model: row for row in rows}


@pytest.mark.slow
def test_the_loader_picks_transformers_and_they_answer_paris(compared: dict, gptq_models: dict):
    for name in (gptq_models["gptq"].name, gptq_models["awq"].name):
        row = compared[name]
        assert row.loader == "transformers"
        assert "Paris" in row.answers[0], (name, row.answers)
        assert row.generation_tokens_per_s > 0 and row.rss_delta_bytes > 0


@pytest.mark.slow
def test_their_perplexity_is_close_to_bf16(compared: dict, gptq_models: dict):
    bf16 = compared[STARTER_HF_DIR].perplexity
    assert 1 < bf16 < 200
    for method, factor in PERPLEXITY_FACTOR.items():
        row = compared[gptq_models[method].name]
        assert row.perplexity <= bf16 * factor, (method, row.perplexity, bf16)
        assert row.file_bytes < compared[STARTER_HF_DIR].file_bytes / 2


# --- LoRA on a quantized base -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A random LoRA for the starter (q_proj, v_proj), strong enough that the greedy reply changes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("loras")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(starter_hf, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder / LORA)
    return folder


@pytest.fixture(scope="module", params=["gptq", "awq"])
def quantized(request: pytest.FixtureRequest, gptq_models: dict, lora_dir: Path) -> ModelManager:
    manager = ModelManager(gptq_models["dir"], lora_dir)
    manager.load(gptq_models[request.param].name, None, {"parallel": 2})
    yield manager
    manager.close()


@pytest.mark.slow
def test_a_lora_applies_to_the_whole_model_and_changes_its_reply(quantized: ModelManager):
    info = quantized.info()
    assert info.loader == "transformers" and "4-bit" in info.dtype and info.extra["quant_kernels"]
    ids = chat_ids(quantized, FRANCE)
    base = quantized.complete(ids, GREEDY, add_bos=False).text
    quantized.apply_loras([LORA])
    changed = quantized.complete(ids, GREEDY, add_bos=False).text
    quantized.remove_loras()
    assert changed != base
    assert quantized.complete(ids, GREEDY, add_bos=False).text == base


@pytest.mark.slow
def test_rows_with_and_without_a_lora_share_a_batch(quantized: ModelManager):
    ids = chat_ids(quantized, FRANCE)
    lora = quantized.adapters([LORA])
    runs = [start(quantized, ids, GREEDY, adapters=lora), start(quantized, ids, GREEDY)]
    with_lora, without = (run.join() for run in runs)  # join raises a row's error
    assert with_lora.ids and without.ids and with_lora.ids != without.ids


# --- training a LoRA on a GPTQ base -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_trains_on_a_gptq_base_and_its_eval_loss_falls(gptq_models: dict, instruction_data: list[dict],
                                                              tmp_path: Path):
    from modules.training.config import Folders, TrainingConfig
    from modules.training.jobs import JobManager

    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "train.json").write_text(json.dumps(instruction_data[:200]))
    (tmp_path / "datasets" / "val.json").write_text(json.dumps(instruction_data[935:955]))
    jobs = JobManager(Folders(models=gptq_models["dir"], loras=tmp_path / "loras", datasets=tmp_path / "datasets",
                              runs=tmp_path / "runs"))
    jobs.start(TrainingConfig(
        name="on-gptq", base_model=gptq_models["gptq"].name,
        dataset={"train_file": "train.json", "eval_file": "val.json", "cutoff_len": 128},
        lora={"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        train={"max_steps": 12, "micro_batch_size": 4, "learning_rate": 2e-3, "save_steps": 100, "eval_steps": 12}))
    status = jobs.wait("on-gptq", 1800)
    assert status.state == "finished", jobs.log_tail("on-gptq", 60)
    evals = [r for r in jobs.progress("on-gptq")[0] if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals
    assert (tmp_path / "loras" / "on-gptq" / "adapter_model.safetensors").is_file()


# --- another architecture: a tiny random Qwen2, with progress and Stop --------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A 2-layer random Qwen2 (biased q/k/v projections, unlike the starter's Llama) with the starter's tokenizer,
    its layers 128 or 256 wide, saved in a models folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen") / "models" / "tiny-qwen2"
    tokenizer = AutoTokenizer.from_pretrained(starter_hf)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_tiny_qwen2_goes_through_gptq_with_progress_and_loads(tiny_qwen: Path):
    spec = QuantSpec("gptq", bits=4, group_size=32, desc_act=True, samples=8, seq_len=64)
    target = tiny_qwen.parent / quant_name(tiny_qwen.name, spec)
    reports: list[Progress] = []
    make_quantized(tiny_qwen, target, spec, progress=reports.append)
    assert target.name == "tiny-qwen2-GPTQ-4bit-g32-act"
    assert list(dict.fromkeys(p.stage for p in reports)) == ["load", "quantize", "save"]
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(p.eta is not None for p in reports)
    config = json.loads((target / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["desc_act"]) == ("gptq", 4, 32, True)
    assert hidden_leftovers(tiny_qwen.parent) == []
    # the same checkpoint as AutoGPTQ wrote them: the settings only in quantize_config.json
    older = tiny_qwen.parent / "tiny-qwen2-autogptq"
    shutil.copytree(target, older)
    stored = json.loads((older / "config.json").read_text())
    del stored["quantization_config"]
    (older / "config.json").write_text(json.dumps(stored))
    manager = ModelManager(tiny_qwen.parent, tiny_qwen.parent / "loras")
    params = GenerationParams(do_sample=False, max_new_tokens=4, ban_eos_token=True)
    replies = []
    for name in (target.name, older.name):
        manager.load(name, None, {"parallel": 1})
        info = manager.info()
        assert info.loader == "transformers" and info.extra["architecture"] == "Qwen2ForCausalLM"
        assert "GPTQ 4-bit g32 act-order" in info.dtype
        replies.append(manager.complete("Once upon a time", params))
    assert replies[0].stats.completion_tokens == 4
    assert replies[1].text == replies[0].text
    manager.close()


@pytest.mark.slow
def test_stop_kills_the_quantizer_and_keeps_nothing(tiny_qwen: Path):
    cancel = threading.Event()

    def stop_once_loaded(progress: Progress) -> None:
        if progress.stage == "quantize":
            cancel.set()

    target = tiny_qwen.parent / "stopped-GPTQ"
    with pytest.raises(Cancelled):
        make_quantized(tiny_qwen, target, QuantSpec("gptq", samples=4, seq_len=32), progress=stop_once_loaded,
                       cancel=cancel)
    assert not target.exists()
    assert hidden_leftovers(tiny_qwen.parent) == []


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (["gptq", STARTER_HF_DIR, "--bits", "5"], ["--bits", "5"]),
    (["gptq", STARTER_HF_DIR, "--group-size", "100"], ["--group-size", "100"]),
    (["awq", STARTER_HF_DIR, "--bits", "8"], ["--bits", "8"]),
    (["awq", STARTER_HF_DIR, "--group-size", "1024"], ["--group-size", "1024"]),
    (["awq", STARTER_HF_DIR, "--group-size", "128"], ["multiple of the group size", "576", "64"]),
    (["awq", STARTER_HF_DIR, "--act-order"], ["--act-order"]),
    (["gptq", "no-such-model"], ["no-such-model"]),
    (["gptq", "../models"], [".."]),
    (["gptq", STARTER_HF_DIR, "--output", "sub/x"], ["sub/x"]),
    (["gptq", STARTER_HF_DIR, "--output", "x", "--calibration", "no-such.json"], ["no-such.json"]),
    (["gptq", STARTER_HF_DIR, "--output", "x", "--seq-len", "8"], ["16 tokens"]),
    (["gptq", STARTER_HF_DIR, "--output", "x", "--samples", "0"], ["calibration sample"]),
], ids=["bits", "group size", "awq bits", "awq group size", "awq groups", "awq act-order", "missing model", "escape", "output path",
        "calibration file", "seq-len", "samples"])
def test_bad_input_is_one_line_and_exit_2(starter_hf: Path, args: list[str], words: list[str]):
    result = quantize(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_a_quantized_source_or_an_existing_output_is_refused(gptq_models: dict):
    before = gptq_models["gptq"].stat().st_mtime_ns
    refused = quantize("gptq", STARTER_HF_DIR, "--model-dir", str(gptq_models["dir"]))
    assert refused.returncode == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert gptq_models["gptq"].stat().st_mtime_ns == before
    requantized = quantize("awq", gptq_models["gptq"].name, "--model-dir", str(gptq_models["dir"]))
    assert requantized.returncode == 2 and "already quantized (gptq)" in requantized.stderr


def test_the_calibration_files_are_read_as_text_and_records(tmp_path: Path):
    from modules.quantize.gptq import DEFAULT_CALIBRATION, read_calibration

    instructions, verdict = read_calibration(DEFAULT_CALIBRATION)
    assert len(instructions) == 1100 and instructions[0]["messages"][0]["role"] == "user"
    assert instructions[0]["messages"][1]["role"] == "assistant"
    assert len(verdict) == 1 and "Gisburn" in verdict[0]["text"]
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "plain"}\n')
    assert read_calibration([tmp_path / "chat.jsonl"]) == [[{"messages": [{"role": "user", "content": "hi"}]},
                                                             {"text": "plain"}]]
    (tmp_path / "bad.json").write_text('[{"question": "no known field"}]')
    with pytest.raises(ConfigError, match="record 1"):
        read_calibration([tmp_path / "bad.json"])


def test_checkpoints_are_recognised_and_a_kernel_is_picked_for_their_groups(tmp_path: Path):
    """Folders as GPTQModel, AutoGPTQ and AutoAWQ write them (their config files and a packed qweight's shape); other
    quantizations are left to Transformers."""
    import torch
    from safetensors.torch import save_file

    from loaders.transformers_quant import pick_kernel, quantized_checkpoint

    def folder(name: str, config: dict, extra: dict | None = None, qweight: tuple[int, int] = (72, 576)) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        for file, content in (extra or {}).items():
            (path / file).write_text(json.dumps(content))
        save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(qweight, dtype=torch.int32)},
                  path / "model.safetensors")
        return path

    gptq = folder("gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                   "desc_act": False}})
    autogptq = folder("autogptq", {}, {"quantize_config.json": {"bits": 4, "group_size": 64, "desc_act": True}})
    autoawq = folder("autoawq", {}, {"quant_config.json": {"w_bit": 4, "q_group_size": 64, "zero_point": True,
                                                          "version": "GEMM"}}, qweight=(576, 72))
    bnb = folder("bnb", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    found = {path.name: quantized_checkpoint(path) for path in (gptq, autogptq, autoawq, bnb, tmp_path)}
    assert (found["gptq"].label, found["gptq"].in_config) == ("GPTQ 4-bit g128", True)
    assert (found["autogptq"].label, found["autogptq"].in_config) == ("GPTQ 4-bit g64 act-order", False)
    assert (found["autoawq"].label, found["autoawq"].in_config) == ("AWQ 4-bit g64", False)
    assert found["bnb"] is None and found[tmp_path.name] is None
    # 576-wide rows (72 int32 rows of 8 packed 4-bit weights): groups of 128 leave a partial group on a CPU
    assert pick_kernel(gptq, found["gptq"], device="cpu", kernel="auto") == "torch"
    assert pick_kernel(gptq, found["gptq"], device="cuda", kernel="auto") == "auto"
    assert pick_kernel(autogptq, found["autogptq"], device="cpu", kernel="auto", trainable=True) == "auto_trainable"
    assert pick_kernel(autoawq, found["autoawq"], device="cpu", kernel="torch") == "torch_awq"
