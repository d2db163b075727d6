"""Concurrency through the API: 8 streaming clients at once all get complete answers; a client that disconnects
(mid-stream, while still queued, or while its prompt is evaluated) cancels its generation and frees the model for
the next request; a prompt that fills the whole context starves no one (a small request is answered soon after it,
/v1/models and health at once throughout); a prompt too long for the context is refused, never cut."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from api_helpers import loaded_manager, recording_generations, server_settings, serving_api
from modules.model_manager import ModelManager
from modules.services import Services
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow  # fills contexts and runs many streams at once


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """(base URL, the Generations the manager handed out, in order, the manager)."""
    folder = tmp_path_factory.mktemp("api")
    # one slot: these tests are about the queue a second client waits in
    manager = loaded_manager(starter_gguf.parent, folder, STARTER_GGUF, n_ctx=4096, parallel=1)
    generations = recording_generations(manager)
    with serving_api(Services(settings=server_settings(starter_gguf.parent, folder), manager=manager)) as url:
        yield url, generations, manager
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


# --- a prompt that fills the whole context --------------------------------------------------------------------------
SMALL_CONTEXT = 512
LIVENESS_S = 30  # a generous bound on "answered", never a speed claim


@pytest.fixture(scope="module")
def small_context(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """(base URL, manager, Generations handed out) of a server whose model holds SMALL_CONTEXT tokens."""
    folder = tmp_path_factory.mktemp("full")
    manager = loaded_manager(starter_gguf.parent, folder, STARTER_GGUF, n_ctx=SMALL_CONTEXT)
    generations = recording_generations(manager)
    with serving_api(Services(settings=server_settings(starter_gguf.parent, folder), manager=manager)) as url:
        yield url, manager, generations
    manager.unload()


def filling_prompt(manager: ModelManager, max_tokens: int) -> list[int]:
    """Token ids that leave exactly max_tokens of the context free."""
    words = " ".join(f"word{n}" for n in range(SMALL_CONTEXT * 2))
    return manager.encode(words)[:SMALL_CONTEXT - max_tokens]


def evaluated(manager: ModelManager) -> int:
    """Prompt tokens the llama.cpp model has evaluated so far (its batch decoder counts them chunk by chunk)."""
    return manager.model.evaluated_prompt_tokens


def test_a_prompt_filling_the_context_does_not_starve_the_others(small_context) -> None:
    url, manager, generations = small_context
    ids = filling_prompt(manager, 4)
    results: dict[str, tuple[int, float]] = {}

    def post(name: str, path: str, body: dict) -> None:
        response = httpx.post(url + path, json=body, timeout=600)
        results[name] = (response.status_code, time.monotonic())

    wait_idle(manager)
    big = threading.Thread(target=post, args=("big", "/v1/completions", {"prompt": ids, "max_tokens": 4}))
    big.start()
    deadline = time.monotonic() + LIVENESS_S
    while not manager.busy:  # the big prompt holds the model: it is being evaluated
        assert time.monotonic() < deadline
        time.sleep(0.005)
    small = threading.Thread(target=post, args=("small", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
    small.start()
    answered_during, slowest = 0, 0.0
    started = time.monotonic()
    while big.is_alive():
        for path in ("/v1/internal/health", "/v1/models"):
            asked = time.monotonic()
            response = httpx.get(url + path, timeout=LIVENESS_S)  # a timeout here fails the test
            assert response.status_code == 200
            slowest = max(slowest, time.monotonic() - asked)
        answered_during += "big" not in results
    big.join()
    small.join(600)
    print(f"big prompt ({len(ids)} tokens) answered after {results['big'][1] - started:.1f} s; the small request "
          f"{results['small'][1] - results['big'][1]:.1f} s after it; {answered_during} health+models pairs answered "
          f"meanwhile, the slowest in {slowest:.2f} s")
    assert results["big"][0] == 200 and results["small"][0] == 200
    assert answered_during >= 1  # /v1/models and health answered while the big prompt was evaluated
    assert results["small"][1] - results["big"][1] < LIVENESS_S  # answered soon after the big one's end
    assert generations[-2].stats.prompt_tokens == len(ids)  # the big one really filled the context


def test_a_client_that_leaves_during_prompt_evaluation_cancels_it(small_context) -> None:
    url, manager, generations = small_context
    ids = filling_prompt(manager, 4)[::-1]  # not a prompt a slot's KV holds from an earlier test
    wait_idle(manager)
    before, read_before = len(generations), evaluated(manager)
    body = json.dumps({"prompt": ids, "max_tokens": 4}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + LIVENESS_S
        while not (len(generations) > before and manager.busy and evaluated(manager) > read_before):
            assert time.monotonic() < deadline, "the prompt evaluation never started"
            time.sleep(0.005)
    wait_idle(manager)
    cancelled = generations[before]
    assert cancelled.stats.finish_reason == "cancelled" and cancelled.stats.completion_tokens == 0
    assert evaluated(manager) - read_before < len(ids)  # stopped between two chunks of the prompt, not after all
    follow_up = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=600)
    assert follow_up.status_code == 200


def test_a_prompt_longer_than_the_context_is_refused_not_cut(small_context) -> None:
    url, manager, _ = small_context
    too_long = filling_prompt(manager, 4) + [filling_prompt(manager, 4)[0]] * 8
    response = httpx.post(url + "/v1/completions", json={"prompt": too_long, "max_tokens": 4}, timeout=LIVENESS_S)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert f"context is {SMALL_CONTEXT} tokens" in error["message"] and str(len(too_long)) in error["message"]
    huge = "word " * 200_000  # refused by its size alone, before any tokenization
    response = httpx.post(url + "/v1/chat/completions", timeout=LIVENESS_S,
                          json={"messages": [{"role": "user", "content": huge}], "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    many = [{"role": "user" if n % 2 == 0 else "assistant", "content": "hi"} for n in range(5001)]
    response = httpx.post(url + "/v1/chat/completions", json={"messages": many, "max_tokens": 4}, timeout=LIVENESS_S)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
