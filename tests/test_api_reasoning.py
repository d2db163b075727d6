"""Reasoning through the API, with the official clients: a reply that thinks comes back with its thinking apart
from its answer, as message.reasoning_content (and delta.reasoning_content while streaming) from
/v1/chat/completions and as a thinking block from /v1/messages; its logprobs cover the answer's tokens only and
usage counts the thinking's as completion_tokens_details.reasoning_tokens (as /v1/responses does), while
/v1/completions, which does not split, keeps every token; enable_thinking, reasoning_effort, chat_template_kwargs
and Anthropic's thinking switch reach the chat template.

The starter model does not think: a grammar makes it write a <think> block and then an answer."""
from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest

from api_helpers import loaded_manager, models_folder, server_settings, serving_api
from extensions.openai import Params
from modules.services import Services
from test_chat_reasoning import THINK_GRAMMAR, THINKING_TEMPLATE

MODEL = "starter.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
THINKS = {"grammar_string": THINK_GRAMMAR, "temperature": 0}
#: With a template that opens the thinking in the prompt, the reply starts inside it: no opening tag is written.
OPENED_GRAMMAR = ('root ::= "The user asks about " [a-z ]{3,40} "\\n</think>\\n\\n" '
                  '"The capital of France is " [A-Z] [a-z]{2,12} "."')

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    folder = tmp_path_factory.mktemp("reasoning")
    models = models_folder(folder, {MODEL: starter_gguf})
    manager = loaded_manager(models, folder, MODEL, n_ctx=2048)
    with serving_api(Services(settings=server_settings(models, folder), manager=manager),
                     Params(allow_template_str=True)) as url:
        yield url
    manager.unload()


@pytest.fixture(scope="module")
def claude(api: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api, api_key="unused", max_retries=0, timeout=300)


def test_chat_completions_returns_the_thinking_as_reasoning_content(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, extra_body=THINKS)
    message = completion.choices[0].message
    assert message.reasoning_content.startswith("The user asks about ")
    assert "think>" not in message.reasoning_content
    assert message.content.startswith("The capital of France is ") and "think>" not in message.content
    assert completion.choices[0].finish_reason == "stop"


def test_a_streamed_reply_sends_its_thinking_first_as_reasoning_content_deltas(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80,
                                           extra_body=THINKS).choices[0].message
    kinds, reasoning, content = [], "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, stream=True,
                                                extra_body=THINKS):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = getattr(delta, "reasoning_content", None)
        if piece:
            kinds.append("reasoning")
            reasoning += piece
        if delta.content:
            kinds.append("content")
            content += delta.content
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert kinds.count("reasoning") >= 2  # streamed as it was written, not in one piece at the end
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # all thinking before the answer


def test_a_thinking_replys_logprobs_cover_its_answer_and_usage_counts_its_thinking(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, logprobs=True,
                                                top_logprobs=2, extra_body=THINKS)
    choice, usage = completion.choices[0], completion.usage
    logprobs = choice.logprobs.content
    assert choice.message.reasoning_content.startswith("The user asks about ")
    assert "".join(item.token for item in logprobs) == choice.message.content
    assert all(len(item.top_logprobs) == 2 and bytes(item.bytes).decode() == item.token for item in logprobs)
    thinking = usage.completion_tokens_details.reasoning_tokens
    assert thinking > 5  # "<think>", "The user asks about ..." and "</think>" are several tokens
    assert len(logprobs) + thinking == usage.completion_tokens
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=80, top_logprobs=2,
                                       extra_body=THINKS)
    assert thinking == response.usage.output_tokens_details.reasoning_tokens  # one count for both routes
    assert [item.token for item in logprobs] == [item.token for item in response.output[1].content[0].logprobs]


def test_streamed_logprobs_come_with_the_answers_deltas_that_wrote_them(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, logprobs=True,
                                           extra_body=THINKS)
    reasoning, content, streamed, usage = "", "", [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, logprobs=True,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=THINKS):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta, logprobs = chunk.choices[0].delta, chunk.choices[0].logprobs
        tokens = [item.token for item in logprobs.content] if logprobs is not None and logprobs.content else []
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            assert not tokens, delta  # the thinking's tokens are not the answer's
        else:
            assert "".join(tokens) == (delta.content or ""), delta  # each delta with the tokens that wrote it
        content += delta.content or ""
        streamed += tokens
    assert (reasoning, content) == (whole.choices[0].message.reasoning_content, whole.choices[0].message.content)
    assert streamed == [item.token for item in whole.choices[0].logprobs.content]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_a_reply_without_thinking_has_no_reasoning_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                logprobs=True)
    logprobs = completion.choices[0].logprobs.content
    assert getattr(completion.choices[0].message, "reasoning_content", None) is None
    assert "".join(item.token for item in logprobs) == completion.choices[0].message.content
    assert len(logprobs) == completion.usage.completion_tokens
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


