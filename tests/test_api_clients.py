"""Clients nobody here wrote, unchanged, against a real server with the starter model: SillyTavern's
text-generation-webui mode (its request bodies replayed field by field), text-generation-webui's own clients, the
official anthropic SDK (a prefilled reply, count_tokens, streamed tool use) and openai's stream helper on streamed
tool calls (and a reply's logprobs covering its text, not its calls, streamed or not); and the tool-call formats of common chat templates read while they are being written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from api_helpers import loaded_manager, models_folder, server_settings, serving_extensions
from conftest import FRANCE
from modules.chat.tool_calls import parse_tool_calls, scan_reply
from modules.services import Services
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow  # a served model answering real clients (SDKs, SillyTavern's bodies)

MODEL = STARTER_GGUF
GREEDY = {"temperature": 0}  # the anthropic SDK has no temperature argument: it goes in extra_body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """The base URL of a server with the starter GGUF loaded."""
    folder = tmp_path_factory.mktemp("clients")
    models = models_folder(folder, {MODEL: starter_gguf})
    manager = loaded_manager(models, folder, MODEL, n_ctx=2048)
    with serving_extensions(Services(settings=server_settings(models, folder, extensions=["openai"]),
                                     manager=manager)) as url:
        yield url
    manager.unload()


@pytest.fixture(scope="module")
def claude(api: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api, api_key="unused", max_retries=0, timeout=300)


def token_ids(api: str, text: str) -> list[int]:
    return httpx.post(api + "/v1/internal/encode", json={"text": text}, timeout=60).json()["tokens"]


# --- SillyTavern, text-generation-webui mode ------------------------------------------------------------------------
#: SillyTavern's defaults (`textgenerationwebui_settings` in public/scripts/textgen-settings.js), by its names.
ST_SETTINGS: dict[str, Any] = {
    "temp": 0.7, "temperature_last": True, "top_p": 0.5, "top_k": 40, "top_a": 0, "tfs": 1, "epsilon_cutoff": 0,
    "eta_cutoff": 0, "typical_p": 1, "min_p": 0, "rep_pen": 1.2, "rep_pen_range": 0, "rep_pen_slope": 1,
    "no_repeat_ngram_size": 0, "penalty_alpha": 0, "num_beams": 1, "length_penalty": 1, "min_length": 0,
    "encoder_rep_pen": 1, "freq_pen": 0, "presence_pen": 0, "skew": 0, "do_sample": True, "early_stopping": False,
    "smoothing_factor": 0.0, "smoothing_curve": 1.0, "dry_allowed_length": 2, "dry_multiplier": 0.0,
    "dry_base": 1.75, "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "dry_penalty_last_n": 0,
    "max_tokens_second": 0, "seed": -1, "add_bos_token": True, "ban_eos_token": False, "skip_special_tokens": True,
    "include_reasoning": True, "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "guidance_scale": 1,
    "negative_prompt": "", "grammar_string": "", "banned_tokens": "", "xtc_threshold": 0.1, "xtc_probability": 0,
    "nsigma": 0.0, "min_keep": 0, "adaptive_target": -0.01, "adaptive_decay": 0.9,
    "sampler_priority": ["repetition_penalty", "presence_penalty", "frequency_penalty", "dry", "temperature",
                         "dynamic_temperature", "quadratic_sampling", "top_n_sigma", "top_k", "top_p", "typical_p",
                         "epsilon_cutoff", "eta_cutoff", "tfs", "top_a", "min_p", "adaptive_p", "mirostat", "xtc",
                         "encoder_repetition_penalty", "no_repeat_ngram"],  # OOBA_DEFAULT_ORDER
}
#: SillyTavern 1.12 (September 2024) sent a few fields differently and lacked the newer samplers.
ST_1_12_ORDER = ["temperature", "dynamic_temperature", "quadratic_sampling", "top_k", "top_p", "typical_p",
                 "epsilon_cutoff", "eta_cutoff", "tfs", "top_a", "min_p", "mirostat"]
ST_PROMPT = ("Assistant is a helpful, concise AI.\n\n"
             "User: What is the capital of France?\nAssistant:")
ST_STOPS = ["\nUser:"]  # getStoppingStrings with names as stop strings


def sillytavern_body(api: str, *, max_tokens: int = 24, stream: bool = False, version: str = "current",
                     banned_tokens: str = "", logit_bias: dict[str, float] | None = None, **settings: Any) -> dict:
    """What SillyTavern posts for a chat in text-generation-webui mode: createTextGenGenerationData's object for
    type 'ooba' (public/scripts/textgen-settings.js: `params`, then `nonAphroditeParams`), JSON-serialised so
    undefined fields are left out, which its server forwards unchanged to /v1/completions
    (src/endpoints/backends/text-completions.js). `banned_tokens` is getCustomTokenBans' comma-separated ids."""
    s = {**ST_SETTINGS, **settings}
    body: dict[str, Any] = {
        "prompt": ST_PROMPT, "max_new_tokens": max_tokens, "max_tokens": max_tokens, "temperature": s["temp"],
        "top_p": s["top_p"], "typical_p": s["typical_p"], "typical": s["typical_p"], "min_p": s["min_p"],
        "repetition_penalty": s["rep_pen"], "frequency_penalty": s["freq_pen"],
        "presence_penalty": s["presence_pen"], "top_k": s["top_k"], "skew": s["skew"],
        "min_length": s["min_length"], "min_tokens": s["min_length"], "num_beams": s["num_beams"],
        "length_penalty": s["length_penalty"], "early_stopping": s["early_stopping"],
        "add_bos_token": s["add_bos_token"], "smoothing_factor": s["smoothing_factor"],
        "smoothing_curve": s["smoothing_curve"], "dry_allowed_length": s["dry_allowed_length"],
        "dry_multiplier": s["dry_multiplier"], "dry_base": s["dry_base"],
        "dry_sequence_breakers": s["dry_sequence_breakers"], "dry_penalty_last_n": s["dry_penalty_last_n"],
        "max_tokens_second": s["max_tokens_second"], "sampler_priority": s["sampler_priority"],
        "stopping_strings": ST_STOPS, "stop": ST_STOPS, "truncation_length": 4096,
        "ban_eos_token": s["ban_eos_token"], "skip_special_tokens": s["skip_special_tokens"],
        "include_reasoning": s["include_reasoning"], "top_a": s["top_a"], "tfs": s["tfs"],
        "epsilon_cutoff": s["epsilon_cutoff"], "eta_cutoff": s["eta_cutoff"], "mirostat_mode": s["mirostat_mode"],
        "mirostat_tau": s["mirostat_tau"], "mirostat_eta": s["mirostat_eta"], "custom_token_bans": banned_tokens,
        "banned_strings": [], "api_type": "ooba", "api_server": api, "xtc_threshold": s["xtc_threshold"],
        "xtc_probability": s["xtc_probability"], "nsigma": s["nsigma"], "top_n_sigma": s["nsigma"],
        "min_keep": s["min_keep"], "adaptive_target": s["adaptive_target"], "adaptive_decay": s["adaptive_decay"],
        # nonAphroditeParams
        "rep_pen": s["rep_pen"], "rep_pen_range": s["rep_pen_range"], "repetition_penalty_range": s["rep_pen_range"],
        "encoder_repetition_penalty": s["encoder_rep_pen"], "no_repeat_ngram_size": s["no_repeat_ngram_size"],
        "penalty_alpha": s["penalty_alpha"], "temperature_last": s["temperature_last"], "do_sample": s["do_sample"],
        "guidance_scale": s["guidance_scale"], "negative_prompt": s["negative_prompt"],
        "repeat_penalty": s["rep_pen"], "repeat_last_n": s["rep_pen_range"], "n_predict": max_tokens,
        "num_predict": max_tokens, "num_ctx": 4096, "mirostat": s["mirostat_mode"], "ignore_eos": s["ban_eos_token"],
        "rep_pen_slope": s["rep_pen_slope"],
    }
    if s["seed"] >= 0:
        body["sampler_seed"] = body["seed"] = s["seed"]
    if s["grammar_string"]:
        body["grammar_string"] = s["grammar_string"]
    if logit_bias:
        body["logit_bias"] = logit_bias
    if version == "1.12":  # the same function in SillyTavern 1.12.6
        for name in ("include_reasoning", "nsigma", "top_n_sigma", "min_keep", "adaptive_target", "adaptive_decay"):
            del body[name]
        body.update(sampler_seed=s["seed"], seed=s["seed"], grammar_string=s["grammar_string"], legacy_api=False,
                    tfs_z=s["tfs"], sampler_priority=ST_1_12_ORDER)
    if stream:
        body["stream"] = True  # generateTextGenWithStreaming
    return body


