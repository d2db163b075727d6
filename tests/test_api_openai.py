"""The OpenAI-compatible API through real clients (openai sync and async, LangChain, raw httpx) against the starter
model on a real server; the Anthropic Messages route, embeddings, internal routes and /predict."""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from api_helpers import loaded_manager, models_folder, server_settings, serving_extensions
from conftest import FRANCE
from modules.services import Services
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow  # a served model answering real clients: each test generates, most for seconds

MODEL = STARTER_GGUF
OTHER = "other-copy.gguf"  # listed in models/ but not loaded


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """(base URL, the Services behind it)."""
    folder = tmp_path_factory.mktemp("api")
    models = models_folder(folder, {MODEL: starter_gguf, OTHER: starter_gguf})
    manager = loaded_manager(models, folder, MODEL, n_ctx=2048)
    services = Services(settings=server_settings(models, folder, extensions=["openai"]), manager=manager)
    with serving_extensions(services) as url:
        yield url, services
    manager.unload()


def ask(question: str = FRANCE) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# --- models ------------------------------------------------------------------------------------------------------
def test_models_lists_the_loaded_model_first(client: openai.OpenAI) -> None:
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == MODEL and OTHER in ids
    assert models[0].resident is True and models[ids.index(OTHER)].resident is False
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_model_that_is_not_loaded_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=OTHER, messages=ask(), max_tokens=4)
    assert "not loaded" in info.value.body["message"]


# --- chat ---------------------------------------------------------------------------------------------------------
def test_chat_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=30, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 30
    assert reply.model == MODEL


def test_the_chat_settings_stopping_strings_end_api_replies(served, client: openai.OpenAI) -> None:
    """chat.custom_stopping_strings (the Chat tab's setting) end an API reply too: the chat path is one."""
    services = served[1]
    before = services.settings.chat
    services.settings.chat = before.model_copy(update={"custom_stopping_strings": ["Paris"]})
    try:
        cut = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=30, temperature=0)
    finally:
        services.settings.chat = before
    whole = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=30, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    assert whole.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert "Paris" not in cut.choices[0].message.content and cut.usage.completion_tokens < 30


def test_chat_stream_equals_the_whole_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_async_client_streams_and_completes(api: str) -> None:
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=300)
        reply = await client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=20, temperature=0)
        stream = await client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                                 temperature=0, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        await client.close()
        return reply.choices[0].message.content, streamed

    chat, streamed = asyncio.run(run())
    assert "Paris" in chat and "Paris" in streamed


def test_max_tokens_stop_and_max_completion_tokens(client: openai.OpenAI) -> None:
    long = client.chat.completions.create(model=MODEL, messages=ask("Count from one to fifty in words."),
                                          max_completion_tokens=7, temperature=0, extra_body={"ban_eos_token": True})
    assert long.usage.completion_tokens == 7 and long.choices[0].finish_reason == "length"
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    assert " 7" in full.choices[0].text
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 7"])
    assert cut.choices[0].text == full.choices[0].text.split(" 7")[0]


def test_seed_repeats_and_n_gives_several_choices(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    several = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story."), max_tokens=16, n=2,
                                             temperature=1.0, seed=3)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].message.content != several.choices[1].message.content


def test_extra_knobs_under_text_generation_webui_names(client: openai.OpenAI, api: str) -> None:
    # the settings' preset (Default) has repetition_penalty 1.1: switch it off to compare with Deterministic
    greedy = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=12, temperature=0,
                                       extra_body={"repetition_penalty": 1.0})
    top_k_one = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=12, temperature=1.0, seed=5,
                                          extra_body={"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.0,
                                                      "sampler_priority": ["min_p", "top_k", "temperature"]})
    assert top_k_one.choices[0].text == greedy.choices[0].text
    preset = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=12,
                                       extra_body={"preset": "Deterministic"})
    assert preset.choices[0].text == greedy.choices[0].text
    response = httpx.post(api + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "no_such_knob": 1},
                          timeout=120)
    assert response.status_code == 200 and "no_such_knob" in response.headers["x-workbench-warnings"]


