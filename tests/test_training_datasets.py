"""Training datasets: each format on small files, prompt masking checked token by token, raw-text chunking,
evaluation splits, the preview, and clear errors for bad files. Uses the starter model's tokenizer (no weights)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from modules.errors import ConfigError, PathError
from modules.training.config import DatasetOptions
from modules.training.datasets import (DatasetError, eval_texts, list_datasets, prepare_dataset, preview_dataset,
                                       read_records)
from modules.training.formatting import IGNORE_INDEX, alpaca_prompt

ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Give an antonym of 'hot'.", "input": "", "output": "Cold."},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}]},
    {"conversations": [{"from": "system", "value": "Answer in French."}, {"from": "human", "value": "Hello"},
                       {"from": "gpt", "value": "Bonjour."}]},
]


@pytest.fixture(scope="module")
def tokenizer(starter_hf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(starter_hf)


@pytest.fixture()
def datasets(tmp_path: Path) -> Path:
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "alpaca.json").write_text(json.dumps(ALPACA))
    (folder / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    (folder / "chat.json").write_text(json.dumps(CHAT))
    (folder / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in SHAREGPT))
    (folder / "qa.csv").write_text('question,answer,context\n"Capital of Italy?",Rome.,\n'
                                   '"Summarize it.","A cat sat.","The cat sat on the mat, all day."\n')
    return folder


def trained_and_masked(example, tokenizer) -> tuple[str, str]:
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    masked = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(trained), tokenizer.decode(masked)


def test_alpaca_layout_masks_the_prompt_token_by_token(datasets, tokenizer):
    data = prepare_dataset(DatasetOptions(train_file="alpaca.json", prompt_format="alpaca"), datasets, tokenizer,
                           seed=0)
    assert data.kind == "instruction" and len(data.train) == 4 and data.eval == []
    for record, example in zip(ALPACA, data.train):
        prompt = alpaca_prompt(record["instruction"], record["input"])
        prompt_ids = tokenizer(prompt)["input_ids"]
        # every prompt token is masked, every reply token (and the EOS) is a label equal to its input id
        assert example.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        reply = example.input_ids[len(prompt_ids):]
        assert example.labels[len(prompt_ids):] == reply
        assert tokenizer.decode(reply) == record["output"] + tokenizer.eos_token
        assert ("### Input:" in example.text) == bool(record["input"])


def test_chat_template_masks_every_assistant_turn_and_nothing_else(datasets, tokenizer):
    data = prepare_dataset(DatasetOptions(train_file="chat.json"), datasets, tokenizer, seed=0)
    first = data.train[0]
    full = tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert first.text == full  # the model's own template, rendered as Transformers renders it
    assert first.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    trained, masked = trained_and_masked(first, tokenizer)
    assert trained == "Hello!<|im_end|>\nFour.<|im_end|>\n"
    assert "Hi there" in masked and "What is 2+2?" in masked and "Be brief." in masked
    assert "Hello!" not in masked and "Four." not in masked
    # the labels are exactly the input ids where trained: no shift, no substitution
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(first.input_ids, first.labels))


def test_sharegpt_conversations_and_jsonl(datasets, tokenizer):
    records = read_records(datasets / "sharegpt.jsonl")
    assert records.kind == "chat"
    assert records.items[1] == [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour."}]
    data = prepare_dataset(DatasetOptions(train_file="sharegpt.jsonl"), datasets, tokenizer, seed=0)
    assert [trained_and_masked(e, tokenizer)[0] for e in data.train] == ["Yes.<|im_end|>\n", "Bonjour.<|im_end|>\n"]
    same = prepare_dataset(DatasetOptions(train_file="alpaca.jsonl"), datasets, tokenizer, seed=0)
    assert [e.input_ids for e in same.train] == [e.input_ids for e in prepare_dataset(
        DatasetOptions(train_file="alpaca.json"), datasets, tokenizer, seed=0).train]


def test_training_on_everything_when_masking_is_off(datasets, tokenizer):
    data = prepare_dataset(DatasetOptions(train_file="chat.json", train_on_responses_only=False), datasets,
                           tokenizer, seed=0)
    assert all(e.labels == e.input_ids for e in data.train)


def test_csv_with_a_column_mapping(datasets, tokenizer):
    options = DatasetOptions(train_file="qa.csv", prompt_format="alpaca",
                             csv_columns={"instruction": "question", "output": "answer", "input": "context"})
    data = prepare_dataset(options, datasets, tokenizer, seed=0)
    assert [trained_and_masked(e, tokenizer)[0] for e in data.train] == ["Rome.<|im_end|>", "A cat sat.<|im_end|>"]
    assert "### Input:\nThe cat sat on the mat, all day." in data.train[1].text
    with pytest.raises(DatasetError, match="no column 'instruction'"):
        prepare_dataset(DatasetOptions(train_file="qa.csv"), datasets, tokenizer, seed=0)


def test_raw_text_chunks_with_overlap_and_blank_lines(tmp_path, tokenizer):
    folder = tmp_path / "datasets"
    folder.mkdir()
    paragraphs = [" ".join(f"word{p}_{i}" for i in range(30)) for p in range(6)]
    (folder / "book.txt").write_text("\n\n".join(paragraphs))
    ids = tokenizer.encode("\n\n".join(paragraphs), add_special_tokens=False)
    data = prepare_dataset(DatasetOptions(train_file="book.txt", cutoff_len=64, overlap_len=16), folder,
                           tokenizer, seed=0)
    assert data.kind == "raw" and all(len(e.input_ids) <= 64 for e in data.train)
    assert data.train[0].input_ids == ids[:64] and data.train[1].input_ids[:16] == ids[48:64]
    assert data.train[1].labels[:16] == [IGNORE_INDEX] * 16  # overlap is context, trained once already
    covered = [t for e in data.train for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]
    assert covered == ids  # every token trained exactly once, in order
    short = [" ".join(f"w{p}x{i}" for i in range(6)) for p in range(8)]
    (folder / "short.txt").write_text("\n\n".join(short))
    sizes = [len(tokenizer.encode(p + "\n\n", add_special_tokens=False)) for p in short]
    at_breaks = prepare_dataset(DatasetOptions(train_file="short.txt", cutoff_len=2 * max(sizes) + 1,
                                               split_at_blank_lines=True), folder, tokenizer, seed=0)
    assert [e.text.split()[0] for e in at_breaks.train] == ["w0x0", "w2x0", "w4x0", "w6x0"]  # whole paragraphs
    assert all(e.text.rstrip().endswith("x5") for e in at_breaks.train)


def test_a_short_story_is_trained_once_token_by_token(tmp_path, tokenizer, verdict_text):
    """Raw text from a real book file: windows trained once each in order, or chunks ending at blank lines that
    still cover the whole story."""
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "verdict.txt").write_text(verdict_text, encoding="utf-8")

    def trained(data) -> list[int]:
        return [t for e in data.train for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]

    windows = prepare_dataset(DatasetOptions(train_file="verdict.txt", cutoff_len=256, overlap_len=32), folder,
                              tokenizer, seed=0)
    assert trained(windows) == tokenizer.encode(verdict_text, add_special_tokens=False)
    assert all(len(e.input_ids) <= 256 for e in windows.train)
    paragraphs = prepare_dataset(DatasetOptions(train_file="verdict.txt", cutoff_len=256, split_at_blank_lines=True),
                                 folder, tokenizer, seed=0)
    assert tokenizer.decode(trained(paragraphs)) == verdict_text
    for example in paragraphs.train[:-1]:  # a chunk ends at a paragraph break, unless one paragraph filled it
        assert example.text.endswith("\n\n") or len(example.input_ids) == 256, example.text[-80:]


def test_eval_split_by_fraction_or_file_and_dropped_for_length(datasets, tokenizer, instruction_data):
    (datasets / "many.json").write_text(json.dumps(instruction_data[:40]))
    options = DatasetOptions(train_file="many.json", eval_fraction=0.25, cutoff_len=64)
    data = prepare_dataset(options, datasets, tokenizer, seed=3)
    again = prepare_dataset(options, datasets, tokenizer, seed=3)
    stats = data.stats()
    assert stats["eval_examples"] + stats["train_examples"] + stats["dropped_too_long"] == 40
    assert stats["dropped_too_long"] > 0 and any("longer than cutoff_len" in w for w in data.warnings)
    assert [e.input_ids for e in data.eval] == [e.input_ids for e in again.eval]  # the seed fixes the split
    assert not {tuple(e.input_ids) for e in data.eval} & {tuple(e.input_ids) for e in data.train}
    texts = eval_texts(options, datasets, seed=3, chat_template=tokenizer.chat_template,
                       bos=tokenizer.bos_token, eos=tokenizer.eos_token)
    assert {e.text for e in data.eval} <= set(texts)  # perplexity sees the same held-out records
    by_file = prepare_dataset(DatasetOptions(train_file="alpaca.json", eval_file="chat.json"), datasets, tokenizer,
                              seed=0)
    assert len(by_file.train) == 4 and len(by_file.eval) == 2


def test_preview_shows_formatted_examples_and_counts(datasets, tokenizer):
    shown = preview_dataset(DatasetOptions(train_file="alpaca.json", prompt_format="alpaca"), datasets, tokenizer,
                            count=2)
    assert len(shown["examples"]) == 2
    assert shown["examples"][0]["trained_text"] == "Paris.<|im_end|>"
    assert shown["examples"][0]["text"].startswith("Below is an instruction")
    assert shown["stats"]["train_examples"] == 4 and shown["stats"]["dropped_too_long"] == 0
    assert shown["stats"]["trained_tokens"] < shown["stats"]["train_tokens"]
    assert list_datasets(datasets) == ["alpaca.json", "alpaca.jsonl", "chat.json", "qa.csv", "sharegpt.jsonl"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.json", "", "empty.json is empty"),
    ("broken.json", '[{"instruction": "x", ', "not valid JSON"),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', "lines.jsonl, line 2 is not valid JSON"),
    ("none.json", "[]", "holds no records"),
    ("keys.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]),
     "record 2 has no 'output' field"),
    ("type.json", json.dumps([{"instruction": "a", "output": 3}]), "record 1: field 'output' must be a string"),
    ("roles.json", json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]),
     r"record 1, messages\[1\]: 'role' is 'bot'"),
    ("noreply.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}]}]), "no assistant turn"),
    ("weird.json", json.dumps([{"prompt": "a", "completion": "b"}]), "record 1 has fields"),
    ("object.json", json.dumps({"instruction": "a"}), "must hold a JSON array"),
])
def test_bad_datasets_get_a_message_naming_the_record_or_field(datasets, tokenizer, name, content, message):
    (datasets / name).write_text(content)
    with pytest.raises(DatasetError, match=message):
        prepare_dataset(DatasetOptions(train_file=name), datasets, tokenizer, seed=0)


@pytest.mark.parametrize("name", ["../secret.json", "/etc/passwd", "..\\x.json", "sub/../../x.json"])
def test_dataset_paths_stay_inside_the_datasets_folder(datasets, tokenizer, name):
    (datasets.parent / "secret.json").write_text(json.dumps(ALPACA))
    with pytest.raises(PathError):
        prepare_dataset(DatasetOptions(train_file=name), datasets, tokenizer, seed=0)


def test_missing_file_and_bad_options_are_refused(datasets, tokenizer):
    with pytest.raises(PathError, match="No dataset named"):
        prepare_dataset(DatasetOptions(train_file="nope.json"), datasets, tokenizer, seed=0)
    with pytest.raises(ValueError, match="overlap_len"):
        DatasetOptions(train_file="a.txt", cutoff_len=32, overlap_len=32)
    with pytest.raises(ConfigError, match="eval fraction"):
        prepare_dataset(DatasetOptions(train_file="chat.json", eval_fraction=0.9), datasets, tokenizer, seed=0)