def test_completions_keep_every_token_of_a_thinking_text(client: openai.OpenAI) -> None:
    """/v1/completions returns the text as written: the thinking is text there, with its tokens' logprobs."""
    prompt = "Question: What is the capital of France?\nAnswer:"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=80, logprobs=1, extra_body=THINKS)
    choice = completion.choices[0]
    assert choice.text.startswith("<think>\nThe user asks about ")
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == completion.usage.completion_tokens
    assert completion.usage.completion_tokens_details is None
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=80, logprobs=1, stream=True,
                                       extra_body=THINKS)
    streamed = [token for chunk in chunks if chunk.choices[0].finish_reason is None
                for token in chunk.choices[0].logprobs.tokens]
    assert streamed == choice.logprobs.tokens


def test_the_thinking_switches_reach_the_chat_template(client: openai.OpenAI) -> None:
    def prompt_tokens(**body) -> int:
        return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, extra_body={
            "instruction_template_str": THINKING_TEMPLATE, **body}).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(enable_thinking=True) > plain  # "<think>\n" opens the reply
    assert prompt_tokens(enable_thinking=False) > prompt_tokens(enable_thinking=True)  # an empty think block
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == prompt_tokens(enable_thinking=False)
    assert prompt_tokens(reasoning_effort="high") > plain
    with pytest.raises(openai.BadRequestError) as refused:
        prompt_tokens(chat_template_kwargs={"messages": []})
    assert refused.value.body["param"] == "chat_template_kwargs"


def test_a_template_that_opens_the_thinking_gets_it_back_as_reasoning(client: openai.OpenAI) -> None:
    """With enable_thinking the template ends the prompt with <think>: the reply, which writes only the closing
    tag, still comes back split."""
    message = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80, extra_body={
        "instruction_template_str": THINKING_TEMPLATE, "enable_thinking": True, "grammar_string": OPENED_GRAMMAR,
        "temperature": 0}).choices[0].message
    assert message.reasoning_content.startswith("The user asks about ")
    assert message.content.startswith("The capital of France is ")


def test_messages_returns_a_thinking_block_before_the_text(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=80, messages=QUESTION, extra_body=THINKS)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking.startswith("The user asks about ")
    assert message.content[1].text.startswith("The capital of France is ")
    assert message.stop_reason == "end_turn"


def test_a_streamed_message_sends_thinking_deltas_then_the_text(claude: anthropic.Anthropic) -> None:
    deltas: list[str] = []
    with claude.messages.stream(model=MODEL, max_tokens=80, messages=QUESTION, extra_body=THINKS) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.type)
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking.startswith("The user asks about ")
    assert final.content[1].text.startswith("The capital of France is ")
    assert deltas.count("thinking_delta") >= 2
    assert deltas.index("text_delta") > max(i for i, kind in enumerate(deltas) if kind == "thinking_delta")


def test_anthropic_thinking_switch_and_earlier_thinking_reach_the_template(claude: anthropic.Anthropic) -> None:
    def input_tokens(**fields) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=fields.pop("messages", QUESTION),
                                            extra_body={"instruction_template_str": THINKING_TEMPLATE},
                                            **fields).input_tokens

    plain = input_tokens()
    assert input_tokens(thinking={"type": "enabled", "budget_tokens": 1024}) > plain
    assert input_tokens(thinking={"type": "disabled"}) > input_tokens(thinking={"type": "enabled",
                                                                                 "budget_tokens": 1024})
    turns = [*QUESTION, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "France's capital is Paris, a long-known fact.", "signature": ""},
        {"type": "text", "text": "Paris."}]}, {"role": "user", "content": "And of Spain?"}]
    without = [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    assert input_tokens(messages=turns) > input_tokens(messages=without)  # this template renders the thinking
