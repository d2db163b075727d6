"""The API's security, started the way webui.py starts it (--api with keys and CORS origins): a Bearer key on every
route, the admin key for load/unload, CORS only for the origins named, 127.0.0.1 unless --listen."""
from __future__ import annotations

import socket
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from conftest import ROOT
from modules.extensions import start_extensions
from modules.model_manager import ModelManager
from modules.services import Services
from modules.settings import load_settings
from modules.starter import STARTER_GGUF

API_KEY, ADMIN_KEY, ORIGIN = "user-key", "admin-key", "https://app.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    folder = tmp_path_factory.mktemp("secure")
    (folder / "settings.yaml").write_text("")  # isolated from user_data/settings.yaml
    settings = load_settings([
        "--settings", str(folder / "settings.yaml"), "--api", "--api-port", str(free_port()), "--api-key", API_KEY,
        "--admin-key", ADMIN_KEY,
        "--api-cors-origins", ORIGIN, "--model-dir", str(starter_gguf.parent), "--lora-dir", str(folder / "loras"),
        "--user-data-dir", str(folder), "--preset-dir", str(ROOT / "presets")])
    manager = ModelManager(settings.model_dir, settings.lora_dir)
    manager.load(STARTER_GGUF, options={"n_ctx": 1024})
    services = Services(settings=settings, manager=manager)
    registry = start_extensions(services)
    server = registry.handles["openai"]  # the extension serves the app itself
    assert server.host == "127.0.0.1"  # no --listen: never the network
    yield server.url
    server.stop()
    manager.unload()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ROUTES = [("GET", "/v1/models", None), ("GET", "/openapi.json", None), ("GET", "/v1/internal/health", None),
          ("POST", "/v1/internal/token-count", {"text": "hi"}),
          pytest.param("POST", "/predict", {"instruction": "Say hi."}, marks=pytest.mark.slow),  # generates
          pytest.param("POST", "/v1/embeddings", {"input": "hi"}, marks=pytest.mark.slow)]  # loads its model


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_every_route_needs_the_key(api: str, method: str, path: str, body: dict | None) -> None:
    missing = httpx.request(method, api + path, json=body, timeout=60)
    wrong = httpx.request(method, api + path, json=body, headers=bearer("nope"), timeout=60)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.request(method, api + path, json=body, headers=bearer(API_KEY), timeout=120).status_code == 200
    assert httpx.request(method, api + path, json=body, headers={"x-api-key": API_KEY}, timeout=120).status_code == 200


def test_unknown_routes_need_the_key_too(api: str) -> None:
    assert httpx.get(api + "/v1/nothing/here").status_code == 401
    assert httpx.get(api + "/v1/nothing/here", headers=bearer(API_KEY)).status_code == 404


def test_official_client_with_and_without_the_key(api: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api + "/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=api + "/v1", api_key=API_KEY, max_retries=0).models.list()
    assert models.data[0].id == STARTER_GGUF


def test_load_and_unload_need_the_admin_key(api: str) -> None:
    for path, body in (("/v1/internal/model/unload", None), ("/v1/internal/lora/load", {"lora_names": []}),
                       ("/v1/internal/model/load", {"model_name": STARTER_GGUF})):
        refused = httpx.post(api + path, json=body, headers=bearer(API_KEY), timeout=60)
        assert refused.status_code == 401 and "admin" in refused.json()["error"]["message"]
    reload = httpx.post(api + "/v1/internal/model/load", headers=bearer(ADMIN_KEY), timeout=120,
                        json={"model_name": STARTER_GGUF, "args": {"n_ctx": 1024}})
    assert reload.status_code == 200 and reload.json()["model_name"] == STARTER_GGUF
    assert httpx.get(api + "/v1/models", headers=bearer(ADMIN_KEY)).status_code == 200  # admin may do all


def test_cors_only_for_the_named_origin(api: str) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(api + "/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(api + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(api + "/v1/models", headers={"Origin": ORIGIN, **bearer(API_KEY)})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_anthropic_clients_get_anthropics_401(api: str) -> None:
    refused = httpx.post(api + "/v1/messages", json={"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
                         headers={"x-api-key": "nope"}, timeout=60)
    assert refused.status_code == 401
    assert refused.json() == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "Wrong key: this route needs the API key."}}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=api, api_key="wrong", max_retries=0).messages.create(
            model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    reply = anthropic.Anthropic(base_url=api, api_key=API_KEY, max_retries=0, timeout=120).messages.create(
        model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert reply.type == "message" and reply.usage.output_tokens > 0
