"""The API serving several models and clients (issue 13): requests name their model (the starter GGUF under three
names, --max-models 2), --jit loads a named model and evicts the least recently used, keep_alive, the per-request
`lora` field, a full queue answered 503 that the official openai client retries until it is served, and /metrics
read with prometheus_client's own parser."""
from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_helpers import models_folder, recording_generations, server_settings, serving_api, serving_extensions
from conftest import wait_until
from extensions.openai import Params
from extensions.openai.protocol import LoraRef
from extensions.openai.target import keep_alive_seconds, request_adapters
from loaders.batching import Adapter
from modules.model_manager import ModelManager
from modules.services import Services
from modules.settings import load_settings

ALPHA, BETA, GAMMA = "alpha.gguf", "beta.gguf", "gamma.gguf"  # one file under three names
HI = [{"role": "user", "content": "Say hi."}]
slow = pytest.mark.slow  # a served model answering real clients


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """(base URL, the Services behind it): alpha and beta resident, gamma only in models/; a queue of one."""
    folder = tmp_path_factory.mktemp("serving")
    models = models_folder(folder, {ALPHA: starter_gguf, BETA: starter_gguf, GAMMA: starter_gguf})
    manager = ModelManager(models, folder / "loras", max_models=2, max_queue=1, loader_options={"n_ctx": 2048})
    manager.load(BETA)
    manager.load(ALPHA)  # the default model: loaded last
    services = Services(settings=server_settings(models, folder, extensions=["openai"]), manager=manager)
    with serving_extensions(services) as url:
        yield url, services
    manager.close()


def resident(api: str) -> list[str]:
    """Names of the resident models, most recently used first (GET /v1/internal/models)."""
    return [m["name"] for m in httpx.get(api + "/v1/internal/models").json()["models"]]


def make_resident(api: str, *names: str) -> None:
    """Load each of `names` that is not resident, and make the last one the default model (a load does)."""
    for index, name in enumerate(names):
        last = index == len(names) - 1
        if name not in resident(api) or (last and default_model(api) != name):
            response = httpx.post(api + "/v1/internal/model/load", json={"model_name": name}, timeout=300)
            assert response.status_code == 200, response.text


def default_model(api: str) -> str | None:
    return httpx.get(api + "/v1/internal/model/info").json()["model_name"]


def requests_of(api: str, model: str) -> float:
    """Requests that ended on `model`, whatever their outcome (GET /metrics)."""
    return sum(sample.value for family in text_string_to_metric_families(httpx.get(api + "/metrics").text)
               for sample in family.samples
               if sample.name == "workbench:requests_total" and sample.labels["model_name"] == model)


def jit(served: Any) -> Params:
    return served[1].extensions.extensions["openai"].params


