"""The Transformers sampling layer: each custom processor on a hand-made 6-token distribution, the chain that
GenerationParams builds, and generate() kwargs checked against a real (tiny, random) model."""
from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
    set_seed,
)

from modules.errors import ConfigError
from modules.generation_params import SAMPLER_NAMES, GenerationParams
from modules.samplers import TRANSFORMERS_SUPPORTED_PARAMS, build_logits_processors, generate_kwargs, sampler_order
from modules.samplers.mirostat import Mirostat
from modules.samplers.penalties import AdditivePenalty, DRYPenalty, PromptRepetitionPenalty, RangedRepetitionPenalty
from modules.samplers.warpers import (
    DynamicTemperature,
    ExcludeTopChoices,
    QuadraticSmoothing,
    TailFree,
    TopA,
    TopK,
    TopNSigma,
)

LOGITS = [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]
INF = float("inf")


def scores(values: list[float] = LOGITS, rows: int = 1) -> torch.Tensor:
    return torch.tensor([values] * rows, dtype=torch.float32)


def probs(values: list[float] = LOGITS) -> list[float]:
    finite = [math.exp(v) for v in values if v != -INF]
    total = sum(finite)
    return [math.exp(v) / total if v != -INF else 0.0 for v in values]


def survivors(out: torch.Tensor, row: int = 0) -> set[int]:
    return {i for i, v in enumerate(out[row].tolist()) if v != -INF}


NO_IDS = torch.zeros((1, 1), dtype=torch.long)


# --- truncation and shaping samplers ------------------------------------------------------------------------
def test_top_k_keeps_exactly_k_and_breaks_ties_as_argmax_does():
    tied = [1.0, 3.0, 3.0, 2.0, 3.0]
    assert survivors(TopK(1)(NO_IDS, scores(tied))) == {int(scores(tied).argmax())} == {1}
    assert survivors(TopK(2)(NO_IDS, scores(tied))) == {1, 2}  # not every token tied with the 2nd
    assert survivors(TopK(3)(NO_IDS, scores(LOGITS, rows=2)), row=1) == {0, 1, 2}
    assert survivors(TopK(50)(NO_IDS, scores())) == set(range(len(LOGITS)))


def test_top_a_keeps_tokens_above_a_times_top_probability_squared():
    p = probs()
    out = TopA(0.2)(NO_IDS, scores())
    assert survivors(out) == {i for i, q in enumerate(p) if q >= 0.2 * p[0] ** 2} == {0, 1, 2}
    assert out[0, :3].tolist() == LOGITS[:3]  # survivors keep their logits
    assert survivors(TopA(5.0)(NO_IDS, scores())) == {0}  # never empties a row


