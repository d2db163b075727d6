"""Continuous batching in the llama.cpp loader (loaders/llama_cpp_batch.py), through the ModelManager as every caller
uses it: concurrent requests decode together in one context, a long prompt is read in chunks between the others'
steps, an idle slot's KV serves the next turn of its conversation, each sequence keeps its own sampler chain.

The starter GGUF is loaded once with 8 slots. A reply is compared with the same request run alone (one sequence
through the same decoder). llama.cpp's arithmetic depends on the batch's shape (which kernels a matrix product takes),
so a batched greedy reply may take the other branch where the two best tokens are nearly tied; the comparison
allows exactly that: up to its first difference the reply equals the reply alone, and there the token it took was
alone's second choice, within TIE_NATS of the first. A mixed-up sequence, position or row would break that at once.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from serving_helpers import (alone, alone_events, chat_ids, check_cancel_frees_a_slot, start,
                             tokens_while_a_long_prompt_is_read)

from loaders.llama_cpp_loader import LlamaCppOptions
from modules.errors import ContextLengthExceeded
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow  # many generations on the CPU

SLOTS = 8
TIE_NATS = 0.5  # measured divergences of 8 concurrent replies: 0.02-0.16 nats between alone's top two
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Write a haiku about rain.", "What is 2+2?",
             "Who wrote Hamlet?", "Describe a cat in one sentence.", "What color is the sky?",
             "Give me a tip for sleeping well."]


@pytest.fixture(scope="module")
def manager(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    manager = ModelManager(starter_gguf.parent, tmp_path_factory.mktemp("loras"))
    manager.load(STARTER_GGUF, "llama.cpp", {"parallel": SLOTS, "n_ctx": 8192})
    yield manager
    manager.unload()


def assert_same_or_near_tie(manager: ModelManager, ids: list[int], params: GenerationParams, got: list[int]) -> bool:
    """`got` (a batched greedy reply, no penalties) equals the reply alone, or leaves it only where alone's top two
    were within TIE_NATS and it took the second. Returns whether it was equal."""
    events = alone_events(manager, ids, params.model_copy(update={"logprobs": 2}))
    want = [event.token_id for event in events]
    if got == want:
        return True
    common = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert common < min(len(got), len(want)), f"one reply is a prefix of the other: {got} vs {want}"
    first, second = events[common].top_logprobs[:2]
    assert got[common] == second.token_id and first.logprob - second.logprob <= TIE_NATS, \
        f"token {common}: took {got[common]}, alone's top two were {first} and {second}"
    return False


def test_the_model_has_its_slots_and_says_what_a_slot_holds(manager: ModelManager):
    model = manager.require_model()
    assert model.slots == SLOTS and manager.resident().engine.slots == SLOTS
    assert manager.info().extra["parallel"] == SLOTS and manager.info().extra["flash_attn"] is True
    assert "A slot holds" in LlamaCppOptions.model_fields["parallel"].description
    assert manager.info().extra["kv_unified"] is True and manager.info().context_length == 8192


def test_eight_concurrent_greedy_replies_match_their_replies_alone_and_interleave(manager: ModelManager):
    params = GenerationParams(do_sample=False, max_new_tokens=40)
    prompts = [chat_ids(manager, q) for q in QUESTIONS]
    runs = [start(manager, ids, params) for ids in prompts]
    for run in runs:
        run.join()
        assert run.generation.stats.finish_reason in ("stop", "length") and run.ids
    for ids, run in zip(prompts, runs):
        assert_same_or_near_tie(manager, ids, params, run.ids)
    # Interleaved: the last request's first token came before the first request's last token. One at a time,
    # the last request would start only after the first had ended.
    assert len(runs[0].tokens) > 1 and runs[-1].tokens[0][0] < runs[0].tokens[-1][0]


def test_a_request_alone_gives_its_reply_again_warm_or_cold(manager: ModelManager, starter_gguf: Path,
                                                            tmp_path: Path):
    """The same request alone gives the same tokens whether its prompt is read anew or partly served by a slot's
    KV, and as in a freshly loaded context, after other conversations filled the slots (seeded sampling and greedy
    alike)."""
    ids = chat_ids(manager, "Write a short poem about the sea and the wind, with a title. " * 16)
    assert len(ids) > 256  # longer than two prompt chunks, so a warm run reuses KV
    seeded = GenerationParams(seed=11, temperature=0.9, top_p=0.95, max_new_tokens=24, ban_eos_token=True)
    greedy = GenerationParams(do_sample=False, max_new_tokens=24, ban_eos_token=True)
    model = manager.require_model()
    first = [start(manager, ids, p).join().ids for p in (seeded, greedy)]
    evaluated = model.evaluated_prompt_tokens
    again = [start(manager, ids, p).join().ids for p in (seeded, greedy)]
    assert model.evaluated_prompt_tokens - evaluated < 2 * len(ids) - 256  # the slots' KV served most of it
    assert again == first

    others = [start(manager, chat_ids(manager, q * 4), GenerationParams(max_new_tokens=20)) for q in QUESTIONS]
    for run in others:
        run.join()
    assert [start(manager, ids, p).join().ids for p in (seeded, greedy)] == first

    fresh = ModelManager(starter_gguf.parent, tmp_path)
    fresh.load(STARTER_GGUF, "llama.cpp", {"parallel": SLOTS, "n_ctx": 8192})
    try:
        assert [alone(fresh, ids, p) for p in (seeded, greedy)] == first
    finally:
        fresh.unload()


def test_with_a_split_cache_a_request_alone_is_exact_whatever_the_other_slots_hold(starter_gguf: Path,
                                                                                    tmp_path: Path):
    manager = ModelManager(starter_gguf.parent, tmp_path)
    manager.load(STARTER_GGUF, "llama.cpp", {"parallel": 4, "n_ctx": 4096, "kv_unified": False})
    try:
        assert manager.info().context_length == 1024 and manager.info().extra["kv_unified"] is False
        ids = chat_ids(manager, "Write a short poem about the sea and the wind, with a title.")
        seeded = GenerationParams(seed=11, temperature=0.9, top_p=0.95, max_new_tokens=24, ban_eos_token=True,
                                  logprobs=1)
        cold = [(e.token_id, e.logprob) for e in alone_events(manager, ids, seeded)]
        for question in QUESTIONS[:5]:  # other conversations fill the other slots' caches
            start(manager, chat_ids(manager, question * 8), GenerationParams(max_new_tokens=30)).join()
        assert [(e.token_id, e.logprob) for e in alone_events(manager, ids, seeded)] == cold
        too_long = chat_ids(manager, "word " * 1100)
        assert len(too_long) > 1024
        with pytest.raises(ContextLengthExceeded):  # a slot holds 1,024 tokens
            manager.complete(too_long, GenerationParams(max_new_tokens=4), cut_to_fit=False)
    finally:
        manager.unload()


def test_the_next_turn_of_a_conversation_reuses_its_slot(manager: ModelManager):
    model = manager.require_model()
    params = GenerationParams(do_sample=False, max_new_tokens=16)
    first_ids = chat_ids(manager, "Tell me a story about a lighthouse keeper and a storm, in many details. " * 20)
    reply = start(manager, first_ids, params)
    # Other conversations pass through the other slots meanwhile.
    for run in [start(manager, chat_ids(manager, q), params) for q in QUESTIONS[:4]]:
        run.join()
    reply.join()
    second = first_ids + reply.ids + model.encode("\nAnd what happened next?")
    before = model.evaluated_prompt_tokens
    start(manager, second, params).join()
    evaluated = model.evaluated_prompt_tokens - before
    # Only the tail past the last whole 128-token chunk of the first prompt is read again.
    assert evaluated <= len(second) - len(first_ids) // 128 * 128, (evaluated, len(second), len(first_ids))
    assert evaluated < len(second) // 2


def test_a_long_prompt_is_read_in_chunks_while_the_others_generate(manager: ModelManager, verdict_text: str):
    model = manager.require_model()
    long_ids = chat_ids(manager, "Summarise this story:\n\n" + model.decode(model.encode(verdict_text)[:1500]))
    between = tokens_while_a_long_prompt_is_read(manager, [chat_ids(manager, q) for q in QUESTIONS[:4]], long_ids)
    # The prompt (~1,550 tokens) is read 128 tokens a step while the others take a token each step: each got
    # about a dozen tokens while it was read. Read whole first, they would have got one or two.
    assert min(between) >= len(long_ids) // 128 - 3, (between, len(long_ids))


def test_each_sequence_has_its_own_grammar_and_penalties(manager: ModelManager):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    ids = chat_ids(manager, "Is the sky blue? Answer yes or no and explain.")
    story = chat_ids(manager, "Write a long story about a dog who loves the sea.")
    rows = [
        (ids, GenerationParams(do_sample=False, max_new_tokens=20, grammar_string=grammar)),
        (ids, GenerationParams(do_sample=False, max_new_tokens=20)),
        (story, GenerationParams(do_sample=False, max_new_tokens=40, repetition_penalty=1.5)),
        (story, GenerationParams(do_sample=False, max_new_tokens=40)),
    ]
    runs = [start(manager, prompt, params) for prompt, params in rows]
    got = [run.join().ids for run in runs]
    model = manager.require_model()
    assert model.decode(got[0]) in ("The answer is yes.", "The answer is no.")
    assert model.decode(got[1]) not in ("The answer is yes.", "The answer is no.")
    for index in (1, 3):  # the plain greedy rows (a penalty picks by other scores than the log-probabilities)
        assert_same_or_near_tie(manager, rows[index][0], rows[index][1], got[index])
    assert got[2] != got[3]  # the penalty changed that row and only that row


def test_a_row_with_no_way_on_ends_and_the_others_go_on(manager: ModelManager):
    ids = chat_ids(manager, "Count to five.")
    greedy = GenerationParams(do_sample=False, max_new_tokens=12)
    dead_end = GenerationParams(max_new_tokens=6, do_sample=False, grammar_string="root ::= [^\\x00-\\U0010FFFF]")
    runs = [start(manager, ids, greedy), start(manager, ids, dead_end)]
    assert_same_or_near_tie(manager, ids, greedy, runs[0].join().ids)
    assert runs[1].join().ids == [] and runs[1].generation.stats.finish_reason == "stop"


def test_cancelling_a_request_frees_its_slot_for_a_waiting_one(manager: ModelManager):
    check_cancel_frees_a_slot(manager, [chat_ids(manager, q) for q in QUESTIONS], SLOTS)


def test_a_full_context_ends_the_longest_sequence_and_keeps_the_rest(starter_gguf: Path, tmp_path: Path):
    """Sequences share the unified cache: when their tokens fill it, the longest ends with 'length' and the others
    go on (an idle slot's KV would have been given up first)."""
    manager = ModelManager(starter_gguf.parent, tmp_path)
    manager.load(STARTER_GGUF, "llama.cpp", {"parallel": 2, "n_ctx": 512})
    try:
        # each fits the context alone (about 130 + 370 and 30 + 200 tokens), not both at once
        params = GenerationParams(do_sample=False, max_new_tokens=370, ban_eos_token=True)
        long = start(manager, chat_ids(manager, "Tell me a story. " * 20), params)
        short = start(manager, chat_ids(manager, "Hi"), GenerationParams(do_sample=False, max_new_tokens=200,
                                                                          ban_eos_token=True))
        assert long.join().generation.stats.finish_reason == "length"
        assert short.join().generation.stats.finish_reason == "length" and len(short.ids) == 200
        assert len(long.ids) < 370
    finally:
        manager.unload()
