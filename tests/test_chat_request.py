"""The one chat path (modules.chat.request) on the real starter model: the Chat tab, /v1/chat/completions, the CLI
and /predict map their input onto a ChatRequest, and the same conversation gives the same prompt and stop strings
whoever sends it; /predict writes the Alpaca prompt training writes; tools, hooks and errors ride the same path."""
from __future__ import annotations


import pytest

from conftest import FRANCE
from extensions.openai.errors import api_error_from
from extensions.openai.internal import predict_request
from extensions.openai.mapping import chat_request as api_chat_request
from extensions.openai.protocol import ChatCompletionRequest
from extensions.openai.protocol_internal import PredictRequest
from modules.chat.request import ALPACA_STOP_STRINGS, ChatRequest, finish_reply, prepare_chat
from modules.errors import InvalidInput
from modules.extensions import ExtensionRegistry
from modules.generate import chat_request as cli_chat_request
from modules.training.formatting import ALPACA_PREAMBLE_INPUT, alpaca_prompt
from modules.ui.chat_runner import turn_request

SYSTEM = "You answer in one short sentence."
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def name(services) -> str:
    return services.manager.resident().name


def from_ui(services, name: str, chat=None, **update):
    """What the Chat tab sends for FRANCE typed into a new chat, the system message set in its settings."""
    chat = (chat or services.settings.chat).model_copy(update={"system_message": SYSTEM})
    params = services.default_params(name).model_copy(update={"max_new_tokens": 64, **update})
    return prepare_chat(services, turn_request(chat, params, [{"role": "user", "content": FRANCE}], "send",
                                               model=name))


def from_api(services, name: str, **fields):
    body = ChatCompletionRequest(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE}],
                                 max_tokens=64, **fields)
    request, warnings = api_chat_request(services, body, name)
    assert warnings == []
    return prepare_chat(services, request)


def from_cli(services, name: str):
    """`python -m modules.generate --chat --system SYSTEM --max-new-tokens 64 --prompt FRANCE` (no preset)."""
    params = services.default_params(name).model_copy(update={"max_new_tokens": 64})
    return prepare_chat(services, cli_chat_request(FRANCE, params, SYSTEM))


def test_the_chat_tab_the_api_and_the_cli_send_the_same_prompt_and_stops(services, name) -> None:
    ui, api, cli = from_ui(services, name), from_api(services, name), from_cli(services, name)
    assert ui.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{FRANCE}")
    assert ui.prompt.endswith("<|im_start|>assistant\n")
    assert ui.prompt == api.prompt == cli.prompt
    assert "<|im_end|>" in ui.params.stop  # the template's end of turn: the CLI's --chat had none before
    assert ui.params.stop == api.params.stop == cli.params.stop
    assert ui.add_bos == api.add_bos == cli.add_bos
    assert ui.params.max_new_tokens == api.params.max_new_tokens == cli.params.max_new_tokens == 64


def test_custom_stopping_strings_reach_the_api_as_they_reach_the_chat_tab(services, name) -> None:
    settings = services.settings
    before = settings.chat
    settings.chat = before.model_copy(update={"custom_stopping_strings": ["\nQ:", "Paris"]})
    try:
        ui, api = from_ui(services, name), from_api(services, name, stop=["END"])
    finally:
        settings.chat = before
    assert {"\nQ:", "Paris", "<|im_end|>"} <= set(ui.params.stop)
    assert "END" in api.params.stop and [s for s in api.params.stop if s != "END"] == ui.params.stop


def test_predict_writes_the_prompt_training_writes(services, name) -> None:
    for instruction, given in (("Summarize the text.", "Cats sleep for most of the day."), ("Name a colour.", "")):
        prepared = prepare_chat(services, predict_request(services, PredictRequest(instruction=instruction,
                                                                                   input=given), name))
        assert prepared.prompt == alpaca_prompt(instruction, given)  # modules.training.formatting's
        assert set(ALPACA_STOP_STRINGS) <= set(prepared.params.stop)
        assert prepared.add_bos is None  # the tokenizer adds BOS, as training's add_special_tokens does
    assert prepared.prompt.startswith("Below is an instruction that describes a task. Write")
    with_input = prepare_chat(services, predict_request(services, PredictRequest(instruction="Sum.", input="1 2"),
                                                        name))
    assert with_input.prompt.startswith(ALPACA_PREAMBLE_INPUT) and "### Input:\n1 2\n\n### Response:\n" in \
        with_input.prompt


def test_tools_go_into_the_prompt_and_calls_come_out_of_the_reply(services, name) -> None:
    prepared = from_api(services, name, tools=[WEATHER])
    assert "get_weather" in prepared.prompt and prepared.tool_names == {"get_weather"}
    assert not prepared.forced_tool and prepared.params.json_schema is None
    reply = finish_reply(prepared, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                   '"Paris"}}\n</tool_call>')
    assert reply.content == "Let me look."
    assert [c["function"]["name"] for c in reply.tool_calls] == ["get_weather"]
    assert reply.tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    forced = from_api(services, name, tools=[WEATHER], tool_choice="required")
    assert forced.forced_tool and forced.params.json_schema["properties"]["name"] == {"const": "get_weather"}
    assert finish_reply(from_api(services, name), "It is sunny.").tool_calls == []


def test_a_bad_tool_choice_is_an_error_about_that_field(services, name) -> None:
    for fields in ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}},
                   {"tool_choice": "required"}):
        with pytest.raises(InvalidInput) as caught:
            from_api(services, name, **fields)
        assert caught.value.field == "tool_choice"
        error = api_error_from(caught.value, "messages")
        assert (error.status, error.param) == (400, "tool_choice")


def test_extension_hooks_apply_on_the_one_path(services, name) -> None:
    registry = ExtensionRegistry(param_overrides={"example": {"hidden_suffix": " (be kind)", "uppercase_output": True,
                                                              "min_p": 0.25}})
    registry.enable_all(["example"])
    services.extensions = registry
    try:
        api = from_api(services, name)
        cli = from_cli(services, name)
    finally:
        services.extensions = None
    assert f"{FRANCE} (be kind)<|im_end|>" in api.prompt and api.prompt == cli.prompt  # the new message, hooked
    assert api.params.min_p == 0.25 and api.state["source"] == "api" and cli.state["source"] == "cli"
    assert finish_reply(api, "paris.").shown == "PARIS."


def test_a_conversation_too_long_is_dropped_from_in_the_chat_tab_and_refused_by_the_api(services, name) -> None:
    history = []
    for turn in range(300):  # about 11,000 tokens: more than the model's 8,192
        history += [{"role": "user", "content": f"Tell me about the number {turn}, at length please."},
                    {"role": "assistant", "content": f"The number {turn} is a fine number with many properties."}]
    messages = [*history, {"role": "user", "content": FRANCE}]
    params = services.default_params(name).model_copy(update={"max_new_tokens": 64})
    chat = services.settings.chat.model_copy(update={"truncation_length": 1024})
    ui = prepare_chat(services, turn_request(chat, params, messages, "send", model=name))
    assert ui.context == 1024 and ui.dropped_messages > 0 and FRANCE in ui.prompt
    assert ui.prompt_tokens <= 1024 - 64
    assert any("oldest messages" in warning for warning in ui.warnings)
    request = ChatRequest(messages=messages, chat=services.settings.chat, params=params, model=name, fit="refuse")
    refused = prepare_chat(services, request)  # rendered whole: the generation counts it and refuses it
    with pytest.raises(InvalidInput, match="context"):
        refused.generate(services.manager, cut_to_fit=False)