def _tail_free_reference(values: list[float], z: float) -> set[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    p = [probs(values)[i] for i in order]
    d1 = [p[i + 1] - p[i] for i in range(len(p) - 1)]
    d2 = [abs(d1[i + 1] - d1[i]) for i in range(len(d1) - 1)]
    cdf, total = [], 0.0
    for d in d2:
        total += d / sum(d2)
        cdf.append(total)
    keep = [True] + [c <= z for c in cdf] + [False]
    return {order[i] for i, k in enumerate(keep) if k}


@pytest.mark.parametrize(("z", "kept"), [(0.5, 1), (0.9, 3), (0.99, 4)])
def test_tail_free_cuts_where_the_curvature_mass_passes_z(z, kept):
    shuffled = [LOGITS[i] for i in (3, 0, 5, 1, 4, 2)]  # the cut must follow probability, not position
    out = survivors(TailFree(z)(NO_IDS, scores(shuffled)))
    assert out == _tail_free_reference(shuffled, z)
    assert len(out) == kept  # the least likely token always goes


def test_top_n_sigma_keeps_logits_within_n_deviations_of_the_max_over_finite_logits():
    assert survivors(TopNSigma(1.0)(NO_IDS, scores())) == {0, 1}  # std 1.708: cut at 1.29
    assert survivors(TopNSigma(2.0)(NO_IDS, scores())) == {0, 1, 2, 3}  # cut at -0.42
    masked = LOGITS[:5] + [-INF]  # mean 1, std sqrt(2) over the five finite logits
    assert survivors(TopNSigma(1.0)(NO_IDS, scores(masked))) == {0, 1}  # cut at 1.59
    assert survivors(TopNSigma(1.5)(NO_IDS, scores(masked))) == {0, 1, 2}  # cut at 0.88


def test_dynamic_temperature_follows_normalised_entropy():
    def expected(values, low, high, exponent):
        p = [q for q in probs(values) if q > 0]
        entropy = -sum(q * math.log(q) for q in p)
        temperature = low + (high - low) * (entropy / math.log(len(p))) ** exponent
        return [v / temperature for v in values]

    out = DynamicTemperature(0.5, 1.5, 1.0)(NO_IDS, scores())
    assert out[0].tolist() == pytest.approx(expected(LOGITS, 0.5, 1.5, 1.0), rel=1e-5)
    # Only tokens still allowed count towards the maximum entropy.
    masked = LOGITS[:3] + [-INF] * 3
    out = DynamicTemperature(0.2, 2.0, 2.0)(NO_IDS, scores(masked))
    assert out[0, :3].tolist() == pytest.approx(expected(masked, 0.2, 2.0, 2.0)[:3], rel=1e-5)
    assert survivors(out) == {0, 1, 2}


def test_quadratic_smoothing_bends_logits_around_the_top():
    out = QuadraticSmoothing(0.5, 1.0)(NO_IDS, scores(LOGITS[:5] + [-INF]))
    assert out[0].tolist() == pytest.approx([3.0 - 0.5 * (v - 3.0) ** 2 for v in LOGITS[:5]] + [-INF])
    out = QuadraticSmoothing(0.5, 2.0)(NO_IDS, scores())  # k = s = 0.5
    assert out[0].tolist() == pytest.approx(
        [3.0 - 0.25 * (v - 3.0) ** 2 + 0.25 * (v - 3.0) ** 3 for v in LOGITS])


def test_xtc_drops_all_top_choices_but_the_least_likely():
    # p = .634, .233, .086, ...: tokens 0 and 1 pass the 0.1 threshold; 1 is the least likely of them.
    assert survivors(ExcludeTopChoices(0.1, 1.0, [])(NO_IDS, scores())) == {1, 2, 3, 4, 5}
    assert survivors(ExcludeTopChoices(0.05, 1.0, [])(NO_IDS, scores())) == {2, 3, 4, 5}
    assert survivors(ExcludeTopChoices(0.5, 1.0, [])(NO_IDS, scores())) == set(range(6))  # only one above
    # A row where a protected token (newline, EOS) would go is left alone.
    assert ExcludeTopChoices(0.1, 1.0, [0])(NO_IDS, scores()).tolist() == scores().tolist()


def test_xtc_acts_with_its_probability_and_replays_under_set_seed():
    xtc = ExcludeTopChoices(0.1, 0.3, [])
    set_seed(7)
    first = xtc(NO_IDS, scores(rows=2000))
    acted = (first[:, 0] == -INF).float().mean().item()
    assert 0.25 < acted < 0.35
    set_seed(7)
    assert torch.equal(xtc(NO_IDS, scores(rows=2000)), first)


# --- penalties ----------------------------------------------------------------------------------------------
def test_presence_and_frequency_penalties_follow_openai_over_the_window():
    ids = torch.tensor([[0, 0, 1, 5, 0]])
    out = AdditivePenalty(0.5, 0.25, window=0)(ids, scores())
    counts = [3, 1, 0, 0, 0, 1]
    assert out[0].tolist() == pytest.approx(
        [v - 0.5 * (c > 0) - 0.25 * c for v, c in zip(LOGITS, counts)])
    out = AdditivePenalty(0.5, 0.25, window=2)(ids, scores())  # sees [5, 0]
    assert out[0].tolist() == pytest.approx([2.25, 2.0, 1.0, 0.0, -1.0, -2.75])


def test_repetition_penalty_only_looks_at_its_window():
    ids = torch.tensor([[1, 4, 0, 4]])
    out = RangedRepetitionPenalty(2.0, window=3)(ids, scores())  # sees [4, 0, 4]
    assert out[0].tolist() == [1.5, 2.0, 1.0, 0.0, -2.0, -2.0]
    out = RangedRepetitionPenalty(2.0, window=0)(ids, scores())
    assert out[0].tolist() == [1.5, 1.0, 1.0, 0.0, -2.0, -2.0]


def test_encoder_repetition_penalty_favours_prompt_tokens_only():
    penalty = PromptRepetitionPenalty(2.0, prompt_length=2)
    out = penalty(torch.tensor([[0, 4, 1]]), scores())  # prompt [0, 4]; token 1 was generated
    assert out[0].tolist() == [6.0, 2.0, 1.0, 0.0, -0.5, -2.0]
    out = penalty(torch.tensor([[0, 4, 1, 2]]), scores())  # the prompt stays what it was
    assert out[0].tolist() == [6.0, 2.0, 1.0, 0.0, -0.5, -2.0]


def _dry_reference(ids: list[int], multiplier, base, allowed, breakers, vocab) -> list[float]:
    """text-generation-webui's DRY loop, written plainly."""
    penalty = [0.0] * vocab
    last = ids[-1]
    if last in breakers:
        return penalty
    lengths: dict[int, int] = {}
    for i in [i for i, v in enumerate(ids[:-1]) if v == last]:
        nxt = ids[i + 1]
        if nxt in breakers:
            continue
        length = 1
        while length < 50:
            j = i - length
            if j < 0 or ids[j] != ids[-(length + 1)] or ids[-(length + 1)] in breakers:
                break
            length += 1
        lengths[nxt] = max(length, lengths.get(nxt, 0))
    for token, length in lengths.items():
        if length >= allowed:
            penalty[token] = multiplier * base ** (length - allowed)
    return penalty


def test_dry_penalises_the_token_that_continued_an_earlier_repeat():
    ids = torch.tensor([[1, 2, 3, 4, 0, 1, 2, 3]])  # "1 2 3" repeats; last time "4" followed
    out = DRYPenalty(1.0, 1.75, 2, breaker_ids=[], window=0)(ids, scores())
    assert out[0].tolist() == pytest.approx([3.0, 2.0, 1.0, 0.0, -1.0 - 1.75, -2.0])
    # A breaker inside the repeat cuts the match to "3" alone: shorter than allowed, no penalty.
    assert DRYPenalty(1.0, 1.75, 2, breaker_ids=[2], window=0)(ids, scores()).tolist() == scores().tolist()
    # The window hides the first occurrence.
    assert DRYPenalty(1.0, 1.75, 2, breaker_ids=[], window=4)(ids, scores()).tolist() == scores().tolist()


def test_dry_matches_the_reference_loop_on_random_texts():
    rng = random.Random(3)
    for _ in range(200):
        vocab = 6
        ids = [rng.randrange(4) for _ in range(rng.randrange(2, 60))]
        breakers = {rng.randrange(vocab)} if rng.random() < 0.5 else set()
        allowed = rng.randrange(1, 4)
        out = DRYPenalty(0.8, 1.5, allowed, breakers, window=0)(torch.tensor([ids]), torch.zeros(1, vocab))
        expected = _dry_reference(ids, 0.8, 1.5, allowed, breakers, vocab)
        assert (-out[0]).tolist() == pytest.approx(expected), ids


# --- mirostat -----------------------------------------------------------------------------------------------
def test_mirostat_v2_truncates_by_surprise_and_learns_from_the_chosen_token():
    rows = 4000
    mirostat = Mirostat(2, tau=1.0, eta=0.5, vocab_size=6, prompt_length=1)
    p = probs()
    # mu starts at 2 bits: only token 0 (0.66 bits) is unsurprising enough.
    out = mirostat(torch.zeros((rows, 1), dtype=torch.long), scores(rows=rows))
    assert all(survivors(out, r) == {0} for r in range(rows))
    assert out[0, 0].item() == LOGITS[0]
    # Token 0 had probability 1 after truncation: surprise 0, so mu rises by eta * tau to 2.5 bits,
    # which lets token 1 (2.10 bits) in; the draw follows the renormalised probabilities.
    out = mirostat(torch.zeros((rows, 2), dtype=torch.long), scores(rows=rows))
    assert torch.allclose(mirostat.mu, torch.full((rows,), 2.5))
    picked = out.argmax(dim=-1)
    assert set(picked.tolist()) == {0, 1}
    share = (picked == 0).float().mean().item()
    assert share == pytest.approx(p[0] / (p[0] + p[1]), abs=0.03)
    # The update uses the token that was actually appended (here: token 1 in every row).
    mirostat(torch.tensor([[0, 0, 1]] * rows), scores(rows=rows))
    surprise_1 = -math.log2(p[1] / (p[0] + p[1]))
    assert mirostat.mu.tolist() == pytest.approx([2.5 - 0.5 * (surprise_1 - 1.0)] * rows, rel=1e-5)


def test_mirostat_v1_keeps_the_k_its_zipf_estimate_gives():
    values = [4.0, 3.0, 2.5, 1.0, 0.5, 0.0]
    tau, rows = 2.0, 3000
    p = sorted(probs(values), reverse=True)
    t = [math.log((i + 2) / (i + 1)) for i in range(5)]
    b = [math.log(p[i] / p[i + 1]) for i in range(5)]
    s_hat = sum(x * y for x, y in zip(t, b)) / sum(x * x for x in t)
    eps = s_hat - 1
    k = int(((eps * 2 ** (2 * tau)) / (1 - 6 ** -eps)) ** (1 / s_hat))
    assert 1 < k < 6  # the case is chosen so the truncation shows
    set_seed(0)
    out = Mirostat(1, tau=tau, eta=0.1, vocab_size=6, prompt_length=1)(
        torch.zeros((rows, 1), dtype=torch.long), scores(values, rows))
    assert set(out.argmax(dim=-1).tolist()) == set(range(k))


def test_mirostat_replays_under_set_seed():
    def run():
        set_seed(11)
        mirostat = Mirostat(2, tau=3.0, eta=0.1, vocab_size=6, prompt_length=1)
        ids = torch.zeros((1, 1), dtype=torch.long)
        for _ in range(20):
            token = mirostat(ids, scores()).argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
        return ids.tolist()

    assert run() == run()


# --- the chain ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(starter_hf):
    return AutoTokenizer.from_pretrained(starter_hf)


def chain(params: GenerationParams, tokenizer, vocab_size: int | None = None, prompt_length: int = 4):
    return build_logits_processors(params, tokenizer=tokenizer, vocab_size=vocab_size or len(tokenizer),
                                   eos_token_ids=[tokenizer.eos_token_id], prompt_length=prompt_length)


def kinds(processors) -> list[type]:
    return [type(p) for p in processors]


def test_defaults_build_an_empty_chain(tokenizer):
    assert len(chain(GenerationParams(), tokenizer)) == 0


def test_greedy_keeps_only_the_penalties(tokenizer):
    knobs = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, tfs=0.9, top_a=0.2, xtc_probability=0.5,
                 mirostat_mode=2, repetition_penalty=1.2, presence_penalty=0.3, dry_multiplier=0.8,
                 no_repeat_ngram_size=3)
    built = chain(GenerationParams(do_sample=False, **knobs), tokenizer)
    assert kinds(built) == [RangedRepetitionPenalty, AdditivePenalty, DRYPenalty, NoRepeatNGramLogitsProcessor]
    assert kinds(chain(GenerationParams(do_sample=True, **knobs), tokenizer))[-1] is Mirostat


