"""Continuous batching in the Transformers loader (loaders/transformers_batch.py), through the ModelManager as every
caller uses it: concurrent requests decode together, each gets what it gets alone, knobs and LoRAs per request.

The starter's Transformers copy is loaded once, in float32, with 8 slots. Replies are compared with the same
request run alone through `LoadedModel.stream` (the path every model took before batching). In float32 a row of a
batch and a sequence alone agree to rounding far below what moves a greedy pick, so the comparison is exact; in
bfloat16 the batch's arithmetic rounds differently and a reply may change after some tokens (the README's "What
batching changes"), which is why this module loads float32.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import MODEL_DIR, wait_until
from serving_helpers import (alone, chat_ids, check_cancel_frees_a_slot, start, tokens_while_a_long_prompt_is_read)

from loaders.batching import Adapter
from loaders.transformers_loader import TransformersOptions
from modules.errors import ModelLoadError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_HF_DIR

pytestmark = pytest.mark.slow  # a model load and many generations on the CPU

SLOTS = 8
LORA = "random-lora"
OTHER_LORA = "other-random-lora"
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Write a haiku about rain.", "What is 2+2?",
             "Who wrote Hamlet?", "Describe a cat in one sentence.", "What color is the sky?",
             "Give me a tip for sleeping well."]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    """A LoRA folder with two random LoRAs for the starter: strong enough that the greedy reply changes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("loras")
    for seed, name, targets in ((0, LORA, ["q_proj", "v_proj"]), (1, OTHER_LORA, ["v_proj", "down_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(starter_hf, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def manager(lora_dir: Path) -> ModelManager:
    manager = ModelManager(MODEL_DIR, lora_dir)
    manager.load(STARTER_HF_DIR, "transformers", {"dtype": "float32", "parallel": SLOTS})
    yield manager
    manager.unload()


def test_the_model_has_its_slots_and_a_batch_decoder(manager: ModelManager):
    model = manager.require_model()
    assert model.slots == SLOTS and manager.resident().engine.slots == SLOTS
    assert TransformersOptions.model_fields["parallel"].description.startswith("Slots")


def test_eight_concurrent_greedy_replies_equal_their_replies_alone_and_interleave(manager: ModelManager):
    params = GenerationParams(do_sample=False, max_new_tokens=32)
    prompts = [chat_ids(manager, q) for q in QUESTIONS]
    expected = [alone(manager, ids, params) for ids in prompts]
    runs = [start(manager, ids, params) for ids in prompts]
    for run in runs:
        run.join()
    for question, run, want in zip(QUESTIONS, runs, expected):
        assert run.ids == want, question
        assert run.generation.stats.finish_reason in ("stop", "length")
    # Interleaved: the last request's first token came before the first request's last token. One at a time,
    # the last request would start only after the first had ended.
    assert len(runs[0].tokens) > 1
    assert runs[-1].tokens[0][0] < runs[0].tokens[-1][0]


def test_a_beam_search_request_runs_alone_and_answers(manager: ModelManager):
    ids = chat_ids(manager, "Name a famous painter.")
    beam = GenerationParams(do_sample=False, num_beams=4, length_penalty=0.0, max_new_tokens=12, ban_eos_token=True)
    greedy = GenerationParams(do_sample=False, max_new_tokens=12, ban_eos_token=True)
    beam_alone, greedy_alone = alone(manager, ids, beam), alone(manager, ids, greedy)
    assert beam_alone != greedy_alone  # so a beam request decoded as a batch row would show
    assert not manager.resident().engine._batch.takes(beam)
    runs = [start(manager, ids, greedy), start(manager, ids, beam), start(manager, ids, greedy)]
    assert [run.join().ids for run in runs] == [greedy_alone, beam_alone, greedy_alone]


def test_rows_with_different_knobs_each_get_their_own(manager: ModelManager):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    ids = chat_ids(manager, "Is the sky blue? Answer yes or no and explain.")
    story = chat_ids(manager, "Write a long story about a dog who loves the sea.")
    rows = [
        (ids, GenerationParams(do_sample=False, max_new_tokens=20, grammar_string=grammar)),
        (ids, GenerationParams(do_sample=False, max_new_tokens=20)),
        (story, GenerationParams(do_sample=False, max_new_tokens=40, repetition_penalty=1.5)),
        (story, GenerationParams(do_sample=False, max_new_tokens=40)),
        # sampled with a seed, with XTC and DRY: the row draws from its own generators, as alone
        (story, GenerationParams(seed=7, temperature=1.0, xtc_probability=0.5, xtc_threshold=0.1,
                                 dry_multiplier=0.8, max_new_tokens=30)),
        (story, GenerationParams(seed=8, mirostat_mode=2, mirostat_tau=4.0, max_new_tokens=30, logprobs=2)),
    ]
    expected = [alone(manager, prompt, params) for prompt, params in rows]
    runs = [start(manager, prompt, params) for prompt, params in rows]
    got = [run.join().ids for run in runs]
    assert got == expected
    model = manager.require_model()
    assert model.decode(got[0]) in ("The answer is yes.", "The answer is no.")
    assert model.decode(got[1]) not in ("The answer is yes.", "The answer is no.")
    assert got[2] != got[3]  # the penalty changed that row and only that row


def test_a_row_with_no_way_on_ends_and_the_others_go_on(manager: ModelManager):
    ids = chat_ids(manager, "Count to five.")
    greedy = GenerationParams(do_sample=False, max_new_tokens=12)
    dead_ends = [GenerationParams(max_new_tokens=6, do_sample=sampling, seed=1,
                                  grammar_string="root ::= [^\\x00-\\U0010FFFF]") for sampling in (False, True)]
    runs = [start(manager, ids, greedy), *[start(manager, ids, params) for params in dead_ends]]
    assert runs[0].join().ids == alone(manager, ids, greedy)
    for run in runs[1:]:
        assert run.join().ids == [] and run.generation.stats.finish_reason == "stop"


def test_logprobs_of_a_row_match_its_logprobs_alone(manager: ModelManager):
    ids = chat_ids(manager, "Tell me about the moon.")
    params = GenerationParams(do_sample=False, max_new_tokens=8, logprobs=3, ban_eos_token=True)
    model = manager.require_model()
    want = [(e.token_id, round(e.logprob, 3), [t.token_id for t in e.top_logprobs])
            for e in model.stream(ids, params, threading.Event())]
    other = start(manager, chat_ids(manager, "Count to ten."), GenerationParams(do_sample=False, max_new_tokens=8))
    generation = manager.generate(ids, params)
    got = [(e.token_id, round(e.logprob, 3), [t.token_id for t in e.top_logprobs])
           for chunk in generation for e in chunk.tokens]
    other.join()
    assert got == want and len(got) == 8


def test_cancelling_a_request_frees_its_slot_for_a_waiting_one(manager: ModelManager):
    check_cancel_frees_a_slot(manager, [chat_ids(manager, q) for q in QUESTIONS], SLOTS)


def test_a_long_prompt_is_read_in_chunks_while_the_others_generate(manager: ModelManager, verdict_text: str):
    model = manager.require_model()
    long_ids = chat_ids(manager, "Summarise this story:\n\n" + model.decode(model.encode(verdict_text)[:1100]))
    between = tokens_while_a_long_prompt_is_read(manager, [chat_ids(manager, q) for q in QUESTIONS[:4]], long_ids)
    # The prompt (~1,150 tokens) is read 128 tokens a step while the others take a token each step: each got
    # several tokens while it was read. Read in one forward, they would have got one or two.
    assert min(between) >= 4, between


def test_a_lora_per_request_beside_requests_without(manager: ModelManager):
    ids = chat_ids(manager, "What is the capital of France?")
    params = GenerationParams(do_sample=False, max_new_tokens=16, ban_eos_token=True)
    base = alone(manager, ids, params)
    manager.apply_loras([LORA])
    try:
        with_lora = alone(manager, ids, params)
    finally:
        manager.remove_loras()
    manager.apply_loras([LORA], [0.5])
    try:
        half = alone(manager, ids, params)
    finally:
        manager.remove_loras()
    assert base != with_lora and half not in (base, with_lora)  # the LoRA and its scale both change the reply

    lora, lora_half = manager.adapters([LORA]), manager.adapters([LORA], [0.5])
    runs = [start(manager, ids, params, adapters=lora), start(manager, ids, params),
            start(manager, ids, params, adapters=lora_half), start(manager, ids, params, adapters=())]
    assert [run.join().ids for run in runs] == [with_lora, base, half, base]

    # With the LoRA applied to the whole model, a request that names none gets it; an empty list is the bare model.
    manager.apply_loras([LORA])
    try:
        runs = [start(manager, ids, params), start(manager, ids, params, adapters=()),
                start(manager, ids, params, adapters=lora_half)]
        assert [run.join().ids for run in runs] == [with_lora, base, half]
    finally:
        manager.remove_loras()
    assert alone(manager, ids, params) == base  # removing the LoRAs unloads the requests' adapters too


def test_a_request_with_two_loras_gets_their_sum(manager: ModelManager):
    ids = chat_ids(manager, "Name a large animal.")
    params = GenerationParams(do_sample=False, max_new_tokens=16, ban_eos_token=True)
    manager.apply_loras([LORA, OTHER_LORA], [1.0, 0.5])
    try:
        both = alone(manager, ids, params)
    finally:
        manager.remove_loras()
    base = alone(manager, ids, params)
    runs = [start(manager, ids, params, adapters=manager.adapters([LORA, OTHER_LORA], [1.0, 0.5])),
            start(manager, ids, params)]
    assert [run.join().ids for run in runs] == [both, base] and both != base


def test_an_unknown_lora_folder_fails_that_request_alone(manager: ModelManager, tmp_path: Path):
    ids = chat_ids(manager, "Hello!")
    params = GenerationParams(do_sample=False, max_new_tokens=6)
    other = start(manager, ids, params)
    broken = start(manager, ids, params, adapters=(Adapter("nothing-here", 1.0, tmp_path),))
    with pytest.raises(ModelLoadError, match="not a PEFT LoRA folder"):
        broken.join()
    assert other.join().ids == alone(manager, ids, params)


def test_a_model_with_sliding_window_layers_batches_rows_of_any_length(tmp_path: Path, starter_hf: Path):
    """Sliding-window layers keep only the window's end of the timeline: rows longer and shorter than the window,
    joining a batch at different steps, each give what they give alone (a tiny random Mistral, window 16)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(starter_hf)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=16, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "tiny-mistral")
    tokenizer.save_pretrained(tmp_path / "tiny-mistral")
    manager = ModelManager(tmp_path, tmp_path / "loras")
    manager.load("tiny-mistral", "transformers", {"dtype": "float32", "parallel": 4})
    try:
        model = manager.require_model()
        assert manager.resident().engine._batch is not None  # batched, not one at a time

        def row(words: int, tokens: int) -> tuple[list[int], GenerationParams]:
            return (model.encode(" ".join(["Once upon a time there was a"] * words)),
                    GenerationParams(do_sample=False, max_new_tokens=tokens, ban_eos_token=True))

        # A short row, then a longer one (the cache grows past the window: the first row is padded), then the
        # longest with a short reply: when it leaves, the two others (close in length: padding inside the window)
        # go on alone in the trimmed cache.
        rows = [row(2, 40), row(3, 40), row(9, 6)]
        expected = [alone(manager, ids, params) for ids, params in rows]
        runs = []
        for ids, params in rows:  # each joins once the one before has generated
            runs.append(start(manager, ids, params))
            wait_until(lambda: len(runs[-1].tokens) >= 3 or runs[-1].done, "the new row generates")
        assert [run.join().ids for run in runs] == expected
    finally:
        manager.unload()


def test_the_static_cache_makes_the_model_one_slot(tiny_llama_dir: Path):
    """The compiled static cache holds one sequence: every request runs alone, whatever parallel says."""
    manager = ModelManager(tiny_llama_dir.parent, tiny_llama_dir.parent / "loras")
    manager.load(tiny_llama_dir.name, "transformers", {"static_cache": True, "parallel": 4})
    try:
        assert manager.require_model().slots == 1 and manager.resident().engine._batch is None
    finally:
        manager.unload()
