"""Attached files against the context, for the one chat path (modules.chat.request).

A prompt too long for the context is normally fitted: the Chat tab leaves out the oldest turns and, as a last
resort, cuts the end of the user's last message; the API refuses it. A file is never cut: when the files of the
message being answered (the Chat tab), or of the whole conversation (the API), do not fit, the request is refused
with AttachmentTooLarge, which names each file's tokens and the room left for them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loaders.base import Capability, LoadedModel
from modules.chat.attachments import Attachment, AttachmentTooLarge, attachments_of, render_attachment, render_messages
from modules.chat.model_prompt import ModelPrompt
from modules.chat.prompt import PromptTooLong
from modules.errors import ContextLengthExceeded

#: build(messages, cut_last) -> the prompt of `messages` (attachments rendered already), `cut_last` False
#: forbidding the builder to shorten the last user message.
Build = Callable[[list[dict[str, Any]], bool], ModelPrompt]


def build_with_attachments(model: LoadedModel, messages: list[dict[str, Any]], build: Build, *, context: int,
                           max_new_tokens: int, refuse: bool,
                           count_tokens: Callable[[str], int] | None = None) -> ModelPrompt:
    """The prompt of `messages` (whose "attachments" are written into their text), built by `build`; refused with
    AttachmentTooLarge when the files it must hold do not fit. `refuse`: the whole conversation must fit (the API);
    else the oldest turns may be left out (the Chat tab) and the files that must fit are those of the last user
    message on. `count_tokens` counts a whole prompt (default: the model's token_count; with images, each image
    as its tokens)."""
    count_tokens = count_tokens or model.token_count
    files = _files_to_fit(messages, refuse)
    rendered = render_messages(messages)
    if not files:
        return build(rendered, True)
    can_count = Capability.TOKENIZE in model.capabilities
    try:
        built = build(rendered, False)
    except (PromptTooLong, ContextLengthExceeded):
        if not can_count:
            raise
        raise _too_large(model, messages, files, build, context, max_new_tokens, refuse, count_tokens) from None
    if can_count and built.result.prompt_tokens is None:  # refuse: the builder did not count it
        built.result.prompt_tokens = count_tokens(built.result.prompt)
    if can_count and built.result.prompt_tokens + max_new_tokens > context:
        raise _too_large(model, messages, files, build, context, max_new_tokens, refuse, count_tokens)
    return built


def _files_to_fit(messages: list[dict[str, Any]], whole: bool) -> list[Attachment]:
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    start = 0 if whole else last_user
    return [file for message in messages[start:] for file in attachments_of(message)]


def _too_large(model: LoadedModel, messages: list[dict[str, Any]], files: list[Attachment], build: Build,
               context: int, max_new_tokens: int, refuse: bool,
               count_tokens: Callable[[str], int]) -> AttachmentTooLarge:
    """The refusal, with the numbers: each file's tokens, and what the prompt takes without any file."""
    tokens: dict[str, int] = {}
    for file in files:
        name = file.name if file.name not in tokens else f"{file.name} ({len(tokens) + 1})"
        tokens[name] = model.token_count(render_attachment(file))
    try:
        without = build(render_messages(messages, include=False), not refuse).result
        others = without.prompt_tokens if without.prompt_tokens is not None else count_tokens(without.prompt)
    except (PromptTooLong, ContextLengthExceeded):  # even without the files it does not fit
        others = context
    return AttachmentTooLarge(files=tokens, room=context - max_new_tokens - others, context=context, others=others,
                              max_new_tokens=max_new_tokens)


def file_tokens(model: LoadedModel, attachment: Attachment) -> int | None:
    """The tokens a file adds to its message on `model`: its block and the blank line after it (None: the model
    cannot count)."""
    if Capability.TOKENIZE not in model.capabilities:
        return None
    return model.token_count(render_attachment(attachment) + "\n\n")


def check_files_fit(model: LoadedModel, files: list[Attachment], *, context: int, max_new_tokens: int) -> list[int]:
    """Each file's tokens (0 where the model cannot count), refusing with AttachmentTooLarge files that alone,
    with nothing else in the prompt, would not fit `context` beside `max_new_tokens`: what a page checks when a
    file is attached, before the whole prompt is built."""
    counts = [file_tokens(model, file) or 0 for file in files]
    if sum(counts) + max_new_tokens > context:
        raise AttachmentTooLarge(files={file.name: count for file, count in zip(files, counts)},
                                 room=context - max_new_tokens, context=context, others=0,
                                 max_new_tokens=max_new_tokens)
    return counts
