"""--multi-user with --gradio-auth, in a real browser and over HTTP: one server started with three users (alice is
an admin); browser contexts stand for people and their browsers.

Chats belong to the signed-in user (they follow her to a second browser; nobody else reads them), a page's session
answers only its own user whatever ids a request carries, an exported chat exists nowhere another request could
fetch it, the operator's controls (extensions, loading models, training) are hidden from and refused to a
non-admin, "Save UI defaults" reaches pages opened afterwards only, and repeated wrong passwords are slowed down.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from gradio_client import Client
from playwright.sync_api import Browser, Page, expect

from ui_helpers import (EVENT_TIMEOUT_MS, Server, Workspace, choose, new_chat, run_event, send, set_text, tab,
                        wait_ready)

pytestmark = pytest.mark.browser

PASSWORDS = {"alice": "correct horse", "bob": "battery staple", "carol": "blue tulip"}
ADMIN = "alice"
_HASH_IN_URL = re.compile(r"/gradio_api/(?:heartbeat/|queue/data\?session_hash=)([A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-auth"))
    (workspace.presets / "Short.yaml").write_text("do_sample: false\nmax_new_tokens: 4\n")
    datasets = workspace.root / "training" / "datasets"  # so that a training form can be complete
    datasets.mkdir(parents=True)
    (datasets / "greetings.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!"}] * 8))
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    passwords = workspace.root / "passwords.txt"
    passwords.write_text("# people allowed in\n" + "".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()))
    with pytest.MonkeyPatch.context() as env:  # the files Gradio serves, where this test can look at them
        env.setenv("GRADIO_TEMP_DIR", str(workspace.root / "gradio-files"))
        server = Server(workspace, "--multi-user", "--gradio-auth-path", str(passwords), "--admin-users", ADMIN,
                        "--preset", "Short", "--lora-dir", str(workspace.root / "loras"), "--training-dir",
                        str(workspace.root / "training")).start()
    yield server
    server.stop()


class SignedIn:
    """A browser (its own context) where `user` signed in, and the URLs its page requested."""

    def __init__(self, browser: Browser, url: str, user: str, password: str | None = None, *, ready: bool = True):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        self.context.set_default_timeout(EVENT_TIMEOUT_MS)
        self.page = self.context.new_page()
        self.urls: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.goto(url)
        self.page.get_by_label("username").fill(user)
        self.page.get_by_label("password").fill(password if password is not None else PASSWORDS[user])
        self.page.get_by_role("button", name="Login").click()
        if ready:
            wait_ready(self.page)

    def session_hash(self) -> str:
        """The queue session hash Gradio's page made up for itself (it names it in its requests)."""
        for url in self.urls:
            match = _HASH_IN_URL.search(url)
            if match:
                return match.group(1)
        raise AssertionError(f"no session hash in the page's requests: {self.urls}")

    def close(self) -> None:
        self.context.close()


def chat_text(page: Page) -> str:
    """The chat shown and the past chats listed."""
    page.locator("#chat-history-select input").first.click()
    listed = " ".join(page.get_by_role("option").all_inner_texts())
    page.keyboard.press("Escape")
    return page.inner_text("#chatbot") + " " + listed


def chat_mode(page: Page) -> str:
    return page.locator("#chat-mode input:checked").get_attribute("value") or ""


def endpoint(config: dict, api_name: str) -> dict:
    return next(d for d in config["dependencies"] if d.get("api_name") == api_name)


