"""The Chat tab's Image button on a llama.cpp vision model, in a real browser (Chromium) against webui.py: the tiny
random-weight VLM of tests/vision_helpers.py converted by llama.cpp's own converter into its GGUF and mmproj GGUF
(conftest's tiny_vlm_gguf), in a model folder of its own, so the llama.cpp loader reads images through libmtmd.

An image attached goes with the message, the reply streams, and re-opening the chat (from Past chats, and in
another page) shows its thumbnail. The status line counts the image as the tokens the projector makes: a context
one token short of a turn's prompt leaves the oldest turn (and its image) out, and the reply still comes."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from ui_helpers import (
    Server,
    Workspace,
    chat_event,
    new_chat,
    open_app,
    open_past_chat,
    pick_image,
    prompt_tokens,
    reply_pieces,
    run_event,
    send,
    set_text,
    tab,
    thumbnail,
    watch_reply,
)
from vision_helpers import IMAGE_SEQ_LEN, make_png

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VLM = "tiny-vlm"
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, tiny_vlm_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-images-llama"))
    (workspace.models / VLM).symlink_to(tiny_vlm_gguf, target_is_directory=True)  # the GGUF with its mmproj
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    server = Server(workspace, model=VLM).start()
    yield server
    server.stop()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    page, errors = open_app(browser, server.url)
    yield page
    page.context.close()
    assert not errors.messages


def max_new_tokens(page: Page, value: int) -> None:
    tab(page, "Parameters")
    set_text(page, "#param-max-new-tokens", str(value))
    tab(page, "Chat")


def test_an_image_goes_with_the_message_the_reply_streams_and_the_chat_keeps_it(browser: Browser, page: Page,
                                                                                tmp_path: Path) -> None:
    max_new_tokens(page, 16)
    new_chat(page)
    bare = prompt_tokens(send(page, QUESTION))

    new_chat(page)
    max_new_tokens(page, 800)  # a long reply (the random model writes noise), to see it arrive in pieces
    red = make_png(tmp_path / "red.png", (255, 0, 0))
    attached = run_event(page, lambda: pick_image(page, red), "#chat-status")
    cost = re.search(r"Attached: 1 image\(s\), (\d+) tokens of the prompt", attached)
    assert cost and int(cost[1]) >= IMAGE_SEQ_LEN, attached  # the projector's tokens, counted before it is sent
    expect(page.locator("#chat-images")).to_contain_text(re.compile(rf"red\.png \(PNG, 40×30, .* · {cost[1]} tokens\)"))
    set_text(page, "#chat-input", QUESTION)
    watch_reply(page)
    status = chat_event(page, lambda: page.click("#chat-send"))
    assert prompt_tokens(status) == bare + int(cost[1]), (bare, status)  # as the waiting list said
    assert re.search(r"reply: [1-9]\d* tokens", status) and "failed" not in status, status
    assert reply_pieces(page) >= 2  # it streamed
    expect(page.locator("#chat-images")).to_be_hidden()  # it went with the message
    expect(thumbnail(page, red)).to_be_visible()

    new_chat(page)  # another chat, then back to this one from Past chats
    expect(thumbnail(page, red)).to_have_count(0)
    open_past_chat(page, QUESTION)
    expect(thumbnail(page, red)).to_be_visible()
    other, _ = open_app(browser, page.url)  # another page opens the latest chat: this one
    try:
        expect(thumbnail(other, red)).to_be_visible()
    finally:
        other.context.close()


def test_a_context_one_token_short_leaves_the_oldest_turn_and_its_image_out(page: Page, tmp_path: Path) -> None:
    max_new_tokens(page, 8)
    new_chat(page)
    blue = make_png(tmp_path / "blue.png", (0, 0, 255))
    run_event(page, lambda: pick_image(page, blue), "#chat-status")
    send(page, QUESTION)
    whole = prompt_tokens(send(page, "And now?"))  # reads the first turn, image and all
    tab(page, "Parameters")
    set_text(page, "#chat-truncation-length", str(whole + 8 - 1))  # one token short of it beside the reply
    tab(page, "Chat")
    status = chat_event(page, lambda: page.click("#chat-regenerate"))
    assert re.search(r"Prompt: (\d+) of \d+ tokens \(2 oldest messages left out to fit\)", status), status
    assert prompt_tokens(status) < whole - IMAGE_SEQ_LEN  # the image went with its turn
    assert re.search(r"reply: [1-9]\d* tokens", status) and "failed" not in status, status
