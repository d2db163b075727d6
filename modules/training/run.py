"""The training job: `python -m modules.training.run CONFIG.yaml [--resume]`, or the same under
`accelerate launch --num_processes N [--cpu] -m modules.training.run CONFIG.yaml`.

It trains with Transformers' Trainer and a PEFT LoRA, writes progress lines and status into the run folder
(the folder holding CONFIG.yaml), checkpoints (marked complete only once fully written), stops and saves the
adapter when the STOP file appears or on SIGTERM/SIGINT, and resumes from the newest complete checkpoint.
Exit status: 0 finished or stopped, 2 a problem with the configuration or data (the message is in status.json),
1 anything else (traceback in job.log).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

from modules.cuda_attention import avoid_cudnn_attention
from modules.cli import ArgumentParser, report
from modules.errors import ConfigError, WorkbenchError
from modules.paths import atomic_write_text
from modules.training.allocator import keep_freed_memory
from modules.training.config import CONFIG_FILE_NAME, TrainingConfig, load_config
from modules.training.progress import (CHECKPOINTS, append_progress, latest_checkpoint, read_progress,
                                       read_status, truncate_progress_after, write_status)

log = logging.getLogger("modules.training.run")
RUN_RECORD = "training_run.json"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_environment(config: TrainingConfig) -> None:
    """Refuse what cannot work here before loading anything."""
    import importlib.util

    import torch

    train = config.train
    cuda = torch.cuda.is_available() and not config.launch.cpu
    if train.qlora:
        if not cuda:
            raise ConfigError("QLoRA loads the base in 4 bits through bitsandbytes, which needs a CUDA GPU; none is "
                              "available here. Turn QLoRA off to train in full precision.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("QLoRA needs bitsandbytes: pip install bitsandbytes")
    for backend in train.report_to:
        if importlib.util.find_spec(backend) is None:
            raise ConfigError(f"Logging to {backend} was asked for, but {backend} is not installed: "
                              f"pip install {backend}")
    if train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16; train in fp32.")
    if config.launch.distributed == "fsdp" and train.qlora:
        raise ConfigError("FSDP with QLoRA is not supported here; use DDP.")


class TrainingJob:
    def __init__(self, config: TrainingConfig, run_dir: Path, *, resume: bool):
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.is_main = _rank() == 0

    # --- helpers ------------------------------------------------------------------------------------------------
    def status(self, **fields: Any) -> None:
        if self.is_main:
            write_status(self.run_dir, **fields)

    def event(self, event: str, **fields: Any) -> None:
        if self.is_main:
            append_progress(self.run_dir, {"type": "event", "event": event, **fields})

    def run_id(self) -> str:
        return str(read_status(self.run_dir).get("run_id") or "")

    def check_lora_target(self) -> None:
        """Refuse to replace a LoRA this run did not write, unless overwrite was asked."""
        target = self.config.lora_path
        if not target.exists() or self.config.overwrite:
            return
        try:
            owner = json.loads((target / RUN_RECORD).read_text()).get("run_id")
        except (OSError, json.JSONDecodeError):
            owner = None
        if not (self.resume and owner and owner == self.run_id()):
            raise ConfigError(f"A LoRA named {self.config.name!r} already exists in {target.parent}; choose another "
                              "name or allow overwriting.")

    # --- the job ------------------------------------------------------------------------------------------------
    def run(self, stop: Any) -> str:
        import torch
        from transformers import AutoTokenizer, EarlyStoppingCallback

        from modules.training.base import training_base
        from modules.training.datasets import prepare_dataset
        from modules.training.trainer import (ExampleDataset, LoraTrainer, PaddedCollator, PaddingFreeCollator,
                                              ProgressCallback, accepts_logits_to_keep, pack_examples,
                                              single_items)

        config, train = self.config, self.config.train
        check_environment(config)
        if "tensorboard" in train.report_to:
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(self.run_dir / "tensorboard"))
        self.check_lora_target()
        self.status(state="preparing", message="Preparing the base model and the data")
        if _world_size() > 1:
            from accelerate import PartialState

            with PartialState(cpu=use_cpu(config)).main_process_first():  # one rank converts a GGUF base
                base = training_base(config.base_path())
        else:
            base = training_base(config.base_path())
        tokenizer = AutoTokenizer.from_pretrained(base.hf_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        data = prepare_dataset(config.dataset, config.folders.datasets, tokenizer, seed=train.seed)
        if train.early_stopping_patience and (not data.eval or not train.eval_steps):
            raise ConfigError("Early stopping needs an evaluation split (an eval file or fraction) and eval_steps.")
        for warning in data.warnings:
            self.event("warning", message=warning)
        self.status(dataset=data.stats())
        if stop.requested():
            return "stopped"

        model = self.load_model(base.hf_dir, torch)
        if train.packing:
            train_items = pack_examples(data.train, config.dataset.cutoff_len)
            eval_items = pack_examples(data.eval, config.dataset.cutoff_len)
        else:
            train_items, eval_items = single_items(data.train), single_items(data.eval)
        if train.padding_free:
            collator = PaddingFreeCollator(share_prefix=train.shared_prefix and packed_attention(model))
        else:
            collator = PaddedCollator(tokenizer.pad_token_id)
        args = self.training_arguments(has_eval=bool(eval_items))
        callback = ProgressCallback(self.run_dir, stop)
        callbacks: list[Any] = [callback]
        if train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(train.early_stopping_patience, train.early_stopping_threshold))
        trainer = LoraTrainer(model=model, args=args, train_dataset=ExampleDataset(train_items),
                              eval_dataset=ExampleDataset(eval_items) if eval_items else None,
                              data_collator=collator, callbacks=callbacks,
                              select_logits=train.padding_free and accepts_logits_to_keep(model),
                              select_last_rows=not train.gradient_checkpointing)
        checkpoint = self.resume_point()
        self.event("resumed" if checkpoint else "started", step=int(checkpoint.name.split("-")[-1])
                   if checkpoint else 0, examples=len(data.train), eval_examples=len(data.eval),
                   processes=trainer.args.world_size, device=str(trainer.args.device))
        final_state = finished_state(checkpoint) if checkpoint is not None else None
        if final_state is not None:  # killed after its last step: nothing left to train
            trainer.state = final_state
            restore_adapter(trainer.model, checkpoint)
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if eval_items and not callback.stopped and not train.eval_steps and not self.evaluated_at(
                trainer.state.global_step):
            trainer.evaluate()  # logged as an eval line by the callback
        outcome = "stopped" if callback.stopped else "finished"
        if self.is_main:
            self.save_adapter(trainer, base, outcome)
        return outcome

    def load_model(self, hf_dir: Path, torch: Any) -> Any:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, set_seed

        train = self.config.train
        set_seed(train.seed)  # the LoRA's initial A matrices: the same seed gives the same run
        dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype}
        kwargs.update(self.quantized_base(hf_dir, torch))
        if train.qlora:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if train.precision == "bf16" else torch.float16)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        if train.padding_free:
            from modules.training.attention import PACKED_SDPA

            kwargs["attn_implementation"] = PACKED_SDPA  # per-example causal attention inside packed rows
        try:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs)
        except ValueError as exc:
            if kwargs.pop("attn_implementation", None) is None:
                raise
            log.warning("per-example attention unavailable for this model (%s); using SDPA with a packed mask", exc)
            model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs)
        model.config.use_cache = False  # a KV cache would hide packed sequences from the mask builder
        if train.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        lora = self.config.lora
        try:
            model = get_peft_model(model, LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.peft_target_modules(), bias="none", task_type="CAUSAL_LM"))
        except ValueError as exc:
            raise ConfigError(f"The LoRA target modules {lora.target_modules} do not fit this model: {exc}") from None
        fsdp = self.config.launch.num_processes > 1 and self.config.launch.distributed == "fsdp"
        if train.fused_lora and not fsdp:  # FSDP swaps parameters under the layers; leave those to PEFT
            from modules.training.fused_lora import fuse_lora_linears

            log.info("fused %d LoRA linear layers", fuse_lora_linears(model))
        return model

    def quantized_base(self, hf_dir: Path, torch: Any) -> dict[str, Any]:
        """from_pretrained keywords for a GPTQ/AWQ base (loaders.transformers_quant with a trainable kernel):
        its layers stay quantized and frozen, in bf16 (fp16 on CUDA when training in fp32), while the LoRA trains
        in the job's precision; none for any other base."""
        from loaders.transformers_quant import quantization_kwargs, quantized_checkpoint

        quantized = quantized_checkpoint(hf_dir)
        if quantized is None:
            return {}
        if self.config.train.qlora:
            raise ConfigError(f"{hf_dir.name} is already quantized ({quantized.label}); turn QLoRA off to train a "
                              "LoRA on it as it is.")
        device = "cpu" if use_cpu(self.config) else "cuda"
        kwargs = quantization_kwargs(hf_dir, quantized, device=device, trainable=True)
        kwargs["dtype"] = torch.bfloat16 if device == "cpu" or self.config.train.precision == "bf16" \
            else torch.float16
        if device == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        return kwargs

    def training_arguments(self, *, has_eval: bool) -> Any:
        from transformers import TrainingArguments

        config, train = self.config, self.config.train
        eval_steps = train.eval_steps if has_eval and train.eval_steps else None
        save_steps = eval_steps if train.early_stopping_patience else train.save_steps
        kwargs: dict[str, Any] = {}
        if config.launch.num_processes > 1 and config.launch.distributed == "fsdp":
            kwargs["fsdp"] = "full_shard auto_wrap"
            kwargs["fsdp_config"] = {"use_orig_params": True}
        return TrainingArguments(
            output_dir=str(self.run_dir / CHECKPOINTS),
            per_device_train_batch_size=train.micro_batch_size, per_device_eval_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation, learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler, warmup_steps=train.warmup_steps,
            num_train_epochs=train.epochs, max_steps=train.max_steps or -1, weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm or 0.0, logging_steps=train.logging_steps,
            eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
            eval_on_start=has_eval and not self.resume, save_strategy="steps", save_steps=save_steps,
            save_total_limit=train.save_total_limit, load_best_model_at_end=bool(train.early_stopping_patience),
            metric_for_best_model="eval_loss" if train.early_stopping_patience else None, greater_is_better=False,
            seed=train.seed, data_seed=train.seed, bf16=train.precision == "bf16",
            activation_checkpointing=train.gradient_checkpointing, report_to=list(train.report_to) or "none",
            use_cpu=use_cpu(config), remove_unused_columns=False,
            prediction_loss_only=True, include_num_input_tokens_seen="all" if train.padding_free else "non_padding",
            disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
            save_only_model=False, **kwargs)

    def resume_point(self) -> Path | None:
        if not self.resume:
            return None
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return None
        if self.is_main:
            for folder in (self.run_dir / CHECKPOINTS).glob("checkpoint-*"):
                if folder != checkpoint and not (folder / "COMPLETE").is_file():
                    shutil.rmtree(folder, ignore_errors=True)  # cut short by a kill: never resume from it
            truncate_progress_after(self.run_dir, int(checkpoint.name.split("-")[-1]))
        if _distributed():
            _barrier()
        return checkpoint

    def evaluated_at(self, step: int) -> bool:
        records, _ = read_progress(self.run_dir)
        return any(r.get("type") == "eval" and r.get("step") == step for r in records)

    def save_adapter(self, trainer: Any, base: Any, outcome: str) -> None:
        """Write the adapter to loras/<name>/ through a temporary folder, so a crash never leaves half of one."""
        config = self.config
        target = config.lora_path
        tmp = target.with_name(f".{target.name}.saving")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / CONFIG_FILE_NAME, config.to_yaml())
        record = {"run_id": self.run_id(), "outcome": outcome, "step": trainer.state.global_step,
                  "base_transformers_dir": str(base.hf_dir), "base_gguf": str(base.gguf) if base.gguf else None}
        atomic_write_text(tmp / RUN_RECORD, json.dumps(record, indent=1))
        wants_gguf = config.gguf_lora == "yes" or (config.gguf_lora == "auto" and base.gguf is not None)
        if wants_gguf:
            from modules.training.export import export_lora_gguf

            try:
                export_lora_gguf(tmp, base.hf_dir)
                (tmp / f"{tmp.name}.gguf").rename(tmp / f"{target.name}.gguf")
            except WorkbenchError as exc:
                self.event("warning", message=f"The GGUF LoRA export failed: {exc}")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        self.status(lora=str(target))


