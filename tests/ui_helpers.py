"""Helpers for the browser tests: start webui.py on a free port with throwaway folders, drive Debian's Chromium
with Playwright, and wait for the page's events to finish."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, Locator, Page, Playwright, expect

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
STARTER = "SmolLM2-135M-Instruct.Q4_1.gguf"
START_TIMEOUT_S = 180
EVENT_TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Workspace:
    """Throwaway folders a server runs on, so tests never touch the real models/, presets/, characters/ or
    user_data/ (models are linked in, not copied)."""

    root: Path
    models: Path = field(init=False)
    presets: Path = field(init=False)
    characters: Path = field(init=False)
    user_data: Path = field(init=False)
    settings: Path = field(init=False)

    def __post_init__(self) -> None:
        self.models, self.presets = self.root / "models", self.root / "presets"
        self.characters, self.user_data = self.root / "characters", self.root / "user_data"
        self.settings = self.root / "settings.yaml"
        self.models.mkdir(parents=True, exist_ok=True)
        (self.models / STARTER).symlink_to(ROOT / "models" / STARTER)
        shutil.copytree(ROOT / "presets", self.presets)
        shutil.copytree(ROOT / "characters", self.characters)
        self.user_data.mkdir()
        self.settings.write_text("")

    def flags(self) -> list[str]:
        return ["--model-dir", str(self.models), "--preset-dir", str(self.presets), "--character-dir",
                str(self.characters), "--user-data-dir", str(self.user_data), "--settings", str(self.settings)]


class Server:
    """webui.py in a subprocess; its output goes to a log file shown when it fails to start."""

    def __init__(self, workspace: Workspace, *extra: str, model: str = STARTER):
        self.workspace = workspace
        self.extra = list(extra)
        self.model = model
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = workspace.root / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "Server":
        command = [sys.executable, "webui.py", "--model", self.model, "--listen-port", str(self.port),
                   *self.workspace.flags(), *self.extra]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"webui.py exited with {self.process.returncode}:\n{self.log.read_text()}")
            if "Ready:" in self.log.read_text(errors="replace") and self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"webui.py was not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> "Server":
        self.stop()
        return self.start()


def launch_browser(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class PageErrors:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page):
        self.messages: list[str] = []
        page.on("console", lambda message: self.messages.append(f"console.{message.type}: {message.text}")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.messages.append(f"page error: {error}"))


def open_app(browser: Browser, url: str, **context_options) -> tuple[Page, PageErrors]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_options)
    context.set_default_timeout(EVENT_TIMEOUT_MS)  # two busy cores can starve the browser for a while
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(url)
    wait_ready(page)
    return page, errors


def sign_in(browser: Browser, url: str, user: str, password: str) -> Page:
    """A page, in a browser context of its own, where `user` signed in (--gradio-auth), once the app is ready."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(EVENT_TIMEOUT_MS)
    page = context.new_page()
    page.goto(url)
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    wait_ready(page)
    return page


def wait_ready(page: Page) -> None:
    """The app has rendered and its start-up events (the session, the open chat) have finished."""
    page.wait_for_selector("#chat-input textarea", timeout=EVENT_TIMEOUT_MS)
    page.wait_for_function("() => { const s = document.querySelector('#chat-status');"
                           " const w = s && s.querySelector('[data-testid=status-tracker]');"
                           " return w && w.classList.contains('hide') && s.innerText.trim().length > 0; }",
                           timeout=EVENT_TIMEOUT_MS)
    wait_idle(page)


_IDLE = ("() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
         ".every(tracker => tracker.classList.contains('hide'))")


def wait_idle(page: Page) -> None:
    """No event is showing progress on any component the page has drawn (Gradio's status trackers are hidden)."""
    page.wait_for_function(_IDLE, timeout=EVENT_TIMEOUT_MS)


