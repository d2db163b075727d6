"""Build the prompt for a conversation in text-generation-webui's three modes, fitted to the context window.

- instruct: the instruction template renders the conversation as system/user/assistant turns.
- chat: character roleplay; a plain "Name: message" transcript (a Jinja chat template, text-generation-webui's
  default) after the character's context and example dialogue, continued at "<character>:".
- chat-instruct: the instruction template wraps a command ("Continue the chat dialogue below. Write a single reply
  for the character ...") with the chat transcript inside it.

The Chat tab and /v1/chat/completions both call `build_prompt`; it never touches a model, only a
`count_tokens(text) -> int` callable when the prompt must fit a token budget.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modules.chat.characters import Character, replace_placeholders
from modules.chat.templates import (CHATML_TEMPLATE, render_chat, starts_with_bos, template_stop_strings)
from modules.errors import ConfigError, WorkbenchError

MODES = ("instruct", "chat", "chat-instruct")

#: The chat-mode transcript (text-generation-webui's format): the character context and the user's persona, then
#: one "Name: message" line per message, continued at "<character>:". Variables: name1 (user), name2 (character),
#: user_bio.
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if message['content'] %}{{- message['content'] + '\\n\\n' }}{%- endif %}
        {%- if user_bio %}{{- user_bio + '\\n\\n' }}{%- endif %}
    {%- elif message['role'] == 'user' %}
        {{- name1 + ': ' + message['content'] + '\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- name2 + ': ' + message['content'] + '\\n' }}
    {%- else %}
        {{- '[' + message['role'] + ': ' + message['content'] + ']\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- name2 + ':' }}
{%- endif %}
"""

#: text-generation-webui's chat-instruct command; <|character|> becomes the character's name (the user's when
#: impersonating) and <|prompt|> the chat transcript.
DEFAULT_CHAT_INSTRUCT_COMMAND = (
    'Continue the chat dialogue below. Write a single reply for the character "<|character|>". '
    "Reply directly, without starting the reply with the character name.\n\n<|prompt|>")

#: Keys of stored history messages that are for the UI, not for the template.
_UI_KEYS = frozenset({"swipes", "swipe_index", "timestamp", "metadata", "id"})


class PromptTooLong(WorkbenchError):
    """The pinned part of the prompt (system message, character context, last message) alone exceeds the budget."""


@dataclass
class PromptOptions:
    """How to turn a conversation into a prompt; the UI and the API fill this from their settings."""

    mode: str = "instruct"
    instruction_template: str = CHATML_TEMPLATE  # Jinja; see templates.choose_template
    chat_template: str = DEFAULT_CHAT_TEMPLATE  # used by "chat" and inside "chat-instruct"
    chat_instruct_command: str = DEFAULT_CHAT_INSTRUCT_COMMAND
    system_message: str = ""  # instruct and chat-instruct; a leading system message in the conversation wins
    user_name: str = "You"
    user_bio: str = ""  # the user's persona, shown after the character context in chat modes
    character: Character | None = None  # chat modes; None means a bare "AI"
    bos_token: str | None = None
    eos_token: str | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tool schemas, for templates that take them
    template_variables: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}

    @property
    def character_name(self) -> str:
        return self.character.name if self.character and self.character.name else "AI"


@dataclass
class PromptResult:
    prompt: str
    messages: list[dict[str, Any]]  # the conversation as rendered, after old messages were dropped
    dropped_messages: int = 0  # oldest messages left out to fit the budget
    stop_strings: list[str] = field(default_factory=list)  # add these to GenerationParams.stop
    warnings: list[str] = field(default_factory=list)  # for the caller to show
    starts_with_bos: bool = False  # True: encode with add_bos=False (the template wrote BOS itself)
    prompt_tokens: int | None = None  # when count_tokens was given


def build_prompt(messages: list[dict[str, Any]], options: PromptOptions, *, continue_last: bool = False,
                 impersonate: bool = False, impersonate_prefix: str = "",
                 count_tokens: Callable[[str], int] | None = None, token_budget: int | None = None,
                 truncate_last_message: bool = True) -> PromptResult:
    """The prompt for `messages` (oldest first; the new user message already appended).

    continue_last: the last message is an assistant reply to be continued in place.
    impersonate: write the user's next message instead (starting with `impersonate_prefix`).
    count_tokens/token_budget: drop the oldest messages until the prompt fits (never the system message, the
    character context or anything from the last user message on); if even that is too long, cut the last user
    message short (or raise PromptTooLong when `truncate_last_message` is False).
    """
    if options.mode not in MODES:
        raise ConfigError(f"Unknown chat mode {options.mode!r}; use one of: {', '.join(MODES)}.")
    if continue_last and impersonate:
        raise ConfigError("Continue and impersonate cannot be asked at once.")
    conversation = [_clean(message, index, flatten=options.mode != "instruct")
                    for index, message in enumerate(messages)]
    if continue_last and (not conversation or conversation[-1]["role"] != "assistant"):
        raise ConfigError("There is no assistant reply at the end of the conversation to continue.")
    head = 0
    while head < len(conversation) and conversation[head]["role"] == "system":
        head += 1
    system, body = conversation[:head], conversation[head:]

    def render(body_now: list[dict[str, Any]]) -> str:
        return _render(options, system, body_now, continue_last, impersonate, impersonate_prefix)

    result = PromptResult(prompt="", messages=[], stop_strings=_stop_strings(options))
    if count_tokens is None or token_budget is None:
        result.prompt = render(body)
        result.messages = system + body
    else:
        body = _fit(render, body, count_tokens, token_budget, result, truncate_last_message, continue_last)
        result.messages = system + body
    result.starts_with_bos = starts_with_bos(result.prompt, options.bos_token)
    return result


