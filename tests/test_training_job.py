"""The training job as the Training tab runs it: a child process started by JobManager on a tiny random Llama,
its progress lines, the adapter it saves, Stop, kill -9 then Resume, early stopping, two processes under
`accelerate launch` (DDP over gloo on the CPU), and the refusals that come before any process starts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import save_tiny_llama
from modules.errors import ConfigError, PathError
from modules.training.config import Folders, TrainingConfig, load_config, parse_config
from modules.training.jobs import JobManager, copy_settings_from_lora
from modules.training.progress import latest_checkpoint, write_status

pytestmark = pytest.mark.slow  # training jobs in child processes

JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path, instruction_data: list[dict]) -> Path:
    """models/tiny: 2 layers, random weights drawn wide enough (initializer_range 0.4) that a LoRA visibly lowers
    the loss within a few steps; datasets/ with instruction records."""
    root = tmp_path_factory.mktemp("training")
    save_tiny_llama(root / "models" / "tiny", starter_hf, initializer_range=0.4)
    (root / "datasets").mkdir()
    (root / "datasets" / "train.json").write_text(json.dumps(instruction_data[:120]))
    return root


@pytest.fixture(scope="module")
def jobs(workspace: Path) -> JobManager:
    return JobManager(Folders(models=workspace / "models", loras=workspace / "loras",
                              datasets=workspace / "datasets", runs=workspace / "runs"))


def tiny_config(name: str, **train: object) -> TrainingConfig:
    return TrainingConfig(
        name=name, base_model="tiny", dataset={"train_file": "train.json", "cutoff_len": 128},
        lora={"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
        train={"max_steps": 8, "save_steps": 2, "micro_batch_size": 4, "learning_rate": 5e-2,
               "lr_scheduler": "constant", **train})


def train_records(jobs: JobManager, name: str) -> list[dict]:
    return [r for r in jobs.progress(name)[0] if r["type"] == "train"]


def wait_for_step(jobs: JobManager, name: str, step: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in train_records(jobs, name)):
            return
        status = jobs.status(name)
        assert status.active, f"the job ended early: {status.state} {status.message}\n{jobs.log_tail(name)}"
        time.sleep(0.05)
    raise TimeoutError(f"{name} never reached step {step}")


def test_a_job_trains_reports_progress_and_saves_its_adapter(jobs: JobManager, workspace: Path):
    config = tiny_config("first", eval_steps=4).model_copy(update={"dataset": tiny_config("x").dataset.model_copy(
        update={"eval_fraction": 0.1})})
    jobs.start(config)
    status = jobs.wait("first", JOB_TIMEOUT)
    assert status.state == "finished", jobs.log_tail("first")
    records, _ = jobs.progress("first")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["max_steps"] == 8 and r["tokens"] > 0 and r["tok_s"] > 0 and r["lr"] == 5e-2 for r in train)
    assert train[-1]["eta_s"] == 0 and train[0]["eta_s"] > 0
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # the adapter learns
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 4, 8]
    assert [r["event"] for r in records if r["type"] == "event"] == ["started", "finished"]
    lora = workspace / "loras" / "first"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.yaml"} <= {
        p.name for p in lora.iterdir()}
    assert load_config(lora / "training_config.yaml").train.max_steps == 8
    assert copy_settings_from_lora(lora)["lora"]["target_modules"] == ["all-linear"]
    assert status.details["dataset"]["eval_examples"] == 12
    assert not any(lora.glob("*.gguf"))  # the base is a Transformers folder: no GGUF LoRA unless asked

    with pytest.raises(PathError, match="already exists"):
        jobs.start(tiny_config("first"))  # refused before any process starts
    assert jobs.status("first").state == "finished"


def test_the_adapter_loads_in_the_transformers_loader(jobs: JobManager, workspace: Path):
    import torch

    from modules.model_manager import ModelManager

    if not (workspace / "loras" / "first").exists():
        pytest.fail("needs the adapter of the previous test")
    manager = ModelManager(workspace / "models", workspace / "loras")
    manager.load("tiny", "transformers", {"dtype": "float32"})
    ids = torch.tensor([manager.encode("Give three uses of a brick.")])
    before = manager.model.model(ids).logits
    info = manager.apply_loras(["first"])
    after = manager.model.model(ids).logits
    assert info.loras == ["first"] and not torch.allclose(before, after)
    manager.unload()


def test_kill_9_then_resume_continues_the_same_curve(jobs: JobManager):
    steps = 24  # the kill lands well before the end (the next test covers a kill after the last checkpoint)
    jobs.start(tiny_config("straight", max_steps=steps))
    assert jobs.wait("straight", JOB_TIMEOUT).state == "finished", jobs.log_tail("straight")
    reference = {r["step"]: r for r in train_records(jobs, "straight")}

    jobs.start(tiny_config("killed", max_steps=steps))
    wait_for_step(jobs, "killed", 5)
    jobs.kill("killed")  # SIGKILL: no chance to save anything
    status = jobs.status("killed")
    assert status.state == "interrupted" and status.resumable
    checkpoint = latest_checkpoint(jobs.run_dir("killed"))
    resumed_from = int(checkpoint.name.split("-")[-1])
    assert resumed_from >= 4

    jobs.resume("killed")
    assert jobs.wait("killed", JOB_TIMEOUT).state == "finished", jobs.log_tail("killed")
    records, _ = jobs.progress("killed")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # no gap, no step counted twice
    events = [r for r in records if r["type"] == "event"]
    assert [e["event"] for e in events] == ["started", "resumed", "finished"]
    assert events[1]["step"] == resumed_from
    later = [r for r in train if r["step"] > resumed_from]
    assert later and later[0]["time"] > events[1]["time"]  # these steps really ran after the resume
    for record in later:  # the same weights, optimizer and data order as the run that was never interrupted
        assert record["lr"] == reference[record["step"]]["lr"]
        assert record["loss"] == pytest.approx(reference[record["step"]]["loss"], rel=1e-4)
    assert reference[steps]["loss"] < reference[1]["loss"] - 1.0  # a restart from scratch would not join up


def test_resume_after_a_kill_past_the_last_checkpoint_trains_no_extra_step(jobs: JobManager, workspace: Path):
    """A kill -9 after the last step's checkpoint but before the run said it finished (here: the status such a kill
    leaves behind). Trainer alone would train a ninth step of eight from that checkpoint."""
    jobs.start(tiny_config("late"))
    assert jobs.wait("late", JOB_TIMEOUT).state == "finished", jobs.log_tail("late")
    assert latest_checkpoint(jobs.run_dir("late")).name == "checkpoint-8"
    first = (workspace / "loras" / "late" / "adapter_model.safetensors").read_bytes()
    jobs.kill("late")  # the process may still be exiting
    write_status(jobs.run_dir("late"), state="running")  # what a kill just before "finished" leaves
    status = jobs.status("late")
    assert status.state == "interrupted" and status.resumable

    jobs.resume("late")
    assert jobs.wait("late", JOB_TIMEOUT).state == "finished", jobs.log_tail("late")
    assert [r["step"] for r in train_records(jobs, "late")] == list(range(1, 9))
    saved = json.loads((workspace / "loras" / "late" / "training_run.json").read_text())
    assert saved["outcome"] == "finished" and saved["step"] == 8
    assert (workspace / "loras" / "late" / "adapter_model.safetensors").read_bytes() == first


def test_stop_saves_the_adapter_at_once(jobs: JobManager, workspace: Path):
    jobs.start(tiny_config("stopped", max_steps=500, save_steps=100))
    wait_for_step(jobs, "stopped", 2)
    jobs.stop("stopped")
    status = jobs.wait("stopped", 120)
    assert status.state == "stopped", jobs.log_tail("stopped")
    saved = json.loads((workspace / "loras" / "stopped" / "training_run.json").read_text())
    assert saved["outcome"] == "stopped" and 2 <= saved["step"] < 20
    assert (workspace / "loras" / "stopped" / "adapter_model.safetensors").is_file()
    assert latest_checkpoint(jobs.run_dir("stopped")).name == f"checkpoint-{saved['step']}"
    assert jobs.status("stopped").resumable


def test_early_stopping_ends_the_run_after_the_patience_runs_out(jobs: JobManager):
    config = tiny_config("patience", max_steps=40, eval_steps=2, early_stopping_patience=2,
                         early_stopping_threshold=100.0)  # no evaluation can improve by 100: never "better"
    config = config.model_copy(update={"dataset": config.dataset.model_copy(update={"eval_fraction": 0.1})})
    jobs.start(config)
    status = jobs.wait("patience", JOB_TIMEOUT)
    assert status.state == "finished", jobs.log_tail("patience")
    assert max(r["step"] for r in train_records(jobs, "patience")) == 6


def test_two_processes_under_accelerate_launch(jobs: JobManager):
    config = TrainingConfig(**{**tiny_config("ddp", max_steps=3, save_steps=3, micro_batch_size=2).model_dump(),
                               "launch": {"num_processes": 2, "distributed": "ddp", "cpu": True}})
    assert "accelerate.commands.launch" in jobs.command(config, resume=False)
    jobs.start(config)
    status = jobs.wait("ddp", JOB_TIMEOUT)
    assert status.state == "finished", jobs.log_tail("ddp", 80)
    records, _ = jobs.progress("ddp")
    started = next(r for r in records if r.get("event") == "started")
    assert started["processes"] == 2 and started["device"].startswith("cpu")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    steps_per_epoch = -(-started["examples"] // (2 * 2))  # two processes, two examples each per step
    assert train[0]["epoch"] == pytest.approx(1 / steps_per_epoch, abs=1e-4)


def test_refusals_before_any_process_starts(jobs: JobManager):
    with pytest.raises(ConfigError, match="CUDA"):
        jobs.start(tiny_config("q", qlora=True))
    with pytest.raises(ConfigError, match="tensorboard is not installed|wandb is not installed"):
        jobs.start(tiny_config("r", report_to=["tensorboard", "wandb"]))
    with pytest.raises(PathError):
        jobs.start(tiny_config("d").model_copy(update={"base_model": "../tiny"}))
    with pytest.raises(PathError, match="No dataset named"):
        jobs.start(tiny_config("e").model_copy(update={"dataset": tiny_config("e").dataset.model_copy(
            update={"train_file": "missing.json"})}))
    with pytest.raises(ConfigError, match="unknown key 'train.lerning_rate'"):
        parse_config({"name": "x", "base_model": "tiny", "dataset": {"train_file": "train.json"},
                      "train": {"lerning_rate": 1}}, "form")
    with pytest.raises(PathError):
        parse_config({"name": "../escape", "base_model": "tiny", "dataset": {"train_file": "train.json"}}, "form")
    assert not any(jobs.folders.runs.glob("[qrde]"))