def answered(page: Page, action) -> None:
    """Do `action()` and wait for the server's answer to the unqueued event (queue=False) it fires, such as a
    selection the server only records, or a refreshed list of choices."""
    with page.expect_response(lambda response: response.url.endswith("/gradio_api/run/predict"),
                              timeout=EVENT_TIMEOUT_MS):
        action()


_WATCH = """([selector, lock]) => {
  window.__eventStarted = false;
  const busy = () => {
    if (lock) { const button = document.querySelector(lock); return !!(button && button.disabled); }
    const tracker = document.querySelector(selector).querySelector('[data-testid=status-tracker]');
    return !!(tracker && !tracker.classList.contains('hide'));
  };
  if (window.__eventWatch) window.__eventWatch.disconnect();
  window.__eventWatch = new MutationObserver(() => { if (busy()) window.__eventStarted = true; });
  window.__eventWatch.observe(document.body, {attributes: true, childList: true, subtree: true});
  window.__eventBusy = busy;
}"""
_FINISHED = "() => window.__eventStarted && !window.__eventBusy()"


def watch_event(page: Page, status_selector: str = "#chat-status", *, lock: str | None = None) -> None:
    """Watch for the next event of the page (see run_event): `event_finished` says when it started and ended."""
    page.evaluate(_WATCH, [status_selector, lock])


def event_finished(page: Page) -> bool:
    """Whether the event `watch_event` waits for has started and finished."""
    return bool(page.evaluate(_FINISHED))


def run_event(page: Page, action, status_selector: str = "#chat-status", *, lock: str | None = None) -> str:
    """Do `action()` (a click...) and wait until the event it starts has finished; returns the text of the
    element at `status_selector`. A streaming event is followed through the button it disables while it runs
    (`lock`); any other through the progress indicator Gradio shows on `status_selector`, one of its outputs."""
    watch_event(page, status_selector, lock=lock)
    action()
    page.wait_for_function(_FINISHED, timeout=EVENT_TIMEOUT_MS)
    return page.inner_text(status_selector)


def chat_event(page: Page, action) -> str:
    """Run a chat turn (Send, Regenerate, Continue...) to its end; returns the chat's status line."""
    return run_event(page, action, "#chat-status", lock="#chat-send")


def tab(page: Page, name: str) -> None:
    """Open a tab and wait until it is the selected one."""
    button = page.get_by_role("tab", name=name, exact=True)
    button.click()
    expect(button).to_have_attribute("aria-selected", "true")


def set_text(page: Page, selector: str, value: str) -> None:
    """Type into a Gradio textbox or number box and commit it (Gradio reads the value on blur/input). Typing
    waits until no event is in flight: one that lands afterwards could redraw the box with its old value."""
    box = page.locator(f"{selector} textarea, {selector} input").first
    for _ in range(2):  # a box just unfolded may still be given its form value once, over what was typed
        wait_idle(page)
        box.fill(value)
        box.blur()
        try:
            expect(box).to_have_value(value, timeout=2000)
            return
        except AssertionError:
            continue
    wait_idle(page)
    box.fill(value)
    box.blur()
    expect(box).to_have_value(value)


def dropdown_option(page: Page, selector: str, name: str) -> Locator:
    """The option `name` of the dropdown at `selector` alone: another dropdown's list may still be drawn (one whose
    choices refresh on focus can reopen after Escape), and an option of the same name there is not this one."""
    listbox = page.locator(f"{selector} input").first.get_attribute("aria-controls")
    return page.locator(f"[id='{listbox}']").get_by_role("option", name=name, exact=True)


def choose(page: Page, selector: str, option: str) -> None:
    """Pick an option of a Gradio dropdown, and check that it took: a dropdown that re-reads its choices when
    opened may redraw its list under the click on a busy machine, and then the pick must be made again."""
    box = page.locator(f"{selector} input").first
    for _ in range(3):
        box.click()
        dropdown_option(page, selector, option).click()
        try:
            expect(box).to_have_value(option, timeout=10_000)
            return
        except AssertionError:
            page.keyboard.press("Escape")
    raise AssertionError(f"{selector} did not take the option {option!r} (it shows {box.input_value()!r})")