def _clean(message: Any, index: int, *, flatten: bool) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
        raise ConfigError(f"Message {index} needs a 'role' of system, user, assistant or tool.")
    cleaned = {key: value for key, value in message.items() if key not in _UI_KEYS and value is not None}
    content = cleaned.get("content", "")
    if isinstance(content, list) and flatten:  # OpenAI content parts; chat transcripts hold text only
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, (str, list)):
        raise ConfigError(f"Message {index} has a 'content' that is neither text nor a list of parts.")
    cleaned["content"] = content
    return cleaned


def _render(options: PromptOptions, system: list[dict[str, Any]], body: list[dict[str, Any]], continue_last: bool,
            impersonate: bool, prefix: str) -> str:
    tokens = {"bos_token": options.bos_token, "eos_token": options.eos_token}
    if options.mode == "instruct":
        if not system and options.system_message.strip():
            system = [{"role": "system", "content": options.system_message}]
        convo = system + body + ([{"role": "user", "content": prefix}] if impersonate else [])
        return render_chat(options.instruction_template, convo, continue_final_message=continue_last or impersonate,
                           tools=options.tools, **tokens, **options.template_variables)

    user, char = options.user_name, options.character_name
    chat_vars = {"name1": user, "name2": char, "user_bio": replace_placeholders(options.user_bio, user, char)}
    context = _character_context(options, system)
    transcript_head = [{"role": "system", "content": context}] if context or chat_vars["user_bio"] else []
    if options.mode == "chat":
        convo = transcript_head + body + ([{"role": "user", "content": prefix}] if impersonate else [])
        return render_chat(options.chat_template, convo, continue_final_message=continue_last or impersonate,
                           tools=options.tools, **chat_vars, **options.template_variables)

    # chat-instruct: the transcript (without the reply being continued) goes inside the command
    inner_body = body[:-1] if continue_last else body
    transcript = render_chat(options.chat_template, transcript_head + inner_body, add_generation_prompt=False,
                             **chat_vars, **options.template_variables) if transcript_head + inner_body else ""
    command = replace_placeholders(options.chat_instruct_command, user, char)
    command = command.replace("<|character|>", user if impersonate else char).replace("<|prompt|>", transcript)
    outer = [{"role": "system", "content": options.system_message}] if options.system_message.strip() else []
    outer.append({"role": "user", "content": command})
    if continue_last:
        outer.append({"role": "assistant", "content": body[-1]["content"]})
    elif impersonate:
        outer.append({"role": "assistant", "content": prefix})
    return render_chat(options.instruction_template, outer, continue_final_message=continue_last or impersonate,
                       **tokens, **options.template_variables)


def _character_context(options: PromptOptions, system: list[dict[str, Any]]) -> str:
    """The character's context and example dialogue, then any system messages the conversation began with."""
    user, char = options.user_name, options.character_name
    parts = []
    if options.character is not None:
        parts += [options.character.context.strip(), options.character.example_dialogue.strip()]
    parts += [m["content"].strip() for m in system if isinstance(m["content"], str)]
    return "\n\n".join(replace_placeholders(p, user, char) for p in parts if p)


def _stop_strings(options: PromptOptions) -> list[str]:
    if options.mode == "instruct":
        stops = template_stop_strings(options.instruction_template, bos_token=options.bos_token,
                                      eos_token=options.eos_token, **options.template_variables)
    else:
        stops = [f"\n{options.user_name}:", f"\n{options.character_name}:"]
        if options.mode == "chat":
            stops += template_stop_strings(options.chat_template, name1=options.user_name,
                                           name2=options.character_name, user_bio="")
        else:
            stops += template_stop_strings(options.instruction_template, bos_token=options.bos_token,
                                           eos_token=options.eos_token, **options.template_variables)
    return list(dict.fromkeys(s for s in stops if s.strip()))


# --- fitting the context window ---------------------------------------------------------------------------------


