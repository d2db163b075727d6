"""Images through the llama.cpp loader (issue 14): a GGUF model with its multimodal projector (mmproj GGUF) beside it
reads image_url parts sent with the official openai client, through llama.cpp's libmtmd in llama-cpp-python.

The model is the tiny random-weight Idefics3 of tests/vision_helpers.py, converted by llama.cpp's own converter into
its text GGUF and its mmproj GGUF (conftest's tiny_vlm_gguf). Its answers are noise, so the tests check what the
plumbing must do: the image's tokens are in the prompt's count, the image reaches the model (another image changes
the first token's log-probability, the same image does not), and text requests before and after one with an image
get the same answer (the image's KV does not linger in the cache the batch decoder reuses)."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest
from api_helpers import models_folder, server_settings, serving_api
from vision_helpers import IMAGE_SEQ_LEN, check_images_counted_and_fitted, image_part, png_data_url

from loaders.base import Capability
from loaders.llama_cpp_loader import LlamaCppLoader
from modules.chat.request import ChatRequest, prepare_chat
from modules.errors import ModelLoadError
from modules.model_manager import ModelManager
from modules.services import Services

VLM = "tiny-vlm"
RED, BLUE = png_data_url((255, 0, 0)), png_data_url((0, 0, 255))
QUESTION = "What is in this picture?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_gguf: Path):
    folder = tmp_path_factory.mktemp("images-llama")
    manager = ModelManager(models_folder(folder, {VLM: tiny_vlm_gguf}), folder / "loras")
    manager.load(VLM, loader="llama.cpp", options={"parallel": 2, "n_ctx": 1024, "n_threads": 1})
    yield Services(settings=server_settings(manager.model_dir, folder), manager=manager)
    manager.unload(VLM)


@pytest.fixture(scope="module")
def client(services: Services):
    with serving_api(services) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(*parts: dict | str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def test_the_projector_beside_the_model_gives_it_vision(services: Services) -> None:
    model = services.manager.require_model(VLM)
    assert Capability.VISION in model.capabilities and model.image_marker
    assert model.info().extra["mmproj"].startswith("mmproj")
    params = services.default_params(VLM).model_copy(update={"max_new_tokens": 4})
    chat = prepare_chat(services, ChatRequest(messages=ask(QUESTION, image_part(RED)), chat=services.settings.chat,
                                              params=params, model=VLM))
    assert chat.prompt.count(model.image_marker) == 1
    vision = model.encode_images(chat.model_prompt)
    # each of the image's tiles (mtmd cuts SmolVLM's image into slices and an overview) is IMAGE_SEQ_LEN tokens
    assert vision.inputs.image_tokens > 0 and vision.inputs.image_tokens % IMAGE_SEQ_LEN == 0
    assert len(vision.ids) == len(vision.inputs.text_ids) + vision.inputs.image_tokens


def test_a_chat_with_an_image_counts_the_images_tokens(services: Services, client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=VLM, messages=ask(QUESTION), max_tokens=4, temperature=0)
    seen = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(RED)), max_tokens=4,
                                          temperature=0)
    model = services.manager.require_model(VLM)
    params = services.default_params(VLM)
    chat = prepare_chat(services, ChatRequest(messages=ask(QUESTION, image_part(RED)), chat=services.settings.chat,
                                              params=params, model=VLM))
    image_tokens = model.encode_images(chat.model_prompt).inputs.image_tokens
    assert seen.usage.prompt_tokens >= plain.usage.prompt_tokens + image_tokens
    assert seen.usage.prompt_tokens == services.manager.prompt_token_count(chat.model_prompt, params, model=VLM)
    assert seen.usage.prompt_tokens == chat.prompt_tokens  # the chat path's own count: each image as its tokens
    assert seen.usage.completion_tokens > 0 and seen.choices[0].message.content


def test_the_context_is_fitted_with_each_image_counted_as_its_tokens(services: Services) -> None:
    check_images_counted_and_fitted(services, VLM, RED, BLUE)


def test_the_image_reaches_the_model(client: openai.OpenAI) -> None:
    def first_logprob(url: str) -> float:
        reply = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(url)), max_tokens=1,
                                               temperature=0, logprobs=True, top_logprobs=1)
        return reply.choices[0].logprobs.content[0].logprob

    red = first_logprob(RED)
    assert first_logprob(RED) == red  # the same image, the same numbers
    assert first_logprob(BLUE) != red


def test_text_replies_are_the_same_before_and_after_an_image(client: openai.OpenAI) -> None:
    def text_reply() -> list[float]:
        reply = client.chat.completions.create(model=VLM, messages=ask(QUESTION), max_tokens=6, temperature=0,
                                               logprobs=True)
        return [entry.logprob for entry in reply.choices[0].logprobs.content]

    before = text_reply()
    streamed = client.chat.completions.create(model=VLM, messages=ask(QUESTION, image_part(BLUE)), max_tokens=4,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[-1].usage.prompt_tokens > IMAGE_SEQ_LEN and chunks[-1].usage.completion_tokens > 0
    assert text_reply() == before


def test_an_mmproj_is_no_model_and_a_named_one_must_exist(tmp_path: Path, tiny_vlm_gguf: Path) -> None:
    mmproj = next(tiny_vlm_gguf.glob("mmproj*.gguf"))
    flat = models_folder(tmp_path, {p.name: p for p in tiny_vlm_gguf.glob("*.gguf")})  # both files in models/
    assert ModelManager(flat, tmp_path / "loras").list_models() == [p.name for p in tiny_vlm_gguf.glob("*.gguf")
                                                                    if p != mmproj]
    options = LlamaCppLoader.parse_options({"n_ctx": 256, "parallel": 1})
    with pytest.raises(ModelLoadError, match="multimodal projector"):
        LlamaCppLoader.load(mmproj, options)
    model_file = next(p for p in tiny_vlm_gguf.glob("*.gguf") if p != mmproj)
    missing = LlamaCppLoader.parse_options({"n_ctx": 256, "parallel": 1, "mmproj": "mmproj-other.gguf"})
    with pytest.raises(ModelLoadError, match="No mmproj file mmproj-other.gguf"):
        LlamaCppLoader.load(model_file, missing)
