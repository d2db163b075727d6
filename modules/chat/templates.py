"""Chat templates: render one with exactly Transformers' `apply_chat_template` semantics, pick the one a model
should use, and read the named templates shipped in `instruction-templates/`.

Rendering goes through `transformers.utils.chat_template_utils.render_jinja_template` (the function
`apply_chat_template` itself calls) so that a template renders here as it does in Transformers: the same sandbox,
the same `raise_exception`/`strftime_now`/`tojson`, the same `continue_final_message` handling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from transformers.utils.chat_template_utils import render_jinja_template

from modules.chat.files import dump_yaml, file_in
from modules.errors import ConfigError, NotFound, PathError
from modules.paths import atomic_write_text

#: The folder of the shipped templates (the caller may pass another one everywhere a folder is taken).
DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "instruction-templates"

#: The template used when the model has none and the user picked none.
DEFAULT_TEMPLATE_NAME = "ChatML"

#: Kept in code as well as in instruction-templates/ChatML.yaml so that a model without a template still gets a
#: prompt when that folder is missing or edited; a test checks that both agree.
CHATML_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_TEMPLATE_KEY = "instruction_template"
_ROLES_HINT = "each message needs a 'role' (system, user, assistant or tool) and a 'content'"


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool | None = None,
                continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                documents: list[dict[str, Any]] | None = None, bos_token: str | None = None,
                eos_token: str | None = None, **extra: Any) -> str:
    """Render `messages` through the Jinja chat `template` as `tokenizer.apply_chat_template(tokenize=False)` does.

    `add_generation_prompt` defaults to the opposite of `continue_final_message` (asking for both is an error, as in
    Transformers). Keys whose value is None are dropped from each message first, as Transformers does. `extra`
    reaches the template as variables (for example `enable_thinking`). Any failure of the template becomes a
    ConfigError carrying the template's own message.
    """
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if continue_final_message and add_generation_prompt:
        raise ConfigError("continue_final_message and add_generation_prompt cannot both be set: the first continues "
                          "the last message, the second opens a new assistant message.")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError("The chat template is empty.")
    cleaned = _clean_messages(messages)
    if continue_final_message and not cleaned:
        raise ConfigError("continue_final_message is set but the conversation is empty.")
    variables = {"bos_token": bos_token or "", "eos_token": eos_token or "", **extra}
    try:
        rendered, _ = render_jinja_template(
            conversations=[cleaned], tools=tools, documents=documents, chat_template=template,
            continue_final_message=continue_final_message, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"The chat template has a syntax error on line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:  # raise_exception(), undefined variables, sandbox refusals
        raise ConfigError(f"The chat template refused the conversation: {exc}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(f"The chat template failed on this conversation: {exc}") from None
    return rendered[0]


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"The conversation must be a list of messages; {_ROLES_HINT}.")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ConfigError(f"Message {index} of the conversation is malformed: {_ROLES_HINT}.")
        cleaned.append({key: value for key, value in message.items() if value is not None})
    return cleaned


def validate_template(template: str) -> None:
    """Raise ConfigError unless `template` compiles and renders a short system/user/assistant conversation."""
    sample = [{"role": "system", "content": "System."}, {"role": "user", "content": "Hello."},
              {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye."}]
    render_chat(template, sample, add_generation_prompt=True)


# --- which template a model uses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChosenTemplate:
    """The template to render with, where it came from, and a warning for the caller to show (or None)."""

    template: str
    source: str  # "user" (picked by name), "model" (its own metadata) or "default"
    name: str  # the picked template's name, "model", or DEFAULT_TEMPLATE_NAME
    warning: str | None = None


def choose_template(model_template: str | None, user_choice: str | None = None, *,
                    templates_dir: str | os.PathLike[str] = DEFAULT_TEMPLATES_DIR) -> ChosenTemplate:
    """The user's pick by name wins; else the model's own template (`LoadedModel.chat_template`); else ChatML with
    a warning. `user_choice` of None, "" or "auto" (any case) means "no pick"."""
    if user_choice and user_choice.strip().lower() != "auto":
        return ChosenTemplate(load_template(user_choice, templates_dir=templates_dir), "user", user_choice)
    if model_template and model_template.strip():
        return ChosenTemplate(model_template, "model", "model")
    warning = (f"The model has no chat template and none was picked, so the {DEFAULT_TEMPLATE_NAME} format is used. "
               "If the replies look wrong, pick the model's format under instruction templates.")
    try:
        template = load_template(DEFAULT_TEMPLATE_NAME, templates_dir=templates_dir)
    except (ConfigError, PathError):
        template = CHATML_TEMPLATE
    return ChosenTemplate(template, "default", DEFAULT_TEMPLATE_NAME, warning)


# --- BOS handling -----------------------------------------------------------------------------------------------


def starts_with_bos(prompt: str, bos_token: str | None) -> bool:
    """Whether the rendered prompt already holds the BOS token, so the caller must encode with add_bos=False."""
    return bool(bos_token) and prompt.startswith(bos_token)


def strip_leading_bos(prompt: str, bos_token: str | None) -> str:
    """The prompt without the BOS the template wrote, for a caller that adds BOS at tokenization."""
    return prompt[len(bos_token):] if starts_with_bos(prompt, bos_token) else prompt


# --- stop strings a template implies ----------------------------------------------------------------------------


def template_stop_strings(template: str, **variables: Any) -> list[str]:
    """Strings that end an assistant turn in this template (such as "<|im_end|>" or "\\n### Instruction:").

    Found as text-generation-webui does: render a fake two-turn chat and take the first marker of the text between
    the turns. Models whose EOS does not match the template (or a template picked by the user) stop on these."""
    fake = [{"role": "user", "content": "first user message"},
            {"role": "assistant", "content": "first assistant message"},
            {"role": "user", "content": "second user message"},
            {"role": "assistant", "content": "second assistant message"}]
    try:
        prompt = render_chat(template, fake, add_generation_prompt=False, **variables)
    except ConfigError:
        return []
    positions = [prompt.find(m["content"]) for m in fake]
    if any(p < 0 for p in positions):
        return []
    ends = [p + len(m["content"]) for p, m in zip(positions, fake)]
    gaps = [prompt[ends[0]:positions[1]], prompt[ends[1]:positions[2]], prompt[ends[3]:]]
    found: list[str] = []
    for gap in gaps:
        stripped = gap.strip()
        for opener, closer in ("<>", "[]", "()", "{}"):
            if stripped.startswith(opener) and closer in stripped:
                found.append(stripped.split(closer)[0] + closer)
                break
        else:
            if ":" in gap:
                found.append(gap.split(":")[0] + ":")
    found = [s for s in dict.fromkeys(found) if s.strip()]
    return [s for s in found if not any(s != other and s.startswith(other) for other in found)]


# --- the named templates in instruction-templates/ --------------------------------------------------------------


def list_templates(templates_dir: str | os.PathLike[str] = DEFAULT_TEMPLATES_DIR) -> list[str]:
    folder = Path(templates_dir)
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()}
    return sorted(names, key=str.lower)


def _template_path(name: str, folder: str | os.PathLike[str]) -> Path:
    for suffix in (".yaml", ".yml"):
        path = file_in(folder, name, suffix, what="instruction template")
        if path.is_file():
            return path
    raise NotFound(f"No instruction template named {name!r} in {folder}; known: "
                      f"{', '.join(list_templates(folder)) or 'none'}.")


def load_template(name: str, *, templates_dir: str | os.PathLike[str] = DEFAULT_TEMPLATES_DIR) -> str:
    """The Jinja text of the named template (the `instruction_template` key of `<name>.yaml`)."""
    path = _template_path(name, templates_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The instruction template {path.name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(_TEMPLATE_KEY), str) or not data[_TEMPLATE_KEY].strip():
        raise ConfigError(f"The instruction template {path.name} needs a non-empty '{_TEMPLATE_KEY}' string key.")
    return data[_TEMPLATE_KEY]


def save_template(name: str, template: str, *, templates_dir: str | os.PathLike[str] = DEFAULT_TEMPLATES_DIR) -> Path:
    """Validate and write `<name>.yaml` atomically; returns its path."""
    path = file_in(templates_dir, name, ".yaml", what="instruction template")
    validate_template(template)
    atomic_write_text(path, dump_yaml({_TEMPLATE_KEY: template}))
    return path


def delete_template(name: str, *, templates_dir: str | os.PathLike[str] = DEFAULT_TEMPLATES_DIR) -> None:
    _template_path(name, templates_dir).unlink()

