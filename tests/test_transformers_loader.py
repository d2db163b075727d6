"""Transformers-specific behaviour: beam search, GGUF files, pickle policy, options that need hardware."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from conftest import FRANCE, MODEL_DIR
from loaders.transformers_loader import TransformersLoader, TransformersOptions
from modules.chat.templates import choose_template, render_chat
from modules.errors import ModelLoadError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_GGUF, STARTER_HF_DIR

pytestmark = pytest.mark.slow  # model loads that take long (a GGUF dequantized into Transformers) and beam search


@pytest.fixture(scope="module")
def starter(starter_hf: Path) -> ModelManager:
    manager = ModelManager(MODEL_DIR, MODEL_DIR.parent / "loras")
    manager.load(STARTER_HF_DIR, "transformers", {"dtype": "float32"})
    yield manager
    manager.unload()


def sequence_logprob(manager: ModelManager, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log p(token | prefix) of the completion under the model."""
    model = manager.require_model().model
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(logprobs[torch.arange(len(completion_ids)), torch.tensor(completion_ids)].sum())


def test_beam_search_scores_at_least_as_high_as_greedy(starter: ModelManager):
    prompt_ids = starter.encode("The history of the city of Rome begins", add_bos=True)
    common = dict(max_new_tokens=12, ban_eos_token=True)
    greedy = starter.generate(prompt_ids, GenerationParams(do_sample=False, **common))
    greedy_ids = [t.token_id for chunk in greedy for t in chunk.tokens]
    beam = starter.generate(prompt_ids, GenerationParams(do_sample=False, num_beams=5, length_penalty=0.0, **common))
    beam_ids = [t.token_id for chunk in beam for t in chunk.tokens]
    assert len(greedy_ids) == len(beam_ids) == 12
    assert sequence_logprob(starter, prompt_ids, beam_ids) >= sequence_logprob(starter, prompt_ids, greedy_ids) - 1e-4


def test_own_decode_loop_agrees_with_generate(starter: ModelManager):
    """Plain greedy runs our step loop; prompt lookup (exact under greedy) goes through generate(): the same
    tokens, also with a penalty that reads the whole sequence so far."""
    model = starter.require_model()
    prompt = render_chat(choose_template(model.chat_template).template,
                         [{"role": "user", "content": "List five fruits, one per line."}],
                         add_generation_prompt=True, bos_token=model.bos_token, eos_token=model.eos_token)
    for knobs in ({"do_sample": False}, {"do_sample": False, "repetition_penalty": 1.3}):
        params = GenerationParams(max_new_tokens=30, **knobs)
        ours = starter.complete(prompt, params)
        through_generate = starter.complete(prompt, params.model_copy(update={"prompt_lookup_num_tokens": 3}))
        assert ours.text == through_generate.text and ours.stats.completion_tokens > 5, knobs
        assert ours.stats.finish_reason == through_generate.stats.finish_reason


def test_gguf_file_loads_in_transformers_and_answers(starter_gguf: Path):
    manager = ModelManager(MODEL_DIR, MODEL_DIR.parent / "loras")
    manager.load(STARTER_GGUF, "transformers", {"dtype": "float32"})
    try:
        model = manager.require_model()
        assert model.loader_name == "transformers" and model.chat_template
        prompt = render_chat(choose_template(model.chat_template).template, [{"role": "user", "content": FRANCE}],
                             bos_token=model.bos_token)
        assert "Paris" in manager.complete(prompt, GenerationParams(do_sample=False, max_new_tokens=30)).text
    finally:
        manager.unload()


def test_tiny_random_model_streams_and_reports_its_context(tiny_llama_dir: Path):
    model = TransformersLoader.load(tiny_llama_dir, TransformersOptions())
    try:
        assert model.context_length == 512
        tokens = list(model.stream(model.encode("Hello", add_bos=True),
                                   GenerationParams(do_sample=False, max_new_tokens=5, ban_eos_token=True),
                                   threading.Event()))
        assert len(tokens) == 5
        info = model.info()
        assert info.loader == "transformers" and info.memory_bytes > 0 and info.dtype == "float32"
    finally:
        model.unload()


def test_max_seq_len_option_overrides_the_context(tiny_llama_dir: Path):
    model = TransformersLoader.load(tiny_llama_dir, TransformersOptions(max_seq_len=256, dtype="bfloat16"))
    try:
        assert model.context_length == 256 and model.info().dtype == "bfloat16"
    finally:
        model.unload()


def test_pickle_checkpoints_need_an_explicit_opt_in(tiny_llama_dir: Path, tmp_path: Path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        TransformersLoader.load(folder, TransformersOptions())
    model = TransformersLoader.load(folder, TransformersOptions(allow_pickle_weights=True))  # weights_only=True
    try:
        assert model.encode("hi")
    finally:
        model.unload()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
@pytest.mark.parametrize("options, message", [
    ({"load_in_4bit": True}, "CUDA"),
    ({"load_in_8bit": True}, "CUDA"),
    ({"device": "cuda"}, "no CUDA"),
])
def test_gpu_only_options_fail_clearly_without_cuda(tiny_llama_dir: Path, options: dict, message: str):
    with pytest.raises(ModelLoadError, match=message):
        TransformersLoader.load(tiny_llama_dir, TransformersOptions(**options))


def test_conflicting_options_are_refused():
    with pytest.raises(ValueError, match="not both"):
        TransformersOptions(load_in_4bit=True, load_in_8bit=True)


def test_trust_remote_code_is_off_unless_asked():
    assert TransformersOptions().trust_remote_code is False


def test_logprobs_under_mirostat_report_the_distribution_it_drew_from(starter: ModelManager):
    generation = starter.generate("The weather today is", GenerationParams(mirostat_mode=2, max_new_tokens=6,
                                                                           seed=3, logprobs=3, ban_eos_token=True))
    tokens = [token for chunk in generation for token in chunk.tokens]
    assert len(tokens) == 6
    for token in tokens:
        # a real distribution: alternatives with finite log-probabilities, the chosen token among the plausible
        assert all(alt.logprob > -1e9 for alt in token.top_logprobs)
        assert token.logprob is not None and token.logprob > -1e9
