"""Prompts for instruct, chat and chat-instruct modes; continue, impersonate, placeholders; fitting the context by
dropping the oldest turns, counted with the starter model's real tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from modules.chat.characters import Character
from modules.chat.prompt import (DEFAULT_CHAT_INSTRUCT_COMMAND, PromptOptions, PromptTooLong, build_prompt)
from modules.chat.templates import choose_template, load_template
from modules.errors import ConfigError

MIRA = Character(name="Mira", greeting="Welcome aboard, {{user}}.",
                 context="{{char}} captains a cargo ship. {{User}} is her new navigator.",
                 example_dialogue="{{user}}: Cargo?\n{{char}}: Best not to ask.")
CHAT = [{"role": "assistant", "content": "Welcome aboard, Sam."}, {"role": "user", "content": "Where to?"}]


@pytest.fixture(scope="module")
def model_template(starter_gguf: Path) -> str:
    return GGUFReader(starter_gguf).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def count_tokens(starter_hf: Path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(starter_hf)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def chat_options(mode: str, **kwargs) -> PromptOptions:
    return PromptOptions(mode=mode, character=MIRA, user_name="Sam", instruction_template=load_template("ChatML"),
                         **kwargs)


def test_instruct_mode_uses_the_template_and_system_message() -> None:
    options = PromptOptions(instruction_template=load_template("ChatML"), system_message="Be terse.")
    result = build_prompt([{"role": "user", "content": "Hi"}], options)
    assert result.prompt == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert result.stop_strings == ["<|im_end|>"]
    assert result.dropped_messages == 0 and result.warnings == []
    # A system message sent with the conversation (as the API does) takes the place of the configured one.
    own = build_prompt([{"role": "system", "content": "Speak French."}, {"role": "user", "content": "Hi"}], options)
    assert "Speak French." in own.prompt and "Be terse." not in own.prompt


def test_instruct_mode_with_the_models_own_template(model_template: str) -> None:
    chosen = choose_template(model_template)
    result = build_prompt([{"role": "user", "content": "Hi"}], PromptOptions(instruction_template=chosen.template))
    assert result.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert result.prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_model_without_template_still_gets_a_prompt() -> None:
    chosen = choose_template(None)
    result = build_prompt([{"role": "user", "content": "Hi"}], PromptOptions(instruction_template=chosen.template))
    assert result.prompt.endswith("<|im_start|>assistant\n") and chosen.warning


def test_chat_mode_transcript_with_placeholders_and_persona() -> None:
    result = build_prompt(CHAT, chat_options("chat", user_bio="{{user}} grew up on Mars."))
    assert result.prompt == (
        "Mira captains a cargo ship. Sam is her new navigator.\n\n"
        "Sam: Cargo?\nMira: Best not to ask.\n\n"
        "Sam grew up on Mars.\n\n"
        "Mira: Welcome aboard, Sam.\n"
        "Sam: Where to?\n"
        "Mira:")
    assert "\nSam:" in result.stop_strings and "\nMira:" in result.stop_strings
    assert not result.starts_with_bos


def test_greeting_fills_placeholders() -> None:
    assert MIRA.greeting_message("Sam") == {"role": "assistant", "content": "Welcome aboard, Sam."}
    assert Character(name="X").greeting_message("Sam") is None


def test_chat_instruct_wraps_the_transcript_in_the_command() -> None:
    result = build_prompt(CHAT, chat_options("chat-instruct", system_message="You write fiction."))
    command = DEFAULT_CHAT_INSTRUCT_COMMAND.replace("<|character|>", "Mira").replace("<|prompt|>", "")
    assert result.prompt.startswith("<|im_start|>system\nYou write fiction.<|im_end|>\n<|im_start|>user\n" + command)
    assert "Mira captains a cargo ship." in result.prompt and "Sam: Where to?\n<|im_end|>" in result.prompt
    assert result.prompt.endswith("<|im_start|>assistant\n")
    assert "\nSam:" in result.stop_strings and "<|im_end|>" in result.stop_strings
    impersonated = build_prompt(CHAT, chat_options("chat-instruct"), impersonate=True)
    assert 'reply for the character "Sam"' in impersonated.prompt


def test_custom_chat_instruct_command() -> None:
    options = chat_options("chat-instruct", chat_instruct_command="Play <|character|> opposite {{user}}:\n<|prompt|>")
    assert "Play Mira opposite Sam:\nMira captains" in build_prompt(CHAT, options).prompt


@pytest.mark.parametrize("mode, ending", [
    ("instruct", "<|im_start|>assistant\nWe head to Cer"),
    ("chat", "Sam: Where to?\nMira: We head to Cer"),
    ("chat-instruct", "<|im_end|>\n<|im_start|>assistant\nWe head to Cer"),
])
def test_continue_the_last_reply(mode: str, ending: str) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "We head to Cer"}]
    result = build_prompt(messages, chat_options(mode), continue_last=True)
    assert result.prompt.endswith(ending)
    if mode == "chat-instruct":  # the reply being continued is not also inside the transcript
        assert result.prompt.count("We head to Cer") == 1
    with pytest.raises(ConfigError, match="no assistant reply"):
        build_prompt(CHAT[1:], chat_options(mode), continue_last=True)


@pytest.mark.parametrize("mode, ending", [
    ("instruct", "<|im_start|>user\nI think"),
    ("chat", "Mira: Ceres.\nSam: I think"),
    ("chat-instruct", "<|im_start|>assistant\nI think"),
])
def test_impersonate_writes_the_users_next_message(mode: str, ending: str) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "Ceres."}]
    assert build_prompt(messages, chat_options(mode), impersonate=True, impersonate_prefix="I think").prompt.endswith(
        ending)


def test_ui_fields_of_history_messages_do_not_reach_the_template() -> None:
    template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    message = {"role": "assistant", "content": "B", "swipes": ["A", "B"], "swipe_index": 1, "timestamp": "t"}
    prompt = build_prompt([message], PromptOptions(instruction_template=template)).prompt
    assert prompt == '{"role": "assistant", "content": "B"}\n'


def test_bad_requests_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown chat mode"):
        build_prompt(CHAT, PromptOptions(mode="story"))
    with pytest.raises(ConfigError, match="Message 0"):
        build_prompt([{"role": "narrator", "content": "x"}], PromptOptions())
    with pytest.raises(ConfigError, match="at once"):
        build_prompt(CHAT, PromptOptions(), continue_last=True, impersonate=True)


def long_history(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "assistant", "content": "Welcome aboard, Sam."}]
    for n in range(turns):
        messages.append({"role": "user", "content": f"Question {n:02d}: tell me about planet number {n}."})
        messages.append({"role": "assistant", "content": f"Answer {n:02d}: planet {n} is cold and far away."})
    messages.append({"role": "user", "content": "Final question: where do we land?"})
    return messages


@pytest.mark.parametrize("mode", ["instruct", "chat", "chat-instruct"])
def test_fitting_drops_the_oldest_turns_first(mode: str, count_tokens) -> None:
    messages = long_history(30)
    options = chat_options(mode, system_message="Stay in character.")
    full = build_prompt(messages, options)
    budget = count_tokens(full.prompt) // 2
    result = build_prompt(messages, options, count_tokens=count_tokens, token_budget=budget)

    assert result.prompt_tokens == count_tokens(result.prompt) <= budget
    assert result.dropped_messages >= 3 and str(result.dropped_messages) in result.warnings[0]
    kept = [m for m in result.messages if m["role"] != "system"]
    assert kept == messages[result.dropped_messages:]  # a suffix: the oldest went first
    assert kept[0]["role"] == "user"  # whole turns are dropped, never half of one
    assert "Question 00" not in result.prompt and "Welcome aboard" not in result.prompt
    assert "Final question: where do we land?" in result.prompt
    if mode != "instruct":
        assert "Mira captains a cargo ship." in result.prompt and "Best not to ask." in result.prompt
    if mode != "chat":
        assert "Stay in character." in result.prompt
    # The fewest turns were dropped: keeping one more turn would not fit.
    one_more = build_prompt(messages[result.dropped_messages - 2:], options)
    assert count_tokens(one_more.prompt) > budget


def test_fitting_keeps_the_reply_being_continued(count_tokens) -> None:
    messages = [*long_history(20), {"role": "assistant", "content": "We land on"}]
    options = chat_options("chat")
    budget = count_tokens(build_prompt(messages, options, continue_last=True).prompt) // 3
    result = build_prompt(messages, options, continue_last=True, count_tokens=count_tokens, token_budget=budget)
    assert result.prompt.endswith("Sam: Final question: where do we land?\nMira: We land on")
    assert result.prompt_tokens <= budget and result.dropped_messages > 0


def test_nothing_dropped_when_it_fits(count_tokens) -> None:
    result = build_prompt(CHAT, chat_options("chat"), count_tokens=count_tokens, token_budget=10_000)
    assert result.dropped_messages == 0 and result.warnings == [] and result.messages == CHAT


def test_too_long_last_message_is_cut_or_refused(count_tokens) -> None:
    messages = [*CHAT, {"role": "user", "content": "word " * 400}]
    options = chat_options("chat")
    budget = count_tokens(build_prompt(messages[:2], options).prompt) + 50
    cut = build_prompt(messages, options, count_tokens=count_tokens, token_budget=budget)
    assert cut.prompt_tokens <= budget and "cut from 2000" in cut.warnings[-1]
    assert "Mira captains a cargo ship." in cut.prompt and cut.prompt.endswith("\nMira:")
    with pytest.raises(PromptTooLong, match="even with all older messages left out"):
        build_prompt(messages, options, count_tokens=count_tokens, token_budget=budget, truncate_last_message=False)
    with pytest.raises(PromptTooLong):  # the character context alone does not fit
        build_prompt(messages, options, count_tokens=count_tokens, token_budget=5)
    with pytest.raises(PromptTooLong, match="budget is 0"):
        build_prompt(messages, options, count_tokens=count_tokens, token_budget=0)
