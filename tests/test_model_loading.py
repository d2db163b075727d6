"""While a model loads (at start-up, from the Model tab, through the API), the manager says which and since when, the
API answers 503 with Retry-After and code model_loading, and GET /v1/internal/health says "loading" at once.

A load is held open by a real remote server that answers its model list one header line at a time until the test
lets it finish; the remote loader then fails to load, as it would against a server that dies."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from api_helpers import server_settings, serving_api
from conftest import wait_until
from modules.errors import ModelLoadError, ModelLoading, NoModelLoaded
from modules.model_manager import ModelManager
from modules.services import Services, load_startup_model

DEADLINE_S = 60


@contextmanager
def slow_server() -> Iterator[tuple[str, threading.Event]]:
    """(base URL, release): an HTTP server that starts each answer and keeps it going, one header line at a time,
    until `release` is set; then it hangs up mid-answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    release = threading.Event()

    def answer(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not release.wait(0.5):  # a header line now and then keeps the client's read timeout at bay
                connection.sendall(b"x-still-thinking: yes\r\n")

    def serve() -> None:
        while not release.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", release
    finally:
        release.set()
        listener.close()


@pytest.fixture()
def served(tmp_path: Path, starter_gguf: Path):
    """(base URL, Services): the API over a manager with no model loaded."""
    services = Services(settings=server_settings(starter_gguf.parent, tmp_path),
                        manager=ModelManager(starter_gguf.parent, tmp_path / "loras"))
    with serving_api(services) as url:
        yield url, services


def health(url: str) -> dict:
    return httpx.get(url + "/v1/internal/health", timeout=DEADLINE_S).json()


def start_load(how: str, url: str, services: Services, remote_url: str) -> threading.Thread:
    """Start a load of the remote model in the background, the way `how` names."""
    manager = services.manager
    if how == "start-up":
        services.settings = services.settings.model_copy(update={"loader": "remote"})
        manager.loader_options = {"remote_url": remote_url}  # what build_services passes from the settings
        work = lambda: load_startup_model(services)  # noqa: E731
    elif how == "model tab":
        def work() -> None:
            with pytest.raises(ModelLoadError):
                manager.load("slow-model", "remote", {"remote_url": remote_url})
    else:
        def work() -> None:
            answer = httpx.post(url + "/v1/internal/model/load", timeout=DEADLINE_S,
                                json={"model_name": "slow-model", "loader": "remote", "args": {"remote_url": remote_url}})
            assert answer.status_code == 400 and "Cannot reach" in answer.json()["error"]["message"]
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["start-up", "model tab", "api"])
def test_requests_during_a_load_are_told_to_retry(served, how: str) -> None:
    url, services = served
    manager = services.manager
    assert health(url) == {"status": "no_model", "model_loaded": False}
    with slow_server() as (remote_url, release):
        loader = start_load(how, url, services, remote_url)
        wait_until(lambda: health(url)["status"] == "loading", "the health route to say 'loading'",
                   timeout_s=DEADLINE_S)
        during = health(url)
        expected = "remote" if how == "start-up" else "slow-model"
        assert during["loading_model"] == expected and during["loading_seconds"] >= 0 and not during["model_loaded"]
        assert manager.loading is not None and manager.loading.name == expected
        with pytest.raises(ModelLoading):
            manager.require_model()

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="slow-model", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "model_loading"
        assert int(refused.value.response.headers["retry-after"]) > 0
        assert expected in refused.value.body["message"]
        with pytest.raises(anthropic.ServiceUnavailableError) as busy:
            anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
                model="slow-model", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert busy.value.body["error"]["type"] == "overloaded_error" and busy.value.response.headers["retry-after"]
        completion = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=DEADLINE_S)
        assert completion.status_code == 503 and completion.json()["error"]["code"] == "model_loading"
        assert httpx.get(url + "/v1/models", timeout=DEADLINE_S).status_code == 200  # never waits on the model
        release.set()
        loader.join(DEADLINE_S)
        assert not loader.is_alive()
    assert manager.loading is None and health(url) == {"status": "no_model", "model_loaded": False}
    after = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=DEADLINE_S)
    assert after.status_code == 503 and after.json()["error"]["code"] == "model_not_loaded"
    assert int(after.headers["retry-after"]) > 0
    with pytest.raises(NoModelLoaded) as nothing:
        manager.require_model()
    assert not isinstance(nothing.value, ModelLoading)
    if how == "start-up":
        assert any("Could not load remote" in message for message in services.startup_messages)


def test_health_says_ok_once_a_model_is_loaded(served, starter_gguf: Path) -> None:
    url, services = served
    services.manager.load(starter_gguf.name, options={"n_ctx": 256})
    try:
        assert health(url) == {"status": "ok", "model_loaded": True}
        assert services.manager.loading is None
    finally:
        services.manager.unload()
