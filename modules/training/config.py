"""The typed configuration of one training job: what the Training tab's form holds, what the child process reads
from CONFIG.yaml, and what lands beside the adapter as training_config.yaml (so "copy settings" can read it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modules.errors import ConfigError, describe_validation_error
from modules.paths import resolve_inside

#: Short names the form offers, and the module names they stand for in Llama-style models.
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
ALL_LINEAR = "all-linear"
CONFIG_FILE_NAME = "training_config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetOptions(_Strict):
    train_file: str = Field(..., description="Dataset file inside training/datasets/ (.txt, .json, .jsonl, .csv).")
    eval_file: str | None = Field(None, description="Evaluation file inside training/datasets/ (same formats).")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the training records held out for "
                                                                 "evaluation when there is no eval file.")
    format: Literal["auto", "raw", "alpaca", "chat", "csv"] = Field(
        "auto", description="auto: from the suffix (.txt raw, .csv csv) and, for JSON, from the first record's keys.")
    prompt_format: Literal["chat_template", "alpaca"] = Field(
        "chat_template", description="How records become text: the model's chat template, or the Alpaca layout.")
    train_on_responses_only: bool = Field(True, description="Mask prompt tokens from the loss (train on replies).")
    cutoff_len: int = Field(256, ge=8, le=131072, description="Longest example in tokens; longer records are "
                                                             "dropped, raw text is cut into chunks of this size.")
    overlap_len: int = Field(0, ge=0, description="Raw text: tokens each chunk repeats from the one before.")
    split_at_blank_lines: bool = Field(False, description="Raw text: cut chunks at blank lines where possible.")
    csv_columns: dict[str, str] = Field(default_factory=dict, description="CSV: field -> column, for the fields "
                                                                          "instruction, input, output, system.")
    system_message: str | None = Field(None, description="System message put before instruction records rendered "
                                                         "with the chat template (None: the template's default).")

    @model_validator(mode="after")
    def _overlap_below_cutoff(self) -> "DatasetOptions":
        if self.overlap_len >= self.cutoff_len:
            raise ValueError(f"overlap_len ({self.overlap_len}) must be smaller than cutoff_len ({self.cutoff_len})")
        unknown = set(self.csv_columns) - {"instruction", "input", "output", "system"}
        if unknown:
            raise ValueError(f"csv_columns maps unknown field(s) {sorted(unknown)}; the fields are instruction, "
                             "input, output and system")
        return self


class LoraOptions(_Strict):
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q", "k", "v", "o"],
                                      description="q, k, v, o, gate, up, down (or *_proj names), or all-linear.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("choose at least one target module")
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError("all-linear already covers every linear layer; give it alone")
        return value

    def peft_target_modules(self) -> str | list[str]:
        if self.target_modules == [ALL_LINEAR]:
            return ALL_LINEAR
        return [TARGET_MODULES.get(name, name) for name in self.target_modules]


class TrainOptions(_Strict):
    learning_rate: float = Field(3e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt"] = Field("linear", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up.")
    epochs: float = Field(3.0, gt=0, description="Passes over the data (when max_steps is 0).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 = run the epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    packing: bool = Field(False, description="Pack several examples into each row of cutoff_len tokens (they "
                                             "never attend to each other).")
    padding_free: bool = Field(True, description="Concatenate each micro-batch into one row with restarting "
                                                 "positions instead of padding (needs a model whose attention "
                                                 "honours position_ids, as Llama-style models do).")
    shared_prefix: bool = Field(True, description="Padding-free: compute the prompt prefix that all the examples of "
                                                  "a micro-batch share (a system prompt, an Alpaca preamble) once "
                                                  "(same loss and gradients; with LoRA dropout the prefix "
                                                  "draws one dropout mask for the micro-batch).")
    fused_lora: bool = Field(True, description="Accumulate each LoRA product into its base layer's output in one "
                                               "step (same arithmetic, fewer passes over memory).")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps; 0 = only at the end.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evaluations without a better eval "
                                                              "loss; 0 = off.")
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="Smallest eval-loss drop that counts.")
    logging_steps: int = Field(1, ge=1, description="Write a progress line every N steps.")
    seed: int = Field(42, ge=0, description="Seed for data order, dropout and LoRA init.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision (bf16 needs hardware that "
                                                                   "supports it).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    qlora: bool = Field(False, description="Load the base in 4 bits through bitsandbytes (CUDA only).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 = off.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list,
                                                            description="Also log to TensorBoard / W&B.")

    @model_validator(mode="after")
    def _packing_needs_padding_free(self) -> "TrainOptions":
        if self.packing and not self.padding_free:
            raise ValueError("packing needs padding_free (packed examples are kept apart by their positions)")
        return self


class LaunchOptions(_Strict):
    num_processes: int = Field(1, ge=1, le=64, description="Processes (one per GPU); >1 runs under "
                                                          "`accelerate launch`.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Several processes: DDP, or FSDP sharding.")
    cpu: bool = Field(False, description="Train on the CPU even when a GPU is present.")


class Folders(_Strict):
    """Where names resolve; the job manager writes absolute paths here, a hand-written config may rely on the
    defaults (relative to the working directory)."""

    models: Path = Path("models")
    loras: Path = Path("loras")
    datasets: Path = Path("training/datasets")
    runs: Path = Path("training/runs")


class TrainingConfig(_Strict):
    name: str = Field(..., description="The LoRA's name: the adapter lands in loras/<name>/.")
    base_model: str = Field(..., description="Base model inside models/ (a Transformers folder or a GGUF file; a "
                                             "GGUF is trained through its dequantized Transformers copy).")
    overwrite: bool = Field(False, description="Replace an existing LoRA (and run) of the same name.")
    gguf_lora: Literal["auto", "yes", "no"] = Field("auto", description="Also write the adapter as a GGUF LoRA; "
                                                                       "auto = when the base is a GGUF file.")
    dataset: DatasetOptions
    lora: LoraOptions = Field(default_factory=LoraOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    launch: LaunchOptions = Field(default_factory=LaunchOptions)
    folders: Folders = Field(default_factory=Folders)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        resolve_inside(Path("loras"), value, what="LoRA")  # raises PathError for '..', '/abs', '\\'
        if "/" in value or value.startswith("."):
            raise ValueError(f"the LoRA name {value!r} must be one plain folder name (no '/', not starting with '.')")
        return value

    # --- folders --------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return resolve_inside(self.folders.runs, self.name, what="training run")

    @property
    def lora_path(self) -> Path:
        return resolve_inside(self.folders.loras, self.name, what="LoRA")

    def base_path(self) -> Path:
        return resolve_inside(self.folders.models, self.base_model, what="model", must_exist=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def parse_config(data: Any, source: str) -> TrainingConfig:
    """Validate a mapping; errors name the bad key and where it came from."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of option: value, not {type(data).__name__}.")
    try:
        return TrainingConfig(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_config(path: Path) -> TrainingConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"Cannot read the training config {path}: {exc.strerror}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"The training config {path} is not UTF-8 text.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def form_settings(config: TrainingConfig) -> dict[str, Any]:
    """The options a user copies from an earlier LoRA: everything but the name, folders and overwrite flag."""
    data = config.model_dump(mode="json")
    for key in ("name", "folders", "overwrite"):
        data.pop(key)
    return data
