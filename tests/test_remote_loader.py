"""The remote loader against real servers: our own API (another workbench) and llama-cpp-python's server, each
started once here on the starter model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from api_helpers import server_settings, serving_api
from conftest import FRANCE
from modules.errors import InvalidInput, ModelLoadError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.services import Services, load_startup_model
from modules.settings import load_settings
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow  # a llama_cpp.server child process and a workbench server

GREEDY = GenerationParams(do_sample=False, max_new_tokens=24)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    manager = ModelManager(starter_gguf.parent, tmp_path_factory.mktemp("loras"))
    manager.load(STARTER_GGUF, options={"n_ctx": 2048})
    yield manager
    manager.unload()


@pytest.fixture(scope="module")
def workbench(local: ModelManager, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Our API serving the local manager: the 'remote' workbench."""
    settings = server_settings(local.model_dir, tmp_path_factory.mktemp("remote"))
    with serving_api(Services(settings=settings, manager=local)) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def remote(workbench: str, local: ModelManager, tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    manager = ModelManager(local.model_dir, tmp_path_factory.mktemp("loras"))
    manager.load("anything", "remote", {"remote_url": workbench})
    yield manager
    manager.unload()


def text_of(manager: ModelManager, prompt: str | list[int], params: GenerationParams = GREEDY) -> str:
    return manager.complete(prompt, params).text


def test_a_request_the_server_refuses_is_bad_input_not_a_failure(remote: ModelManager) -> None:
    """The remote server's 4xx is the request's fault (the API answers 400, not a 500 "the server failed")."""
    with pytest.raises(InvalidInput, match="HTTP 400.*outside"):
        remote.complete("The capital of France is", GREEDY.model_copy(update={"logit_bias": {10**9: 1.0}}))
    assert text_of(remote, "The capital of France is")


# --- against another workbench ------------------------------------------------------------------------------------
def test_it_learns_what_the_workbench_serves(remote: ModelManager) -> None:
    model = remote.model
    info = remote.info()
    assert info.loader == "remote" and info.extra["server"] == "workbench" and info.name == STARTER_GGUF
    assert "tokenize" in info.capabilities and "<|im_start|>" in model.chat_template
    assert model.context_length == 2048 and "min_p" in model.supported_params


def test_tokens_and_greedy_text_match_the_local_model(remote: ModelManager, local: ModelManager) -> None:
    assert remote.encode("Hello world, bonjour!") == local.encode("Hello world, bonjour!")
    assert remote.decode(local.encode("Hello world")) == "Hello world"
    prompt = "The capital of France is"
    assert text_of(remote, prompt) == text_of(local, prompt)
    lengths = remote.complete(prompt, GREEDY.model_copy(update={"max_new_tokens": 5, "ban_eos_token": True}))
    assert lengths.stats.completion_tokens == 5 and lengths.stats.finish_reason == "length"


def test_stop_strings_and_knobs_reach_the_server(remote: ModelManager, local: ModelManager) -> None:
    prompt = "1, 2, 3, 4, 5,"
    full = text_of(local, prompt)
    assert " 7" in full
    assert text_of(remote, prompt, GREEDY.model_copy(update={"stop": [" 7"]})) == full.split(" 7")[0]
    penalised = GREEDY.model_copy(update={"repetition_penalty": 1.5, "max_new_tokens": 40})
    assert text_of(remote, prompt, penalised) == text_of(local, prompt, penalised) != text_of(local, prompt)
    with_logprobs = remote.complete(prompt, GREEDY.model_copy(update={"logprobs": 2, "max_new_tokens": 4}))
    assert with_logprobs.stats.completion_tokens == 4


def test_cancel_stops_the_remote_generation(remote: ModelManager, local: ModelManager) -> None:
    generation = remote.generate("Once upon a time", GREEDY.model_copy(update={"max_new_tokens": 1500,
                                                                              "ban_eos_token": True}))
    seen = 0
    for _ in generation:
        seen += 1
        if seen == 3:
            generation.cancel()
    assert generation.stats.finish_reason == "cancelled" and generation.stats.completion_tokens < 1500
    deadline = time.monotonic() + 30
    while local.busy and time.monotonic() < deadline:  # the server sees the connection close and stops too
        time.sleep(0.01)
    assert not local.busy


def test_flags_load_the_remote_model_at_start(workbench: str, local: ModelManager, tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("")
    settings = load_settings(["--settings", str(tmp_path / "settings.yaml"), "--loader", "remote",
                              "--remote-url", workbench, "--model-dir", str(tmp_path)])
    services = Services(settings=settings, manager=ModelManager(tmp_path, tmp_path / "loras",
                                                                loader_options=settings.loader_options))
    load_startup_model(services)
    try:
        assert services.manager.info().loader == "remote" and services.manager.info().name == STARTER_GGUF
        assert "Paris" in text_of(services.manager, france_prompt(local))
    finally:
        services.manager.unload()


def france_prompt(manager: ModelManager) -> str:
    from modules.chat.templates import render_chat

    return render_chat(manager.model.chat_template, [{"role": "user", "content": FRANCE}])


def test_clear_errors_when_the_server_is_missing(tmp_path: Path) -> None:
    manager = ModelManager(tmp_path, tmp_path)
    with pytest.raises(ModelLoadError, match="needs --remote-url"):
        manager.load("x", "remote")
    with pytest.raises(ModelLoadError, match="Cannot reach"):
        manager.load("x", "remote", {"remote_url": f"http://127.0.0.1:{free_port()}/v1"})
    assert manager.model is None


# --- against llama-cpp-python's server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_server(starter_gguf: Path) -> str:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(starter_gguf),
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "False"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reader.join(timeout=30)  # its stderr, read to the end
            pytest.fail(f"llama_cpp.server exited: {b''.join(errors).decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("llama_cpp.server did not start within 180 s")
    yield url + "/v1"
    process.terminate()
    process.wait(timeout=30)


def test_llama_cpp_python_server(llama_server: str, local: ModelManager, tmp_path: Path) -> None:
    manager = ModelManager(tmp_path, tmp_path)
    manager.load(STARTER_GGUF, "remote", {"remote_url": llama_server})
    try:
        info = manager.info()
        assert info.extra["server"] == "llama-cpp-python" and "tokenize" not in info.capabilities
        assert manager.encode("Hello world, bonjour!") == local.encode("Hello world, bonjour!")
        assert manager.decode(local.encode("Hello world")) == "Hello world"
        answer = manager.complete(france_prompt(local), GREEDY.model_copy(update={"stop": ["<|im_end|>"]}))
        assert "Paris" in answer.text and "<|im_end|>" not in answer.text
        counted = manager.complete("1, 2, 3, 4, 5,", GREEDY.model_copy(update={"max_new_tokens": 6,
                                                                                "ban_eos_token": False}))
        assert counted.text and len(local.encode(counted.text)) <= 6
        warned = manager.generate("Hi", GREEDY.model_copy(update={"dry_multiplier": 0.8}))
        assert any("dry_multiplier" in w for w in warned.warnings)  # declared honestly: it has no DRY
    finally:
        manager.unload()
