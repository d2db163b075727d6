"""How fast the web UI is ready, and how fast a reply reaches the browser next to the core streaming path.

    python bench/ui.py [--tokens 128] [--rounds 3]

1. ready_s: seconds from launching `webui.py` (starter model, throwaway user data) until a page in Chromium shows
   the Chat tab ready to chat with the model loaded.
2. browser_tok_s: the Chat tab's reply (Deterministic preset, EOS banned, exactly --tokens tokens) as the browser
   receives it: tokens / (last change of the reply in the page - the click on Send), on the browser's clock.
3. core_tok_s: the same prompt and parameters through ModelManager.generate in this process: tokens / (last
   token - the call), while the (idle) server keeps running.
Browser and core rounds alternate, so both see the same load on the machine; medians are reported. The last
line is one JSON object: {"ready_s", "browser_tok_s", "core_tok_s", "ratio"} (ratio = browser / core).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.cli import ArgumentParser  # noqa: E402
from needs import need_packages, need_program  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
need_packages("gradio", "llama_cpp", requirements="requirements.txt")
need_packages("playwright", requirements="requirements-test.txt")
need_program(CHROMIUM, "apt-get install chromium")

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from modules.chat.history import ChatMessage  # noqa: E402
from modules.presets import load_preset  # noqa: E402
from modules.services import build_services  # noqa: E402
from modules.settings import load_settings  # noqa: E402
from modules.starter import STARTER_GGUF  # noqa: E402
from modules.chat.request import prepare_chat  # noqa: E402
from modules.ui.chat_runner import turn_request  # noqa: E402

QUESTION = "Write a long story about a dragon who learns to cook."

_WATCH_REPLY = """() => {
  window.__replyTimes = [];
  const chat = document.querySelector('#chatbot');
  const last = () => {
    const rows = chat.querySelectorAll('.bot-row');
    return rows.length ? rows[rows.length - 1].innerText : '';
  };
  let seen = last();
  new MutationObserver(() => {
    const now = last();
    if (now !== seen) { seen = now; window.__replyTimes.push(performance.now()); }
  }).observe(chat, {childList: true, subtree: true, characterData: true});
  window.__started = false;
  new MutationObserver(() => { if (document.querySelector('#chat-send').disabled) window.__started = true; })
    .observe(document.body, {attributes: true, subtree: true});
  window.__sendAt = performance.now();
  document.querySelector('#chat-send').click();
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags(work: Path, port: int) -> list[str]:
    return ["--model", STARTER_GGUF, "--listen-port", str(port), "--user-data-dir", str(work / "user_data"),
            "--settings", str(work / "settings.yaml"), "--preset", "Deterministic"]


def wait_ready(page: Page, url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("webui.py did not answer")
            time.sleep(0.05)
    page.goto(url)
    page.wait_for_function("() => { const s = document.querySelector('#chat-status');"
                           " const w = s && s.querySelector('.wrap');"
                           " return w && w.classList.contains('hide') && s.innerText.startsWith('Ready'); }",
                           timeout=max(1.0, deadline - time.monotonic()) * 1000)


def set_knob(page: Page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(value)
    box.blur()


def browser_round(page: Page, tokens: int) -> float:
    page.click("#chat-new")
    page.wait_for_timeout(500)
    page.locator("#chat-input textarea").fill(QUESTION)
    page.evaluate(_WATCH_REPLY)
    page.wait_for_function("() => { const s = document.querySelector('#chat-status');"
                           " return window.__started && !document.querySelector('#chat-send').disabled"
                           " && /reply: \\d+ tokens/.test(s.innerText); }", timeout=600_000)
    status = page.inner_text("#chat-status")
    got = int(status.split("reply: ")[1].split(" tokens")[0])
    assert got == tokens, status
    sent, times = page.evaluate("() => [window.__sendAt, window.__replyTimes]")
    print(f"  server: {status.split(' · ', 1)[-1]}", file=sys.stderr)
    return tokens / ((times[-1] - sent) / 1000)


def core_round(services, tokens: int) -> float:
    settings = services.settings
    params = load_preset(settings.preset_dir, "Deterministic").model_copy(
        update={"max_new_tokens": tokens, "ban_eos_token": True})
    messages = [ChatMessage(role="user", content=QUESTION).model_dump(include={"role", "content"})]
    prepared = prepare_chat(services, turn_request(settings.chat, params, messages, "send"))
    start = time.perf_counter()
    generation = prepared.generate(services.manager)
    last, count = start, 0
    for chunk in generation:
        count += len(chunk.tokens)
        last = time.perf_counter()
    assert count == tokens, count
    return tokens / (last - start)


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    (work / "user_data").mkdir()
    (work / "settings.yaml").write_text("")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    services = build_services(load_settings(flags(work, free_port())))
    services.manager.load(STARTER_GGUF)
    browser_rates: list[float] = []
    core_rates: list[float] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(600_000)
        started = time.monotonic()
        server = subprocess.Popen([sys.executable, "webui.py", *flags(work, port)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(page, url, started + 300)
            ready_s = time.monotonic() - started
            print(f"ready in {ready_s:.1f} s", file=sys.stderr)
            page.get_by_role("tab", name="Parameters", exact=True).click()
            set_knob(page, "#param-max-new-tokens", str(args.tokens))
            page.locator("#params-stop-strings-and-tokens .label-wrap").click()
            page.locator("#param-ban-eos-token input[type=checkbox]").set_checked(True)
            page.get_by_role("tab", name="Chat", exact=True).click()
            for number in range(args.rounds):
                browser_rates.append(browser_round(page, args.tokens))
                core_rates.append(core_round(services, args.tokens))
                print(f"round {number + 1}: browser {browser_rates[-1]:.1f} tokens/s, core {core_rates[-1]:.1f} "
                      "tokens/s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=60)
            browser.close()
    services.manager.unload()
    shutil.rmtree(work, ignore_errors=True)
    browser_tok_s, core_tok_s = statistics.median(browser_rates), statistics.median(core_rates)
    print(json.dumps({"ready_s": round(ready_s, 2), "browser_tok_s": round(browser_tok_s, 2),
                      "core_tok_s": round(core_tok_s, 2), "ratio": round(browser_tok_s / core_tok_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
