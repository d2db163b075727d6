"""Architectures other than the starter's Llama through GGUF conversion and quantization: a tiny random Qwen2 and
a tiny random Gemma 3, made on the fly, become Q8_0 and Q4_K_M GGUFs (modules.quantize.gguf.make_gguf, llama.cpp's
converter and quantizer), and llama.cpp loads each, generates, and picks the next token as the Transformers model
does.

The models have a SentencePiece tokenizer trained here on data/the-verdict.txt (512 pieces): the converter reads a
tokenizer.model without checking it against the pre-tokenizers it knows, which a byte-level BPE tokenizer must pass
(Transformers 5 gives a qwen2 folder its Qwen2Tokenizer, whose pre-tokenizer over the starter's vocabulary is one
llama.cpp does not know). Widths are multiples of 256, so the K-quants apply to every row.

How close is close: at 64 places of the text the Transformers model scores llama.cpp's greedy pick against its own
(the logit it gives its own pick minus the one it gives llama.cpp's: 0 when they agree). Measured with
llama-cpp-python 0.3.36, the mean was 0.002 (Qwen2) and 0.0002 (Gemma 3) for Q8_0, 0.06 and 0.05 for Q4_K_M, and
2.3 and 5.1 for the picks of another random model of the same shape (seed 1), the control each test computes too.
"""
from __future__ import annotations

import io
from typing import Any

import pytest
from conftest import ROOT

from modules.generation_params import GenerationParams
from modules.quantize.gguf import make_gguf

pytestmark = pytest.mark.slow

TYPES = {"Q8_0": 7, "Q4_K_M": 15}  # general.file_type: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M
VOCAB = 512
POSITIONS = range(8, 200, 3)  # where the next-token picks are compared
#: The most the quantized model's picks may cost under the Transformers model, as a share of what another random
#: model's picks cost there (the measured shares were under 1/1000 for Q8_0 and 1/40 for Q4_K_M).
SHARE = {"Q8_0": 0.01, "Q4_K_M": 0.25}


def tokenizer_model(text: str) -> bytes:
    """A 512-piece SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback) trained on `text`."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def tiny_model(arch: str, seed: int) -> Any:
    """A 2-layer random model of `arch`, 256 wide. Gemma 3 gets query_pre_attn_scalar = its head size: llama.cpp's
    converter does not write the scalar and llama.cpp derives the attention scale itself (which matches every
    published Gemma 3), so Transformers' default of 256 over a 64-wide head would make a model llama.cpp computes
    differently. Its embeddings are untied: tied, a Gemma (whose input embeddings are scaled by the square root of
    the width) of random weights predicts its input token everywhere, and every such model would agree."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, initializer_range=0.05)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, tie_word_embeddings=False, initializer_range=0.1,
                                              head_dim=64, query_pre_attn_scalar=64, sliding_window=512)).eval()


def logit_gaps(logits: Any, picks: list[int]) -> list[float]:
    """At each compared place, the logit the model gives its own pick minus the one it gives `picks`."""
    return [float(logits[p - 1].max() - logits[p - 1, token]) for p, token in zip(POSITIONS, picks)]


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One architecture's tiny model, its Q8_0 and Q4_K_M GGUFs, and what llama.cpp did with each (each loaded
    once): its architecture and type, a greedy reply, and the Transformers model's view of llama.cpp's
    next-token picks, beside another random model's picks."""
    import torch
    from gguf import GGUFReader

    from modules.model_manager import ModelManager

    arch = request.param
    text = (ROOT / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    models = tmp_path_factory.mktemp(f"arch-{arch}") / "models"
    folder = models / f"tiny-{arch}"
    model = tiny_model(arch, seed=0)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer_model(text))
    control = tiny_model(arch, seed=1)
    out: dict[str, Any] = {"arch": arch, "folder": folder}
    manager = ModelManager(models, models.parent / "loras")
    for type_name in TYPES:
        gguf = make_gguf(folder, models / f"tiny-{arch}.{type_name}.gguf", type_name)
        reader = GGUFReader(gguf)
        manager.load(gguf.name, "llama.cpp", {"n_ctx": 512, "parallel": 1})
        ids = manager.model.encode(text, add_bos=True)[:max(POSITIONS)]
        picks = []
        for place in POSITIONS:
            generation = manager.generate(ids[:place], GenerationParams(do_sample=False, max_new_tokens=1,
                                                                        ban_eos_token=True))
            tokens = [token.token_id for chunk in generation for token in chunk.tokens]
            picks.append(tokens[0])
        reply = manager.complete("It was", GenerationParams(do_sample=False, max_new_tokens=8, ban_eos_token=True))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            control_picks = control(torch.tensor([ids])).logits[0].argmax(-1)
        out[type_name] = {
            "file": gguf, "architecture": reader.fields["general.architecture"].contents(),
            "file_type": int(reader.fields["general.file_type"].parts[-1][0]), "info": manager.info(),
            "reply": reply, "gaps": logit_gaps(logits, picks),
            "control_gaps": logit_gaps(logits, [int(control_picks[p - 1]) for p in POSITIONS])}
        manager.unload()
    manager.close()
    return out


def test_each_file_is_its_type_of_its_architecture(converted: dict) -> None:
    for type_name, file_type in TYPES.items():
        made = converted[type_name]
        assert made["architecture"] == converted["arch"] and made["file_type"] == file_type
        assert made["info"].loader == "llama.cpp" and made["info"].extra["architecture"] == converted["arch"]
    weights = sum(f.stat().st_size for f in converted["folder"].glob("*.safetensors"))
    assert converted["Q4_K_M"]["file"].stat().st_size < converted["Q8_0"]["file"].stat().st_size < weights


def test_llama_cpp_generates_from_each(converted: dict) -> None:
    for type_name in TYPES:
        reply = converted[type_name]["reply"]
        assert reply.stats.completion_tokens == 8 and reply.stats.finish_reason == "length", (type_name, reply)


def test_llama_cpp_picks_the_next_token_as_transformers_does(converted: dict) -> None:
    control = sum(converted["Q8_0"]["control_gaps"]) / len(POSITIONS)
    assert control > 1.0  # another model's picks cost that much: the measure tells models apart
    for type_name, share in SHARE.items():
        gaps = converted[type_name]["gaps"]
        mean = sum(gaps) / len(gaps)
        print(converted["arch"], type_name, "mean gap", round(mean, 4), "control", round(control, 3))
        assert mean < share * control, (type_name, mean, control)