def test_chain_follows_sampler_priority(tokenizer):
    params = GenerationParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                              sampler_priority=["min_p", "temperature", "repetition_penalty", "top_k"])
    assert kinds(chain(params, tokenizer)) == [MinPLogitsWarper, TemperatureLogitsWarper, RangedRepetitionPenalty,
                                               TopK, TopPLogitsWarper]
    params.temperature_last = True
    assert kinds(chain(params, tokenizer)) == [MinPLogitsWarper, RangedRepetitionPenalty, TopK,
                                               TopPLogitsWarper, TemperatureLogitsWarper]


def test_temperature_last_moves_the_temperature_family_after_truncation():
    params = GenerationParams(temperature_last=True)
    order = sampler_order(params)
    assert order[-3:] == ["temperature", "dynamic_temperature", "quadratic_sampling"]
    assert "mirostat" not in order and len(order) == len(SAMPLER_NAMES) - 1


def test_chain_changes_the_distribution_as_its_parts_do(tokenizer):
    """Temperature after top-k under temperature_last: the cut is taken on the raw logits."""
    vocab = len(tokenizer)
    logits = torch.zeros((1, vocab))
    logits[0, :6] = torch.tensor(LOGITS)
    logits[0, 6:] = -10.0
    built = chain(GenerationParams(top_k=3, temperature=2.0, temperature_last=True), tokenizer)
    out = built(torch.tensor([[7, 8, 9, 10]]), logits)
    assert survivors(out) == {0, 1, 2}
    assert out[0, :3].tolist() == pytest.approx([1.5, 1.0, 0.5])