def st_stream_text(api: str, body: dict) -> tuple[httpx.Headers, str]:
    """Stream as SillyTavern reads it: each event's choices[0].text, to [DONE]."""
    text, done = "", False
    with httpx.stream("POST", api + "/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            data = json.loads(line[len("data: "):])
            assert "error" not in data, data
            text += data["choices"][0]["text"] if data["choices"] else ""
        headers = response.headers
    assert done
    return headers, text


@pytest.mark.parametrize("version", ["current", "1.12"])
def test_sillytavern_generates_with_its_own_defaults(api: str, version: str) -> None:
    """Every field SillyTavern sends is accepted; the ones it sends under other backends' names map onto ours,
    samplers we lack are off, so nothing comes back as a warning."""
    whole = httpx.post(api + "/v1/completions", json=sillytavern_body(api, version=version), timeout=300)
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["text"].strip()
    assert "x-workbench-warnings" not in whole.headers and "warnings" not in whole.json()
    headers, streamed = st_stream_text(api, sillytavern_body(api, version=version, stream=True))
    assert streamed.strip() and "x-workbench-warnings" not in headers


def test_sillytavern_knobs_act_under_their_other_names(api: str) -> None:
    """Greedy, the same body gives the same text; the repetition penalty SillyTavern also sends as rep_pen and
    repeat_penalty, the token bans as a "1,2" string and the logit bias as {"id": bias} all change it."""
    def text(**settings: Any) -> str:
        body = sillytavern_body(api, max_tokens=8, temp=0, **settings)
        response = httpx.post(api + "/v1/completions", json=body, timeout=300)
        assert response.status_code == 200 and "x-workbench-warnings" not in response.headers, response.text
        return response.json()["choices"][0]["text"]

    plain = text(rep_pen=1.0)
    assert " Paris" in plain
    paris = token_ids(api, " Paris")[0]
    assert " Paris" not in text(rep_pen=1.0, banned_tokens=f"{paris},{paris + 1}")
    assert " Paris" not in text(rep_pen=1.0, logit_bias={str(paris): -100})
    body = sillytavern_body(api, max_tokens=8, temp=0)  # rep_pen_range 0: the whole context
    for name in ("repetition_penalty", "rep_pen", "repeat_penalty"):
        del body[name]
    body["prompt"] = "The cat sat on the mat. The cat sat on the"

    def penalised(**fields: float) -> str:
        return httpx.post(api + "/v1/completions", json={**body, **fields}, timeout=300).json()["choices"][0]["text"]

    assert penalised(rep_pen=1.5) == penalised(repeat_penalty=1.5) == penalised(repetition_penalty=1.5) \
        != penalised(repetition_penalty=1.0)


def test_sillytavern_slider_extremes_are_accepted(api: str) -> None:
    """Its temperature slider goes to 5 (OpenAI's API stops at 2) and its rep_pen_range slider starts at -1
    (the whole context, as 0)."""
    for settings in ({"temp": 4.5}, {"rep_pen_range": -1, "rep_pen": 1.3}):
        response = httpx.post(api + "/v1/completions", json=sillytavern_body(api, max_tokens=4, **settings),
                              timeout=300)
        assert response.status_code == 200 and "x-workbench-warnings" not in response.headers, response.text


def test_sillytavern_stream_with_dry_and_a_seed(api: str) -> None:
    """DRY with SillyTavern's JSON-string breakers, a fixed seed: the stream equals the whole reply."""
    settings = {"dry_multiplier": 0.8, "seed": 7}
    whole = httpx.post(api + "/v1/completions", json=sillytavern_body(api, **settings), timeout=300)
    assert whole.status_code == 200 and "x-workbench-warnings" not in whole.headers, whole.text
    _, streamed = st_stream_text(api, sillytavern_body(api, stream=True, **settings))
    assert streamed == whole.json()["choices"][0]["text"]


@pytest.mark.parametrize("breakers", ['["\\n", ":", "\\"", "*"]', '"\\n", ":", "\\"", "*"', ["\n", ":", '"', "*"],
                                      ""])
def test_dry_sequence_breakers_in_every_form(api: str, breakers: Any) -> None:
    """SillyTavern's JSON text, text-generation-webui's own form (its default, without brackets), a list."""
    body = {"prompt": "Hello", "max_tokens": 4, "dry_multiplier": 0.8, "dry_sequence_breakers": breakers}
    response = httpx.post(api + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200 and "x-workbench-warnings" not in response.headers, response.text


def test_other_backends_fields_are_reported_when_they_would_matter(api: str) -> None:
    """A knob we lack that is switched on, or one knob given two different values under two names, comes back
    as ignored; at its off value it is accepted without a word."""
    quiet = httpx.post(api + "/v1/completions", timeout=120,
                       json={"prompt": "Hi", "max_tokens": 2, "min_length": 0, "skew": 0, "rep_pen": 1.1,
                             "repetition_penalty": 1.1, "api_type": "ooba", "truncation_length": 4096})
    assert quiet.status_code == 200 and "x-workbench-warnings" not in quiet.headers
    loud = httpx.post(api + "/v1/completions", timeout=120,
                      json={"prompt": "Hi", "max_tokens": 2, "min_length": 20, "rep_pen": 1.5,
                            "repetition_penalty": 1.1})
    assert loud.status_code == 200
    assert "min_length" in loud.headers["x-workbench-warnings"] and "rep_pen" in loud.headers["x-workbench-warnings"]


@pytest.mark.parametrize(("field", "value", "param"), [
    ("top_k", "40", "top_k"), ("rep_pen", "1.2", "repetition_penalty"), ("typical", True, "typical_p"),
    ("dry_sequence_breakers", "\\n, :", "dry_sequence_breakers"),
    ("dry_sequence_breakers", "[1, 2]", "dry_sequence_breakers"),
    ("custom_token_bans", "7, eight", "custom_token_bans"),
    ("sampler_priority", "top_k\nbogus", "sampler_priority"),
])
def test_bad_values_are_clear_400s(api: str, field: str, value: Any, param: str) -> None:
    """Strict typing stays ("40" is not 40), under other backends' names too (the error names our knob); a
    malformed text form is refused naming the field."""
    response = httpx.post(api + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, field: value}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error


# --- text-generation-webui's own clients ----------------------------------------------------------------------------
def test_text_generation_webui_documented_requests(api: str) -> None:
    """The examples of text-generation-webui's API documentation, with the text forms of its presets
    (sampler_priority one per line, DRY breakers without brackets, token bans as text)."""
    preset_forms = {
        "sampler_priority": "repetition_penalty\npresence_penalty\nfrequency_penalty\ndry\ntop_n_sigma\ntemperature\n"
                            "dynamic_temperature\nquadratic_sampling\ntop_k\ntop_p\ntypical_p\nepsilon_cutoff\n"
                            "eta_cutoff\ntfs\ntop_a\nmin_p\nadaptive_p\nmirostat\nxtc\nencoder_repetition_penalty\n"
                            "no_repeat_ngram",
        "dry_sequence_breakers": '"\\n", ":", "\\"", "*"', "custom_token_bans": "", "seed": -1,
        "truncation_length": 0, "max_tokens_second": 0, "auto_max_new_tokens": False, "static_cache": False,
        "adaptive_target": 0, "adaptive_decay": 0.9, "prompt_lookup_num_tokens": 0,
    }
    body = {"prompt": "This is a cake recipe:\n\n1.", "max_tokens": 20, "temperature": 0.6, "top_p": 0.95,
            "top_k": 20, "stream": True, **preset_forms}
    text = ""
    with httpx.stream("POST", api + "/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200 and "x-workbench-warnings" not in response.headers
        for line in response.iter_lines():  # the documentation's sseclient loop
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text.strip()
    chat = httpx.post(api + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": FRANCE}], "mode": "instruct", "temperature": 0.6, "top_p": 0.95,
        "top_k": 20, "max_tokens": 30, **preset_forms})
    assert chat.status_code == 200 and "x-workbench-warnings" not in chat.headers, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


def test_a_text_generation_webui_preset_file_loads(tmp_path: Path) -> None:
    """A preset as text-generation-webui writes it (its text forms) loads: GenerationParams' validators read
    them, for presets and the API alike."""
    from modules.presets import load_preset

    (tmp_path / "Ooba.yaml").write_text(
        'temperature: 0.7\nmin_p: 0.05\ndry_multiplier: 0.8\ndry_sequence_breakers: \'"\\n", ":", "\\"", "*"\'\n'
        "sampler_priority: |-\n  dry\n  min_p\n  adaptive_p\n  temperature\ncustom_token_bans: '13, 42'\n")
    params = load_preset(tmp_path, "Ooba")
    assert params.dry_sequence_breakers == ["\n", ":", '"', "*"]
    assert params.sampler_priority[:3] == ["dry", "min_p", "temperature"]
    assert "adaptive_p" not in params.sampler_priority
    assert params.custom_token_bans == [13, 42]


# --- Anthropic: prefill and count_tokens ---------------------------------------------------------------------------
def test_anthropic_prefill_continues_the_assistant_text(api: str, claude: anthropic.Anthropic) -> None:
    """The reply continues "The capital of France is" (it does not repeat it, nor start a new turn); the prompt
    holds the prefill open: it is longer than the prompt without it by exactly the prefill's tokens."""
    question = {"role": "user", "content": "What is the capital of France?"}
    prefill = {"role": "assistant", "content": "The capital of France is"}
    reply = claude.messages.create(model=MODEL, max_tokens=12, messages=[question, prefill], extra_body=GREEDY)
    text = reply.content[0].text
    assert "Paris" in text and "capital" not in text
    assert reply.stop_reason == "end_turn"
    opened = claude.messages.count_tokens(model=MODEL, messages=[question, prefill]).input_tokens
    fresh = claude.messages.count_tokens(model=MODEL, messages=[question]).input_tokens
    assert opened - fresh == len(token_ids(api, prefill["content"]))
    assert reply.usage.input_tokens == opened
    with claude.messages.stream(model=MODEL, max_tokens=12, messages=[question, prefill], extra_body=GREEDY) as s:
        assert s.get_final_text() == text


TOOL = {"name": "get_weather", "description": "Current weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"], "additionalProperties": False}}


