"""The pieces the training job uses for speed, checked against what they replace on a tiny random Llama: fused
LoRA layers against PEFT's own forward and backward, padding-free rows (per-example attention, examples cut after
their last target) against running each example on its own, the last layer on kept rows against the full layer;
and the malloc settings the job process applies."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from modules.training.attention import PACKED_SDPA
from modules.training.fused_lora import fuse_lora_linears

TEXTS = ["Name three primary colors.", "Translate 'good morning' into French, please, and explain the greeting.",
         "Add 2 and 3."]


def lora_model(folder: Path, *, dropout: float = 0.0, attention: str | None = None) -> torch.nn.Module:
    """The same LoRA every call (seed 0), with B drawn non-zero so that gradients reach A too."""
    kwargs = {"attn_implementation": attention} if attention else {}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model.train()


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, **inputs: torch.Tensor) -> tuple[float, dict]:
    torch.manual_seed(1)  # the same dropout masks for both models
    loss = model(input_ids=ids, labels=ids, **inputs).loss
    loss.backward()
    return loss.item(), lora_grads(model)


def cpu_trainer(model: torch.nn.Module, output_dir: Path, **kwargs: Any) -> Any:
    """The job's LoraTrainer, only to call its compute_loss."""
    from transformers import TrainingArguments

    from modules.training.trainer import LoraTrainer

    return LoraTrainer(model=model, args=TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none",
                                                           disable_tqdm=True), **kwargs)


def token_ids(folder: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.mark.slow  # forward and backward passes, twice each
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_layers_give_peft_s_loss_and_gradients(tiny_llama_dir: Path, dropout: float):
    ids = torch.tensor([sum(token_ids(tiny_llama_dir), [])])
    peft_loss, peft_grads = loss_and_grads(lora_model(tiny_llama_dir, dropout=dropout), ids)
    fused = lora_model(tiny_llama_dir, dropout=dropout)
    assert fuse_lora_linears(fused) == 2 * 7  # every linear layer of both decoder layers
    fused_loss, fused_grads = loss_and_grads(fused, ids)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-5)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 2 * 2 * 7  # A and B of each layer
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_layers_leave_disabled_and_merged_adapters_to_peft(tiny_llama_dir: Path):
    ids = torch.tensor([token_ids(tiny_llama_dir)[0]])
    model = lora_model(tiny_llama_dir).eval()
    fuse_lora_linears(model)
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(without, base)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter does something, so the next check means something
    torch.testing.assert_close(merged, with_lora, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # forward and backward passes, one per example
def test_a_padding_free_row_trains_like_its_examples_one_by_one(tiny_llama_dir: Path):
    """Logits and LoRA gradients of one row of three examples (positions restarting at each) equal those of the
    examples run apart: no example attends to another."""
    examples = token_ids(tiny_llama_dir)
    model = lora_model(tiny_llama_dir, attention=PACKED_SDPA)
    fuse_lora_linears(model)
    apart_logits, total = [], torch.zeros(())
    for ids in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        apart_logits.append(logits.detach())
        total = total + F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
    total.backward()
    apart_grads = lora_grads(model)
    model.zero_grad()

    row = torch.tensor([sum(examples, [])])
    positions = torch.tensor([[i for ids in examples for i in range(len(ids))]])
    logits = model(input_ids=row, position_ids=positions).logits[0]
    torch.testing.assert_close(logits.detach(), torch.cat(apart_logits), rtol=1e-4, atol=1e-4)
    pieces = logits.split([len(ids) for ids in examples])
    sum(F.cross_entropy(p[:-1], torch.tensor(ids[1:]), reduction="sum") for p, ids in zip(pieces, examples)).backward()
    for name, grad in apart_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5, msg=name)


