"""Serving many at once in a real browser (issue 13): pages generate at the same time, and each chat is answered by
the model (and LoRAs) it picked.

One server: --multi-user with passwords (alice is the operator, bob is not), --parallel 2 (two slots per model),
--max-models 2, a models folder holding three names of the starter GGUF (links to one file), so that three
"models" can be loaded, two at a time, and the starter's Transformers copy with a random LoRA made for it (strong
enough to change the greedy reply). Browser contexts stand for people.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from conftest import FRANCE, wait_until
from modules.chat.history import ChatMessage
from modules.ui.model_choice import NOT_LOADED, ModelChoice
from modules.ui.session_state import user_key
from ui_helpers import (ROOT, STARTER, Server, Workspace, answered, chat_event, choose, event_finished, last_reply,
                        new_chat, open_past_chat, run_event, send, set_text, sign_in, tab, wait_ready, watch_event)

PASSWORDS = {"alice": "correct horse", "bob": "battery staple"}
ALPHA, BETA, GAMMA = "alpha.gguf", "beta.gguf", "gamma.gguf"
HF = "starter-hf"  # the starter's Transformers copy, which takes a LoRA per request
LORA = "random-lora"
LONG_TOKENS = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path) -> Workspace:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    workspace = Workspace(tmp_path_factory.mktemp("webui-concurrent"))
    for name in (ALPHA, BETA, GAMMA):
        (workspace.models / name).symlink_to(ROOT / "models" / STARTER)
    (workspace.models / HF).symlink_to(starter_hf)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(starter_hf, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(workspace.root / "loras" / LORA)
    (workspace.presets / "Short.yaml").write_text("do_sample: false\nmax_new_tokens: 8\n")
    (workspace.presets / "Long.yaml").write_text(f"do_sample: false\nmax_new_tokens: {LONG_TOKENS}\n"
                                                 "ban_eos_token: true\n")
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    passwords = workspace.root / "passwords.txt"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in PASSWORDS.items()))
    server = Server(workspace, "--multi-user", "--gradio-auth-path", str(passwords), "--admin-users", "alice",
                    "--parallel", "2", "--max-models", "2", "--preset", "Short", "--lora-dir",
                    str(workspace.root / "loras"), model=ALPHA).start()
    yield server
    server.stop()


@pytest.fixture
def alice(browser: Browser, server: Server) -> Iterator[Page]:
    page = sign_in(browser, server.url, "alice", PASSWORDS["alice"])
    yield page
    page.context.close()


@pytest.fixture
def bob(browser: Browser, server: Server) -> Iterator[Page]:
    page = sign_in(browser, server.url, "bob", PASSWORDS["bob"])
    yield page
    page.context.close()


def saved_chats(workspace: Workspace, user: str) -> list[dict]:
    """The user's chats as saved on disk, newest first."""
    files = (workspace.user_data / "users" / user_key(user) / "logs" / "chat").glob("*/*.json")
    chats = [json.loads(path.read_text()) for path in files]
    return sorted(chats, key=lambda chat: chat["updated"], reverse=True)


def picked_model(page: Page) -> str:
    return page.locator("#chat-model input").first.input_value()


def open_models(page: Page) -> None:
    """Open the chat's model picker; it re-reads what it offers when it gets the focus."""
    answered(page, lambda: page.locator("#chat-model input").first.click())


def close_models(page: Page) -> None:
    page.keyboard.press("Escape")
    page.locator("#chat-model input").first.blur()  # a click on a box that keeps the focus would not reopen it


def offered(page: Page, label: str):
    """The option of the open model picker labelled `label` (its count: 1 when offered, else 0)."""
    return page.get_by_role("option", name=label, exact=True)


def pick_model(page: Page, name: str) -> None:
    """Pick `name` in the chat's model picker, whether it is loaded or not."""
    open_models(page)
    offered(page, name).or_(offered(page, name + NOT_LOADED)).first.click()
    expect(page.locator("#chat-model input").first).to_have_value(re.compile(rf"^{re.escape(name)}( \(|$)"))
    page.locator("#chat-model input").first.blur()


def writing(page: Page) -> str:
    """The text of the last reply in the chat (the one being written)."""
    return page.evaluate("() => { const r = document.querySelectorAll('#chatbot .bot-row');"
                         " return r.length ? r[r.length - 1].innerText.trim() : ''; }")


@pytest.mark.browser
def test_two_pages_stream_their_replies_at_the_same_time(alice: Page, bob: Page, workspace: Workspace) -> None:
    pages = {"alice": alice, "bob": bob}
    for page in pages.values():
        tab(page, "Parameters")
        run_event(page, lambda page=page: choose(page, "#preset-select", "Long"), "#param-max-new-tokens")
        tab(page, "Chat")
        new_chat(page)
        set_text(page, "#chat-input", "Write a very long story about a lighthouse keeper and a storm.")
        watch_event(page, lock="#chat-send")
    alice.click("#chat-send")
    wait_until(lambda: writing(alice), "alice's first words")
    bob.click("#chat-send")  # while alice's reply is being written
    wait_until(lambda: writing(bob), "bob's first words")
    alice_then = len(writing(alice).split())  # read after bob's first words appeared
    wait_until(lambda: all(event_finished(page) for page in pages.values()), "both replies ended", timeout_s=600)
    # Streamed together: bob's reply began while most of alice's was still to come. With one slot he would have
    # waited for all of it (her reply was complete before his first word).
    alice_words = len(last_reply(alice).split())
    assert alice_then < alice_words / 2, (alice_then, alice_words)
    for who, page in pages.items():
        status = page.inner_text("#chat-status")
        assert f"Model: {ALPHA}" in status and f"reply: {LONG_TOKENS} tokens" in status, (who, status)
        shown = last_reply(page)
        saved = saved_chats(workspace, who)[0]["messages"][-1]
        assert saved["role"] == "assistant" and saved["metadata"]["model"] == ALPHA
        assert len(saved["content"].split()) > LONG_TOKENS // 4
        page.reload()  # the chat as saved, shown again: the whole reply
        wait_ready(page)
        assert last_reply(page) == shown, who


