"""Training datasets: read a file from training/datasets/, check every record, format it (Alpaca layout or the
model's chat template), tokenize it with prompt masking, split off an evaluation set, and describe the result for
the Training tab's preview.

Formats: raw text (.txt, or JSON records with a "text" field), Alpaca records (instruction, input, output), chat
records ("messages" with role/content, or ShareGPT "conversations" with from/value), and CSV files whose columns
map onto the Alpaca fields. Every problem names the file and the record (1-based) or field at fault.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.chat.templates import choose_template
from modules.errors import ConfigError, WorkbenchError
from modules.paths import resolve_inside
from modules.training.config import DatasetOptions
from modules.training.formatting import (Example, Segment, alpaca_chat_segments, alpaca_instruction_segments,
                                         instruction_messages, raw_text_examples, template_segments,
                                         tokenize_segments)

SUFFIXES = (".txt", ".json", ".jsonl", ".csv")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


class DatasetError(ConfigError):
    """A dataset file or record is unusable; the message names which."""


@dataclass
class Records:
    """A file's content, checked and normalized: kind "raw" (texts), "instruction" (dicts) or "chat" (messages)."""

    kind: str
    items: list[Any]
    source: str


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    kind: str
    records: int
    dropped_too_long: int = 0
    dropped_empty: int = 0
    warnings: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        lengths = [len(e.input_ids) for e in self.train]
        return {
            "kind": self.kind, "records": self.records, "train_examples": len(self.train),
            "eval_examples": len(self.eval), "dropped_too_long": self.dropped_too_long,
            "dropped_empty": self.dropped_empty, "train_tokens": sum(lengths),
            "trained_tokens": sum(e.trained_tokens for e in self.train),
            "eval_tokens": sum(len(e.input_ids) for e in self.eval),
            "longest": max(lengths, default=0), "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        }


def list_datasets(datasets_dir: Path) -> list[str]:
    if not datasets_dir.is_dir():
        return []
    return sorted(str(p.relative_to(datasets_dir)) for p in datasets_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))


def dataset_path(datasets_dir: Path, name: str) -> Path:
    path = resolve_inside(datasets_dir, name, what="dataset", must_exist=True)
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(f"{name} is not a dataset file: use .txt, .json, .jsonl or .csv.")
    return path


# --- reading ------------------------------------------------------------------------------------------------------


def read_records(path: Path, fmt: str = "auto", csv_columns: dict[str, str] | None = None) -> Records:
    suffix = path.suffix.lower()
    name = path.name
    try:
        if suffix == ".txt" or fmt == "raw" and suffix not in (".json", ".jsonl"):
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise DatasetError(f"{name} is empty.")
            return Records("raw", [text], name)
        if suffix == ".csv" or fmt == "csv":
            return Records("instruction", _read_csv(path, csv_columns or {}), name)
        raw = _read_json(path)
    except UnicodeDecodeError:
        raise DatasetError(f"{name} is not UTF-8 text.") from None
    except OSError as exc:
        raise DatasetError(f"Cannot read {name}: {exc.strerror}.") from None
    if not raw:
        raise DatasetError(f"{name} holds no records.")
    kind = fmt if fmt in ("raw", "alpaca", "chat") else _detect(raw[0], name)
    if kind == "alpaca":
        return Records("instruction", [_alpaca_record(r, i, name) for i, r in enumerate(raw, 1)], name)
    if kind == "chat":
        return Records("chat", [_chat_record(r, i, name) for i, r in enumerate(raw, 1)], name)
    return Records("raw", [_text_record(r, i, name) for i, r in enumerate(raw, 1)], name)


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{path.name} is empty.")
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path.name}, line {number} is not valid JSON: {exc.msg} (column {exc.colno}).") \
                    from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") \
            from None
    if not isinstance(data, list):
        raise DatasetError(f"{path.name} must hold a JSON array of records, not a {type(data).__name__}.")
    return data


def _detect(first: Any, name: str) -> str:
    if not isinstance(first, dict):
        raise DatasetError(f"{name}, record 1 is a {type(first).__name__}, not an object with fields.")
    if "messages" in first or "conversations" in first:
        return "chat"
    if "instruction" in first or "output" in first:
        return "alpaca"
    if "text" in first:
        return "raw"
    raise DatasetError(f"{name}, record 1 has fields {sorted(first)}; expected Alpaca fields (instruction, input, "
                       "output), chat 'messages' / ShareGPT 'conversations', or 'text'.")