def test_anthropic_count_tokens_equals_the_usage(claude: anthropic.Anthropic) -> None:
    request = {"model": MODEL, "system": "You are a geography teacher.",
               "messages": [{"role": "user", "content": FRANCE}]}
    plain = claude.messages.count_tokens(**request).input_tokens
    assert plain == claude.messages.create(**request, max_tokens=4).usage.input_tokens
    with_tools = claude.messages.count_tokens(**request, tools=[TOOL]).input_tokens
    assert with_tools > plain + 10  # the tools are part of the prompt
    assert with_tools == claude.messages.create(**request, tools=[TOOL], max_tokens=4).usage.input_tokens
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=MODEL, messages=[])


# --- streamed tool calls --------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                            "parameters": TOOL["input_schema"]}}
IN_ROME = [{"role": "user", "content": "What is the weather in Rome?"}]


def test_openai_stream_passes_tool_arguments_as_they_are_written(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, messages=IN_ROME, tools=[WEATHER], tool_choice="required", max_tokens=60,
                   temperature=0)
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_completion().choices[0]
    first = next(e.chunk.choices[0].delta.tool_calls[0] for e in events
                 if e.type == "chunk" and e.chunk.choices and e.chunk.choices[0].delta.tool_calls)
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == ""
    pieces = [e.arguments_delta for e in events
              if e.type == "tool_calls.function.arguments.delta" and e.arguments_delta]
    assert len(pieces) > 1
    assert json.loads("".join(pieces)) == json.loads(whole.function.arguments)
    assert final.finish_reason == "tool_calls" and final.message.tool_calls[0].id == first.id
    assert not final.message.content