def by_label(client: Client, api_name: str, values: dict[str, object]) -> dict[str, object]:
    """Keyword arguments for an endpoint, its inputs named by their labels (Gradio names most of them param_N);
    the inputs not named keep the values the page starts with."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]
    names = {parameter["label"]: parameter["parameter_name"] for parameter in info["parameters"]}
    return {names[label]: value for label, value in values.items()}


def shown_model(browser: Browser, url: str) -> str:
    """What is loaded, as a page opened now shows it."""
    person = SignedIn(browser, url, "carol")
    tab(person.page, "Model")
    shown = person.page.inner_text("#model-info")
    person.close()
    return shown


def test_a_wrong_password_is_refused(browser: Browser, server: Server) -> None:
    person = SignedIn(browser, server.url, "alice", "wrong password", ready=False)
    person.page.get_by_text("Incorrect Credentials", exact=False).wait_for()
    assert person.page.locator("#chat-input").count() == 0
    assert person.context.request.get(server.url + "config").status in (401, 403)
    person.close()


def test_chats_follow_their_user_to_another_browser_and_nobody_else_sees_them(browser: Browser,
                                                                              server: Server) -> None:
    alice, bob = SignedIn(browser, server.url, "alice"), SignedIn(browser, server.url, "bob")
    new_chat(alice.page)
    send(alice.page, "My secret word is pineapple.")
    new_chat(bob.page)
    send(bob.page, "My secret word is avocado.")
    # Her browser keeps no chat key of its own: the chats are found from who signed in.
    assert alice.page.evaluate("() => localStorage.getItem('workbench-session')") is None
    alice_elsewhere = SignedIn(browser, server.url, "alice")  # the same person, another browser
    seen = chat_text(alice_elsewhere.page)
    assert "pineapple" in seen and "avocado" not in seen
    bob_elsewhere = SignedIn(browser, server.url, "bob")
    seen = chat_text(bob_elsewhere.page)
    assert "avocado" in seen and "pineapple" not in seen
    for person in (alice, bob, alice_elsewhere, bob_elsewhere):
        person.close()


def test_a_request_carrying_another_users_page_session_is_refused(browser: Browser, server: Server) -> None:
    alice, bob = SignedIn(browser, server.url, "alice"), SignedIn(browser, server.url, "bob")
    theirs = alice.session_hash()
    config = bob.context.request.get(server.url + "config").json()
    export = endpoint(config, "export_chat")
    join = {"session_hash": theirs, "fn_index": export["id"], "trigger_id": export["targets"][0][0],
            "data": [None] * len(export["inputs"]), "event_data": None}
    # Bob, signed in, names Alice's page: running her export, reading her page's stream, dumping its state.
    assert bob.context.request.post(server.url + "gradio_api/queue/join", data=join).status == 403
    assert bob.context.request.post(server.url + "gradio_api/call/export_chat",
                                    data={"data": join["data"], "session_hash": theirs}).status == 403
    assert bob.context.request.get(server.url + f"gradio_api/queue/data?session_hash={theirs}").status == 403
    assert bob.context.request.get(server.url + f"gradio_api/deep_link?session_hash={theirs}").status == 403
    # Nobody signed in: refused as well.
    anonymous = browser.new_context()
    assert anonymous.request.get(server.url + f"gradio_api/deep_link?session_hash={theirs}").status == 401
    anonymous.close()
    # Alice herself is answered.
    assert alice.context.request.get(server.url + f"gradio_api/deep_link?session_hash={theirs}").status == 200
    for person in (alice, bob):
        person.close()


def test_an_exported_chat_downloads_for_its_owner_and_has_no_url(browser: Browser, server: Server,
                                                                 workspace: Workspace) -> None:
    alice, bob = SignedIn(browser, server.url, "alice"), SignedIn(browser, server.url, "bob")
    new_chat(alice.page)
    send(alice.page, "Remember the word periwinkle.")
    with alice.page.expect_download() as download:
        alice.page.click("#chat-export")
    assert "periwinkle" in Path(download.value.path()).read_text()
    # No copy lies where Gradio serves files from.
    served = [p for p in (workspace.root / "gradio-files").rglob("*")
              if p.is_file() and b"periwinkle" in p.read_bytes()]
    assert served == []
    # The chat file itself, asked for by URL: refused to Bob and to a request signed in as nobody.
    chat_file = next(p for p in workspace.user_data.rglob("*.json") if "periwinkle" in p.read_text())
    assert bob.context.request.get(server.url + f"gradio_api/file={chat_file}").status == 403
    anonymous = browser.new_context()
    assert anonymous.request.get(server.url + f"gradio_api/file={chat_file}").status == 401
    anonymous.close()
    for person in (alice, bob):
        person.close()


def test_the_operator_controls_are_for_an_admin_only(browser: Browser, server: Server) -> None:
    alice, bob = SignedIn(browser, server.url, "alice"), SignedIn(browser, server.url, "bob")
    tab(alice.page, "Session")
    tab(bob.page, "Session")
    assert alice.page.locator("#extensions-list").is_visible()
    assert alice.page.locator("#save-defaults").is_visible()
    assert not bob.page.locator("#extensions-list").is_visible()
    assert not bob.page.locator("#save-defaults").is_visible()
    assert bob.page.locator("#settings-in-force").is_visible()
    # Over Gradio's HTTP API, without the page: Bob is refused by the handler itself, Alice is answered.
    with pytest.raises(Exception, match="is for the operator"):
        Client(server.url, auth=("bob", PASSWORDS["bob"]), verbose=False).predict(
            ["example"], api_name="/apply_extensions")
    admin = Client(server.url, auth=("alice", PASSWORDS["alice"]), verbose=False)
    shown, _ = admin.predict(["example"], api_name="/apply_extensions")
    assert shown["value"] == ["example"]
    shown, _ = admin.predict([], api_name="/apply_extensions")
    assert shown["value"] == []
    for person in (alice, bob):
        person.close()


def test_loading_models_and_training_are_for_an_admin_only(browser: Browser, server: Server,
                                                           workspace: Workspace) -> None:
    bob, alice = SignedIn(browser, server.url, "bob"), SignedIn(browser, server.url, "alice")
    before = shown_model(browser, server.url)
    assert "SmolLM2-135M-Instruct" in before
    for person in (alice, bob):
        tab(person.page, "Model")
    for control in ("#model-load", "#model-unload", "#model-reload", "#loader-select", "#lora-apply"):
        expect(alice.page.locator(control)).to_be_visible()
        assert not bob.page.locator(control).is_visible(), control
    # Bob still sees which models there are and what is loaded.
    assert bob.page.locator("#model-select").is_visible()
    assert bob.page.inner_text("#model-info") == before
    for person in (alice, bob):
        tab(person.page, "Training")
    expect(alice.page.locator("#training-start")).to_be_visible()
    assert not bob.page.locator("#training-start").is_visible()
    assert bob.page.locator("#training-progress").is_visible()  # how the runs go is no secret
    expect(alice.page.get_by_role("tab", name="Merge and export")).to_be_visible()
    assert not bob.page.get_by_role("tab", name="Merge and export").is_visible()
    tab(bob.page, "Perplexity")
    assert bob.page.locator("#ppl-table").is_visible() and not bob.page.locator("#ppl-evaluate").is_visible()

    # Over Gradio's HTTP API, without the page: every call of Bob's is refused by the handler itself...
    as_bob = Client(server.url, auth=("bob", PASSWORDS["bob"]), verbose=False)
    for api_name, values in (("/unload_model", {}), ("/load_model", {"n_ctx": 512}), ("/reload_model", {}),
                             ("/start_training", {"LoRA name": "bobs-lora"})):
        with pytest.raises(Exception, match="is for the operator"):
            as_bob.predict(**by_label(as_bob, api_name, values), api_name=api_name)
    # ...and changed nothing: the same model with the same context, no training run, no LoRA.
    assert shown_model(browser, server.url) == before
    assert list((workspace.root / "training" / "runs").glob("*")) == []
    assert list((workspace.root / "loras").glob("*")) == []
    # Alice's calls are answered.
    as_alice = Client(server.url, auth=("alice", PASSWORDS["alice"]), verbose=False)
    status, info = as_alice.predict(api_name="/unload_model")
    assert status == "Unloaded." and "No model loaded" in info
    status, _ = as_alice.predict(api_name="/load_model")  # the model the page offers, with its options
    assert status.startswith("Loaded **SmolLM2-135M-Instruct.Q4_1.gguf**")
    assert shown_model(browser, server.url) == before
    with pytest.raises(Exception, match="climbs out of its folder"):  # past the operator check, to the form's
        as_alice.predict(**by_label(as_alice, "/start_training", {"LoRA name": "../bobs-lora"}),
                         api_name="/start_training")
    for person in (alice, bob):
        person.close()


def test_saved_ui_defaults_reach_pages_opened_afterwards_only(browser: Browser, server: Server,
                                                              workspace: Workspace) -> None:
    bob = SignedIn(browser, server.url, "bob")  # open before the save
    alice = SignedIn(browser, server.url, "alice")
    tab(alice.page, "Parameters")
    run_event(alice.page, lambda: choose(alice.page, "#preset-select", "Deterministic"),
              "#param-max-new-tokens")  # the preset's values arrive
    set_text(alice.page, "#param-max-new-tokens", "33")
    tab(alice.page, "Chat")
    alice.page.locator("#chat-mode").get_by_text("chat-instruct", exact=True).click()
    tab(alice.page, "Session")
    status = run_event(alice.page, lambda: alice.page.click("#save-defaults"), "#save-defaults-status")
    assert "pages opened from now on" in status
    saved = yaml.safe_load(workspace.settings.read_text())
    assert (saved["preset"], saved["generation"], saved["chat"]["mode"]) == (
        "Deterministic", {"max_new_tokens": 33}, "chat-instruct")
    # A page opened now (another user's) starts with them...
    fresh = SignedIn(browser, server.url, "bob")
    assert chat_mode(fresh.page) == "chat-instruct"
    tab(fresh.page, "Parameters")
    assert fresh.page.locator("#preset-select input").first.input_value() == "Deterministic"
    assert fresh.page.locator("#param-max-new-tokens input").first.input_value() == "33"
    # ...while the settings the server runs with (what the API reads) stay as started,
    tab(fresh.page, "Session")
    assert "preset: Short" in fresh.page.inner_text("#settings-in-force")
    # and the page open before the save keeps its own: the Short preset (4 tokens) in instruct mode.
    assert chat_mode(bob.page) == "instruct"
    status = send(bob.page, "Name a colour.")
    assert 0 < int(re.search(r"reply: (\d+) tokens", status).group(1)) <= 4
    for person in (alice, bob, fresh):
        person.close()
    workspace.settings.write_text("")


def test_repeated_wrong_passwords_are_slowed_down(server: Server) -> None:
    """Over HTTP from two loopback addresses. Runs last: it leaves 127.0.0.2's failure count high (an address's
    count is only forgotten, never cleared)."""
    def sign_in(client: httpx.Client, user: str, password: str) -> httpx.Response:
        return client.post("/login", data={"username": user, "password": password})

    with httpx.Client(base_url=server.url) as here, httpx.Client(
            base_url=server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as elsewhere:
        answers = [sign_in(elsewhere, "carol", "not her password") for _ in range(6)]
        assert [answer.status_code for answer in answers] == [400] * 5 + [429]
        assert "Too many failed sign-ins" in answers[-1].json()["detail"]
        assert int(answers[-1].headers["Retry-After"]) > 0
        # While the pause lasts, even the right password waits: for this user name from any address, and from
        # this address for any user name.
        assert sign_in(here, "carol", PASSWORDS["carol"]).status_code == 429
        assert sign_in(elsewhere, "bob", PASSWORDS["bob"]).status_code == 429
        # Another user from another address is not held up.
        assert sign_in(here, "bob", PASSWORDS["bob"]).status_code == 200
        # Once the pause is over, the right password works.
        deadline = time.monotonic() + 120
        while (answer := sign_in(here, "carol", PASSWORDS["carol"])).status_code == 429:
            assert time.monotonic() < deadline, answer.text
            time.sleep(1)
        assert answer.status_code == 200
