"""Grammar and JSON-schema constrained output on the Transformers path, end to end with a tiny random Llama.

The model knows nothing, so whatever valid structure comes out is the grammar's doing. Its head is 64 logits
wider than the tokenizer's vocabulary, as padded heads are, to check the mask covers the padding.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed

from modules.errors import ConfigError
from modules.generation_params import GenerationParams
from modules.samplers import build_logits_processors, generate_kwargs
from modules.constraints import CompileWorker, digest
from modules.samplers.grammar import GrammarCompilers, GrammarConstraint, compile_constraint, xgrammar_compile

PADDING = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "member": {"type": "boolean"},
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "colours"],
}


@pytest.fixture(scope="module")
def tokenizer(starter_hf):
    return AutoTokenizer.from_pretrained(starter_hf)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("models") / "tiny-padded-llama"
    config = LlamaConfig(vocab_size=len(tokenizer) + PADDING, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval()


def generate(model, tokenizer, params: GenerationParams, prompt: str = "Answer in JSON:") -> tuple[str, list[int]]:
    eos = [tokenizer.eos_token_id]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    processors = build_logits_processors(params, tokenizer=tokenizer, vocab_size=model.config.vocab_size,
                                         eos_token_ids=eos, prompt_length=ids.shape[1])
    if params.seed >= 0:
        set_seed(params.seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=processors,
                             max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
                             **generate_kwargs(params, tokenizer=tokenizer, eos_token_ids=eos))
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_unconstrained_random_model_does_not_write_json(model, tokenizer):
    text, _ = generate(model, tokenizer, GenerationParams(do_sample=False, max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_schema_makes_greedy_output_valid(model, tokenizer):
    text, tokens = generate(model, tokenizer, GenerationParams(do_sample=False, json_schema=SCHEMA,
                                                               max_new_tokens=200))
    assert tokens[-1] == tokenizer.eos_token_id  # the grammar finished and let the reply end
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.slow  # three long constrained samplings
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_holds_under_hot_sampling(model, tokenizer, seed):
    params = GenerationParams(seed=seed, temperature=1.5, top_k=200, xtc_probability=0.5, xtc_threshold=0.01,
                              repetition_penalty=1.3, json_schema=SCHEMA, max_new_tokens=200)
    text, tokens = generate(model, tokenizer, params)
    assert max(tokens) < len(tokenizer)  # the padded head's extra ids never come out
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_holds_with_mirostat(model, tokenizer):
    params = GenerationParams(seed=4, mirostat_mode=2, mirostat_tau=6.0, json_schema=SCHEMA, max_new_tokens=200)
    text, _ = generate(model, tokenizer, params)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_gbnf_grammar_shapes_the_output(model, tokenizer):
    grammar = 'root ::= answer " " digit digit? "!"\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    for seed in (1, 2):
        text, _ = generate(model, tokenizer, GenerationParams(seed=seed, grammar_string=grammar, max_new_tokens=20))
        assert re.fullmatch(r"(yes|no) [0-9]{1,2}!", text), text


def test_grammar_masks_the_padded_head(tokenizer):
    compiled = compile_constraint(tokenizer=tokenizer, vocab_size=len(tokenizer) + PADDING,
                                  eos_token_ids=[tokenizer.eos_token_id], grammar='root ::= "yes"')
    scores = torch.zeros((1, len(tokenizer) + PADDING))
    scores[0, len(tokenizer):] = 100.0  # padding the model would love to pick
    out = GrammarConstraint(compiled, prompt_length=1)(torch.tensor([[5]]), scores)
    allowed = torch.nonzero(out[0] > float("-inf")).squeeze(1).tolist()
    assert allowed and max(allowed) < len(tokenizer)
    assert all("yes".startswith(tokenizer.decode([t])) for t in allowed)
    assert scores[0, len(tokenizer)].item() == 100.0  # generate()'s own copy of the logits is left alone


def test_bad_grammar_and_schema_raise_config_errors_with_the_reason(tokenizer):
    def build(**kwargs):
        build_logits_processors(GenerationParams(**kwargs), tokenizer=tokenizer, vocab_size=len(tokenizer),
                                eos_token_ids=[tokenizer.eos_token_id], prompt_length=1)

    with pytest.raises(ConfigError, match=r'grammar_string.*Rule "missing" is not defined') as caught:
        build(grammar_string="root ::= missing")
    assert "/project/" not in str(caught.value)  # the library's source location is trimmed
    with pytest.raises(ConfigError, match="json_schema.*Unsupported type"):
        build(json_schema={"type": "objekt"})


def test_compilers_are_cached_per_tokenizer_and_vocabulary(tokenizer):
    cache = GrammarCompilers()
    eos = [tokenizer.eos_token_id]
    compiler = cache.get(tokenizer, len(tokenizer), eos)
    assert cache.get(tokenizer, len(tokenizer), eos) is compiler
    padded = cache.get(tokenizer, len(tokenizer) + PADDING, eos)
    assert padded is not compiler
    assert padded.compile_grammar('root ::= "a"').tokenizer_info.vocab_size == len(tokenizer) + PADDING


def first_mask(compiled, vocab_size: int) -> list[int]:
    scores = torch.zeros((1, vocab_size))
    out = GrammarConstraint(compiled, prompt_length=1)(torch.tensor([[5]]), scores)
    return torch.nonzero(out[0] > float("-inf")).squeeze(1).tolist()


def test_a_grammar_read_back_from_the_trial_masks_like_one_compiled_here(tokenizer):
    """The compiler process may send its compiled grammar back serialised; the loader keeps what it reads."""
    compilers = GrammarCompilers()
    eos, width = [tokenizer.eos_token_id], len(tokenizer) + PADDING
    text = json.dumps(SCHEMA)
    vocabulary = compilers.vocabulary(tokenizer, width, eos)
    here = xgrammar_compile(vocabulary.compiler, "json_schema", text)
    compilers.trial_compiler(tokenizer, width, eos).adopt("json_schema", text, here.serialize_json())
    kept = vocabulary.find(digest("json_schema", text))
    assert kept is not None and kept is not here
    assert first_mask(kept, width) == first_mask(here, width)


def test_the_trial_compile_runs_with_the_models_vocabulary_in_a_child(tokenizer):
    """What the child compiles for this tokenizer is what the loader then uses: a grammar it refuses is refused
    with xgrammar's message, and one it accepts is kept for the loader (compiled here or read back)."""
    compilers = GrammarCompilers()
    eos, width = [tokenizer.eos_token_id], len(tokenizer)
    trial = compilers.trial_compiler(tokenizer, width, eos)
    worker = CompileWorker()
    try:
        with pytest.raises(ConfigError, match=r'Rule "missing" is not defined'):
            worker.compile(trial, "grammar_string", "root ::= missing")
        grammar = 'root ::= "yes" | "no"'
        trial.adopt("grammar_string", grammar, worker.compile(trial, "grammar_string", grammar))
        kept = compilers.vocabulary(tokenizer, width, eos).find(digest("grammar_string", grammar))
        assert all("yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t]))
                   for t in first_mask(kept, width))
    finally:
        worker.close()
