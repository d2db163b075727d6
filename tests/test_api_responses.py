"""POST /v1/responses (OpenAI's Responses API) through the official `openai` client against a real server with the
starter model: text, instructions, a conversation continued by previous_response_id, the streaming helper's
events, a function tool round trip, the model's thinking as a reasoning item (streamed as reasoning_text events;
passed back as input, it reaches only templates that render it), reasoning.effort, output_text logprobs; and the
bounded store that keeps responses.

The starter model does not think: a grammar makes it write a <think> block and then an answer."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from api_helpers import loaded_manager, models_folder, server_settings, serving_extensions
from conftest import FRANCE
from extensions.openai.responses_store import ResponseStore, StoredResponse
from modules.services import Services
from modules.starter import STARTER_GGUF
from test_chat_reasoning import THINK_GRAMMAR, THINKING_TEMPLATE

MODEL = STARTER_GGUF
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
FORCE_WEATHER = {"type": "function", "name": "get_weather"}
THINKS = {"grammar_string": THINK_GRAMMAR, "temperature": 0}
LOGPROBS = ["message.output_text.logprobs"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """The base URL of a server with the starter GGUF loaded."""
    folder = tmp_path_factory.mktemp("responses")
    models = models_folder(folder, {MODEL: starter_gguf})
    manager = loaded_manager(models, folder, MODEL, n_ctx=2048)
    settings = server_settings(models, folder, extensions=["openai"],
                               extension_params={"openai": {"allow_template_str": True}})
    with serving_extensions(Services(settings=settings, manager=manager)) as url:
        yield url
    manager.unload()


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=300)


# --- text ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_text_reply_and_its_stored_copy(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=40)
    assert "Paris" in reply.output_text
    assert reply.status == "completed" and reply.object == "response" and reply.model == MODEL
    assert [item.type for item in reply.output] == ["message"] and reply.output[0].role == "assistant"
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 40
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.usage.output_tokens_details.reasoning_tokens == 0
    assert reply.output[0].content[0].logprobs == []  # not asked for
    assert client.responses.retrieve(reply.id).output_text == reply.output_text
    as_items = client.responses.create(model=MODEL, temperature=0, max_output_tokens=40, input=[
        {"role": "user", "content": [{"type": "input_text", "text": FRANCE}]}])
    assert as_items.output_text == reply.output_text  # the same conversation, sent as a message item
    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)


@pytest.mark.slow
def test_instructions_steer_the_reply(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=30)
    french = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=30,
                                     instructions="Always answer in French.")
    assert french.instructions == "Always answer in French."
    words = {"le", "la", "les", "de", "du", "est", "et"}
    assert words & set(french.output_text.lower().replace(",", " ").split())
    assert not words & set(plain.output_text.lower().replace(",", " ").split())


@pytest.mark.slow
def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Alice. Please remember it.", temperature=0,
                                    max_output_tokens=30)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=30)
    assert "Alice" in second.output_text and second.previous_response_id == first.id
    # the earlier prompt and its reply are in the new prompt
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    alone = client.responses.create(model=MODEL, input="What is my name?", temperature=0, max_output_tokens=30)
    assert "Alice" not in alone.output_text
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="Go on.", previous_response_id="resp_nobody_made_this")
    assert info.value.body["code"] == "previous_response_not_found"
    assert info.value.body["param"] == "previous_response_id"
    unkept = client.responses.create(model=MODEL, input="Hello.", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Go on.", previous_response_id=unkept.id)


@pytest.mark.slow
def test_a_reply_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    story = dict(model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=8, temperature=0)
    cut = client.responses.create(**story)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 8 and cut.output_text
    with client.responses.stream(**story) as stream:
        kinds = [event.type for event in stream]
    assert kinds[-1] == "response.incomplete" and "response.completed" not in kinds


@pytest.mark.slow
def test_text_format_json_schema_parses_into_the_clients_model(client: openai.OpenAI) -> None:
    class City(BaseModel):
        city: str = Field(max_length=20)
        country: str = Field(max_length=20)

    reply = client.responses.parse(model=MODEL, input="Name the capital of France as JSON.", text_format=City,
                                   temperature=0, max_output_tokens=60)
    assert isinstance(reply.output_parsed, City) and reply.output_parsed.city == "Paris"


@pytest.mark.slow
def test_model_routing_is_the_chat_routes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="no-such-model", input="Hi")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.slow
def test_truncation_auto_leaves_out_the_oldest_turns(client: openai.OpenAI) -> None:
    """A conversation longer than the context (2048 tokens) is refused by default, as OpenAI does; with
    truncation "auto" its oldest turns are left out and the last question is answered."""
    turns = []
    for number in range(40):
        turns += [{"role": "user", "content": f"Tell me fact number {number} about the history of the Roman Empire."},
                  {"role": "assistant", "content": "The Roman Empire was founded in 27 BC, when Augustus became the "
                                                   "first emperor, and its western half ended in 476 AD."}]
    long = [*turns, {"role": "user", "content": FRANCE}]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=long, temperature=0, max_output_tokens=30)
    assert info.value.body["code"] == "context_length_exceeded"
    reply = client.responses.create(model=MODEL, input=long, temperature=0, max_output_tokens=30, truncation="auto")
    assert "Paris" in reply.output_text and reply.truncation == "auto"
    assert reply.usage.input_tokens + 30 <= 2048


# --- streaming ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_stream_helper_adds_up_to_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert "Paris" in final.output_text and final.status == "completed"
    assert [e.text for e in events if e.type == "response.output_text.done"] == [final.output_text]
    assert client.responses.retrieve(final.id).output_text == final.output_text  # kept once streamed
    raw = list(client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=40,
                                       stream=True))
    assert [e.sequence_number for e in raw] == list(range(len(raw)))
    assert raw[-1].type == "response.completed" and raw[-1].response.output_text == final.output_text


# --- function tools -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_function_tool_round_trip(client: openai.OpenAI) -> None:
    asked = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice=FORCE_WEATHER, temperature=0, max_output_tokens=40)
    calls = [item for item in asked.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    result = {"type": "function_call_output", "call_id": calls[0].call_id,
              "output": json.dumps({"temperature_c": 21, "sky": "sunny"})}
    answered = client.responses.create(model=MODEL, previous_response_id=asked.id, input=[result],
                                       tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=40)
    assert answered.output_text.strip() and not [i for i in answered.output if i.type == "function_call"]
    # the same turn with the whole conversation sent back as items (the model's call among them)
    resent = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", temperature=0,
                                     max_output_tokens=40, store=False, input=[
                                         {"role": "user", "content": "What is the weather in Paris?"},
                                         *[item.model_dump(exclude_none=True) for item in asked.output], result])
    assert resent.usage.input_tokens == answered.usage.input_tokens and resent.output_text.strip()


@pytest.mark.slow
def test_a_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="What is the weather in Rome?", tools=[WEATHER],
                                 tool_choice="required", temperature=0, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [deltas]
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == deltas and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert not [e for e in events if e.type == "response.output_text.delta"]  # no raw call shown as text


# --- reasoning ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_thinking_comes_back_as_a_reasoning_item(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=80, extra_body=THINKS)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    thinking = reply.output[0]
    assert thinking.summary == [] and [part.type for part in thinking.content] == ["reasoning_text"]
    assert thinking.content[0].text.startswith("The user asks about ") and "think>" not in thinking.content[0].text
    assert reply.output_text.startswith("The capital of France is ") and "think>" not in reply.output_text
    assert 0 < reply.usage.output_tokens_details.reasoning_tokens < reply.usage.output_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}],
                                          max_tokens=80, extra_body=THINKS).choices[0].message
    assert (chat.reasoning_content, chat.content) == (thinking.content[0].text, reply.output_text)  # one path
    kept = client.responses.retrieve(reply.id)
    assert kept.output[0].type == "reasoning" and kept.output[0].content[0].text == thinking.content[0].text


@pytest.mark.slow
def test_a_streamed_reply_sends_its_thinking_as_reasoning_text_events_first(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=80, extra_body=THINKS)
    with client.responses.stream(model=MODEL, input=FRANCE, max_output_tokens=80, extra_body=THINKS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    thinking = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert len(thinking) >= 2  # streamed as it was written, not in one piece at the end
    assert kinds.index("response.output_text.delta") > max(
        i for i, kind in enumerate(kinds) if kind == "response.reasoning_text.delta")
    assert {e.output_index for e in events if e.type == "response.reasoning_text.delta"} == {0}
    done = [e.text for e in events if e.type == "response.reasoning_text.done"]
    assert done == ["".join(thinking)] == [whole.output[0].content[0].text]
    finished = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in finished] == ["reasoning", "message"] and finished[0].status == "completed"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "".join(thinking) and final.output_text == whole.output_text
    assert final.usage.output_tokens_details.reasoning_tokens == whole.usage.output_tokens_details.reasoning_tokens


@pytest.mark.slow
def test_reasoning_effort_reaches_the_chat_template_as_chat_completions_sends_it(client: openai.OpenAI) -> None:
    template = {"instruction_template_str": THINKING_TEMPLATE}

    def input_tokens(**fields) -> int:
        return client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=1, extra_body=template,
                                       **fields).usage.input_tokens

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], max_tokens=1,
                                          extra_body={**template, "reasoning_effort": "high"})
    assert input_tokens(reasoning={"effort": "high"}) == chat.usage.prompt_tokens > input_tokens()
    assert input_tokens(reasoning={"effort": "max"}) > input_tokens()
    assert input_tokens(reasoning={"summary": "auto"}) == input_tokens()  # no effort: the template's own


@pytest.mark.slow
def test_reasoning_items_sent_back_reach_only_templates_that_render_them(client: openai.OpenAI) -> None:
    """A reasoning item (passed back as the SDK gave it, or kept with a response for previous_response_id) is the
    next assistant turn's reasoning_content: the starter's own template leaves it out of the prompt, a template
    that renders earlier thinking (THINKING_TEMPLATE) puts it in."""
    first = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=80, extra_body=THINKS)
    again = {"role": "user", "content": "And of Spain?"}
    sent_back = [{"role": "user", "content": FRANCE}, *[item.model_dump(exclude_none=True) for item in first.output],
                 again]
    without = [item for item in sent_back if item.get("type") != "reasoning"]
    summary_only = [{"type": "reasoning", "id": "rs_1", "summary": [
        {"type": "summary_text", "text": first.output[0].content[0].text}]} if item.get("type") == "reasoning"
        else item for item in sent_back]
    encrypted_only = [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"}
                      if item.get("type") == "reasoning" else item for item in sent_back]

    def input_tokens(template: dict, **fields) -> int:
        return client.responses.create(model=MODEL, max_output_tokens=1, store=False, extra_body=template,
                                       **fields).usage.input_tokens

    for template, renders in (({}, False), ({"instruction_template_str": THINKING_TEMPLATE}, True)):
        plain = input_tokens(template, input=without)
        thought = input_tokens(template, input=sent_back)
        assert (thought > plain) is renders and (thought == plain) is not renders
        assert input_tokens(template, input=summary_only) == thought
        assert input_tokens(template, input=encrypted_only) == plain  # nothing readable in it
        assert input_tokens(template, input=[again], previous_response_id=first.id) == thought


# --- logprobs -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_output_text_logprobs_are_the_chat_completions_ones(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=12, include=LOGPROBS,
                                    top_logprobs=2)
    logprobs = reply.output[0].content[0].logprobs
    assert "".join(item.token for item in logprobs) == reply.output_text
    assert len(logprobs) == reply.usage.output_tokens, reply.usage
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in logprobs)
    assert all(item.top_logprobs[0].logprob >= item.logprob for item in logprobs)
    assert all(bytes(item.bytes).decode() == item.token for item in logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}],
                                          temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    assert [item.token for item in chat.choices[0].logprobs.content] == [item.token for item in logprobs]
    assert reply.top_logprobs == 2
    alone = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=12, top_logprobs=3)
    assert all(len(item.top_logprobs) == 3 for item in alone.output[0].content[0].logprobs)
    included = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=12,
                                       include=LOGPROBS)
    assert [item.top_logprobs for item in included.output[0].content[0].logprobs] == [[]] * len(logprobs)


@pytest.mark.slow
def test_streamed_deltas_carry_their_tokens_logprobs(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=12, include=LOGPROBS,
                                 top_logprobs=2) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all("".join(item.token for item in e.logprobs) == e.delta for e in deltas)
    streamed = [item.token for e in deltas for item in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [item.token for item in done.logprobs] == streamed == [i.token for i in final.output[0].content[0].logprobs]
    assert all(len(item.top_logprobs) == 2 for e in deltas for item in e.logprobs)


@pytest.mark.slow
def test_a_thinking_replys_logprobs_cover_its_answer_only(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input=FRANCE, max_output_tokens=80, include=LOGPROBS,
                                    extra_body=THINKS)
    logprobs = reply.output[1].content[0].logprobs
    assert "".join(item.token for item in logprobs) == reply.output_text
    assert len(logprobs) + reply.usage.output_tokens_details.reasoning_tokens == reply.usage.output_tokens
    with client.responses.stream(model=MODEL, input=FRANCE, max_output_tokens=80, include=LOGPROBS,
                                 extra_body=THINKS) as stream:
        events = list(stream)
    streamed = [item.token for e in events if e.type == "response.output_text.delta" for item in e.logprobs]
    assert streamed == [item.token for item in logprobs]


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input.0.content.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]},
     "input.0.content.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input.0.content.0"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": [{"type": "reasoning", "summary": [], "content": "I think."}]}, "input.0.content"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "output_text", "text": "x"}]}]}, "input.0.summary.0"),
    ({"input": "Hi", "include": ["message.output_text.everything"]}, "include.0"),
    ({"input": "Hi", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "Hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": []}, "input"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice"),
    ({"input": "Hi", "temperature": "hot"}, "temperature"),
])
def test_unsupported_input_is_a_400_naming_the_field(api: str, body: dict, param: str) -> None:
    answer = httpx.post(api + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


# --- the store ----------------------------------------------------------------------------------------------------
def _stored(text: str) -> StoredResponse:
    return StoredResponse({"id": "x"}, [{"role": "user", "content": text}])


def test_the_store_gives_up_its_oldest_responses() -> None:
    store = ResponseStore(max_items=2)
    for ident in ("a", "b", "c"):
        assert store.put(ident, _stored(ident))
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    small = _stored("y" * 100).size
    sized = ResponseStore(max_chars=2 * small)
    assert sized.put("one", _stored("y" * 100)) and sized.put("two", _stored("z" * 100))
    assert sized.put("three", _stored("w" * 100)) and sized.get("one") is None and len(sized) == 2
    assert not sized.put("huge", _stored("h" * 3 * small)) and len(sized) == 2  # larger than the store: not kept
    assert sized.delete("two") and not sized.delete("two")