def test_the_padding_free_batch_leaves_out_only_tokens_without_a_later_target(tiny_llama_dir: Path, tmp_path: Path):
    """The collator cuts each example after its last target; the job's loss on that row equals the loss of the
    whole examples run one by one, and the token count is still the examples' whole length."""
    from modules.training.formatting import IGNORE_INDEX, Example
    from modules.training.trainer import PaddingFreeCollator

    tokenized = token_ids(tiny_llama_dir)
    examples = [Example(ids, [IGNORE_INDEX] * 4 + ids[4:], "") for ids in tokenized[:2]]  # a masked prompt
    examples.append(Example(tokenized[2], tokenized[2][:-2] + [IGNORE_INDEX] * 2, ""))  # untrained tail of two
    batch = PaddingFreeCollator()([{"examples": examples}])
    assert int(batch["example_tokens"]) == sum(len(ids) for ids in tokenized)
    assert batch["input_ids"].shape[1] == sum(len(ids) for ids in tokenized) - 1 - 1 - 3
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["shift_labels"].shape

    model = lora_model(tiny_llama_dir, attention=PACKED_SDPA)
    trainer = cpu_trainer(model, tmp_path)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        total, count = 0.0, 0
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_a_shared_prefix_written_once_trains_like_the_examples_written_out(tiny_llama_dir: Path, tmp_path: Path):
    """A system prompt that every example starts with goes into the row once; each example continues from it. The
    job's loss and every LoRA gradient equal those of the row with each example written out in full; a prefix
    that holds a trained token is not shared."""
    from modules.training.formatting import IGNORE_INDEX, Example
    from modules.training.trainer import PaddingFreeCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prefix = tokenizer("You are a helpful assistant. Answer briefly.")["input_ids"]
    examples = [Example(prefix + ids, [IGNORE_INDEX] * (len(prefix) + 3) + ids[3:], "")
                for ids in token_ids(tiny_llama_dir)]
    full = PaddingFreeCollator()([{"examples": examples}])
    shared = PaddingFreeCollator(share_prefix=True)([{"examples": examples}])
    assert shared["input_ids"].shape[1] == full["input_ids"].shape[1] - 2 * len(prefix)
    assert int(shared["example_tokens"]) == int(full["example_tokens"])
    positions = shared["position_ids"][0].tolist()
    assert positions[:len(prefix) + 1] == list(range(len(prefix) + 1))
    assert positions.count(len(prefix)) == len(examples)  # every example continues at the prefix's length
    assert (shared["shift_labels"] != IGNORE_INDEX).sum() == (full["shift_labels"] != IGNORE_INDEX).sum()

    results = []
    for batch in (full, shared):
        model = lora_model(tiny_llama_dir, attention=PACKED_SDPA)
        fuse_lora_linears(model)
        loss = cpu_trainer(model, tmp_path, select_last_rows=True).compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), lora_grads(model)))
    (full_loss, full_grads), (shared_loss, shared_grads) = results
    assert shared_loss == pytest.approx(full_loss, rel=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) == 2 * 2 * 7
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    raw = [Example(e.input_ids, list(e.input_ids), "") for e in examples]  # raw text: every token trained
    assert torch.equal(PaddingFreeCollator(share_prefix=True)([{"examples": raw}])["input_ids"],
                       PaddingFreeCollator()([{"examples": raw}])["input_ids"])


def test_the_last_layer_on_kept_rows_gives_the_same_loss_and_gradients(tiny_llama_dir: Path, tmp_path: Path):
    """With prompts masked, the job runs the last layer's o_proj and MLP only where a logit is kept: the loss and
    every LoRA gradient match the full computation, and the layers get their own forward back afterwards."""
    from modules.training.formatting import IGNORE_INDEX, Example
    from modules.training.last_layer import position_wise_tail
    from modules.training.trainer import PaddingFreeCollator

    examples = [Example(ids, [IGNORE_INDEX] * 6 + ids[6:], "") for ids in token_ids(tiny_llama_dir)]
    batch = PaddingFreeCollator()([{"examples": examples}])
    results = []
    for select_rows in (False, True):
        model = lora_model(tiny_llama_dir, attention=PACKED_SDPA)
        fuse_lora_linears(model)
        o_proj, mlp = position_wise_tail(model)
        forwards = (o_proj.forward, mlp.forward)
        trainer = cpu_trainer(model, tmp_path, select_last_rows=select_rows)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert (o_proj.forward, mlp.forward) == forwards
        results.append((loss.item(), lora_grads(model)))
    (full_loss, full_grads), (rows_loss, rows_grads) = results
    assert rows_loss == pytest.approx(full_loss, rel=1e-5)
    assert rows_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_glibc_takes_the_training_malloc_settings():
    """In a fresh interpreter, as the job process applies them: glibc must accept each setting."""
    import subprocess
    import sys

    code = "from modules.training.allocator import keep_freed_memory; print(keep_freed_memory())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "True", result.stderr