def _fit(render: Callable[[list[dict[str, Any]]], str], body: list[dict[str, Any]],
         count_tokens: Callable[[str], int], budget: int, result: PromptResult, truncate_last_message: bool,
         continue_last: bool) -> list[dict[str, Any]]:
    """Drop whole turns from the oldest on, the fewest that make the prompt fit, and fill `result` with the prompt,
    its token count, the number of dropped messages and warnings.

    Near-linear in the conversation: each message's own text is counted from the newest back, only as far as such
    texts could still fit (a turn's prompt holds at least its messages' texts), which bounds the turns that can be
    kept; then only prompts of about the budget's size are rendered and counted whole, each guess guided by how the
    last count compared with its estimate. Counting the whole conversation, and bisecting over it, re-rendered and
    re-tokenized thousands of messages several times."""
    if budget <= 0:
        raise PromptTooLong(f"No room for a prompt: the token budget is {budget}. Lower max_new_tokens or load the "
                            "model with a longer context.")
    last_user = max((i for i, m in enumerate(body) if m["role"] == "user"), default=None)
    pinned_from = last_user if last_user is not None else (len(body) - 1 if continue_last else len(body))
    starts = [i for i in range(1, pinned_from) if body[i]["role"] == "user"]  # a turn starts at a user message
    cuts = list(dict.fromkeys([0] + starts + [pinned_from]))  # dropping k turns keeps body[cuts[k]:]
    last = len(cuts) - 1
    counted: dict[int, tuple[str, int]] = {}

    def attempt(k: int) -> tuple[str, int]:
        if k not in counted:
            prompt = render(body[cuts[k]:])
            counted[k] = (prompt, count_tokens(prompt))
        return counted[k]

    pinned = attempt(last)[1]
    texts = [0] * (last + 1)  # texts[k]: tokens of the messages' own texts in the turns kept after k dropped
    k = last
    if pinned <= budget:
        while k > 0 and pinned + texts[k] <= budget:
            k -= 1
            texts[k] = texts[k + 1] + sum(count_tokens(_text_of(m)) for m in body[cuts[k]:cuts[k + 1]])
        lowest = k if pinned + texts[k] <= budget else k + 1  # dropping fewer turns cannot fit
        k = _fewest_dropped(attempt, texts, pinned, budget, lowest, last)
        if k == lowest and k > 0 and attempt(k - 1)[1] <= budget:  # the estimate was no bound after all
            k = _fewest_dropped(attempt, texts, pinned, budget, 0, k - 1)
    prompt, used = attempt(k)
    kept = body[cuts[k]:]
    if k:
        result.dropped_messages = cuts[k]
        result.warnings.append(f"{cuts[k]} of the oldest messages did not fit in the context and were left out of "
                               "the prompt.")
    if used > budget:
        kept, prompt, used = _truncate_last_user(render, kept, count_tokens, budget, result, truncate_last_message,
                                                 used)
    result.prompt, result.prompt_tokens = prompt, used
    return kept


def _fewest_dropped(attempt: Callable[[int], tuple[str, int]], texts: list[int], pinned: int, budget: int,
                    low: int, high: int) -> int:
    """The smallest k in [low, high] whose prompt fits (`high` when none does), for prompts that shrink as k grows.
    Guesses from the estimate pinned + ratio * texts[k], the ratio learnt from each count; bisects once guesses
    stop narrowing the range fast."""
    ratio, guided = 1.0, 0
    while low < high:
        if guided < 4:
            guess = next((j for j in range(low, high) if pinned + ratio * texts[j] <= budget), high - 1)
            guided += 1
        else:
            guess = (low + high) // 2
        used = attempt(guess)[1]
        if texts[guess]:
            ratio = max(1.0, (used - pinned) / texts[guess])
        if used <= budget:
            high = guess
        else:
            low = guess + 1
    return high


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if isinstance(part, dict))


def _truncate_last_user(render: Callable[[list[dict[str, Any]]], str], kept: list[dict[str, Any]],
                        count_tokens: Callable[[str], int], budget: int, result: PromptResult, allowed: bool,
                        used: int) -> tuple[list[dict[str, Any]], str, int]:
    too_long = (f"The prompt needs {used} tokens but only {budget} fit (context length minus max_new_tokens), even "
                "with all older messages left out. Shorten the message, the system message or the character "
                "context, lower max_new_tokens, or load the model with a longer context.")
    index = max((i for i, m in enumerate(kept) if m["role"] == "user"), default=None)
    if not allowed or index is None or not isinstance(kept[index]["content"], str):
        raise PromptTooLong(too_long)
    text = kept[index]["content"]

    def with_length(n: int) -> tuple[list[dict[str, Any]], str, int]:
        trial = [*kept[:index], {**kept[index], "content": text[:n]}, *kept[index + 1:]]
        prompt = render(trial)
        return trial, prompt, count_tokens(prompt)

    low, high, best = 0, len(text), None  # the longest prefix of the message that fits
    while low <= high:
        mid = (low + high) // 2
        trial = with_length(mid)
        if trial[2] <= budget:
            best, low = trial, mid + 1
        else:
            high = mid - 1
    if best is None:
        raise PromptTooLong(too_long)
    kept_chars = len(best[0][index]["content"])
    result.warnings.append(f"The last user message was cut from {len(text)} to {kept_chars} characters to fit the "
                           "context.")
    return best
