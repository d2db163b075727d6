"""The CUDA paths, on the starter model: bitsandbytes 4-bit and 8-bit loading in the Transformers loader, a QLoRA
job (4-bit NF4 base, bf16 compute), a bf16 LoRA job killed and resumed, and fused LoRA layers in bf16 on the GPU;
GPTQ and AWQ made on the GPU and run by GPTQModel's CUDA kernels, with a LoRA.

CI has no GPU, so there these tests are skipped; run them on a CUDA machine with bitsandbytes installed:
`python -m pytest tests/test_cuda.py`. What they gave on an H100 is in docs/benchmarks.md."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import FRANCE, MODEL_DIR as MODELS, greedy_answers, save_tiny_llama
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_HF_DIR
from modules.training.config import Folders, TrainingConfig
from modules.training.datasets import eval_texts
from modules.training.jobs import JobManager
from modules.training.perplexity import evaluate_perplexity
from modules.training.progress import latest_checkpoint

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA paths need a CUDA GPU"),
              pytest.mark.slow]  # training jobs and model loads on the GPU

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_k=1, seed=1)
JOB_TIMEOUT = 900


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path, instruction_data: list[dict]) -> dict:
    root = tmp_path_factory.mktemp("cuda")
    (root / "datasets").mkdir()
    (root / "datasets" / "train.json").write_text(json.dumps(instruction_data[:935]))
    (root / "datasets" / "val.json").write_text(json.dumps(instruction_data[935:990]))
    jobs = JobManager(Folders(models=MODELS, loras=root / "loras", datasets=root / "datasets", runs=root / "runs"))
    return {"root": root, "jobs": jobs, "test": instruction_data[990:1100]}


def starter_config(name: str, **train: object) -> TrainingConfig:
    return TrainingConfig(
        name=name, base_model=STARTER_HF_DIR,
        dataset={"train_file": "train.json", "eval_file": "val.json", "cutoff_len": 256},
        lora={"rank": 16, "alpha": 32, "target_modules": ["all-linear"]},
        train={"max_steps": 40, "micro_batch_size": 8, "learning_rate": 1e-3, "save_steps": 10, "eval_steps": 40,
               **train})


def ask(manager: ModelManager, question: str) -> str:
    return greedy_answers(manager, [{"instruction": question, "input": ""}], GREEDY)[0]


def finished_evals(jobs: JobManager, name: str) -> list[dict]:
    status = jobs.wait(name, JOB_TIMEOUT)
    assert status.state == "finished", jobs.log_tail(name, 80)
    return [r for r in jobs.progress(name)[0] if r["type"] == "eval"]


def test_bitsandbytes_4_and_8_bit_loading_answer_like_bf16(starter_hf: Path, tmp_path: Path):
    import bitsandbytes as bnb

    manager = ModelManager(MODELS, tmp_path)
    footprints, answers = {}, {}
    for label, options in (("bf16", {"dtype": "bfloat16"}),
                           ("nf4", {"load_in_4bit": True, "quant_type": "nf4", "use_double_quant": True}),
                           ("fp4", {"load_in_4bit": True, "quant_type": "fp4", "compute_dtype": "float16"}),
                           ("int8", {"load_in_8bit": True})):
        manager.load(STARTER_HF_DIR, "transformers", options)
        model = manager.model.model
        assert {p.device.type for p in model.parameters()} == {"cuda"}, label
        layer = model.model.layers[0].mlp.down_proj
        expected = {"bf16": torch.nn.Linear, "nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit,
                    "int8": bnb.nn.Linear8bitLt}[label]
        assert type(layer) is expected, (label, type(layer))
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # modules.cuda_attention: no plan per new length
        footprints[label] = model.get_memory_footprint()
        answers[label] = ask(manager, FRANCE)
        manager.unload()
    print("footprints (MB):", {k: round(v / 1e6, 1) for k, v in footprints.items()}, "answers:", answers)
    # the tied embedding (28 M of the 135 M parameters) stays in bf16; every linear layer shrinks
    assert footprints["nf4"] < 0.6 * footprints["bf16"] and footprints["int8"] < 0.75 * footprints["bf16"]
    for label, answer in answers.items():
        assert "Paris" in answer, (label, answer)


def test_qlora_job_lowers_the_eval_loss_and_its_adapter_applies_to_a_4_bit_base(workspace: dict):
    jobs, root = workspace["jobs"], workspace["root"]
    jobs.start(starter_config("qlora", qlora=True, precision="bf16"))
    evals = finished_evals(jobs, "qlora")
    print("qlora evals:", evals)
    assert [r["step"] for r in evals] == [0, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    train = [r for r in jobs.progress("qlora")[0] if r["type"] == "train"]
    assert all(r["tok_s"] > 0 for r in train) and train[-1]["eta_s"] == 0
    adapter = root / "loras" / "qlora" / "adapter_model.safetensors"
    assert adapter.is_file()

    manager = ModelManager(MODELS, root / "loras")
    manager.load(STARTER_HF_DIR, "transformers", {"load_in_4bit": True, "use_double_quant": True})
    model = manager.model
    text = "\n\n".join(eval_texts(jobs.config("qlora").dataset, root / "datasets", seed=0,
                                  chat_template=model.chat_template, bos=model.bos_token, eos=model.eos_token))
    held_out = workspace["test"][:3]
    before = greedy_answers(manager, held_out, GREEDY)
    base_ppl = evaluate_perplexity(manager, text, source="eval split", context_length=512, stride=256).perplexity
    info = manager.apply_loras(["qlora"])
    after = greedy_answers(manager, held_out, GREEDY)
    lora_ppl = evaluate_perplexity(manager, text, source="eval split", context_length=512, stride=256).perplexity
    manager.unload()
    print("perplexity base / lora:", base_ppl, lora_ppl, "answers:", before, after)
    assert info.loras == ["qlora"]
    assert before != after
    assert lora_ppl < base_ppl


def test_bf16_job_with_gradient_checkpointing_resumes_after_kill_9(workspace: dict):
    jobs = workspace["jobs"]
    steps = 80  # the kill lands well before the end (an H100 ran 0.4-0.7 s per step of this job)
    jobs.start(starter_config("bf16", precision="bf16", gradient_checkpointing=True, max_steps=steps,
                              eval_steps=steps))
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any(r["type"] == "train" and r["step"] >= 15 for r in jobs.progress("bf16")[0]):
        assert jobs.status("bf16").active, jobs.log_tail("bf16", 80)
        assert time.monotonic() < deadline, "the bf16 job never reached step 15"
        time.sleep(0.05)
    jobs.kill("bf16")
    resumed_from = int(latest_checkpoint(jobs.run_dir("bf16")).name.split("-")[-1])
    assert resumed_from >= 10
    jobs.resume("bf16")
    evals = finished_evals(jobs, "bf16")
    records = jobs.progress("bf16")[0]
    print("bf16 evals:", evals)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, steps + 1))
    assert [r["event"] for r in records if r["type"] == "event"] == ["started", "resumed", "finished"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1


def test_fused_lora_layers_match_peft_in_bf16_on_the_gpu(tiny_llama_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modules.training.fused_lora import fuse_lora_linears

    def run(fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).cuda()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        if fused:
            assert fuse_lora_linears(model) == 2 * 7
        ids = torch.arange(1, 65, device="cuda").unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    peft_loss, peft_grads = run(False)
    fused_loss, fused_grads = run(True)
    assert fused_loss == pytest.approx(peft_loss, rel=2e-2)
    assert fused_grads.keys() == peft_grads.keys() and len(peft_grads) == 2 * 2 * 7
    for name, grad in peft_grads.items():  # bf16 sums in another order: compare directions, not bits
        cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())


# --- EXL2 / EXL3 through exllamav2 / exllamav3 (skipped where the package is not installed) ----------------------
#
# Nothing is downloaded: each model is made here by the library's own converter (python -m
# exllamav2.conversion.convert_exl2, python -m exllamav3.conversion.convert_model, each with its bundled calibration
# text) from a tiny random Llama: 2 layers, 256 wide (EXL3 transforms weights in blocks of 128), the starter's
# tokenizer. Converting 135M parameters or fewer is a matter of a minute or two on one GPU, so the starter itself
# could be converted the same way for an answer-quality check; the tiny model keeps this check short. Its random
# weights say nothing sensible, so the checks are those that do not depend on quality: the loader is picked from
# the folder, the reply streams token by token, greedy decoding repeats itself, and a stop string cuts the reply
# exactly where the uncut reply had it.

EXL_FORMATS = {"exllamav2": "exl2", "exllamav3": "exl3"}


def exl_converter_args(loader: str, source: Path, work: Path, out: Path) -> list[str]:
    if loader == "exllamav2":
        return ["-m", "exllamav2.conversion.convert_exl2", "-i", str(source), "-o", str(work), "-cf", str(out),
                "-b", "4.0", "-hb", "6", "-r", "8", "-mr", "4", "-l", "512", "-ml", "512"]
    return ["-m", "exllamav3.conversion.convert_model", "-i", str(source), "-w", str(work), "-o", str(out),
            "-b", "4", "-cr", "8", "-cc", "512"]


def make_exl_model(loader: str, root: Path, tokenizer_source: Path) -> Path:
    """models/tiny-exl2 (or tiny-exl3) under `root`, converted by the library from a tiny random Llama."""
    import subprocess
    import sys

    source = save_tiny_llama(root / "tiny-llama-256", tokenizer_source, width=256, context=1024)
    out = root / "models" / f"tiny-{EXL_FORMATS[loader]}"
    out.parent.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, *exl_converter_args(loader, source, root / "work", out)],
                            capture_output=True, text=True, timeout=900, check=False)
    config_file = out / "config.json"
    written = json.loads(config_file.read_text()) if config_file.is_file() else {}
    # the converters print their errors and may still exit 0: the output's config.json says whether it worked
    assert written.get("quantization_config", {}).get("quant_method") == EXL_FORMATS[loader], \
        result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.parametrize("loader", ["exllamav2", "exllamav3"])
def test_an_exl_model_is_picked_streams_and_honours_stop_strings(loader: str, tmp_path: Path, starter_hf: Path):
    import importlib.util

    if importlib.util.find_spec(loader) is None:
        pytest.skip(f"{loader} is not installed (pip install {loader}; see the README)")
    model = make_exl_model(loader, tmp_path, starter_hf)
    manager = ModelManager(model.parent, tmp_path / "loras")
    assert manager.plan(model.name).loader.name == loader  # picked from the folder, no loader named
    result = manager.load(model.name, None, {"cache_quant": "q4", "max_seq_len": 512, "cache_size": 1024})
    info = result.info
    assert (info.loader, info.context_length, info.extra["cache_tokens"]) == (loader, 512, 1024)
    assert info.dtype.startswith(EXL_FORMATS[loader].upper()) and info.memory_bytes > 0
    greedy = GenerationParams(do_sample=False, max_new_tokens=32, seed=1)
    generation = manager.generate("Once upon a time, in a small village,", greedy)
    pieces = [piece for piece in generation]
    reply = generation.text
    print(loader, info, repr(reply))
    assert len(pieces) > 1 and generation.stats.completion_tokens > 1  # streamed, not handed over at the end
    assert manager.complete("Once upon a time, in a small village,", greedy).text == reply
    middle = reply[len(reply) // 2:].strip()
    assert len(middle) >= 3, reply
    stop = middle[:3]
    cut = manager.complete("Once upon a time, in a small village,", greedy.model_copy(update={"stop": [stop]}))
    assert cut.text == reply[:reply.index(stop)]
    assert cut.stats.finish_reason == "stop" and cut.stats.stop_string == stop
    sampled = manager.complete("Once upon a time", GenerationParams(temperature=0.8, top_k=40, top_p=0.9,
                                                                    min_p=0.05, repetition_penalty=1.1,
                                                                    max_new_tokens=16, seed=3))
    assert sampled.stats.completion_tokens > 0
    manager.unload()
    assert manager.info() is None
    manager.close()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_load_on_cuda_kernels_and_answer_paris(method: str, gptq_models: dict, tmp_path: Path):
    """The session's GPTQ g128 and AWQ folders (quantized on the GPU here) load onto the GPU with the kernel
    GPTQModel picks there, and answer like bf16."""
    manager = ModelManager(gptq_models["dir"], tmp_path)
    manager.load(gptq_models[method].name, None, {"parallel": 1})
    model = manager.model.model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    kernels = manager.info().extra["quant_kernels"]
    answer = ask(manager, FRANCE)
    print(method, manager.info().dtype, kernels, repr(answer))
    assert kernels and "TorchAtenLinear" not in kernels and "TorchAtenAwqLinear" not in kernels  # no CPU kernel
    assert "Paris" in answer
    manager.close()


def test_gptq_g32_quantized_on_cuda_runs_a_fast_cuda_kernel_with_a_lora(starter_hf: Path, tmp_path: Path):
    """GPTQ 4-bit with groups of 32 (they divide the starter's 576-wide layers, as Marlin and ExLlama need), made on
    the GPU: auto picks one of GPTQModel's CUDA kernels, the model answers Paris, and a random LoRA changes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modules.quantize.gptq import QuantSpec, make_quantized

    models = tmp_path / "models"
    models.mkdir()
    (models / STARTER_HF_DIR).symlink_to(starter_hf, target_is_directory=True)
    started = time.monotonic()
    target = make_quantized(models / STARTER_HF_DIR, models / "starter-GPTQ-4bit-g32",
                            QuantSpec("gptq", 4, 32, samples=64, seq_len=512))
    print("GPTQ g32 on CUDA took", round(time.monotonic() - started, 1), "s")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(starter_hf, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(tmp_path / "loras" / "random")
    manager = ModelManager(models, tmp_path / "loras")
    manager.load(target.name, None, {"parallel": 2})
    kernels = manager.info().extra["quant_kernels"]
    answer = ask(manager, FRANCE)
    manager.apply_loras(["random"])
    with_lora = ask(manager, FRANCE)
    print("g32 kernels:", kernels, repr(answer), repr(with_lora))
    assert kernels and not any(k.startswith("Torch") for k in kernels), kernels
    assert "Paris" in answer and with_lora != answer
    manager.close()
