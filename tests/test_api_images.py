"""Images on the one chat path (issue 14): image_url content parts with base64 data URLs reach a vision-language
model through the Transformers loader (AutoModelForImageTextToText and its processor), with the official openai
client; a text-only model (the starter) and URLs the server would have to fetch are refused with a clear 400.

The vision model is a tiny random-weight Idefics3 made on the fly (tests/vision_helpers.py): its answers are noise,
so the tests check what the plumbing must do: the image's tokens are in the prompt (its token count grows by
them), generation runs, and the image reaches the model (another image changes the first token's log-probability,
the same image does not)."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from api_helpers import models_folder, server_settings, serving_api
from modules.chat.request import ChatRequest, prepare_chat
from modules.errors import ImagesUnsupported, InvalidInput
from modules.model_manager import ModelManager
from modules.services import Services
from vision_helpers import IMAGE_SEQ_LEN, check_images_counted_and_fitted, image_part, make_tiny_vlm, png_data_url

VLM = "tiny-vlm"
TEXT_ONLY = "starter.gguf"
RED, BLUE = png_data_url((255, 0, 0)), png_data_url((0, 0, 255))
QUESTION = "What is in this picture?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path):
    folder = tmp_path_factory.mktemp("images")
    vlm = make_tiny_vlm(folder / "vlm", starter_hf)
    models = models_folder(folder, {VLM: vlm, TEXT_ONLY: starter_gguf})
    manager = ModelManager(models, folder / "loras", max_models=2)
    manager.load(TEXT_ONLY, options={"n_ctx": 2048})
    manager.load(VLM, options={"parallel": 2})
    yield Services(settings=server_settings(models, folder), manager=manager)
    manager.unload(VLM)
    manager.unload(TEXT_ONLY)


@pytest.fixture(scope="module")
def client(services: Services):
    with serving_api(services) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(*parts: dict | str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def prepared(services: Services, messages: list[dict], model: str = VLM):
    params = services.default_params(model).model_copy(update={"max_new_tokens": 4})
    return prepare_chat(services, ChatRequest(messages=messages, chat=services.settings.chat, params=params,
                                              model=model))


# --- the core -------------------------------------------------------------------------------------------------------
def test_each_image_becomes_its_tokens_in_the_prompt(services: Services) -> None:
    model = services.manager.require_model(VLM)
    text = prepared(services, ask(QUESTION))
    one = prepared(services, ask(QUESTION, image_part(RED)))
    two = prepared(services, ask(image_part(RED), QUESTION, image_part(BLUE)))
    assert text.images == () and len(one.images) == 1 and len(two.images) == 2
    assert one.prompt.count(model.image_marker) == 1 and two.prompt.count(model.image_marker) == 2
    image_token = model.tokenizer.convert_tokens_to_ids(model.image_marker)
    ids = model.encode_images(two.model_prompt).ids
    assert ids.count(image_token) == 2 * IMAGE_SEQ_LEN
    count = services.manager.prompt_token_count
    assert count(one.model_prompt, one.params, model=VLM) >= count(text.prompt, text.params, model=VLM) + IMAGE_SEQ_LEN


def test_the_starter_and_bad_images_are_refused_before_anything_runs(services: Services) -> None:
    with pytest.raises(ImagesUnsupported, match="reads no images"):
        prepared(services, ask(QUESTION, image_part(RED)), model=TEXT_ONLY)
    with pytest.raises(InvalidInput, match="does not fetch images"):
        prepared(services, ask(QUESTION, image_part("https://example.com/cat.png")))
    with pytest.raises(InvalidInput, match="could not be read"):
        prepared(services, ask(QUESTION, image_part("data:image/png;base64,aGVsbG8=")))
    with pytest.raises(InvalidInput, match="stands for an image"):
        prepared(services, ask("Look: <image>", image_part(RED)))


def test_turns_left_out_to_fit_take_their_images_with_them(services: Services) -> None:
    model = services.manager.require_model(VLM)
    chat = services.settings.chat.model_copy(update={"truncation_length": 300})
    messages = [*ask("An old picture " + "word " * 400, image_part(RED)),
                {"role": "assistant", "content": "I see it."}, *ask(QUESTION, image_part(BLUE))]
    params = services.default_params(VLM).model_copy(update={"max_new_tokens": 4})
    result = prepare_chat(services, ChatRequest(messages=messages, chat=chat, params=params, model=VLM))
    assert result.dropped_messages >= 1 and "An old picture" not in result.prompt
    assert result.prompt.count(model.image_marker) == 1
    assert [image.data for image in result.images] == [prepared(services, ask(image_part(BLUE))).images[0].data]


def test_the_context_is_fitted_with_each_image_counted_as_its_tokens(services: Services) -> None:
    check_images_counted_and_fitted(services, VLM, RED, BLUE)


# --- the API, with the official client --------------------------------------------------------------------------------
def test_a_chat_with_an_image_is_answered_and_counts_the_images_tokens(services: Services,
                                                                        client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=VLM, messages=ask(QUESTION), max_tokens=4, temperature=0)
    seen = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(RED)), max_tokens=4,
                                          temperature=0)
    assert seen.usage.prompt_tokens >= plain.usage.prompt_tokens + IMAGE_SEQ_LEN
    assert seen.usage.prompt_tokens == prepared(services, ask(QUESTION, image_part(RED))).prompt_tokens  # one count
    assert seen.usage.completion_tokens > 0 and seen.choices[0].message.content


def test_the_image_reaches_the_model(client: openai.OpenAI) -> None:
    def first_logprob(url: str) -> float:
        reply = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(url)), max_tokens=1,
                                               temperature=0, logprobs=True, top_logprobs=1)
        return reply.choices[0].logprobs.content[0].logprob

    red = first_logprob(RED)
    assert first_logprob(RED) == red  # the same image, the same numbers
    assert first_logprob(BLUE) != red


def test_a_streamed_chat_with_an_image(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(BLUE)), max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens > IMAGE_SEQ_LEN


def test_a_text_only_model_answers_an_image_with_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TEXT_ONLY, messages=ask(QUESTION, image_part(RED)), max_tokens=4)
    assert caught.value.status_code == 400
    assert caught.value.code == "images_unsupported" and caught.value.param == "messages"
    assert "reads no images" in caught.value.message
    reply = client.chat.completions.create(model=TEXT_ONLY, messages=ask(QUESTION), max_tokens=4)  # text still works
    assert reply.choices[0].message.content is not None


def test_an_image_url_the_server_would_fetch_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not fetch images") as caught:
        client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part("http://127.0.0.1:1/x.png")),
                                       max_tokens=4)
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part("data:image/png,rawbytes")),
                                       max_tokens=4)


def test_an_image_block_through_the_anthropic_sdk(services: Services, client: openai.OpenAI) -> None:
    import anthropic

    claude = anthropic.Anthropic(base_url=str(client.base_url).removesuffix("/v1/"), api_key="unused", max_retries=0,
                                 timeout=300)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED.split(",", 1)[1]}}
    plain = claude.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": QUESTION}])
    seen = claude.messages.create(model=VLM, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, block]}])
    assert seen.usage.input_tokens >= plain.usage.input_tokens + IMAGE_SEQ_LEN
    with pytest.raises(anthropic.BadRequestError, match="reads no images"):
        claude.messages.create(model=TEXT_ONLY, max_tokens=4, messages=[{"role": "user", "content": [block]}])
    with pytest.raises(anthropic.BadRequestError, match="does not fetch"):
        claude.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])


# --- the Responses API: input_image and input_file parts take the same path ------------------------------------------
FACT = "The lighthouse keeper on Varnholm island is called Edda Quist."


def said(*parts: dict | str) -> list[dict]:
    """A Responses API input: one user message of input_text / input_image / input_file parts."""
    return [{"role": "user", "content": [{"type": "input_text", "text": p} if isinstance(p, str) else p
                                         for p in parts]}]


def test_responses_read_an_input_image_as_its_image_tokens(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=VLM, input=said(QUESTION), max_output_tokens=4, temperature=0)
    seen = client.responses.create(model=VLM, input=said(QUESTION, {"type": "input_image", "image_url": RED,
                                                                    "detail": "auto"}),
                                   max_output_tokens=4, temperature=0)
    assert seen.usage.input_tokens >= plain.usage.input_tokens + IMAGE_SEQ_LEN
    assert seen.status in ("completed", "incomplete") and seen.usage.output_tokens > 0
    chat = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(RED)), max_tokens=4,
                                          temperature=0)
    assert seen.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt as the chat route's


def test_responses_refuse_an_input_image_on_a_text_only_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="reads no images") as caught:
        client.responses.create(model=TEXT_ONLY, input=said(QUESTION, {"type": "input_image", "image_url": RED}),
                                max_output_tokens=4)
    assert caught.value.status_code == 400 and caught.value.code == "images_unsupported"
    assert caught.value.param == "input"


def test_responses_read_an_input_file_into_the_prompt(services: Services, client: openai.OpenAI) -> None:
    import base64

    question = "Who keeps the lighthouse on Varnholm?"
    data = "data:text/plain;base64," + base64.b64encode(FACT.encode()).decode()
    plain = client.responses.create(model=TEXT_ONLY, input=said(question), max_output_tokens=8, temperature=0)
    read = client.responses.create(model=TEXT_ONLY, input=said(
        {"type": "input_file", "filename": "keepers.txt", "file_data": data}, question),
        max_output_tokens=8, temperature=0)
    fact_tokens = len(services.manager.require_model(TEXT_ONLY).encode(FACT))
    assert read.usage.input_tokens >= plain.usage.input_tokens + fact_tokens
    chat = client.chat.completions.create(model=TEXT_ONLY, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "file", "file": {"filename": "keepers.txt", "file_data": data}},
                                     {"type": "text", "text": question}]}])
    assert read.usage.input_tokens == chat.usage.prompt_tokens  # the file's block, as the chat route writes it
    assert read.output_text == chat.choices[0].message.content
