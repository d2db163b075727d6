"""The chat prompt for a loaded model from chat settings, as modules.chat.request renders it for every caller.

It picks the template (the user's, the model's, or the stated default), puts the tools in (through the template
when it takes them, else a system message), loads the character for the chat modes, fills PromptOptions from the
settings and the model's special tokens, and fits the conversation to the context (the model's, or a shorter
truncation_length) minus max_new_tokens: by dropping the oldest turns (the Chat tab), or not at all (the API,
which refuses a prompt too long, as OpenAI does).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import Capability, LoadedModel
from modules.chat.characters import Character, load_character
from modules.chat.prompt import DEFAULT_CHAT_INSTRUCT_COMMAND, PromptOptions, PromptResult, build_prompt
from modules.chat.templates import choose_template
from modules.chat.tool_prompt import for_template, template_takes_tools, with_fallback_system
from modules.errors import ContextLengthExceeded
from modules.model_manager import check_text_fits
from modules.settings import ChatSettings


@dataclass
class ModelPrompt:
    result: PromptResult
    #: Context length in force (the model's, or chat.truncation_length when shorter).
    context: int
    #: Warnings to show: a default template, dropped turns, a shortened message.
    warnings: list[str]


def chat_character(chat: ChatSettings, characters_dir: Path) -> Character | None:
    """The character of a chat-mode conversation; None in instruct mode or when none is named."""
    if chat.mode == "instruct" or not chat.character:
        return None
    return load_character(chat.character, characters_dir=characters_dir)


def build_model_prompt(model: LoadedModel, chat: ChatSettings, messages: list[dict[str, Any]], *,
                       max_new_tokens: int, template_dir: Path, characters_dir: Path,
                       template_override: str | None = None, tools: list[dict[str, Any]] | None = None,
                       continue_last: bool = False, impersonate: bool = False,
                       impersonate_prefix: str = "", drop_old_messages: bool = True,
                       truncate_last_message: bool = True,
                       template_variables: dict[str, Any] | None = None,
                       count_tokens: Callable[[str], int] | None = None) -> ModelPrompt:
    """`messages` is the whole conversation with the new user message appended. `template_override` is a Jinja
    template given inline (the API's instruction_template_str); otherwise chat.instruction_template names one
    in `template_dir`, and an empty name means the model's own. `tools` (OpenAI function tools) reach a template
    that renders them; for one that ignores them they are described in the system message.

    `template_variables` reach the template's render (enable_thinking, reasoning_effort, a request's own).
    `count_tokens` counts a prompt (default: the model's token_count; a prompt with images: modules.chat.images'
    image_counter, each image as its tokens).

    `truncate_last_message` False: when the prompt does not fit even with the oldest turns left out, PromptTooLong
    is raised rather than the last user message cut (it holds attached files: modules.chat.attachment_fit).

    `drop_old_messages` False keeps every message: the prompt is rendered once, uncounted (the generation counts
    it and refuses it when too long), after refusing at once, with ContextLengthExceeded, a conversation whose
    message count or texts' size alone exceed what the context can hold."""
    if not drop_old_messages:
        _check_conversation_fits(model, messages, max_new_tokens)
    warnings: list[str] = []
    if template_override:
        template = template_override
    else:
        chosen = choose_template(model.chat_template, chat.instruction_template or None, templates_dir=template_dir)
        template = chosen.template
        if chosen.warning:
            warnings.append(chosen.warning)
    template_tools = None
    variables = dict(template_variables or {})
    if tools and template_takes_tools(template, tools, bos_token=model.bos_token or "",
                                      eos_token=model.eos_token or "", **variables):
        template_tools, messages = tools, for_template(messages)
    elif tools:
        messages = with_fallback_system(messages, tools)
    else:
        messages = for_template(messages)
    options = PromptOptions(
        mode=chat.mode, instruction_template=template, system_message=chat.system_message,
        chat_instruct_command=chat.chat_instruct_command or DEFAULT_CHAT_INSTRUCT_COMMAND,
        user_name=chat.user_name, user_bio=chat.user_bio, character=chat_character(chat, characters_dir),
        bos_token=model.bos_token, eos_token=model.eos_token, tools=template_tools, template_variables=variables)
    context = model.context_length
    if chat.truncation_length:
        context = min(context, chat.truncation_length)
    can_count = Capability.TOKENIZE in model.capabilities and drop_old_messages
    result = build_prompt(messages, options, continue_last=continue_last, impersonate=impersonate,
                          impersonate_prefix=impersonate_prefix,
                          count_tokens=(count_tokens or model.token_count) if can_count else None,
                          token_budget=context - max_new_tokens if can_count else None,
                          truncate_last_message=truncate_last_message)
    return ModelPrompt(result, context, warnings + result.warnings)


def _check_conversation_fits(model: LoadedModel, messages: list[dict[str, Any]], max_new_tokens: int) -> None:
    """Refuse, before any template renders it, a conversation that cannot fit the context: more messages than
    tokens of room (a template writes at least one token per message), or texts whose size in bytes alone needs
    more tokens than that (see check_text_fits)."""
    room = model.context_length - max_new_tokens
    if len(messages) > room:
        raise ContextLengthExceeded(context=model.context_length, prompt_tokens=len(messages),
                                    max_new_tokens=max_new_tokens, exact=False,
                                    what=f"the conversation of {len(messages)} messages")
    size = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            size += len(content.encode("utf-8", errors="surrogatepass"))
        elif isinstance(content, list):
            size += sum(len(part["text"].encode("utf-8", errors="surrogatepass")) for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    check_text_fits(model, size, max_new_tokens, what="the conversation")