def _string_field(record: dict[str, Any], key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DatasetError(f"{where} has no '{key}' field.")
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, not {type(value).__name__}.")
    return value


def _alpaca_record(record: Any, index: int, name: str) -> dict[str, str]:
    where = f"{name}, record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a {type(record).__name__}, not an object with instruction/input/output.")
    result = {key: _string_field(record, key, where, required=key in ("instruction", "output"))
              for key in ("instruction", "input", "output", "system")}
    if not result["instruction"].strip():
        raise DatasetError(f"{where}: field 'instruction' is empty.")
    return result


def _text_record(record: Any, index: int, name: str) -> str:
    where = f"{name}, record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a {type(record).__name__}, not an object with a 'text' field.")
    return _string_field(record, "text", where, required=True)


def _chat_record(record: Any, index: int, name: str) -> list[dict[str, str]]:
    where = f"{name}, record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a {type(record).__name__}, not an object with 'messages'.")
    if "messages" in record:
        turns, role_key, text_key, roles = record["messages"], "role", "content", {r: r for r in _ROLES}
        field_name = "messages"
    elif "conversations" in record:
        turns, role_key, text_key, roles = record["conversations"], "from", "value", _SHAREGPT_ROLES
        field_name = "conversations"
    else:
        raise DatasetError(f"{where} has neither 'messages' nor 'conversations' (fields: {sorted(record)}).")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: '{field_name}' must be a non-empty list of turns.")
    messages = []
    for number, turn in enumerate(turns, 1):
        turn_where = f"{where}, {field_name}[{number - 1}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{turn_where} is a {type(turn).__name__}, not an object with '{role_key}' and "
                               f"'{text_key}'.")
        role = _string_field(turn, role_key, turn_where, required=True)
        content = _string_field(turn, text_key, turn_where, required=True)
        if role.lower() not in roles:
            raise DatasetError(f"{turn_where}: '{role_key}' is {role!r}; expected one of {sorted(roles)}.")
        messages.append({"role": roles[role.lower()], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where} has no assistant turn to learn from.")
    return messages


def _read_csv(path: Path, mapping: dict[str, str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if not columns:
            raise DatasetError(f"{path.name} is empty (no header row).")
        wanted = {key: mapping.get(key, key) for key in ("instruction", "input", "output", "system")}
        for key in ("instruction", "output"):
            if wanted[key] not in columns:
                how = f"mapped to {key}" if key in mapping else f"needed for {key}; map another column to it"
                raise DatasetError(f"{path.name} has no column '{wanted[key]}' ({how}). Its columns: "
                                   f"{', '.join(columns)}.")
        records = []
        for number, row in enumerate(reader, 1):
            where = f"{path.name}, row {number}"
            if None in row:
                raise DatasetError(f"{where} has more cells than the header has columns.")
            record = {key: (row.get(column) or "") for key, column in wanted.items()}
            if not record["instruction"].strip():
                raise DatasetError(f"{where}: column '{wanted['instruction']}' (instruction) is empty.")
            records.append(record)
    if not records:
        raise DatasetError(f"{path.name} has a header but no rows.")
    return records


# --- formatting and splitting -------------------------------------------------------------------------------------


def record_segments(kind: str, item: Any, options: DatasetOptions, template: str | None, *, bos: str | None,
                    eos: str | None) -> tuple[list[Segment], bool]:
    """One record as segments, and whether the tokenizer should add its special tokens (the chat template
    writes its own)."""
    if template is None:
        if kind == "instruction":
            return alpaca_instruction_segments(item, eos or ""), True
        return alpaca_chat_segments(item, eos or ""), True
    messages = instruction_messages(item, options.system_message) if kind == "instruction" else item
    return template_segments(messages, template, bos=bos, eos=eos), False


def pick_template(options: DatasetOptions, model_template: str | None, warnings: list[str] | None = None) -> str | None:
    """The chat template records are rendered with (None for the Alpaca layout)."""
    if options.prompt_format != "chat_template":
        return None
    chosen = choose_template(model_template or None)
    if chosen.warning and warnings is not None:
        warnings.append(chosen.warning)
    return chosen.template


def format_records(records: Records, options: DatasetOptions, tokenizer: Any,
                   warnings: list[str] | None = None) -> tuple[list[Example], int, int]:
    """Examples, the number dropped for exceeding cutoff_len, and the number with nothing to train on."""
    if records.kind == "raw":
        examples = []
        for text in records.items:
            examples += raw_text_examples(text, tokenizer, cutoff=options.cutoff_len, overlap=options.overlap_len,
                                          at_blank_lines=options.split_at_blank_lines)
        return examples, 0, 0
    template = pick_template(options, getattr(tokenizer, "chat_template", None), warnings)
    examples, too_long, empty = [], 0, 0
    for index, item in enumerate(records.items, 1):
        try:
            segments, special = record_segments(records.kind, item, options, template, bos=tokenizer.bos_token,
                                                eos=tokenizer.eos_token)
        except WorkbenchError as exc:
            raise DatasetError(f"{records.source}, record {index}: {exc}") from None
        example = tokenize_segments(segments, tokenizer, add_special_tokens=special,
                                    train_all=not options.train_on_responses_only)
        if len(example.input_ids) > options.cutoff_len:
            too_long += 1
        elif example.trained_tokens == 0:
            empty += 1
        else:
            examples.append(example)
    return examples, too_long, empty


def split_records(records: Records, options: DatasetOptions, datasets_dir: Path, seed: int) -> tuple[Records,
                                                                                                     Records | None]:
    """Training records and evaluation records: the eval file's, or a seeded share of the training records
    (raw text is split after chunking instead, in prepare_dataset)."""
    if options.eval_file:
        return records, read_records(dataset_path(datasets_dir, options.eval_file), options.format,
                                     options.csv_columns)
    if not options.eval_fraction or records.kind == "raw":
        return records, None
    train, held = split_items(records.items, options.eval_fraction, seed, what="records")
    return Records(records.kind, train, records.source), Records(records.kind, held, records.source)


def prepare_dataset(options: DatasetOptions, datasets_dir: Path, tokenizer: Any, *, seed: int) -> PreparedData:
    records = read_records(dataset_path(datasets_dir, options.train_file), options.format, options.csv_columns)
    train_records, eval_records = split_records(records, options, datasets_dir, seed)
    warnings: list[str] = []
    train_examples, dropped, empty = format_records(train_records, options, tokenizer, warnings)
    eval_examples: list[Example] = []
    if eval_records is not None:
        eval_examples, eval_dropped, eval_empty = format_records(eval_records, options, tokenizer)
        dropped, empty = dropped + eval_dropped, empty + eval_empty
        if not eval_examples:
            raise DatasetError(f"The evaluation split gives no examples within cutoff_len ({options.cutoff_len} "
                               "tokens).")
    elif options.eval_fraction and records.kind == "raw":
        train_examples, eval_examples = split_items(train_examples, options.eval_fraction, seed, what="chunks")
    if not train_examples:
        raise DatasetError(f"{options.train_file} gives no training examples: {dropped} were longer than "
                           f"cutoff_len ({options.cutoff_len} tokens) and {empty} had no reply to train on.")
    if dropped:
        warnings.append(f"{dropped} record(s) were longer than cutoff_len ({options.cutoff_len} tokens) and were "
                        "left out.")
    return PreparedData(train_examples, eval_examples, records.kind, len(records.items), dropped, empty, warnings)


def eval_texts(options: DatasetOptions, datasets_dir: Path, *, seed: int, chat_template: str | None,
               bos: str | None, eos: str | None) -> list[str]:
    """The evaluation split as formatted text (what perplexity is measured on), without a tokenizer: the
    llama.cpp loader has none of Transformers' kind."""
    records = read_records(dataset_path(datasets_dir, options.train_file), options.format, options.csv_columns)
    if records.kind == "raw":
        raise DatasetError("A raw-text dataset has no record-level evaluation split; measure perplexity on the "
                           "text file itself.")
    _, held = split_records(records, options, datasets_dir, seed)
    if held is None:
        raise DatasetError("This dataset setting has no evaluation split (no eval file and an eval fraction of 0).")
    template = pick_template(options, chat_template)
    return ["".join(s.text for s in record_segments(held.kind, item, options, template, bos=bos, eos=eos)[0])
            for item in held.items]


def split_items(items: list[Any], fraction: float, seed: int, *, what: str) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of the items (at least one) for evaluation; the same seed gives the same split."""
    count = max(1, round(len(items) * fraction))
    if count >= len(items):
        raise DatasetError(f"An eval fraction of {fraction} leaves nothing to train on ({len(items)} {what}).")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(items) if i not in held], [e for i, e in enumerate(items) if i in held]


def preview_dataset(options: DatasetOptions, datasets_dir: Path, tokenizer: Any, *, seed: int = 42,
                    count: int = 3) -> dict[str, Any]:
    """The first formatted examples (whole text and the part trained on), and the counts the tab shows."""
    data = prepare_dataset(options, datasets_dir, tokenizer, seed=seed)
    shown = []
    for example in data.train[:count]:
        trained = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
        shown.append({"text": example.text, "trained_text": tokenizer.decode(trained),
                      "tokens": len(example.input_ids), "trained_tokens": len(trained)})
    return {"examples": shown, "stats": data.stats(), "warnings": data.warnings}
