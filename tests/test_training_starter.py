"""The seeds' workflow on the starter model: train a LoRA for a couple of dozen steps on the instruction data
(935 train / 55 validation / 110 test) from the starter GGUF (through its Transformers copy), watch the eval loss
fall, chat with the adapter in both loaders, merge it, export GGUF files, and measure perplexity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import greedy_answers, instruction_prompts
from serving_helpers import alone, start
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_GGUF, STARTER_HF_DIR
from modules.training.config import Folders, TrainingConfig
from modules.training.datasets import eval_texts
from modules.training.export import export_model_gguf, merge_lora, quantize_gguf
from modules.training.jobs import JobManager
from modules.training.perplexity import evaluate_perplexity, load_results, record_result

pytestmark = pytest.mark.slow  # trains the starter model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
GREEDY = GenerationParams(max_new_tokens=10, temperature=0.0, top_k=1, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path,
            instruction_data: list[dict]) -> dict:
    root = tmp_path_factory.mktemp("starter-training")
    (root / "datasets").mkdir()
    (root / "datasets" / "train.json").write_text(json.dumps(instruction_data[:935]))
    (root / "datasets" / "val.json").write_text(json.dumps(instruction_data[935:990]))
    jobs = JobManager(Folders(models=MODELS, loras=root / "loras", datasets=root / "datasets", runs=root / "runs"))
    config = TrainingConfig(
        name="alpaca", base_model=STARTER_GGUF,  # a GGUF: trained through models/SmolLM2-135M-Instruct
        dataset={"train_file": "train.json", "eval_file": "val.json", "cutoff_len": 256},
        lora={"rank": 16, "alpha": 32, "target_modules": ["all-linear"]},
        train={"max_steps": 24, "micro_batch_size": 4, "learning_rate": 1e-3, "save_steps": 100})
    jobs.start(config)
    status = jobs.wait("alpaca", 2400)
    assert status.state == "finished", jobs.log_tail("alpaca", 60)
    return {"root": root, "jobs": jobs, "config": jobs.config("alpaca"), "test": instruction_data[990:1100]}


def answers(manager: ModelManager, records: list[dict]) -> list[str]:
    return greedy_answers(manager, records, GREEDY)


def test_the_eval_loss_falls(trained):
    records, _ = trained["jobs"].progress("alpaca")
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 24]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals
    lora = trained["root"] / "loras" / "alpaca"
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "alpaca.gguf").is_file()


def test_the_adapter_changes_the_greedy_answer_in_the_transformers_loader(trained):
    manager = ModelManager(MODELS, trained["root"] / "loras")
    manager.load(STARTER_HF_DIR, "transformers", {"dtype": "float32"})
    held_out = trained["test"][:3]
    before = answers(manager, held_out)
    info = manager.apply_loras(["alpaca"])
    after = answers(manager, held_out)
    manager.unload()
    assert info.loras == ["alpaca"]
    assert before != after, before
    trained["peft_answers"] = after


def test_gguf_lora_in_llama_cpp_matches_the_merged_transformers_model(trained):
    root = trained["root"]
    models = root / "models"
    merge_lora(root / "loras" / "alpaca", MODELS / STARTER_HF_DIR, models / "merged", dtype="float32")
    export_model_gguf(MODELS / STARTER_HF_DIR, models / "base.F16.gguf", "f16")
    held_out = trained["test"][:3]
    merged = ModelManager(models, root / "loras")
    merged.load("merged", "transformers", {"dtype": "float32"})
    merged_answers = answers(merged, held_out)
    merged.unload()
    if "peft_answers" in trained:
        assert merged_answers == trained["peft_answers"]  # merging changes nothing
    gguf = ModelManager(models, root / "loras")
    gguf.load("base.F16.gguf", "llama.cpp", {"n_ctx": 2048}, loras=["alpaca"])
    assert gguf.info().loras == ["alpaca"]
    assert answers(gguf, held_out) == merged_answers
    gguf.unload()


def test_the_original_quantized_file_takes_the_gguf_lora(trained):
    manager = ModelManager(MODELS, trained["root"] / "loras")
    manager.load(STARTER_GGUF, "llama.cpp", {"n_ctx": 2048})
    held_out = trained["test"][:3]
    plain = answers(manager, held_out)
    manager.apply_loras(["alpaca"])
    with_lora = answers(manager, held_out)
    manager.unload()
    assert plain != with_lora


def test_merged_model_exports_to_q8_0_and_q4_k_m(trained):
    from gguf import GGUFReader

    models = trained["root"] / "models"
    if not (models / "merged").is_dir():
        pytest.fail("needs the merged model of the previous test")
    q8 = export_model_gguf(models / "merged", models / "merged.Q8_0.gguf", "q8_0")
    q4 = quantize_gguf(models / "base.F16.gguf", models / "base.Q4_K_M.gguf", "q4_k_m")
    assert int(GGUFReader(str(q8)).fields["general.file_type"].contents()) == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert int(GGUFReader(str(q4)).fields["general.file_type"].contents()) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert q4.stat().st_size < q8.stat().st_size < (models / "base.F16.gguf").stat().st_size
    manager = ModelManager(models, trained["root"] / "loras")
    for name in (q8.name, q4.name):
        manager.load(name, "llama.cpp", {"n_ctx": 2048})
        assert answers(manager, trained["test"][:1])[0].strip()
    manager.unload()


def test_perplexity_on_the_eval_split_falls_with_the_lora_in_both_loaders(trained):
    root = trained["root"]
    table = root / "perplexity.json"
    config = trained["config"]
    for name, loader in ((STARTER_HF_DIR, "transformers"), (STARTER_GGUF, "llama.cpp")):
        manager = ModelManager(MODELS, root / "loras")
        manager.load(name, loader, {"dtype": "float32"} if loader == "transformers" else {"n_ctx": 2048})
        model = manager.model
        text = "\n\n".join(eval_texts(config.dataset, root / "datasets", seed=config.train.seed,
                                      chat_template=model.chat_template, bos=model.bos_token, eos=model.eos_token))
        scores = []
        for loras in ([], ["alpaca"]):
            manager.apply_loras(loras)
            result = evaluate_perplexity(manager, text, source="eval split", context_length=512, stride=256,
                                         max_tokens=1024)
            record_result(table, result)
            scores.append(result.perplexity)
        manager.unload()
        assert scores[1] < scores[0], (loader, scores)
    rows = load_results(table)
    assert [(r["loader"], r["loras"]) for r in rows] == [("transformers", []), ("transformers", ["alpaca"]),
                                                         ("llama.cpp", []), ("llama.cpp", ["alpaca"])]
    assert all(r["tokens"] == 1023 and r["context_length"] == 512 for r in rows)


@pytest.mark.parametrize("name, loader, options", [
    (STARTER_HF_DIR, "transformers", {"dtype": "float32", "parallel": 4}),
    # a split cache: each request alone gives exactly its reply, whatever the other slot holds
    (STARTER_GGUF, "llama.cpp", {"n_ctx": 4096, "parallel": 4, "kv_unified": False}),
])
def test_concurrent_requests_with_and_without_the_lora_each_get_their_own_answer(trained, name, loader, options):
    """A LoRA per request: two requests at once, one naming the trained LoRA and one none, answer as the model
    answers them with the LoRA applied and without (Transformers: one batch, PEFT's adapter_names; llama.cpp:
    adapters apply to the whole context, so the two run as two groups)."""
    manager = ModelManager(MODELS, trained["root"] / "loras")
    manager.load(name, loader, options)
    try:
        prompts = instruction_prompts(manager.model.chat_template, trained["test"][:2])
        params = GenerationParams(max_new_tokens=16, do_sample=False)
        ids = [manager.model.encode(p) for p in prompts]
        plain = [alone(manager, i, params) for i in ids]
        manager.apply_loras(["alpaca"])
        with_lora = [alone(manager, i, params) for i in ids]
        manager.remove_loras()
        assert plain != with_lora
        lora = manager.adapters(["alpaca"])
        runs = [start(manager, ids[0], params, adapters=lora), start(manager, ids[0], params),
                start(manager, ids[1], params), start(manager, ids[1], params, adapters=lora)]
        assert [run.join().ids for run in runs] == [with_lora[0], plain[0], plain[1], with_lora[1]]
    finally:
        manager.unload()
