"""Reasoning ("thinking") on the one chat path: the splitter that keeps a reply's <think> block apart from its
answer as text arrives (any chunking gives the whole text's split), the template switches (enable_thinking,
reasoning_effort) reaching the template, earlier thinking reaching only templates that render it, and a real reply
of the starter model made to think by a grammar, read back by finish_reply."""
from __future__ import annotations

import random

import pytest

from modules.chat.reasoning import ReasoningSplitter, prompt_opens_thinking, split_reasoning
from modules.chat.request import ChatRequest, finish_reply, prepare_chat

#: The starter model does not think: this grammar makes it write a thinking block, then an answer.
THINK_GRAMMAR = ('root ::= "<think>\\nThe user asks about " [a-z ]{3,40} "\\n</think>\\n\\n" '
                 '"The capital of France is " [A-Z] [a-z]{2,12} "."')

#: A template in the style of Qwen3's: it reads enable_thinking, renders earlier replies' reasoning_content and,
#: with thinking on, opens the thinking in the generation prompt.
THINKING_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}
{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}
{%- elif enable_thinking is defined %}{{- '<think>\\n' }}{%- endif %}
{%- if reasoning_effort is defined %}{{- '[effort: ' + reasoning_effort + ']' }}{%- endif %}
{%- endif %}
"""

SAMPLES = [
    "<think>\nI ponder 2 + 2.\n</think>\n\nThe answer is 4.",
    "  <thinking>a b </thinking>ok then",
    "[THINK]short[/THINK]\nAnswer.",
    "<think>cut off in the middle of a tho",
    "<think></think>Nothing thought.",
    "Hello <think>this is text</think> world",
    "Plain answer, no thinking at all.",
    "<thi",
    "",
    "<think>\nA < B and </thin is not the end\n</think>Done",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_streaming_splitter_agrees_with_the_whole_text_in_any_chunking(text: str) -> None:
    whole = split_reasoning(text)
    rng = random.Random(text)
    chunkings = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        chunkings.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    for chunks in chunkings:
        splitter = ReasoningSplitter()
        pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)] + splitter.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        content = "".join(t for kind, t in pieces if kind == "content")
        assert (reasoning, content) == (whole.reasoning or "", whole.content), chunks


def test_what_is_thinking_and_what_is_answer() -> None:
    first = split_reasoning(SAMPLES[0])
    assert (first.reasoning, first.content, first.closed) == ("I ponder 2 + 2.", "The answer is 4.", True)
    assert split_reasoning(SAMPLES[1]).reasoning == "a b"
    assert split_reasoning(SAMPLES[2]).content == "Answer."
    cut = split_reasoning(SAMPLES[3])
    assert (cut.reasoning, cut.content, cut.closed) == ("cut off in the middle of a tho", "", False)
    assert split_reasoning(SAMPLES[4]).reasoning == ""
    middle = split_reasoning(SAMPLES[5])  # a tag in the middle of an answer is text
    assert (middle.reasoning, middle.content) == (None, SAMPLES[5])
    assert split_reasoning(SAMPLES[9]).reasoning == "A < B and </thin is not the end"


def test_a_prompt_that_opens_the_thinking_starts_the_reply_inside_it() -> None:
    opened = prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert opened == ("<think>", "</think>")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n") is None
    reply = split_reasoning("Let me see.\n</think>\n\nParis.", opened)
    assert (reply.reasoning, reply.content) == ("Let me see.", "Paris.")
    splitter = ReasoningSplitter(opened)
    assert splitter.feed("Let me") == [("reasoning", "Let me")]
    assert splitter.thinking


def test_the_pieces_arrive_while_the_model_thinks() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<thi") == []
    assert splitter.feed("nk>\nStep one") == [("reasoning", "Step one")]
    assert splitter.feed(", step two </th") == [("reasoning", ", step two")]
    assert splitter.thinking
    assert splitter.feed("ink>\n\nThe ans") == [("content", "The ans")]
    assert not splitter.thinking
    assert splitter.feed("wer.") == [("content", "wer.")]
    assert splitter.finish() == []


# --- on the starter model -------------------------------------------------------------------------------------------
def request(services, messages, **fields) -> ChatRequest:
    name = services.manager.resident().name
    chat = fields.pop("chat", services.settings.chat)
    params = services.default_params(name).model_copy(update=fields.pop("params", {"max_new_tokens": 32}))
    return ChatRequest(messages=messages, chat=chat, params=params, model=name, **fields)


USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_the_thinking_switches_reach_the_template(services) -> None:
    default = prepare_chat(services, request(services, USER, template=THINKING_TEMPLATE))
    assert default.prompt.endswith("<|im_start|>assistant\n")  # "default": the template's own choice
    assert default.thinking_opened is None
    off = prepare_chat(services, request(services, USER, template=THINKING_TEMPLATE,
                                         chat=services.settings.chat.model_copy(update={"enable_thinking": "off"})))
    assert off.prompt.endswith("<think>\n\n</think>\n\n") and off.thinking_opened is None
    on = prepare_chat(services, request(services, USER, template=THINKING_TEMPLATE,
                                        chat=services.settings.chat.model_copy(update={"enable_thinking": "on",
                                                                                       "reasoning_effort": "low"})))
    assert on.prompt.endswith("<think>\n[effort: low]")
    # a request's own variables (the API's chat_template_kwargs) win over the chat settings'
    api = prepare_chat(services, request(services, USER, template=THINKING_TEMPLATE,
                                         chat=services.settings.chat.model_copy(update={"enable_thinking": "off"}),
                                         template_variables={"enable_thinking": True}))
    assert api.prompt.endswith("<think>\n") and api.thinking_opened == ("<think>", "</think>")


@pytest.mark.slow
def test_earlier_thinking_reaches_only_a_template_that_renders_it(services) -> None:
    history = [*USER, {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital: Paris"},
               {"role": "user", "content": "And of Spain?"}]
    chatml = prepare_chat(services, request(services, history))  # the starter's own template
    assert "Paris." in chatml.prompt and "France's capital" not in chatml.prompt
    thinking = prepare_chat(services, request(services, history, template=THINKING_TEMPLATE))
    assert "<think>\nFrance's capital: Paris\n</think>\n\nParis.<|im_end|>" in thinking.prompt


@pytest.mark.slow
def test_a_reply_that_thinks_comes_back_as_reasoning_and_answer(services) -> None:
    prepared = prepare_chat(services, request(services, USER, params={
        "grammar_string": THINK_GRAMMAR, "max_new_tokens": 80, "temperature": 0}))
    text = "".join(chunk.text for chunk in prepared.generate(services.manager))
    assert text.startswith("<think>\nThe user asks about ")
    reply = finish_reply(prepared, text)
    assert reply.reasoning.startswith("The user asks about ") and "<think>" not in reply.reasoning
    assert reply.content.startswith("The capital of France is ") and "think>" not in reply.content
    assert reply.shown == reply.content == reply.answer
    # an impersonation is the user's own text: nothing in it is read as thinking
    user = prepare_chat(services, request(services, USER, impersonate=True))
    assert finish_reply(user, text).reasoning is None