@pytest.mark.browser
def test_two_chats_of_one_page_are_answered_by_their_own_models(alice: Page, workspace: Workspace) -> None:
    new_chat(alice)
    pick_model(alice, ALPHA)
    assert f"Model: {ALPHA}" in send(alice, "Chat one: say hello.")
    new_chat(alice)
    assert picked_model(alice) == ALPHA  # a new chat starts with the page's pick
    pick_model(alice, BETA)  # the operator may pick a model that is not loaded: it loads when used
    assert f"Model: {BETA}" in send(alice, "Chat two: say hello.")
    open_models(alice)  # both resident now
    expect(offered(alice, ALPHA)).to_have_count(1)
    expect(offered(alice, BETA)).to_have_count(1)
    close_models(alice)
    # Each chat keeps its model: opening it shows that model, and the next turn is answered by it.
    open_past_chat(alice, "Chat one")
    expect(alice.locator("#chat-model input").first).to_have_value(ALPHA)
    assert f"Model: {ALPHA}" in send(alice, "And goodbye?")
    open_past_chat(alice, "Chat two")
    expect(alice.locator("#chat-model input").first).to_have_value(BETA)
    assert f"Model: {BETA}" in chat_event(alice, lambda: alice.click("#chat-regenerate"))
    by_title = {chat["messages"][0]["content"]: chat for chat in saved_chats(workspace, "alice")}
    assert [m["metadata"]["model"] for m in by_title["Chat one: say hello."]["messages"]] == [ALPHA] * 4
    assert [m["metadata"]["model"] for m in by_title["Chat two: say hello."]["messages"]] == [BETA] * 2


@pytest.mark.browser
def test_only_the_operator_loads_and_a_model_gone_is_reported(alice: Page, bob: Page, workspace: Workspace) -> None:
    new_chat(alice)
    pick_model(alice, BETA)
    send(alice, "Load beta, please.")
    # bob picks among the resident models only.
    open_models(bob)
    expect(offered(bob, BETA)).to_have_count(1)
    expect(bob.get_by_role("option").filter(has_text=NOT_LOADED)).to_have_count(0)
    close_models(bob)
    new_chat(bob)
    pick_model(bob, BETA)
    assert f"Model: {BETA}" in send(bob, "Hello from bob.")
    # alice uses alpha (now the more recently used), then loads gamma: beta, used least recently, makes room.
    new_chat(alice)
    pick_model(alice, ALPHA)
    send(alice, "Hello from alice.")
    new_chat(alice)
    pick_model(alice, GAMMA)
    assert f"Model: {GAMMA}" in send(alice, "Load gamma, please.")
    # bob's chat names beta, which is gone: he is told so, and his message waits in the box.
    set_text(bob, "#chat-input", "Are you still there?")
    bob.click("#chat-send")
    bob.locator(".toast-body").filter(has_text=f"{BETA} is not loaded: pick another").first.wait_for()
    assert bob.locator("#chat-input textarea").input_value() == "Are you still there?"
    assert [m["content"] for m in saved_chats(workspace, "bob")[0]["messages"]][-2] == "Hello from bob."
    open_models(bob)
    expect(offered(bob, BETA + NOT_LOADED)).to_have_count(1)
    expect(offered(bob, GAMMA)).to_have_count(1)  # what is resident now


def test_a_chats_choice_is_read_back_from_its_messages() -> None:
    stamped = ModelChoice(BETA, ("style",), 0.5).stamp(BETA)
    messages = [ChatMessage(role="user", content="Hi", metadata=ModelChoice(ALPHA).stamp(ALPHA)),
                ChatMessage(role="assistant", content="Hello", metadata=stamped),
                ChatMessage(role="user", content="A dummy message records nothing.")]
    assert ModelChoice.of_chat(messages) == ModelChoice(BETA, ("style",), 0.5)
    assert ModelChoice.of_chat(messages[:1]) == ModelChoice(ALPHA)
    assert ModelChoice.of_chat(messages[2:]) is None


@pytest.mark.browser
def test_a_chat_runs_with_the_loras_it_picked(alice: Page, workspace: Workspace) -> None:
    new_chat(alice)
    pick_model(alice, HF)
    expect(alice.locator("#chat-loras .token")).to_have_count(0)
    assert f"Model: {HF} ·" in send(alice, FRANCE)
    plain = last_reply(alice)
    new_chat(alice)
    alice.locator("#chat-loras input").first.click()
    alice.get_by_role("option", name=LORA, exact=True).click()
    alice.keyboard.press("Escape")
    assert f"Model: {HF} with LoRA {LORA} ×1 ·" in send(alice, FRANCE)
    assert last_reply(alice) != plain
    # Each chat keeps its LoRAs: opening it shows them.
    open_past_chat(alice, FRANCE, 1)  # the older one: without
    expect(alice.locator("#chat-loras .token")).to_have_count(0)
    open_past_chat(alice, FRANCE, 0)
    expect(alice.locator("#chat-loras .token")).to_have_text([LORA])
    chats = [chat for chat in saved_chats(workspace, "alice") if chat["messages"][0]["content"] == FRANCE]
    assert [chat["messages"][-1]["metadata"].get("loras") for chat in chats] == [[{"name": LORA, "scale": 1.0}], None]
