"""Both loaders on the real starter model, through the ModelManager as every caller uses them."""
from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from conftest import FRANCE, MODEL_DIR, wait_until
from modules.chat.templates import choose_template, render_chat
from modules.errors import UnsupportedParameter
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_GGUF, STARTER_HF_DIR

GREEDY = GenerationParams(do_sample=False, max_new_tokens=40)


# slow: the transformers loader's generations take seconds each on a CPU
@pytest.fixture(scope="module", params=["llama.cpp", pytest.param("transformers", marks=pytest.mark.slow)])
def manager(request: pytest.FixtureRequest, starter_gguf, starter_hf) -> ModelManager:
    manager = ModelManager(MODEL_DIR, MODEL_DIR.parent / "loras")
    name = STARTER_GGUF if request.param == "llama.cpp" else STARTER_HF_DIR
    manager.load(name, request.param)
    yield manager
    manager.unload()


def chat(manager: ModelManager, question: str) -> str:
    model = manager.require_model()
    chosen = choose_template(model.chat_template)
    return render_chat(chosen.template, [{"role": "user", "content": question}], add_generation_prompt=True,
                       bos_token=model.bos_token, eos_token=model.eos_token)


def run(manager: ModelManager, prompt: str, params: GenerationParams):
    return manager.complete(prompt, params)


def test_greedy_chat_answer_names_paris(manager):
    result = run(manager, chat(manager, FRANCE), GREEDY)
    assert "Paris" in result.text
    assert result.stats.finish_reason == "stop"  # ended on its own end-of-turn token


def test_max_new_tokens_is_honoured(manager):
    params = GenerationParams(do_sample=False, max_new_tokens=7, ban_eos_token=True)
    result = run(manager, "Once upon a time", params)
    assert result.stats.completion_tokens == 7
    assert result.stats.finish_reason == "length"


def test_stop_string_split_across_tokens_cuts_and_is_never_shown(manager):
    prompt = chat(manager, "Write three sentences about the sea.")
    free = manager.generate(prompt, GenerationParams(do_sample=False, max_new_tokens=40, ban_eos_token=True))
    tokens = [token for chunk in free for token in chunk.tokens]
    # A stop string made of the end of one token and the start of the next (both at least 2 characters).
    index = next(i for i in range(3, len(tokens) - 1)
                 if len(tokens[i].text) >= 2 and len(tokens[i + 1].text.strip()) >= 2)
    stop = tokens[index].text[-2:] + tokens[index + 1].text[:2]
    expected = free.text[:free.text.index(stop)]
    chunks = list(manager.generate(prompt, GenerationParams(do_sample=False, max_new_tokens=40, stop=[stop],
                                                            ban_eos_token=True)))
    shown = "".join(chunk.text for chunk in chunks)
    assert shown == expected
    # Never printed in part: no chunk boundary ever exposed a prefix of the stop string at the end of the text.
    running = ""
    for chunk in chunks:
        running += chunk.text
        assert not any(running.endswith(stop[:k]) for k in range(1, len(stop) + 1)) or running == expected


def test_same_seed_same_text_other_seed_differs(manager):
    prompt = chat(manager, "Tell me a short story about a dragon.")
    sampled = GenerationParams(temperature=1.0, max_new_tokens=30, seed=1234)
    first = run(manager, prompt, sampled).text
    again = run(manager, prompt, sampled).text
    other = run(manager, prompt, sampled.model_copy(update={"seed": 99})).text
    assert first == again
    assert first != other


def test_top_k_1_equals_greedy(manager):
    prompt = chat(manager, "Name three colours.")
    greedy = run(manager, prompt, GenerationParams(do_sample=False, max_new_tokens=30)).text
    top1 = run(manager, prompt, GenerationParams(temperature=1.5, top_k=1, max_new_tokens=30, seed=7)).text
    assert top1 == greedy


def _repeat_fraction(manager: ModelManager, prompt_ids: list[int], completion: str) -> float:
    ids = manager.encode(completion)
    seen = set(prompt_ids)
    repeats = 0
    for token in ids:
        repeats += token in seen
        seen.add(token)
    return repeats / max(len(ids), 1)


def test_repetition_penalty_lowers_repeated_tokens(manager):
    prompt = "apple banana apple banana apple banana apple banana apple banana apple banana"
    prompt_ids = manager.encode(prompt)
    base = GenerationParams(do_sample=False, max_new_tokens=30, ban_eos_token=True)
    plain = _repeat_fraction(manager, prompt_ids, run(manager, prompt, base).text)
    penalised = _repeat_fraction(manager, prompt_ids, run(
        manager, prompt, base.model_copy(update={"repetition_penalty": 1.8})).text)
    assert penalised < plain


