"""Concurrency through the API: 8 streaming clients at once all get complete answers, and a client that disconnects
(mid-stream, or while still queued) cancels its generation and frees the model for the next request."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import ROOT
from modules.model_manager import ModelManager
from modules.services import Services
from modules.settings import Settings
from modules.starter import STARTER_GGUF


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """(base URL, the Generations the manager handed out, in order)."""
    from extensions.openai.server import create_app, serve_app

    folder = tmp_path_factory.mktemp("api")
    settings = Settings(model_dir=starter_gguf.parent, lora_dir=folder / "loras", user_data_dir=folder,
                        preset_dir=ROOT / "presets", template_dir=ROOT / "instruction-templates")
    manager = ModelManager(starter_gguf.parent, folder / "loras")
    manager.load(STARTER_GGUF, options={"n_ctx": 4096})
    generations = []
    generate = manager.generate

    def recording(*args, **kwargs):  # the real generate; we only keep a handle on what it returns
        generation = generate(*args, **kwargs)
        generations.append(generation)
        return generation

    manager.generate = recording  # type: ignore[method-assign]
    server = serve_app(create_app(Services(settings=settings, manager=manager)), "127.0.0.1", 0)
    yield server.url, generations, manager
    server.stop()
    manager.unload()


def stream_body(max_tokens: int, content: str = "Write a long story about a dragon.") -> dict:
    return {"model": STARTER_GGUF, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ban_eos_token": True, "stream_options": {"include_usage": True}}


def read_stream(url: str, body: dict) -> tuple[str, dict, bool]:
    """(text, usage, whether [DONE] arrived) of one streamed chat completion."""
    text, usage, done = [], {}, False
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
                if chunk.get("usage"):
                    usage = chunk["usage"]
    return "".join(text), usage, done


def test_eight_concurrent_streams_all_complete(served) -> None:
    url, _, _ = served
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: read_stream(url, stream_body(24)), range(8)))
    assert all(done for _, _, done in results)
    assert all(usage["completion_tokens"] == 24 for _, usage, _ in results)
    assert len({text for text, _, _ in results}) == 1  # the same greedy answer for everyone, none cut short
    assert results[0][0]


def wait_idle(manager: ModelManager, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while manager.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_client_that_disconnects_mid_stream_frees_the_queue(served) -> None:
    url, generations, manager = served
    with httpx.stream("POST", url + "/v1/chat/completions", json=stream_body(3000), timeout=600) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break
        long_run = generations[-1]
    closed = time.monotonic()
    wait_idle(manager)
    freed_after = time.monotonic() - closed
    follow_up = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=600)
    assert follow_up.status_code == 200
    assert long_run.stats.finish_reason == "cancelled"
    assert long_run.stats.completion_tokens < 3000
    print(f"queue free {freed_after:.3f} s after the client left; {long_run.stats.completion_tokens} tokens made")


def test_a_queued_client_that_leaves_never_runs(served) -> None:
    url, generations, manager = served
    with httpx.stream("POST", url + "/v1/chat/completions", json=stream_body(3000), timeout=600) as first:
        lines = first.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        before = len(generations)
        gave_up = threading.Event()

        def impatient() -> None:
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=stream_body(50),
                                  timeout=httpx.Timeout(600, read=3.0)) as response:
                    response.read()
            except httpx.ReadTimeout:
                gave_up.set()

        worker = threading.Thread(target=impatient)
        worker.start()
        worker.join()
        assert gave_up.is_set()
        queued = generations[before]
    wait_idle(manager)
    after = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=600)
    assert after.status_code == 200
    assert queued.stats.finish_reason == "cancelled" and queued.stats.completion_tokens == 0