def chat_messages(page: Page) -> list[tuple[str, str]]:
    """(role, text) of each message in the chatbot."""
    rows = page.locator("#chatbot .message-row")
    result = []
    for i in range(rows.count()):
        row = rows.nth(i)
        classes = row.get_attribute("class") or ""
        role = "user" if "user-row" in classes else "assistant"
        result.append((role, row.inner_text().strip()))
    return result


def last_reply(page: Page) -> str:
    replies = [text for role, text in chat_messages(page) if role == "assistant"]
    return replies[-1] if replies else ""


def send(page: Page, text: str) -> str:
    set_text(page, "#chat-input", text)
    return chat_event(page, lambda: page.click("#chat-send"))


def new_chat(page: Page) -> None:
    run_event(page, lambda: page.click("#chat-new"), "#chatbot")


def open_past_chat(page: Page, title: str, nth: int = 0) -> None:
    """Open the past chat whose title starts with `title` (the `nth` newest of those)."""
    page.locator("#chat-history-select input").first.click()
    run_event(page, lambda: page.get_by_role("option").filter(has_text=title).nth(nth).click(), "#chatbot")


def prompt_tokens(status: str) -> int:
    """The prompt's token count the chat's status line shows."""
    match = re.search(r"Prompt: (\d+) of \d+ tokens", status)
    assert match, status
    return int(match.group(1))


def chat_files(workspace: Workspace) -> list[Path]:
    """The workspace's chat files, the last written last."""
    return sorted((workspace.user_data / "logs" / "chat").glob("*/*.json"), key=lambda p: p.stat().st_mtime)


def pick_image(page: Page, path: Path) -> None:
    """Pick `path` in the Chat tab's Image button's file chooser."""
    with page.expect_file_chooser() as chooser:
        page.click("#chat-image")
    chooser.value.set_files(str(path))


def thumbnail(page: Page, image: Path):
    """The thumbnail of `image` on a user message in the chat (its file is named by the image's hash)."""
    return page.locator(f"#chatbot .user-row img[src*='{hashlib.sha256(image.read_bytes()).hexdigest()}']")


def add_dummy(page: Page, button: str, text: str) -> None:
    """Add `text` to the chat with a Send dummy message / reply button (`button`: its selector)."""
    set_text(page, "#chat-input", text)
    run_event(page, lambda: page.click(button), "#chatbot")


#: Records the lengths the last reply has while a turn runs (Send disabled): several lengths, several pieces.
_WATCH_REPLY = """() => {
  window.__replyLengths = new Set();
  if (window.__replyWatch) window.__replyWatch.disconnect();
  window.__replyWatch = new MutationObserver(() => {
    const rows = document.querySelectorAll('#chatbot .bot-row');
    if (document.querySelector('#chat-send').disabled && rows.length)
      window.__replyLengths.add(rows[rows.length - 1].innerText.trim().length);
  });
  window.__replyWatch.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def watch_reply(page: Page) -> None:
    """Watch the last reply while the next turn runs; `reply_pieces` then says how many lengths it showed."""
    page.evaluate(_WATCH_REPLY)


def reply_pieces(page: Page) -> int:
    """How many different non-empty lengths the last reply showed while the watched turn ran (2 or more: it
    streamed)."""
    return len(page.evaluate("() => [...window.__replyLengths].filter(n => n > 0)"))


def screenshot(page: Page, name: str) -> None:
    """docs/screenshots/<name>.png of the whole page, without the notices floating over it; only when
    WORKBENCH_SCREENSHOTS=1 is set, so that a test run leaves the tracked pictures alone."""
    if os.environ.get("WORKBENCH_SCREENSHOTS") != "1":
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    hide = page.add_style_tag(content=".toast-wrap { display: none !important; }")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    hide.evaluate("element => element.remove()")
