"""Training tokens/s of our LoRA job next to plain PEFT + Transformers Trainer, same model, data, LoRA settings,
seed and steps, in the same run; with the final loss of each.

    python bench/training.py [--steps 20] [--batch 8] [--repeats 3] [--records 400] [--model SmolLM2-135M-Instruct]
                             [--ours shared_prefix=false ...]

Ours is the real job (`python -m modules.training.run`, started through JobManager): padding-free micro-batches
(one row, positions restarting per example, so no padding and no cross-example attention) and logits computed
only where a token is trained. Its tokens/s comes from its own progress lines. The baseline is what a PEFT
tutorial writes: the same tokenized, prompt-masked examples, DataCollatorForSeq2Seq padding each batch to its
longest example, the model's own loss over full logits. Both count real (non-padding) tokens and skip the first
step (warm-up) when timing; both see the same batches in the same order (same sampler seed, same LoRA init), so
their loss curves should agree. With --repeats N the two run N times each, alternating which goes first, and the
figures are medians (the ratio is the median of the N paired ratios), because these machines are noisy: a single
pair of runs can be off by 10%. The last line is one JSON object:
{"ours": {"tok_s", "final_loss"}, "baseline": {"tok_s", "final_loss"}, "ratio", "ratios": [one per repeat], ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.cli import ArgumentParser  # noqa: E402
from needs import need_packages  # noqa: E402

need_packages("yaml", "torch", "transformers", "peft", requirements="requirements.txt")

import yaml  # noqa: E402

from modules.starter import STARTER_HF_DIR  # noqa: E402
from modules.training.config import Folders, TrainingConfig  # noqa: E402
from modules.training.jobs import JobManager  # noqa: E402

DATA = ROOT / "data" / "instruction-data.json"


def job_config(args: argparse.Namespace, name: str, **train: object) -> TrainingConfig:
    return TrainingConfig(
        name=name, base_model=args.model,
        dataset={"train_file": "train.json", "cutoff_len": args.cutoff},
        lora={"rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": [args.targets]},
        train={"max_steps": args.steps, "micro_batch_size": args.batch, "learning_rate": 1e-3, "save_steps": 10_000,
               "seed": args.seed, "logging_steps": 1, **args.ours_options, **train})


def run_ours(args: argparse.Namespace, work: Path, name: str, **train: object) -> dict:
    jobs = JobManager(Folders(models=ROOT / "models", loras=work / "loras", datasets=work / "datasets",
                              runs=work / "runs"))
    jobs.start(job_config(args, name, **train))
    status = jobs.wait(name, timeout=7200)
    if status.state != "finished":
        raise SystemExit(f"our job ended {status.state}: {status.message}\n{jobs.log_tail(name)}")
    steps = [r for r in jobs.progress(name)[0] if r["type"] == "train"]
    first, last = steps[0], steps[-1]
    return {"tok_s": round((last["tokens"] - first["tokens"]) / (last["time"] - first["time"]), 1),
            "final_loss": round(last["loss"], 4), "losses": [round(r["loss"], 4) for r in steps]}


def run_baseline(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    from modules.training.config import DatasetOptions
    from modules.training.datasets import prepare_dataset

    model_dir = ROOT / "models" / args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_dataset(DatasetOptions(train_file="train.json", cutoff_len=args.cutoff), work / "datasets",
                           tokenizer, seed=args.seed)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in data.train]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    set_seed(args.seed)
    targets = "all-linear" if args.targets == "all-linear" else [f"{t}_proj" for t in args.targets.split(",")]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    marks: list[tuple[int, float, int, float]] = []
    counted = {"tokens": 0}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            marks.append((state.global_step, time.perf_counter(), counted["tokens"], 0.0))

        def on_log(self, a, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    losses: list[float] = []
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features: list[dict]) -> dict:
        counted["tokens"] += sum(len(f["input_ids"]) for f in features)  # real tokens, as ours counts them
        return collator(features)

    trainer = Trainer(model=model, train_dataset=rows, data_collator=collate, callbacks=[Clock()], args=TrainingArguments(
        output_dir=str(work / "baseline"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
        seed=args.seed, data_seed=args.seed, use_cpu=True, disable_tqdm=True, remove_unused_columns=False))
    trainer.train()
    (_, t0, n0, _), (_, t1, n1, _) = marks[0], marks[-1]
    return {"tok_s": round((n1 - n0) / (t1 - t0), 1), "final_loss": round(losses[-1], 4),
            "losses": [round(x, 4) for x in losses]}


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=STARTER_HF_DIR, help="A Transformers folder in models/.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="Examples per step (micro-batch, no accumulation).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each, alternating; medians are reported.")
    parser.add_argument("--records", type=int, default=400, help="Instruction records to draw batches from.")
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="all-linear, or q,k,v,o,... short names.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--packing", action="store_true", help="Also run ours with packing (reported apart).")
    parser.add_argument("--ours", action="append", default=[], metavar="OPTION=VALUE",
                        help="A train option for our job, e.g. shared_prefix=false (to measure one piece).")
    args = parser.parse_args()
    args.ours_options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.ours)}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        (work / "datasets").mkdir()
        (work / "datasets" / "train.json").write_text(json.dumps(json.loads(DATA.read_text())[:args.records]))
        pairs: list[tuple[dict, dict]] = []
        for repeat in range(args.repeats):
            runs = {}
            for side in (("baseline", "ours") if repeat % 2 == 0 else ("ours", "baseline")):
                runs[side] = run_baseline(args, work) if side == "baseline" else run_ours(args, work, f"bench-{repeat}")
                print(f"repeat {repeat + 1}/{args.repeats}: {side}: {runs[side]['tok_s']} tok/s, final loss "
                      f"{runs[side]['final_loss']}", flush=True)
            pairs.append((runs["ours"], runs["baseline"]))
            print(f"repeat {repeat + 1}/{args.repeats}: ratio {runs['ours']['tok_s'] / runs['baseline']['tok_s']:.3f}",
                  flush=True)
        ours, baseline = pairs[0]
        gap = max(abs(a - b) for a, b in zip(ours["losses"], baseline["losses"]))
        print(f"largest per-step loss difference between the two curves: {gap:.4f}", flush=True)
        ratios = [o["tok_s"] / b["tok_s"] for o, b in pairs]
        result = {"ours": {"tok_s": statistics.median(o["tok_s"] for o, _ in pairs), "final_loss": ours["final_loss"]},
                  "baseline": {"tok_s": statistics.median(b["tok_s"] for _, b in pairs),
                               "final_loss": baseline["final_loss"]},
                  "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                  "mean_loss_last5": {"ours": round(statistics.mean(ours["losses"][-5:]), 4),
                                      "baseline": round(statistics.mean(baseline["losses"][-5:]), 4)},
                  "steps": args.steps, "batch": args.batch}
        if args.packing:
            packed = run_ours(args, work, "bench-packed", packing=True)
            result["ours_packed"] = {k: packed[k] for k in ("tok_s", "final_loss")}
            print(f"ours with packing: {packed['tok_s']} tok/s", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