def test_repetition_penalty_range_0_means_the_whole_context(manager):
    """0 is "all tokens" (SillyTavern's default rep_pen_range), never "penalties off"."""
    prompt = "apple banana apple banana apple banana apple banana apple banana apple banana"
    base = GenerationParams(do_sample=False, max_new_tokens=20, ban_eos_token=True, repetition_penalty=1.8)
    whole = run(manager, prompt, base.model_copy(update={"repetition_penalty_range": 0})).text
    assert whole == run(manager, prompt, base.model_copy(
        update={"repetition_penalty_range": manager.model.context_length})).text
    assert whole != run(manager, prompt, base.model_copy(update={"repetition_penalty": 1.0})).text


def test_json_schema_output_parses_and_validates(manager):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    prompt = chat(manager, "Give the capital of France and its country as JSON.")
    # maxLength bounds the strings, so the grammar must close the object well within the token limit
    result = run(manager, prompt, GenerationParams(do_sample=False, max_new_tokens=160, json_schema=schema))
    jsonschema.validate(json.loads(result.text), schema)


def test_cancel_stops_the_stream_within_one_token(manager):
    generation = manager.generate("Once upon a time", GenerationParams(do_sample=False, max_new_tokens=200,
                                                                       ban_eos_token=True))
    seen_after_cancel = 0
    for index, chunk in enumerate(generation):
        if index == 3:
            generation.cancel()
        elif index > 3:
            seen_after_cancel += len(chunk.tokens)
    assert seen_after_cancel <= 1
    assert generation.stats.finish_reason == "cancelled"
    assert generation.stats.completion_tokens <= 6
    # The queue is free again at once: the next request runs.
    assert run(manager, "Hello", GenerationParams(do_sample=False, max_new_tokens=2)).stats.completion_tokens >= 1


def test_logprobs_of_chosen_and_top_tokens(manager):
    result = manager.generate(chat(manager, FRANCE), GenerationParams(do_sample=False, max_new_tokens=8, logprobs=3))
    tokens = [token for chunk in result for token in chunk.tokens]
    assert tokens
    for token in tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token_id == token.token_id  # greedy picks the most likely token
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob


def test_encode_decode_round_trip_and_token_count(manager):
    text = "Hello world, ça va? 你好"
    ids = manager.encode(text)
    assert manager.decode(ids) == text
    assert manager.token_count(text) == len(ids)
    assert manager.encode("<|im_start|>") == [manager.require_model().encode("<|im_start|>")[0]]  # special parsed


def test_chat_template_comes_from_model_metadata(manager):
    model = manager.require_model()
    assert model.chat_template and "<|im_start|>" in model.chat_template
    prompt = chat(manager, "Hi")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_unsupported_knob_is_reported_never_ignored_silently(manager):
    model = manager.require_model()
    # llama.cpp has no beam search; Transformers 5 moved contrastive search to a Hub download.
    knob, value = ("num_beams", 3) if model.loader_name == "llama.cpp" else ("penalty_alpha", 0.6)
    params = GenerationParams(do_sample=False, max_new_tokens=3, top_k=4, **{knob: value})
    generation = manager.generate("Hello", params)
    assert any(knob in warning for warning in generation.warnings)
    assert generation.params.model_dump()[knob] == value  # reported, not silently dropped from the request
    with pytest.raises(UnsupportedParameter, match=knob):
        manager.generate("Hello", params, strict=True)


def test_generation_runs_one_at_a_time_in_arrival_order(manager):
    """With one slot, requests run one at a time, in the order they arrived (with more slots they are admitted in
    that order and decoded together: test_llama_cpp_batching, test_transformers_batching)."""
    info = manager.info()
    manager.load(info.name, info.loader, {"parallel": 1})
    order: list[int] = []
    lock = threading.Lock()
    # the first runs until the three others have queued behind it, then is stopped
    generations = [manager.generate("Count to 100:", GenerationParams(do_sample=False, max_new_tokens=4000,
                                                                      ban_eos_token=True))]
    generations += [manager.generate(f"Count to {index}:", GenerationParams(do_sample=False, max_new_tokens=4))
                    for index in range(1, 4)]

    def client(index: int) -> None:
        for _ in generations[index]:
            pass
        with lock:
            order.append(index)

    threads = []
    try:
        for index in range(4):
            thread = threading.Thread(target=client, args=(index,))
            thread.start()
            threads.append(thread)
            wait_until(lambda: manager.busy if index == 0 else manager.waiting == index,
                       "the request reached the model")  # arrived in order
        generations[0].cancel()
        for thread in threads:
            thread.join(timeout=120)
        assert order == [0, 1, 2, 3]
        assert generations[0].stats.finish_reason == "cancelled"
        assert all(g.stats.completion_tokens == 4 for g in generations[1:])
    finally:
        for generation in generations:
            generation.cancel()
        manager.load(info.name, info.loader)
