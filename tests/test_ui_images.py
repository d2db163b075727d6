"""Images in the Chat tab, in a real browser (Chromium) against webui.py running a tiny random-weight
vision-language model (tests/vision_helpers.py): an image attached with the Image button is listed, goes with the
next message (the status line's prompt count grows by the image's tokens), a reply arrives, the message shows its
thumbnail, the chat file records the image by its hash (the file itself in the chats' images folder), and another
page opening the chat shows it. With the starter model (text-only) picked, an image is refused with the
ImagesUnsupported message before anything is saved."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from ui_helpers import (STARTER, Server, Workspace, answered, chat_files, new_chat, open_app, pick_image,
                        prompt_tokens, run_event, send, set_text, tab, thumbnail)
from vision_helpers import IMAGE_SEQ_LEN, make_png, make_tiny_vlm

from modules.ui.model_choice import NOT_LOADED

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VLM = "tiny-vlm"
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-images"))
    make_tiny_vlm(workspace.models / VLM, starter_hf)
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    server = Server(workspace, "--max-models", "2", model=VLM).start()
    yield server
    server.stop()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    page, _ = open_app(browser, server.url)
    tab(page, "Parameters")  # short replies: the random model writes noise until max_new_tokens
    set_text(page, "#param-max-new-tokens", "16")
    tab(page, "Chat")
    yield page
    page.context.close()


def test_an_image_reaches_the_model_and_stays_with_the_chat(browser: Browser, page: Page, workspace: Workspace,
                                                            tmp_path: Path) -> None:
    new_chat(page)
    bare = prompt_tokens(send(page, QUESTION))

    new_chat(page)
    red = make_png(tmp_path / "red.png", (255, 0, 0))
    attached = run_event(page, lambda: pick_image(page, red), "#chat-status")
    cost = re.search(r"Attached: 1 image\(s\), (\d+) tokens of the prompt", attached)
    assert cost and int(cost[1]) >= IMAGE_SEQ_LEN, attached  # counted on the loaded model, before it is sent
    listing = page.locator("#chat-images")
    expect(listing).to_contain_text(re.compile(rf"red\.png \(PNG, 40×30, .* · {cost[1]} tokens\)"))

    status = send(page, QUESTION)
    assert prompt_tokens(status) >= bare + IMAGE_SEQ_LEN  # the image's tokens, counted in the prompt
    assert prompt_tokens(status) == bare + int(cost[1]), (bare, status)  # as the waiting list said
    assert re.search(r"reply: [1-9]\d* tokens", status), status  # the model answered
    expect(listing).to_be_hidden()  # it went with the message
    expect(thumbnail(page, red)).to_be_visible()

    saved = json.loads(chat_files(workspace)[-1].read_text())
    user = next(m for m in saved["messages"] if m["role"] == "user")
    assert user["content"] == QUESTION
    data = red.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert user["images"] == [{"sha256": digest, "media_type": "image/png", "name": "red.png", "size": len(data),
                               "width": 40, "height": 30}]
    stored = chat_files(workspace)[-1].parent / "images" / f"{digest}.png"
    assert stored.read_bytes() == data and "base64" not in chat_files(workspace)[-1].read_text()

    again = send(page, "And now?")  # the next turn reads the image again, from the images folder
    assert "left out" not in again and prompt_tokens(again) > prompt_tokens(status) + IMAGE_SEQ_LEN

    other, _ = open_app(browser, page.url)  # another page opens the latest chat: this one
    try:
        expect(thumbnail(other, red)).to_be_visible()
    finally:
        other.context.close()


def test_a_text_only_model_refuses_an_image_before_anything_is_saved(page: Page, workspace: Workspace,
                                                                      tmp_path: Path) -> None:
    new_chat(page)
    blue = make_png(tmp_path / "blue.png", (0, 0, 255))
    before = [(path, path.read_bytes()) for path in chat_files(workspace)]
    pick_model(page, STARTER)  # not loaded yet: the image waits, and the turn refuses it once the model is loaded
    assert "Attached: 1 image(s)" in run_event(page, lambda: pick_image(page, blue), "#chat-status")
    set_text(page, "#chat-input", QUESTION)
    page.click("#chat-send")
    refusal = page.locator(".toast-body").filter(has_text=f"{STARTER} reads no images")
    expect(refusal).to_be_visible(timeout=180_000)
    expect(page.locator("#chat-input textarea").first).to_have_value(QUESTION)  # the message stays in the box
    assert [(path, path.read_bytes()) for path in chat_files(workspace)] == before  # nothing saved
    assert not thumbnail(page, blue).count()

    page.click("#chat-images-clear")
    expect(page.locator("#chat-images")).to_be_hidden()
    expect(refusal).to_have_count(0, timeout=60_000)  # the notice closes by itself
    pick_image(page, blue)  # now the starter is loaded: refused at once
    expect(refusal).to_be_visible(timeout=60_000)
    expect(page.locator("#chat-images")).to_be_hidden()


def pick_model(page: Page, name: str) -> None:
    """Pick `name` in the chat's model picker, whether it is loaded or not."""
    box = page.locator("#chat-model input").first
    answered(page, lambda: box.click())
    page.get_by_role("option", name=name, exact=True).or_(
        page.get_by_role("option", name=name + NOT_LOADED, exact=True)).first.click()
    expect(box).to_have_value(re.compile(rf"^{re.escape(name)}( \(|$)"))
    box.blur()