def test_bias_bans_and_banned_strings(tokenizer):
    eos = tokenizer.eos_token_id
    params = GenerationParams(logit_bias={5: 2.5, 7: 1.0}, custom_token_bans=[7], ban_eos_token=True,
                              banned_strings=["hello world"])
    (bias,) = chain(params, tokenizer)
    assert isinstance(bias, SequenceBiasLogitsProcessor)
    hello, world = tokenizer.encode("hello world", add_special_tokens=False)
    vocab = len(tokenizer)
    out = bias(torch.tensor([[3, hello]]), torch.zeros((1, vocab)))
    assert out[0, 5].item() == 2.5
    assert out[0, 7].item() == -INF and out[0, eos].item() == -INF  # a ban beats a bias
    assert out[0, world].item() == -INF  # "world" may not follow "hello"
    assert bias(torch.tensor([[3, 4]]), torch.zeros((1, vocab)))[0, world].item() == 0.0  # elsewhere it may
    with pytest.raises(ConfigError, match="custom_token_bans.*999999"):
        chain(GenerationParams(custom_token_bans=[999999]), tokenizer)
    with pytest.raises(ConfigError, match="logit_bias"):
        chain(GenerationParams(logit_bias={-1: 1.0}), tokenizer)


def test_dry_breakers_and_xtc_protection_come_from_the_tokenizer(tokenizer):
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    (dry,) = chain(GenerationParams(dry_multiplier=1.0, dry_sequence_breakers=["\n"]), tokenizer)
    assert dry.breakers.tolist() == [newline]
    (xtc,) = chain(GenerationParams(xtc_probability=0.5), tokenizer)
    assert set(xtc.protected.tolist()) == {newline, tokenizer.eos_token_id}