def test_logprobs_and_echo(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    assert "".join(choice.logprobs.tokens) == choice.text[len(prompt):]
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(item.token for item in content) == chat.choices[0].message.content
    assert all(len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.logprob for item in content)


def test_suffix_is_refused_for_a_model_without_fim_tokens(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=4)
    assert info.value.body["param"] == "suffix"


# --- raw SSE ------------------------------------------------------------------------------------------------------
def test_sse_framing(api: str) -> None:
    body = {"model": MODEL, "messages": ask(), "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", api + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        chunk = json.loads(event[len("data: "):])
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"].startswith("chatcmpl-")


# --- structured output and tools ------------------------------------------------------------------------------------
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                          "country": {"type": "string", "enum": ["France", "Italy", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ask("Name the capital of France as JSON."), max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
    loose = client.chat.completions.create(model=MODEL, messages=ask("Describe Paris as a JSON object."),
                                           max_tokens=80, temperature=0, response_format={"type": "json_object"},
                                           extra_body={"ban_eos_token": False})
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages = ask("What is the weather in Paris?")
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40,
                                           temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather"
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=30,
                                            temperature=0, tool_choice="none")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    streamed = list(client.chat.completions.create(
        model=MODEL, messages=ask("What is the weather in Rome?"), tools=[WEATHER_TOOL], max_tokens=40,
        temperature=0, stream=True, tool_choice="required"))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    assert "get_weather" not in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


@pytest.mark.parametrize("question", [FRANCE, "What is the weather in Paris?"])
def test_streamed_reply_with_tools_is_the_whole_reply(client: openai.OpenAI, question: str) -> None:
    """With tool_choice auto the reply may be text or a call: the stream holds back what may be a call, and in the
    end shows what the whole reply shows, text and calls alike, never a call's raw markup."""
    request = dict(model=MODEL, messages=ask(question), tools=[WEATHER_TOOL], max_tokens=40, temperature=0,
                   tool_choice="auto")
    whole = client.chat.completions.create(**request).choices[0]
    streamed = [c for c in client.chat.completions.create(**request, stream=True) if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    calls = [tc.function.name for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == (whole.message.content or "")
    assert calls == [tc.function.name for tc in whole.message.tool_calls or []]
    assert streamed[-1].choices[0].finish_reason == whole.finish_reason
    if calls:
        assert "<tool_call>" not in text and "get_weather" not in text


def test_langchain_chat_openai_answers_and_binds_a_tool(api: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=api + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=30,
                     max_retries=0)
    assert "Paris" in llm.invoke(FRANCE).content

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"Sunny in {city}"

    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str)
    assert get_weather.invoke(reply.tool_calls[0]["args"]).startswith("Sunny in")


# --- Anthropic Messages -----------------------------------------------------------------------------------------------
def test_anthropic_messages(api: str) -> None:
    body = {"model": MODEL, "max_tokens": 30, "temperature": 0, "system": "You are a geography teacher.",
            "messages": [{"role": "user", "content": FRANCE}]}
    reply = httpx.post(api + "/v1/messages", json=body, timeout=120).json()
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert "Paris" in reply["content"][0]["text"] and reply["stop_reason"] == "end_turn"
    assert reply["usage"]["input_tokens"] > 10
    with httpx.stream("POST", api + "/v1/messages", json={**body, "stream": True}, timeout=120) as response:
        events = [line[len("event: "):] for line in response.iter_lines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"] and events[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in events and "content_block_delta" in events
    stopped = httpx.post(api + "/v1/messages", json={**body, "stop_sequences": ["Paris"]}, timeout=120).json()
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "Paris"
    assert "Paris" not in "".join(block.get("text", "") for block in stopped["content"])
    tool = {"name": "get_weather", "description": "Current weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    used = httpx.post(api + "/v1/messages", timeout=120, json={
        "model": MODEL, "max_tokens": 40, "temperature": 0, "tools": [tool],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}).json()
    block = [b for b in used["content"] if b["type"] == "tool_use"][0]
    assert used["stop_reason"] == "tool_use" and block["name"] == "get_weather"
    jsonschema.validate(block["input"], tool["input_schema"])
    with httpx.stream("POST", api + "/v1/messages", timeout=120, json={
            "model": MODEL, "max_tokens": 40, "temperature": 0, "tools": [tool], "stream": True,
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}) as response:
        data = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    starts = [d["content_block"] for d in data if d["type"] == "content_block_start"]
    partial = "".join(d["delta"]["partial_json"] for d in data
                      if d["type"] == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "get_weather"  # no raw call as text
    assert json.loads(partial) == block["input"]  # the streamed call is the whole reply's call
    assert [d["delta"]["stop_reason"] for d in data if d["type"] == "message_delta"] == ["tool_use"]
    answer = httpx.post(api + "/v1/messages", timeout=120, json={
        "model": MODEL, "max_tokens": 20, "temperature": 0, "tools": [tool],
        "messages": [{"role": "user", "content": "What is the weather in Paris?"},
                     {"role": "assistant", "content": used["content"]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                                   "content": "Sunny, 21 C"}]}]})
    assert answer.status_code == 200 and answer.json()["content"]


# --- embeddings -----------------------------------------------------------------------------------------------------
def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    raw = httpx.post(str(client.base_url) + "embeddings", timeout=120,
                     json={"model": "all-MiniLM-L6-v2", "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-5)
    assert floats.usage.prompt_tokens > 10


# --- errors ---------------------------------------------------------------------------------------------------------
def test_errors_are_openai_shaped_never_422(api: str) -> None:
    cases = [
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"messages": ask(), "temperature": 101}, 400, "temperature"),
        ("POST", "/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k"),
        ("POST", "/v1/completions", {"prompt": [10 ** 9]}, 400, "prompt"),
        ("POST", "/v1/internal/decode", {"tokens": [999999]}, 400, "tokens"),
        ("POST", "/v1/internal/model/load", {"model_name": "missing.gguf"}, 404, "model_name"),
        ("GET", "/v1/no/such/route", None, 404, None),
    ]
    for method, path, body, status, param in cases:
        response = httpx.request(method, api + path, json=body, timeout=60)
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (path, error)
    broken = httpx.post(api + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]


def test_cors_is_off_by_default(api: str) -> None:
    response = httpx.get(api + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


# --- internal routes and /predict ---------------------------------------------------------------------------------
def test_internal_routes(api: str) -> None:
    encoded = httpx.post(api + "/v1/internal/encode", json={"text": "Hello world"}).json()
    assert encoded["length"] == len(encoded["tokens"]) == 2
    assert httpx.post(api + "/v1/internal/decode", json={"tokens": encoded["tokens"]}).json()["text"] == "Hello world"
    assert httpx.post(api + "/v1/internal/token-count", json={"text": "Hello world"}).json()["length"] == 2
    info = httpx.get(api + "/v1/internal/model/info").json()
    assert info["model_name"] == MODEL and info["loader"] == "llama.cpp" and "min_p" in info["supported_params"]
    assert "<|im_start|>" in info["chat_template"]
    assert set(httpx.get(api + "/v1/internal/model/list").json()["model_names"]) == {MODEL, OTHER}
    assert httpx.get(api + "/v1/internal/health").json() == {"status": "ok", "model_loaded": True}
    assert httpx.post(api + "/v1/internal/stop-generation").json() == {"status": "ok"}


def test_predict_answers_an_alpaca_instruction(api: str, instruction_data: list[dict]) -> None:
    record = next(r for r in instruction_data if r["input"])
    response = httpx.post(api + "/predict", timeout=120, json={"instruction": record["instruction"],
                                                                "input": record["input"], "max_new_tokens": 30})
    assert response.status_code == 200 and set(response.json()) == {"answer"}
    assert isinstance(response.json()["answer"], str) and response.json()["answer"]
    missing = httpx.post(api + "/predict", json={"input": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "instruction"


def test_jit_loads_the_model_a_request_names(served, client: openai.OpenAI) -> None:
    api, services = served
    params = services.extensions.extensions["openai"].params
    params.jit = True  # what --jit sets
    try:
        reply = client.chat.completions.create(model=OTHER, messages=ask(), max_tokens=4)
        assert reply.model == OTHER and client.models.list().data[0].id == OTHER  # --max-models 1: it replaced
        assert [m["name"] for m in httpx.get(api + "/v1/internal/models").json()["models"]] == [OTHER]
    finally:
        params.jit = False
        httpx.post(api + "/v1/internal/model/load", json={"model_name": MODEL, "args": {"n_ctx": 2048}}, timeout=120)
    assert client.models.list().data[0].id == MODEL


def test_unload_gives_503_and_load_brings_it_back(api: str, client: openai.OpenAI) -> None:
    assert httpx.post(api + "/v1/internal/model/unload", timeout=60).json() == {"status": "ok"}
    with pytest.raises(openai.InternalServerError) as info:  # the client's name for 5xx: here a 503
        client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=4)
    assert info.value.status_code == 503 and info.value.body["code"] == "model_not_loaded"
    assert httpx.get(api + "/v1/internal/health").json()["model_loaded"] is False
    loaded = httpx.post(api + "/v1/internal/model/load", timeout=120,
                        json={"model_name": MODEL, "args": {"n_ctx": 2048}}).json()
    assert loaded["model_name"] == MODEL and loaded["loader"] == "llama.cpp"
    assert client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=4).choices[0].message.content
