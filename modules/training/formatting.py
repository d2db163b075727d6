"""Records -> text segments (prompt or reply) -> token ids with labels.

A record becomes a list of Segments whose `trained` flag says whether its tokens count in the loss. The text is
tokenized once as a whole (so tokens at a boundary are the ones the model will see at inference) and each token
is labelled by the segment its characters fall in: a token that overlaps a reply is trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from modules.chat.templates import render_chat
from modules.errors import ConfigError

IGNORE_INDEX = -100

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes " \
                  "the request."
ALPACA_PREAMBLE_INPUT = "Below is an instruction that describes a task, paired with an input that provides " \
                        "further context. Write a response that appropriately completes the request."


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# --- instruction records: {"instruction", "input", "output", "system"} ------------------------------------------


def instruction_messages(record: dict[str, str], system_message: str | None) -> list[dict[str, str]]:
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    messages = []
    system = record.get("system") or system_message
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return messages


def alpaca_prompt(instruction: str, input_text: str = "", system: str | None = None) -> str:
    """The Alpaca prompt up to "### Response:\\n" (also what a chat with an Alpaca-trained LoRA should send)."""
    if input_text:
        return (f"{system or ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}"
                "\n\n### Response:\n")
    return f"{system or ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_instruction_segments(record: dict[str, str], eos: str) -> list[Segment]:
    prompt = alpaca_prompt(record["instruction"], record.get("input", ""), record.get("system"))
    return [Segment(prompt, False), Segment(record["output"] + eos, True)]


def alpaca_chat_segments(messages: list[dict[str, str]], eos: str) -> list[Segment]:
    """A conversation in the Alpaca layout: each user turn an "### Instruction:", each reply a "### Response:"."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    segments = [Segment(f"{system or ALPACA_PREAMBLE}\n\n", False)]
    for message in messages:
        if message["role"] == "user":
            segments.append(Segment(f"### Instruction:\n{message['content']}\n\n### Response:\n", False))
        elif message["role"] == "assistant":
            segments.append(Segment(message["content"] + eos, True))
            segments.append(Segment("\n\n", False))
    if segments[-1].text == "\n\n":
        segments.pop()
    return segments


# --- the model's chat template --------------------------------------------------------------------------------


def template_segments(messages: list[dict[str, str]], template: str, *, bos: str | None,
                      eos: str | None) -> list[Segment]:
    """Render the whole conversation, and find each assistant turn as the text between "the conversation so far
    with a generation prompt" and "the conversation through this turn". Both must be prefixes of the whole
    rendering (true of ChatML, Llama, Mistral, Gemma... templates); a template that rewrites earlier turns when
    later ones follow cannot be masked this way and is refused with a clear message."""
    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        return render_chat(template, part, add_generation_prompt=generation_prompt, bos_token=bos, eos_token=eos)

    full = render(messages, False)
    segments: list[Segment] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:index], True) if index else ""
        end = render(messages[:index + 1], False)
        if not (full.startswith(start) and full.startswith(end)) or len(start) < cursor or len(end) < len(start):
            raise ConfigError("The chat template renders earlier turns differently once later turns follow, so the "
                              "replies cannot be told apart from the prompt. Turn off 'train on responses only' "
                              "or use the Alpaca prompt format.")
        segments.append(Segment(full[cursor:len(start)], False))
        segments.append(Segment(full[len(start):len(end)], True))
        cursor = len(end)
    segments.append(Segment(full[cursor:], False))
    return [s for s in segments if s.text]


# --- tokenization ---------------------------------------------------------------------------------------------


def tokenize_segments(segments: list[Segment], tokenizer: Any, *, add_special_tokens: bool,
                      train_all: bool = False) -> Example:
    """Token ids and labels; prompt tokens get IGNORE_INDEX unless `train_all`."""
    text = "".join(s.text for s in segments)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        trained_chars = _trained_char_mask(segments)
        labels = []
        for token, (start, end) in zip(ids, encoded["offset_mapping"]):
            trained = train_all or (end > start and any(trained_chars[start:end]))
            labels.append(token if trained else IGNORE_INDEX)
        return Example(ids, labels, text)
    ids, labels = [], []  # slow tokenizers have no offsets: encode segment by segment
    if add_special_tokens and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(tokenizer.bos_token_id if train_all else IGNORE_INDEX)
    for segment in segments:
        piece = tokenizer.encode(segment.text, add_special_tokens=False)
        ids += piece
        labels += piece if (segment.trained or train_all) else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels, text)


def _trained_char_mask(segments: list[Segment]) -> list[bool]:
    mask: list[bool] = []
    for segment in segments:
        mask.extend([segment.trained] * len(segment.text))
    return mask


# --- raw text -----------------------------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"(\n[ \t]*\n\s*)")


def raw_text_examples(text: str, tokenizer: Any, *, cutoff: int, overlap: int, at_blank_lines: bool) -> list[Example]:
    """Cut a text into chunks of at most `cutoff` tokens. Each chunk repeats the last `overlap` tokens of the one
    before as context (masked from the loss: they were trained once already). With `at_blank_lines`, chunks end
    at paragraph breaks where a paragraph fits."""
    if at_blank_lines:
        pieces = _paragraphs(text)
        chunks = _pack_paragraphs([tokenizer.encode(p, add_special_tokens=False) for p in pieces], cutoff, overlap)
    else:
        chunks = _windows(tokenizer.encode(text, add_special_tokens=False), cutoff, overlap, first_context=0)
    return [Example(ids, [IGNORE_INDEX] * context + ids[context:], tokenizer.decode(ids))
            for ids, context in chunks if len(ids) > context]


def _paragraphs(text: str) -> list[str]:
    parts = _BLANK_LINES.split(text)
    paragraphs = []
    for index in range(0, len(parts), 2):
        paragraph = parts[index] + (parts[index + 1] if index + 1 < len(parts) else "")
        if paragraph:
            paragraphs.append(paragraph)
    return paragraphs


def _windows(ids: list[int], cutoff: int, overlap: int, *, first_context: int) -> list[tuple[list[int], int]]:
    """Chunks of `ids` as (tokens, number of leading context tokens)."""
    chunks: list[tuple[list[int], int]] = []
    step = cutoff - overlap
    start = 0
    while start < len(ids):
        context = first_context if start == 0 else overlap
        chunks.append((ids[start:start + cutoff], context))
        if start + cutoff >= len(ids):
            break
        start += step
    return chunks


def _pack_paragraphs(pieces: list[list[int]], cutoff: int, overlap: int) -> list[tuple[list[int], int]]:
    chunks: list[tuple[list[int], int]] = []
    current: list[int] = []
    context = 0
    for piece in pieces:
        if len(current) + len(piece) <= cutoff:
            current += piece
            continue
        if len(current) > context:
            chunks.append((current, context))
        tail = current[-overlap:] if overlap and current else []
        if len(tail) + len(piece) <= cutoff:
            current, context = tail + piece, len(tail)
            continue
        windows = _windows(tail + piece, cutoff, overlap, first_context=len(tail))
        chunks.extend(windows[:-1])
        current, context = windows[-1]
    if len(current) > context:
        chunks.append((current, context))
    return chunks