def test_incompatible_combinations_are_refused(tokenizer):
    for params in (GenerationParams(mirostat_mode=2, num_beams=2),
                   GenerationParams(json_schema={"type": "object"}, prompt_lookup_num_tokens=3),
                   GenerationParams(grammar_string='root ::= "a"', ban_eos_token=True)):
        with pytest.raises(ConfigError):
            chain(params, tokenizer)


def test_supported_params_name_real_fields():
    assert TRANSFORMERS_SUPPORTED_PARAMS <= set(GenerationParams.model_fields)
    assert set(GenerationParams.model_fields) - TRANSFORMERS_SUPPORTED_PARAMS == {"penalty_alpha"}


# --- generate() kwargs, against a real model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    # A model may ship sampling defaults; ours must override every one of them.
    model.generation_config.top_k = 1
    model.generation_config.temperature = 0.01
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    return model


def _generate(model, tokenizer, params: GenerationParams, prompt: str = "Once upon a time") -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    processors = chain(params, tokenizer, vocab_size=model.config.vocab_size, prompt_length=ids.shape[1])
    kwargs = generate_kwargs(params, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    if params.seed >= 0:
        set_seed(params.seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=processors,
                             max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # generates through transformers' generate with every knob
def test_generate_kwargs_leave_our_chain_the_whole_sampler(tiny_model, tokenizer):
    greedy = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=12))
    # Greedy with the model's repetition_penalty=5 and no_repeat_ngram_size=1 neutralised:
    logits_path = _plain_greedy(tiny_model, tokenizer, 12)
    assert greedy == logits_path
    # Sampling with the model's top_k=1 neutralised: a random model's flat distribution rarely repeats greedy.
    sampled = [_generate(tiny_model, tokenizer, GenerationParams(seed=s, max_new_tokens=12)) for s in (1, 2)]
    assert sampled[0] != greedy and sampled[1] != greedy and sampled[0] != sampled[1]
    assert _generate(tiny_model, tokenizer, GenerationParams(seed=1, max_new_tokens=12)) == sampled[0]


