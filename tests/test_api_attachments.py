"""Files attached through the API, with the official clients: OpenAI's file content parts (a base64 data URL and
its filename) on /v1/chat/completions and Anthropic's document blocks (base64 or text source) on /v1/messages are
read into text and reach the prompt, counted in the usage; a file too large for the context is a 400 naming its
tokens and the room left; an unreadable one a 400 naming it and why."""
from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest
from api_helpers import loaded_manager, models_folder, server_settings, serving_api
from attachment_files import data_url, make_docx, make_pdf

from modules.chat.attachments import message_text, read_attachment
from modules.services import Services

MODEL = "starter.gguf"
N_CTX = 2048
FACT = "The lighthouse keeper on Varnholm island is called Edda Quist, and the vault code is 4417."
QUESTION = "Who keeps the lighthouse on Varnholm?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    folder = tmp_path_factory.mktemp("api-attachments")
    models = models_folder(folder, {MODEL: starter_gguf})
    manager = loaded_manager(models, folder, MODEL, n_ctx=N_CTX)
    with serving_api(Services(settings=server_settings(models, folder), manager=manager)) as url:
        yield url, manager
    manager.unload()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served[0], api_key="unused", max_retries=0, timeout=300)


def _file_part(name: str, data: bytes, media_type: str) -> dict:
    return {"type": "file", "file": {"filename": name, "file_data": data_url(data, media_type)}}


def _prompt_tokens(client: openai.OpenAI, content) -> int:
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                max_tokens=1, temperature=0)
    return completion.usage.prompt_tokens


def _block_tokens(manager, name: str, data: bytes) -> int:
    """Tokens the file adds to the message: its fenced block and the blank line before the typed text."""
    model = manager.require_model(None)
    return (model.token_count(message_text(QUESTION, [read_attachment(name, data)]))
            - model.token_count(QUESTION))


@pytest.mark.parametrize(("name", "data", "media_type"), [
    ("notes.txt", FACT.encode(), "text/plain"),
    ("notes.pdf", make_pdf([FACT]), "application/pdf"),
    ("notes.docx", make_docx([FACT]), "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
])
def test_a_file_part_reaches_the_prompt(client: openai.OpenAI, served, name: str, data: bytes,
                                        media_type: str) -> None:
    bare = _prompt_tokens(client, [{"type": "text", "text": QUESTION}])
    attached = _prompt_tokens(client, [_file_part(name, data, media_type), {"type": "text", "text": QUESTION}])
    added = _block_tokens(served[1], name, data)
    model = served[1].require_model(None)
    assert added > model.token_count(FACT)
    assert abs(attached - bare - added) <= 2  # the block's tokens, give or take where the text joins


def test_the_model_reads_the_file(client: openai.OpenAI) -> None:
    """The vault code exists only in the file: the starter, forced to write four digits, copies it."""
    completion = client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": [_file_part("vault.txt", FACT.encode(), "text/plain"),
                                               {"type": "text", "text": "What is the vault code?"}]}],
        extra_body={"grammar_string": 'root ::= "The vault code is " [0-9] [0-9] [0-9] [0-9]'})
    assert completion.choices[0].message.content == "The vault code is 4417"


def test_a_file_too_large_for_the_context_is_refused_with_the_numbers(client: openai.OpenAI, served) -> None:
    big = ("lighthouse keeper " * N_CTX).encode()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=64, messages=[
            {"role": "user", "content": [_file_part("big.txt", big, "text/plain"), {"type": "text", "text": "Sum up."}]}])
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded"
    tokens = _block_tokens(served[1], "big.txt", big)
    message = error.body["message"]
    assert "big.txt: " in message and " tokens" in message and f"context is {N_CTX:,} tokens" in message
    named = int(message.split("big.txt: ")[1].split(" tokens")[0].replace(",", ""))
    assert abs(named - tokens) <= 2
    left = int(message.split("only ")[1].split(" are left")[0].replace(",", ""))
    assert 0 < left < N_CTX - 64 < named
    assert "not cut" in message


@pytest.mark.parametrize(("part", "says"), [
    (_file_part("broken.pdf", b"%PDF-1.4 not really", "application/pdf"), "broken.pdf cannot be read"),
    (_file_part("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"), "photo.png is a binary file"),
    ({"type": "file", "file": {"file_id": "file-abc123"}}, "file_id is not supported"),
    ({"type": "file", "file": {"filename": "a.txt", "file_data": "data:text/plain;base64,%%%"}}, "not valid base64"),
])
def test_an_unreadable_file_is_a_400_naming_it(client: openai.OpenAI, part: dict, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}])
    assert says in caught.value.body["message"]
    assert caught.value.body["param"] == "messages.0.content"


def test_anthropic_document_blocks_reach_the_prompt(claude: anthropic.Anthropic, served) -> None:
    def input_tokens(content) -> int:
        message = claude.messages.create(model=MODEL, max_tokens=1,
                                         messages=[{"role": "user", "content": content}])
        return message.usage.input_tokens

    question = {"type": "text", "text": QUESTION}
    bare = input_tokens([question])
    pdf = make_pdf([FACT])
    as_pdf = input_tokens([{"type": "document", "title": "notes.pdf", "source": {
        "type": "base64", "media_type": "application/pdf", "data": data_url(pdf, "x").split(",", 1)[1]}}, question])
    as_text = input_tokens([{"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                            "data": FACT}}, question])
    assert abs(as_pdf - bare - _block_tokens(served[1], "notes.pdf", pdf)) <= 2
    assert abs(as_text - bare - _block_tokens(served[1], "document.txt", FACT.encode())) <= 2
