"""The chat prompt for the loaded model from chat settings: the one function the Chat tab and the API both call.

It picks the template (the user's, the model's, or the stated default), loads the character for the chat modes,
fills PromptOptions from the settings and the model's special tokens, and fits the conversation to the context
(the model's, or a shorter truncation_length) minus max_new_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import Capability, LoadedModel
from modules.chat.characters import Character, load_character
from modules.chat.prompt import DEFAULT_CHAT_INSTRUCT_COMMAND, PromptOptions, PromptResult, build_prompt
from modules.chat.templates import choose_template
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
                       impersonate_prefix: str = "") -> ModelPrompt:
    """`messages` is the whole conversation with the new user message appended. `template_override` is a Jinja
    template given inline (the API's instruction_template_str); otherwise chat.instruction_template names one
    in `template_dir`, and an empty name means the model's own."""
    warnings: list[str] = []
    if template_override:
        template = template_override
    else:
        chosen = choose_template(model.chat_template, chat.instruction_template or None, templates_dir=template_dir)
        template = chosen.template
        if chosen.warning:
            warnings.append(chosen.warning)
    options = PromptOptions(
        mode=chat.mode, instruction_template=template, system_message=chat.system_message,
        chat_instruct_command=chat.chat_instruct_command or DEFAULT_CHAT_INSTRUCT_COMMAND,
        user_name=chat.user_name, user_bio=chat.user_bio, character=chat_character(chat, characters_dir),
        bos_token=model.bos_token, eos_token=model.eos_token, tools=tools)
    context = model.context_length
    if chat.truncation_length:
        context = min(context, chat.truncation_length)
    can_count = Capability.TOKENIZE in model.capabilities
    result = build_prompt(messages, options, continue_last=continue_last, impersonate=impersonate,
                          impersonate_prefix=impersonate_prefix,
                          count_tokens=model.token_count if can_count else None,
                          token_budget=context - max_new_tokens if can_count else None)
    return ModelPrompt(result, context, warnings + result.warnings)