def finished_state(checkpoint: Path) -> Any:
    """The checkpoint's TrainerState when it holds the run's last step, else None. Trainer would train one more
    step from such a checkpoint when the step count is not a whole number of epochs (it resumes mid-epoch and
    checks the limit after a step)."""
    from transformers import TrainerState
    from transformers.trainer import TRAINER_STATE_NAME

    try:
        state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    except (OSError, ValueError, TypeError):
        return None
    return state if 0 < state.max_steps <= state.global_step else None


def restore_adapter(model: Any, checkpoint: Path) -> None:
    """The adapter weights that `train(resume_from_checkpoint=...)` would restore, without training a step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))


def packed_attention(model: Any) -> bool:
    """Whether the model runs modules.training.attention, the one attention that reads shared prefixes back
    (Transformers' mask builder would cut each example off from the prefix)."""
    from modules.training.attention import PACKED_SDPA

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) == PACKED_SDPA


def use_cpu(config: TrainingConfig) -> bool:
    import torch

    return config.launch.cpu or not torch.cuda.is_available()


def _distributed() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch

        torch.distributed.barrier()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m modules.training.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="The job's config.yaml (its folder is the run folder).")
    parser.add_argument("--resume", action="store_true", help="Continue from the newest complete checkpoint.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = args.config.resolve().parent
    is_main = _rank() == 0
    try:
        config = load_config(args.config)
    except WorkbenchError as exc:
        if is_main and args.config.is_file():  # a run folder: the Training tab reads why from its status
            write_status(run_dir, state="failed", message=str(exc), pid=None)
        return report(exc)
    from modules.training.trainer import StopRequest

    stop = StopRequest(run_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.event.set())
    if is_main:
        status = {"state": "preparing", "pid": os.getpid(), "message": "", "resumed": args.resume}
        if not args.resume or not read_status(run_dir).get("run_id"):
            status["run_id"] = uuid.uuid4().hex
        write_status(run_dir, **status)
    keep_freed_memory()  # before the model's first allocations (modules.training.allocator)
    avoid_cudnn_attention()  # a new cuDNN plan per row length cost 4x per step on an H100 (modules.cuda_attention)
    job = TrainingJob(config, run_dir, resume=args.resume)
    try:
        outcome = job.run(stop)
    except WorkbenchError as exc:
        job.status(state="failed", message=str(exc))
        job.event("failed", message=str(exc))
        return report(exc)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the status file
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        job.status(state="failed", message=message)
        job.event("failed", message=message)
        return 1
    message = (f"Stopped; the adapter so far is in {config.lora_path}" if outcome == "stopped"
               else f"Finished; the adapter is in {config.lora_path}")
    job.status(state=outcome, message=message, pid=None)
    job.event(outcome, message=message)
    if stop.stop_file.exists() and is_main:
        stop.stop_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