#: The starter does not call tools by itself: this grammar makes it say a sentence, then call get_weather.
SAY_THEN_CALL = ('root ::= "Let me check the weather.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", '
                 '\\"arguments\\": {\\"city\\": \\"Rome\\"}}\\n</tool_call>"')


def test_a_reply_with_calls_gives_the_logprobs_of_its_text_alone(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, messages=IN_ROME, tools=[WEATHER], max_tokens=60, temperature=0, logprobs=True,
                   top_logprobs=1, extra_body={"grammar_string": SAY_THEN_CALL})
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check the weather."
    assert json.loads(whole.message.tool_calls[0].function.arguments) == {"city": "Rome"}
    tokens = [item.token for item in whole.logprobs.content]
    assert "".join(tokens).strip() == whole.message.content  # none of the call's markup
    streamed = [item.token for chunk in client.chat.completions.create(**request, stream=True)
                for choice in chunk.choices if choice.logprobs and choice.logprobs.content
                for item in choice.logprobs.content]
    assert streamed == tokens


def test_anthropic_stream_passes_tool_input_as_it_is_written(claude: anthropic.Anthropic) -> None:
    request = dict(model=MODEL, max_tokens=60, tools=[TOOL], tool_choice={"type": "any"}, extra_body=GREEDY,
                   messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    whole = next(b for b in claude.messages.create(**request).content if b.type == "tool_use")
    with claude.messages.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["tool_use"] and starts[0].input == {} and starts[0].name == "get_weather"
    pieces = [e.partial_json for e in events if e.type == "input_json"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == whole.input
    assert final.stop_reason == "tool_use" and final.content[0].input == whole.input


# --- the formats models write calls in, read while they are written ----------------------------------------------
NAMES = {"get_weather", "add"}
REPLIES = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "add", "arguments": {}}]',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo \\"centre\\""}}',
    "function_tag": 'Sure. <function=get_weather>{"city": "Lima"}</function>',
    "openai_json": 'Here:\n```json\n{"type": "function", "function": {"name": "add", "arguments": {"a": 3}}}\n```',
    "bare_json": '{"name": "get_weather", "arguments": {"city": "Kyiv"}}',
}


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_tool_call_formats_read_as_they_are_written(fmt: str) -> None:
    """Scanning every prefix of a reply: the text before the calls is released and never any markup; each call's
    arguments only grow, and in the end they parse to the finished reply's arguments."""
    reply = REPLIES[fmt]
    content, calls = parse_tool_calls(reply, NAMES)
    assert calls, fmt
    shown, arguments = 0, {}
    for end in range(1, len(reply) + 1):
        scan = scan_reply(reply[:end], NAMES)
        assert scan.content_end >= shown or scan.calls
        shown = max(shown, scan.content_end)
        for index, draft in enumerate(scan.calls):
            if draft.streams:
                assert draft.arguments.startswith(arguments.get(index, ""))
                arguments[index] = draft.arguments
    assert reply[:shown] == content
    assert [json.loads(arguments[i]) for i in range(len(calls))] == \
        [json.loads(c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("reply", ["No call here [1], {\"x\": 1}, [citation] <b>bold</b> `code` {braces}.",
                                   '{"name": "unknown_function", "arguments": {"city": "Paris"}}',
                                   "```python\nprint([1, 2])\n```"])
def test_text_that_only_looks_like_a_call_is_content(reply: str) -> None:
    assert parse_tool_calls(reply, NAMES) == (reply, [])
    assert scan_reply(reply, NAMES, final=True).content_end == len(reply)
