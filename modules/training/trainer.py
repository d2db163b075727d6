"""The pieces we hand to Transformers' Trainer: collators, a loss that computes logits only where a token is
trained, bin packing, and the callback that writes progress, honours Stop and marks finished checkpoints.

Padding-free batches: a micro-batch is one row of all its examples back to back, with position ids restarting at
each example; modules.training.attention runs causal attention per example from those positions (a model that
cannot take that attention gets Transformers' SDPA, whose mask builder turns restarting positions into a
block-diagonal mask), so examples never attend to each other and no compute goes to padding. The model must not
use a KV cache while training (use_cache=False), or the mask builder skips that detection.
"""
from __future__ import annotations

import inspect
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from modules.training.formatting import IGNORE_INDEX, Example
from modules.training.last_layer import only_kept_rows
from modules.training.progress import COMPLETE_MARK, STOP_FILE, append_progress, write_status


class ExampleDataset(torch.utils.data.Dataset):
    """Examples, or packs of examples (each pack one item), as the Trainer's sampler sees them."""

    def __init__(self, items: list[list[Example]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"examples": self.items[index]}


def single_items(examples: list[Example]) -> list[list[Example]]:
    return [[example] for example in examples]


def pack_examples(examples: list[Example], capacity: int) -> list[list[Example]]:
    """Best-fit-decreasing bin packing of whole examples into bins of `capacity` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[Example]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        best = min((b for b in range(len(bins)) if room[b] >= size), key=lambda b: room[b], default=None)
        if best is None:
            bins.append([examples[index]])
            room.append(capacity - size)
        else:
            bins[best].append(examples[index])
            room[best] -= size
    return bins


class PaddingFreeCollator:
    """One row per micro-batch: input_ids, position_ids, labels, and shift_labels (the target of each position,
    which the Trainer also uses to count the tokens a gradient-accumulation step normalizes by).

    Each example is cut after the last position that predicts a trained token: the tokens after it (at least the
    closing one, whose next token is not the example's) have no target and no later token of the example attends
    to them, so computing them changes nothing. With `share_prefix`, the leading tokens that every example has in
    common and trains on nowhere are written once; each example continues from them (positions going on from the
    prefix's length), which modules.training.attention reads back. Their hidden states are the same in every
    example, so the loss and gradients are those of the examples written out in full (with LoRA dropout, the
    prefix draws one mask for the micro-batch instead of one per example). `example_tokens` counts the
    examples' whole lengths, the tokens/s the progress lines report."""

    def __init__(self, share_prefix: bool = False):
        self.share_prefix = share_prefix

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [example for feature in features for example in feature["examples"]]
        cuts = [max((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX and i > 0),
                    default=len(e.input_ids)) for e in examples]
        shared = shared_prefix(examples, cuts) if self.share_prefix and len(examples) > 1 else 0
        first = examples[0]
        ids: list[int] = first.input_ids[:shared]
        positions: list[int] = list(range(shared))
        labels: list[int] = ([IGNORE_INDEX] + first.labels[1:shared])[:shared]
        shift: list[int] = [IGNORE_INDEX] * shared  # shared_prefix: no target inside the prefix
        for example, cut in zip(examples, cuts):
            ids += example.input_ids[shared:cut]
            positions += range(shared, cut)
            labels += ([] if shared else [IGNORE_INDEX]) + example.labels[max(shared, 1):cut]  # never the first
            shift += (example.labels + [IGNORE_INDEX])[shared + 1:cut + 1]  # the next token's label, if any
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "labels": torch.tensor([labels]), "shift_labels": torch.tensor([shift]),
                "example_tokens": torch.tensor(sum(len(e.input_ids) for e in examples))}


def shared_prefix(examples: list[Example], cuts: list[int]) -> int:
    """How many leading tokens all `examples` have in common with no trained target among them (not even the
    next token's), keeping at least one token of each example (cut at `cuts`) out of it."""
    limit = min(cuts) - 1
    head = examples[0].input_ids
    length = 0
    while length < limit and all(e.input_ids[length] == head[length] for e in examples[1:]):
        length += 1
    for example in examples:  # position t predicts labels[t + 1]
        trained = next((i for i in range(1, length + 1) if example.labels[i] != IGNORE_INDEX), None)
        if trained is not None:
            length = trained - 1
    return length


class PaddedCollator:
    """Classic batches padded to the longest example, for models whose attention ignores position_ids."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [e for f in features for e in f["examples"]]
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad)
        labels = torch.full((len(examples), width), IGNORE_INDEX)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = 1
        shift = torch.cat([labels[:, 1:], torch.full((len(examples), 1), IGNORE_INDEX)], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": shift}


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class LoraTrainer(Trainer):
    """Trainer whose loss asks the model for logits only at positions whose next token is trained: with prompts
    masked, most positions need no (vocabulary-sized) logits at all."""

    def __init__(self, *args: Any, select_logits: bool = True, select_last_rows: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.select_logits = select_logits
        self.select_last_rows = select_logits and select_last_rows  # see modules.training.last_layer

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count the examples' tokens, also those the padding-free collator did not need to feed."""
        if "example_tokens" not in inputs or self.args.include_num_input_tokens_seen == "no":
            super()._track_num_input_tokens(inputs)
            return
        tokens = torch.as_tensor(inputs["example_tokens"], device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        inputs = dict(inputs)
        inputs.pop("labels", None)
        inputs.pop("example_tokens", None)
        shift = inputs.pop("shift_labels")
        if self.select_logits and shift.shape[0] == 1:
            keep = (shift[0] != IGNORE_INDEX).nonzero().squeeze(-1)
            rows = (only_kept_rows(self.accelerator.unwrap_model(model), keep, shift.shape[1])
                    if self.select_last_rows else nullcontext())
            with rows:
                outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits, targets = outputs.logits[0], shift[0, keep]
        else:
            outputs = model(**inputs, use_cache=False)
            selected = shift != IGNORE_INDEX
            logits, targets = outputs.logits[selected], shift[selected]
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is not None:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        else:
            loss = total / max(1, targets.numel())
        return (loss, outputs) if return_outputs else loss


class StopRequest:
    """Set by a signal handler or seen as a STOP file in the run folder."""

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.event = threading.Event()

    def requested(self) -> bool:
        return self.event.is_set() or self.stop_file.exists()


class ProgressCallback(TrainerCallback):
    """Progress lines and status (rank 0), Stop (every rank agrees on the same step), checkpoint marks."""

    def __init__(self, run_dir: Path, stop: StopRequest):
        self.run_dir = run_dir
        self.stop = stop
        self.stopped = False
        self._session_start = 0.0
        self._session_first_step = 0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session_start = self._last_time = time.perf_counter()
        self._session_first_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen
        if state.is_world_process_zero:
            write_status(self.run_dir, state="running", step=state.global_step, max_steps=state.max_steps,
                         message="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wants = self.stop.requested()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if wants else 0.0])
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            wants = bool(flag.item())
        if wants and not self.stopped:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                write_status(self.run_dir, state="stopping", step=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        common = {"step": step, "max_steps": state.max_steps, "epoch": round(float(state.epoch or 0), 4)}
        if "eval_loss" in logs:
            append_progress(self.run_dir, {"type": "eval", **common, "eval_loss": float(logs["eval_loss"])})
            return
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = int(state.num_input_tokens_seen)
        tok_s = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        done = step - self._session_first_step
        eta = (now - self._session_start) / done * (state.max_steps - step) if done > 0 else None
        record = {"type": "train", **common, "loss": float(logs["loss"]),
                  "lr": float(logs.get("learning_rate", 0.0)), "grad_norm": _float(logs.get("grad_norm")),
                  "tokens": tokens, "tok_s": round(tok_s, 1), "eta_s": round(eta, 1) if eta is not None else None}
        append_progress(self.run_dir, record)
        write_status(self.run_dir, step=step, max_steps=state.max_steps, loss=record["loss"], eta_s=record["eta_s"])

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its part
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark = folder / COMPLETE_MARK
                with open(mark, "w") as handle:
                    handle.write(str(state.global_step))
                    handle.flush()
                    os.fsync(handle.fileno())


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