def metric(api: str, name: str, **labels: str) -> float:
    """One sample of GET /metrics, read with prometheus_client's parser (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(api + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- requests name their model ------------------------------------------------------------------------------------
@slow
def test_two_resident_models_answer_the_requests_that_name_them(api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    before = {name: requests_of(api, name) for name in (ALPHA, BETA)}
    for name in (ALPHA, BETA):
        reply = client.chat.completions.create(model=name, messages=HI, max_tokens=3, temperature=0)
        assert reply.model == name and reply.choices[0].message.content
    unnamed = client.completions.create(model="", prompt="Hello", max_tokens=2)
    assert unnamed.model == ALPHA  # no model named: the default one
    # each request was decoded by the model it named: that model's counter moved, by its own requests only
    assert requests_of(api, BETA) == before[BETA] + 1
    assert requests_of(api, ALPHA) == before[ALPHA] + 2
    listed = httpx.get(api + "/v1/internal/models").json()
    assert listed["max_models"] == 2 and {m["name"] for m in listed["models"]} == {ALPHA, BETA}
    alpha = next(m for m in listed["models"] if m["name"] == ALPHA)
    assert alpha["default"] and alpha["slots"] >= 1 and alpha["slots_busy"] == 0 and alpha["queued"] == 0
    assert alpha["memory_bytes"] > 0 and alpha["max_queue"] == 1 and alpha["loader"] == "llama.cpp"
    cards = client.models.list().data
    assert {c.id for c in cards[:2]} == {ALPHA, BETA} and cards[0].id == ALPHA and cards[2].id == GAMMA
    assert [c.resident for c in cards] == [True, True, False]


@slow
def test_tokenizer_and_info_routes_take_a_model(api: str) -> None:
    make_resident(api, BETA, ALPHA)
    encoded = httpx.post(api + "/v1/internal/encode", json={"text": "Hello world", "model": BETA}).json()
    assert encoded["length"] == 2
    assert httpx.post(api + "/v1/internal/decode", json={"tokens": encoded["tokens"], "model": BETA}
                      ).json()["text"] == "Hello world"
    assert httpx.post(api + "/v1/internal/token-count", json={"text": "Hello world", "model": BETA}).json() == {
        "length": 2}
    assert httpx.get(api + "/v1/internal/model/info", params={"model": BETA}).json()["model_name"] == BETA
    assert httpx.get(api + "/v1/internal/model/info").json()["model_name"] == ALPHA
    missing = httpx.get(api + "/v1/internal/model/info", params={"model": GAMMA})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@slow
def test_a_model_that_is_not_resident_is_a_404_saying_how_to_load_it(api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=GAMMA, messages=HI, max_tokens=2)
    assert "/v1/internal/model/load" in info.value.body["message"] and "--jit" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model.gguf", messages=HI, max_tokens=2)
    assert "does not exist" in info.value.body["message"]
    assert GAMMA not in resident(api)


@slow
def test_jit_loads_a_named_model_and_evicts_the_least_recently_used(served, api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    client.completions.create(model=ALPHA, prompt="Hello", max_tokens=1)  # beta is now the least recently used
    evicted = metric(api, "workbench:model_unloads_total", model_name=BETA, reason="evicted")
    jit(served).jit = True
    try:
        reply = client.chat.completions.create(model=GAMMA, messages=HI, max_tokens=2)
    finally:
        jit(served).jit = False
    assert reply.model == GAMMA
    assert resident(api) == [GAMMA, ALPHA]  # beta made room; /v1/internal/models shows it
    assert metric(api, "workbench:model_unloads_total", model_name=BETA, reason="evicted") == evicted + 1
    assert metric(api, "workbench:model_loads_total", model_name=GAMMA) >= 1


@slow
def test_unload_takes_a_model_name(api: str) -> None:
    make_resident(api, BETA, ALPHA)
    assert httpx.post(api + "/v1/internal/model/unload", json={"model_name": BETA}, timeout=60).json() == {
        "status": "ok"}
    assert resident(api) == [ALPHA]
    again = httpx.post(api + "/v1/internal/model/unload", json={"model_name": BETA}, timeout=60)
    assert again.status_code == 404 and again.json()["error"]["param"] == "model_name"


def test_jit_and_its_old_name_are_flags(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("")
    for flag in ("--jit", "--api-autoload"):
        settings = load_settings(["--settings", str(tmp_path / "settings.yaml"), flag])
        assert Params(**settings.extension_params["openai"]).loads_on_demand, flag
    assert not Params().loads_on_demand


# --- keep_alive -----------------------------------------------------------------------------------------------------
@slow
def test_keep_alive_zero_unloads_the_model_after_the_request(api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    reply = client.completions.create(model=BETA, prompt="Hello", max_tokens=2, extra_body={"keep_alive": 0})
    assert reply.choices[0].text
    wait_until(lambda: BETA not in resident(api), "beta unloaded after a request with keep_alive 0")
    assert resident(api) == [ALPHA]


@slow
def test_keep_alive_durations(api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)

    def unloads_in(keep_alive: Any) -> float | None:
        client.chat.completions.create(model=BETA, messages=HI, max_tokens=1, extra_body={"keep_alive": keep_alive})
        models = httpx.get(api + "/v1/internal/models").json()["models"]
        return next(m for m in models if m["name"] == BETA)["unloads_in_seconds"]

    assert 3000 < unloads_in("1h") <= 3600
    assert 300 < unloads_in("5m30s") <= 330
    assert unloads_in(-1) is None  # kept loaded
    bad = httpx.post(api + "/v1/chat/completions", json={"model": BETA, "messages": HI, "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    assert [keep_alive_seconds(v) for v in ("1h30m", "90s", "1.5m", "250ms", 300, "300", "-1", -5, "0", None)] == [
        5400, 90, 90, 0.25, 300, 300, -1, -1, 0, None]


# --- LoRA per request -----------------------------------------------------------------------------------------------
def test_the_lora_field_takes_names_and_llama_cpp_ids(tmp_path: Path) -> None:
    for name in ("tone", "style"):
        (tmp_path / "loras" / name).mkdir(parents=True)
        (tmp_path / "loras" / name / "adapter_config.json").write_text("{}")
    manager = ModelManager(tmp_path / "models", tmp_path / "loras")
    assert manager.list_loras() == ["style", "tone"]  # llama.cpp's ids are places in this list
    assert request_adapters(manager, None) is None  # no field: the model's own LoRAs
    assert request_adapters(manager, []) == ()  # the bare model
    assert request_adapters(manager, "tone") == (Adapter("tone", 1.0),)
    assert request_adapters(manager, ["tone", "style"]) == (Adapter("tone", 1.0), Adapter("style", 1.0))
    assert request_adapters(manager, [LoraRef(name="tone", scale=0.5), LoraRef(id=0, scale=0.25),
                                      LoraRef(id="tone")]) == (
        Adapter("tone", 0.5), Adapter("style", 0.25), Adapter("tone", 1.0))


@slow
@pytest.mark.parametrize("lora", ["nope", ["tone-that-is-not-there"], [{"name": "nope", "scale": 0.5}],
                                  [{"id": 7, "scale": 1.0}], [{"id": "nope"}]])
def test_an_unknown_lora_is_a_404(api: str, lora: Any) -> None:
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": HI, "max_tokens": 1})):
        response = httpx.post(api + path, json={**body, "model": ALPHA, "lora": lora})
        assert response.status_code == 404 and response.json()["error"]["param"] == "lora", response.text
    anthropic_client = anthropic.Anthropic(base_url=api, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client.messages.create(model=ALPHA, max_tokens=1, messages=HI, extra_body={"lora": lora})


@slow
@pytest.mark.parametrize("lora", [[{"name": "a", "id": 0}], [{"scale": 0.5}], [{"name": "a", "weight": 1}], 5])
def test_a_malformed_lora_field_is_a_400(api: str, lora: Any) -> None:
    response = httpx.post(api + "/v1/chat/completions", json={"model": ALPHA, "messages": HI, "lora": lora})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("lora"), response.text


@slow
def test_an_empty_lora_list_reaches_the_generation(served, api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    generations = recording_generations(served[1].manager)
    try:
        client.completions.create(model=ALPHA, prompt="Hello", max_tokens=1, extra_body={"lora": []})
        client.completions.create(model=ALPHA, prompt="Hello", max_tokens=1)
    finally:
        del served[1].manager.generate  # the real method again
    assert [g.adapters for g in generations] == [(), None]


# --- fairness and backpressure --------------------------------------------------------------------------------------
@slow
def test_requests_carry_their_client(served, api: str) -> None:
    make_resident(api, BETA, ALPHA)
    generations = recording_generations(served[1].manager)
    try:
        for key in (None, "secret-one"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            httpx.post(api + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers, timeout=300)
    finally:
        del served[1].manager.generate
    by_address, by_key = (g.client for g in generations)
    assert by_address == "address:127.0.0.1"
    assert by_key.startswith("key:") and "secret-one" not in by_key


@slow
def test_a_full_queue_is_a_503_that_the_openai_client_retries_until_served(served, api: str) -> None:
    make_resident(api, BETA, ALPHA)
    engine = served[1].manager.resident(ALPHA).engine
    long = {"model": ALPHA, "prompt": "Once upon a time", "max_tokens": 1900, "ban_eos_token": True, "stream": True}
    seen: list[int] = []
    replies: list[Any] = []

    def ask(retries: int) -> None:
        http = httpx.Client(event_hooks={"response": [lambda response: seen.append(response.status_code)]},
                            timeout=300) if retries else None
        retrying = openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=retries, http_client=http)
        replies.append(retrying.completions.create(model=ALPHA, prompt="Hello", max_tokens=2))

    with ExitStack() as stack:
        for _ in range(engine.slots):  # every slot busy with a long generation (its first token has arrived)
            stack.enter_context(httpx.stream("POST", api + "/v1/completions", json=long, timeout=300))
        wait_until(lambda: engine.busy_slots == engine.slots, "every slot busy")
        queued = threading.Thread(target=ask, args=(0,))
        queued.start()
        wait_until(lambda: engine.waiting == 1, "one request waiting (--max-queue 1)")
        full = httpx.post(api + "/v1/chat/completions", json={"model": ALPHA, "messages": HI, "max_tokens": 1})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "overloaded" and "--max-queue" in full.json()["error"]["message"]
        messages = httpx.post(api + "/v1/messages", json={"model": ALPHA, "messages": HI, "max_tokens": 1})
        assert messages.status_code == 503 and messages.json()["error"]["type"] == "overloaded_error"
        retried = threading.Thread(target=ask, args=(50,))
        retried.start()
        wait_until(lambda: 503 in seen, "the openai client was refused once")
    # the long streams are closed: their generations are cancelled, the queue moves, the retries get in
    queued.join(timeout=300)
    retried.join(timeout=300)
    assert len(replies) == 2 and all(r.choices[0].text for r in replies)
    assert seen[0] == 503 and seen[-1] == 200
    assert metric(api, "workbench:requests_total", model_name=ALPHA, outcome="overloaded") >= 3


# --- /metrics -------------------------------------------------------------------------------------------------------
@slow
def test_metrics_parse_and_move_after_a_request(api: str, client: openai.OpenAI) -> None:
    make_resident(api, BETA, ALPHA)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(api + "/metrics").text)}
    assert {"workbench:requests", "workbench:prompt_tokens", "workbench:generation_tokens",
            "workbench:time_to_first_token_seconds", "workbench:time_per_output_token_seconds",
            "workbench:num_requests_waiting", "workbench:num_requests_running", "workbench:models_resident",
            "workbench:model_loads", "workbench:model_unloads"} <= set(families)
    assert families["workbench:time_to_first_token_seconds"].type == "histogram"
    names = ("workbench:prompt_tokens_total", "workbench:generation_tokens_total",
             "workbench:time_to_first_token_seconds_count", "workbench:time_per_output_token_seconds_count")
    before = {name: metric(api, name, model_name=BETA) for name in names}
    reply = client.completions.create(model=BETA, prompt="The capital of France is", max_tokens=4,
                                      extra_body={"ban_eos_token": True})
    moved = {name.removeprefix("workbench:"): metric(api, name, model_name=BETA) - before[name] for name in names}
    assert moved == {"prompt_tokens_total": reply.usage.prompt_tokens, "generation_tokens_total": 4,
                     "time_to_first_token_seconds_count": 1, "time_per_output_token_seconds_count": 1}
    assert metric(api, "workbench:models_resident") == 2
    assert metric(api, "workbench:num_requests_waiting", model_name=ALPHA) == 0
    assert metric(api, "workbench:slots", model_name=ALPHA) >= 1


@slow
def test_metrics_need_the_api_key(served) -> None:
    with serving_api(served[1], Params(api_key="metrics-key")) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        response = httpx.get(url + "/metrics", headers={"Authorization": "Bearer metrics-key"})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        openmetrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer metrics-key",
                                                           "Accept": "application/openmetrics-text"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")