def _plain_greedy(model, tokenizer, steps: int) -> list[int]:
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            token = model(ids).logits[0, -1].argmax().item()
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_sampler_chain_replays_under_a_seed(tiny_model, tokenizer):
    params = GenerationParams(seed=5, temperature=1.3, top_k=50, top_p=0.95, min_p=0.01, xtc_probability=0.5,
                              xtc_threshold=0.001, dry_multiplier=0.8, presence_penalty=0.5, max_new_tokens=10)
    first = _generate(tiny_model, tokenizer, params)
    assert _generate(tiny_model, tokenizer, params) == first
    mirostat = GenerationParams(seed=5, mirostat_mode=2, mirostat_tau=8.0, max_new_tokens=10)
    drawn = _generate(tiny_model, tokenizer, mirostat)
    assert _generate(tiny_model, tokenizer, mirostat) == drawn
    assert drawn != _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=10))
    assert drawn != _generate(tiny_model, tokenizer, mirostat.model_copy(update={"seed": 6}))


def test_no_repeat_ngram_and_bans_hold_in_generation(tiny_model, tokenizer):
    out = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, no_repeat_ngram_size=1,
                                                            max_new_tokens=20))
    prompt = tokenizer("Once upon a time").input_ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    greedy = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=5))
    banned = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=5,
                                                               custom_token_bans=[greedy[0]]))
    assert banned[0] != greedy[0] and greedy[0] not in banned


def test_generate_kwargs_shape_the_decoding_mode(tokenizer):
    eos = [tokenizer.eos_token_id]
    greedy = generate_kwargs(GenerationParams(do_sample=False), tokenizer=tokenizer, eos_token_ids=eos)
    assert greedy["do_sample"] is False and "top_k" not in greedy  # nothing that would only warn
    sampled = generate_kwargs(GenerationParams(top_k=5), tokenizer=tokenizer, eos_token_ids=eos)
    assert sampled["do_sample"] is True and sampled["top_k"] == 0 and sampled["temperature"] == 1.0
    mirostat = generate_kwargs(GenerationParams(mirostat_mode=2), tokenizer=tokenizer, eos_token_ids=eos)
    assert mirostat["do_sample"] is False  # mirostat has drawn the token; generate() takes the only one left
    beams = generate_kwargs(GenerationParams(num_beams=3, length_penalty=0.5, early_stopping=True),
                            tokenizer=tokenizer, eos_token_ids=eos)
    assert (beams["num_beams"], beams["length_penalty"], beams["early_stopping"]) == (3, 0.5, True)
    cfg = generate_kwargs(GenerationParams(guidance_scale=1.5, negative_prompt="rude words"),
                          tokenizer=tokenizer, eos_token_ids=eos)
    assert cfg["guidance_scale"] == 1.5
    assert cfg["negative_prompt_ids"][0].tolist() == tokenizer("rude words").input_ids
    assert "prompt_lookup_num_tokens" not in sampled
    assert generate_kwargs(GenerationParams(prompt_lookup_num_tokens=4), tokenizer=tokenizer,
                           eos_token_ids=eos)["prompt_lookup_num_tokens"] == 4


def test_guidance_and_beams_run_through_generate(tiny_model, tokenizer):
    plain = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=6))
    guided = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=6, guidance_scale=3.0,
                                                               negative_prompt="The end."))
    assert len(guided) == 6 and guided != plain
    beams = _generate(tiny_model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=6, num_beams=3,
                                                              repetition_penalty=1.3))
    assert len(beams) == 6


def test_chain_reproduces_transformers_own_samplers_for_shared_knobs(tiny_model, tokenizer):
    """Same knobs, same seed: our chain (default priority) draws what generate()'s built-in samplers draw."""
    params = GenerationParams(seed=3, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1,
                              repetition_penalty_range=0, max_new_tokens=16)
    ours = _generate(tiny_model, tokenizer, params)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    set_seed(3)
    with torch.inference_mode():
        theirs = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=True,
                                     temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1,
                                     no_repeat_ngram_size=0, pad_token_id=tokenizer.eos_token_id)
    assert ours == theirs[0, ids.shape[1]:].tolist()
