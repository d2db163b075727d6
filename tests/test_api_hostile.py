"""A hostile battery: several hundred requests an attacker or a buggy client might send, generated from small
tables, against one server (the starter GGUF with a small context, an API key and a different admin key).

Every case must be answered within DEADLINE_S with a 4xx, never a 5xx, in OpenAI's error shape (Anthropic's under
/v1/messages), and after each group the server must still answer a normal request. The official openai and
anthropic SDKs must raise their own exception class for each status; a bug is a 500 whose error id is also in the
log line."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from api_helpers import loaded_manager, server_settings, serving
from modules.services import Services
from modules.starter import STARTER_GGUF

pytestmark = pytest.mark.slow

API_KEY, ADMIN_KEY = "battery-user-key", "battery-admin-key"
CONTEXT = 512
DEADLINE_S = 30  # "answered within seconds": a liveness bound, never a speed claim
ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                   "request_too_large", "rate_limit_error", "api_error", "overloaded_error"}


# --- raw JSON -------------------------------------------------------------------------------------------------------
class Raw:
    """A JSON value written as is (NaN, Infinity, numbers JSON cannot hold): json.dumps cannot write these."""

    def __init__(self, text: str):
        self.text = text


NAN, INF, NEG_INF, HUGE_FLOAT, HUGE_INT = (Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"),
                                            Raw("9" * 5000))


def encode(body: Any) -> bytes:
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))  # ensure_ascii: a lone surrogate is written as the escape \ud800
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{index}@@"', raw)
    return text.encode()


# --- the cases --------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    expect: int | None = None  # an exact status, else any 4xx
    key: str | None = API_KEY


JSON = {"content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hello", "max_tokens": 2}
MESSAGES = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
BASES = {
    "/v1/completions": COMPLETION,
    "/v1/chat/completions": CHAT,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "Hi"}]},
    "/v1/embeddings": {"input": "hi"},
    "/v1/internal/encode": {"text": "hi"},
    "/v1/internal/decode": {"tokens": [1, 2]},
    "/v1/internal/token-count": {"text": "hi"},
    "/v1/internal/model/load": {"model_name": "missing.gguf"},
    "/v1/internal/lora/load": {"lora_names": ["missing"]},
    "/predict": {"instruction": "Say hi."},
}
ADMIN_ROUTES = {"/v1/internal/model/load", "/v1/internal/model/unload", "/v1/internal/lora/load"}

#: Whole bodies that are no request at all.
BAD_BODIES: dict[str, tuple[bytes, dict[str, str]]] = {
    "not JSON": (b"{not json", JSON),
    "truncated JSON": (b'{"prompt": "x", "max_tokens": ', JSON),
    "empty": (b"", JSON),
    "null": (b"null", JSON),
    "an array": (b"[1, 2, 3]", JSON),
    "a string": (b'"hello"', JSON),
    "a number": (b"42", JSON),
    "true": (b"true", JSON),
    "NaN field": (b'{"x": NaN}', JSON),
    "Infinity field": (b'{"x": Infinity}', JSON),
    "-Infinity field": (b'{"x": -Infinity}', JSON),
    "1e400 field": (b'{"x": 1e400}', JSON),
    "5000-digit integer": (b'{"x": ' + b"9" * 5000 + b"}", JSON),
    "deep arrays": (b"[" * 100_000 + b"]" * 100_000, JSON),
    "deep objects": (b'{"a":' * 300 + b"1" + b"}" * 300, JSON),
    "escaped lone surrogate": (b'{"x": "\\ud800"}', JSON),
    "lone surrogate as UTF-8 bytes": (b'{"x": "\xed\xa0\x80"}', JSON),
    "invalid UTF-8": (b'{"x": "\xff\xfe"}', JSON),
    "surrogate in a key": (b'{"\\udfff": 1}', JSON),
    "text/plain": (b'{"prompt": "x"}', {"content-type": "text/plain"}),
    "no content type": (b'{"prompt": "x"}', {}),
    "form-encoded": (b"prompt=x&max_tokens=2", {"content-type": "application/x-www-form-urlencoded"}),
    "multipart": (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--b--\r\n",
                  {"content-type": "multipart/form-data; boundary=b"}),
}

#: Names that must never reach a file outside their folder, nor crash the OS call that looks them up.
BAD_NAMES = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "a/../../b", "~/.ssh/id_rsa", "C:\\x",
             "x" * 5000, "a/" * 3000 + "b", "a\x00b", "\ud800", "..", "%2e%2e/x", " "]

INT_WRONG = ["5", 1.5, True, [], {}, NAN, INF, HUGE_FLOAT, HUGE_INT]
FLOAT_WRONG = ["0.5", True, [], {}, NAN, INF, NEG_INF, HUGE_FLOAT]
BOOL_WRONG = ["true", 1, 0, None, [], {}]
STR_WRONG = [5, 1.5, True, [], {}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
HUGE_SCHEMA = {"type": "object", "properties": {f"p{n}": {"type": "string", "description": "d" * 200}
                                                for n in range(3000)}}
MANY_MESSAGES = [{"role": "user" if n % 2 == 0 else "assistant", "content": "hi"} for n in range(5001)]
HUGE_TEXT = "word " * 200_000

#: Fields shared by /v1/completions and /v1/chat/completions: values each must refuse.
SAMPLING: dict[str, list[Any]] = {
    "max_tokens": INT_WRONG + [0, -1, 10**12, CONTEXT],
    "n": INT_WRONG + [0, -1, 9, 10**6],
    "temperature": FLOAT_WRONG + [-0.1, 100.5, 1e308],
    "top_p": FLOAT_WRONG + [-0.1, 1.5],
    "presence_penalty": FLOAT_WRONG + [-3, 3],
    "frequency_penalty": FLOAT_WRONG + [-3, 3],
    "seed": ["1", 1.5, True, 10**30, -(10**30), NAN],
    "stop": [5, [1], [None], {"a": 1}, ["x"] * 5000],
    "logit_bias": ["x", [1], {"abc": 1}, {"1": 1000}, {"1": -1000}, {"1": "x"}, {"99999999": 1}, {"-5": 1},
                   {str(n): 1 for n in range(5000)}, {"1": NAN}],
    "stream": BOOL_WRONG,
    "stream_options": ["x", {"include_usage": "yes"}, {"bogus": 1}],
    "user": STR_WRONG,
    "model": [5, [], "no-such-model", *BAD_NAMES],
    "preset": [5, *[n for n in BAD_NAMES if n.strip()], "no-such-preset"],
    "top_k": ["5", 1.5, -1, 10**12],
    "min_p": [-1, 2, "x"],
    "typical_p": [-0.5, 1.5],
    "repetition_penalty": [-1, "x", NAN],
    "repetition_penalty_range": [-2, 10**12],
    "mirostat_mode": [3, -1, True, "2"],
    "custom_token_bans": [[-1], [10**8], "a,b", ["x"], list(range(5000))],
    "sampler_priority": [["bogus"], 5, "temperature,bogus"],
    "dry_sequence_breakers": [5, "not json ["],
    "dry_allowed_length": [0, 10**12],
    "num_beams": [0, 65],
    "max_new_tokens": [0, 10**7],
    "grammar_string": [5, "root ::= (", "root ::= undefined_rule", "root ::= [a-"],
    "json_schema": [5, "not json", {"type": "nonsense"}, {"type": "object", "properties": {"a": {"$ref": "#/$defs/no"}}},
                    {"type": "string", "pattern": "("}],
    "banned_strings": [5, [5]],
    "stopping_strings": [5, [5], ["x"] * 5000],
}
COMPLETION_ONLY: dict[str, list[Any]] = {
    "prompt": ["", [], [-1], [10**9], [1.5], [[1], [2]], ["a", "b"], 123, {"a": 1}, None, True, [[]], [None],
               HUGE_TEXT, list(range(1, 5000))],
    "suffix": ["def f(", 5],
    "echo": BOOL_WRONG[:-2],
    "logprobs": [-1, 21, 10**6, True, "1", 1.5],
    "best_of": [0, 3, 10**6],
}
CHAT_ONLY: dict[str, list[Any]] = {
    "messages": [[], "hi", [1], [None], [{"role": "bogus", "content": "x"}], [{"content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": {"text": "x"}}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
                 [{"role": "user", "content": [{"text": "x"}]}], [{"role": "user", "content": "x", "tool_calls": "x"}],
                 [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}],
                 [{"role": "user", "content": "x", "name": 5}], MANY_MESSAGES,
                 [{"role": "user", "content": HUGE_TEXT}], [{"role": "user", "content": "x" * 600_000}]],
    "tools": ["x", [1], [{"type": "function"}], [{"type": "function", "function": {"name": "bad name!"}}],
              [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
              [{"type": "bogus", "function": {"name": "f"}}], [TOOL] * 200,
              [{"type": "function", "function": {"name": "lookup_everything", "parameters": HUGE_SCHEMA}}]],
    "tool_choice": ["sometimes", 5, {"type": "function"}, "required", {"type": "function", "function": {"name": 5}}],
    "response_format": ["json", {"type": "bogus"}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": "x"}}],
    "logprobs": ["yes", 1, 2.5],
    "top_logprobs": [-1, 21, 10**6, "1"],
    "max_completion_tokens": [0, -1, 10**12, "5"],
    "mode": ["bogus", 5],
    "instruction_template": [5, *BAD_NAMES, "no-such-template"],
    "instruction_template_str": [5, "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                                    "{% endfor %}", "{{ 'x' * 10000000000 }}"],
    "name1": STR_WRONG,
    "user_bio": STR_WRONG,
    "chat_instruct_command": STR_WRONG,
    "continue_": ["yes", True],
}
#: Whole chat bodies whose fault lies between two fields.
CHAT_BODIES = {
    "tool_choice names a missing tool": {**CHAT, "tools": [TOOL],
                                         "tool_choice": {"type": "function", "function": {"name": "missing"}}},
    "a character name climbing out": {**CHAT, "mode": "chat", "character": "../../etc/passwd"},
    "a huge character name": {**CHAT, "mode": "chat", "character": "c" * 5000},
    "a character that does not exist": {**CHAT, "mode": "chat", "character": "Nobody-Here"},
    "a NUL in the character": {**CHAT, "mode": "chat-instruct", "character": "a\x00b"},
    "max_tokens fills the context": {**CHAT, "max_tokens": CONTEXT},
    "several choices with a stream and a bad seed": {**CHAT, "n": 2, "stream": True, "seed": "x"},
}
MESSAGES_FIELDS: dict[str, list[Any]] = {
    "max_tokens": INT_WRONG + [0, -1, 10**12, None],
    "messages": [[], "x", [{"role": "system", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "bogus"}]}],
                 [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}],
                 [{"role": "user", "content": [{"type": "document", "source": {}}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}],
                 [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "r"}]}],
                 [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x",
                                                "content": [{"type": "image"}]}]}],
                 [{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": "x"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": 5}], "extra": 1}],
                 [{"role": "user", "content": [5]}], [{"role": "user", "content": [None]}],
                 MANY_MESSAGES, [{"role": "user", "content": HUGE_TEXT}]],
    "system": [5, [{"type": "image"}], [{"type": "text", "text": 5}], [5], {"text": "x"}],
    "stop_sequences": ["x", [5], ["s"] * 5000],
    "temperature": FLOAT_WRONG + [-1, 1.5],
    "top_p": [-0.5, 1.5, "x"],
    "top_k": [-1, 10**12, "5"],
    "stream": BOOL_WRONG,
    "tools": ["x", [{"name": "bad name!"}], [{"name": "f", "input_schema": "x"}], [{"name": "f"}] * 200, [5]],
    "tool_choice": ["auto", {"type": "bogus"}, {"type": "tool"}, 5],
    "metadata": ["x", 5, []],
    "model": [5, "no-such-model", *BAD_NAMES],
}
INTERNAL: dict[str, list[Any]] = {
    "/v1/internal/encode": [{"text": 5}, {}, {"text": None}, {"text": "x", "add_bos": "yes"}, {"text": "x", "bogus": 1},
                            {"text": "\ud800"}, {"text": "x" * 3_000_000}],
    "/v1/internal/decode": [{"tokens": [-1]}, {"tokens": [2**40]}, {"tokens": ["a"]}, {"tokens": "x"},
                            {"tokens": [99_999_999]}, {"tokens": [1.5]}, {"tokens": None}, {}, {"tokens": [NAN]}],
    "/v1/internal/token-count": [{"text": 5}, {}, {"text": ["a"]}, {"text": HUGE_TEXT.replace(" ", "\ud800")},
                                 {"text": " " * 3_000_000}],
    "/v1/internal/model/load": [*({"model_name": name} for name in [*BAD_NAMES, "missing.gguf", 5, ""]),
                                {"model_name": STARTER_GGUF, "args": {"n_ctx": -5}},
                                {"model_name": STARTER_GGUF, "args": {"bogus": 1}},
                                {"model_name": STARTER_GGUF, "args": {"n_ctx": "big"}},
                                {"model_name": STARTER_GGUF, "loader": "bogus"},
                                {"model_name": STARTER_GGUF, "args": "x"}, {}],
    "/v1/internal/lora/load": [*({"lora_names": [name]} for name in [*BAD_NAMES, "missing", "."]),
                               {"lora_names": "x"}, {"lora_names": [1]}, {"lora_names": ["a"], "lora_scales": [1, 2]},
                               {"lora_names": [], "lora_scales": "x"}, {}],
    "/predict": [{"instruction": ""}, {}, {"instruction": 5}, {"instruction": "x", "temperature": 5},
                 {"instruction": "x", "max_new_tokens": 10**6}, {"instruction": "x", "max_new_tokens": 0},
                 {"instruction": "x", "input": 5}, {"instruction": "x", "bogus": 1},
                 {"instruction": HUGE_TEXT, "max_new_tokens": 2}],
    "/v1/embeddings": [{"input": []}, {"input": 5}, {"input": [[1, 2]]}, {"input": "x", "encoding_format": "hex"},
                       {"input": "x", "dimensions": 0}, {}, {"input": [5]}, {"input": "x", "bogus": 1},
                       {"input": ["hi"] * 3000}],
    "/v1/messages/count_tokens": [{"messages": []}, {"messages": [{"role": "user", "content": 5}]},
                                  {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, {}],
}
ROUTES: list[tuple[str, str, int]] = [
    ("GET", "/v1/nope", 404), ("GET", "/v1", 404), ("GET", "/", 404), ("POST", "/v1/models", 405),
    ("DELETE", "/v1/chat/completions", 405), ("PUT", "/v1/messages", 405), ("GET", "/v1/messages/xyz", 404),
    ("GET", "/v1/completions", 405), ("PATCH", "/v1/internal/health", 405), ("GET", "/v1/internal/model/load", 405),
    ("GET", "/v1/models/" + "m" * 5000, 404), ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", 404),
    ("GET", "/v1/models/%00", 404), ("POST", "/v1/chat/completions/extra", 404), ("TRACE", "/v1/models", 405),
    ("GET", "/%ff%fe", 404), ("GET", "/v1/models/%ED%A0%80", 404), ("OPTIONS", "/v1/completions", 405),
    ("DELETE", "/v1/messages", 405), ("GET", "/v1/messages", 405), ("POST", "/v1/internal/health", 405),
]
AUTH: list[tuple[str, dict[str, str]]] = [
    ("no key", {}), ("a wrong key", {"authorization": "Bearer nope"}), ("a bare Bearer", {"authorization": "Bearer"}),
    ("basic auth", {"authorization": "Basic dXNlcjprZXk="}), ("a 10 kB key", {"authorization": "Bearer " + "k" * 10_000}),
    ("a wrong x-api-key", {"x-api-key": "nope"}), ("the key without Bearer", {"authorization": API_KEY}),
]


def field_cases(path: str, base: dict[str, Any], fields: dict[str, list[Any]]) -> list[Case]:
    return [Case(f"{path} {name}={_short(value)}", "POST", path, encode({**base, name: value}))
            for name, values in fields.items() for value in values]


def _short(value: Any) -> str:
    text = value.text if isinstance(value, Raw) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def groups() -> dict[str, list[Case]]:
    cases: dict[str, list[Case]] = {}
    cases["bodies"] = [Case(f"{path} {name}", "POST", path, body, headers,
                            key=ADMIN_KEY if path in ADMIN_ROUTES else API_KEY)
                       for path in BASES for name, (body, headers) in BAD_BODIES.items()]
    cases["bodies"] += [Case(f"{path} 17 MiB body", method, path, b'{"x": "' + b"y" * (17 * 2**20) + b'"}', expect=413)
                        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/messages"),
                                             ("GET", "/v1/models"))]
    cases["completions"] = field_cases("/v1/completions", COMPLETION, {**SAMPLING, **COMPLETION_ONLY})
    cases["chat"] = field_cases("/v1/chat/completions", CHAT, {**SAMPLING, **CHAT_ONLY})
    cases["chat"] += [Case(f"chat: {name}", "POST", "/v1/chat/completions", encode(body))
                      for name, body in CHAT_BODIES.items()]
    cases["anthropic"] = field_cases("/v1/messages", MESSAGES, MESSAGES_FIELDS)
    cases["anthropic"].append(Case("messages without max_tokens", "POST", "/v1/messages",
                                   encode({"messages": MESSAGES["messages"]})))
    cases["anthropic"].append(Case("tool_choice names a missing tool", "POST", "/v1/messages", encode(
        {**MESSAGES, "tools": [{"name": "f"}], "tool_choice": {"type": "tool", "name": "missing"}})))
    cases["internal"] = [Case(f"{path} {_short(body)}", "POST", path, encode(body),
                              key=ADMIN_KEY if path in ADMIN_ROUTES else API_KEY)
                         for path, bodies in INTERNAL.items() for body in bodies]
    cases["routes"] = [Case(f"{method} {path[:60]}", method, path, None, {}, expect=status,
                            key=ADMIN_KEY if path in ADMIN_ROUTES else API_KEY)
                       for method, path, status in ROUTES]
    cases["auth"] = [Case(f"{path} with {name}", "POST", path, encode(BASES[path]), {**JSON, **headers}, expect=401,
                          key=None)
                     for path in ("/v1/chat/completions", "/v1/messages", "/v1/internal/encode")
                     for name, headers in AUTH]
    cases["auth"] += [Case(f"{path} with the API key", "POST", path, encode(BASES.get(path, {})), expect=401)
                      for path in sorted(ADMIN_ROUTES)]
    return cases


GROUPS = groups()


# --- the server ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    """The base URL of the API with keys, plus two routes that fail like a bug would."""
    from extensions.openai import Params
    from extensions.openai.server import create_app

    folder = tmp_path_factory.mktemp("hostile")
    manager = loaded_manager(starter_gguf.parent, folder, STARTER_GGUF, n_ctx=CONTEXT)
    app = create_app(Services(settings=server_settings(starter_gguf.parent, folder), manager=manager),
                     Params(api_key=API_KEY, admin_key=ADMIN_KEY))

    def bug() -> None:
        raise RuntimeError("a deliberate bug in a test route")

    app.add_api_route("/v1/internal/test-bug", bug, methods=["POST"])
    app.add_api_route("/v1/messages/test-bug", bug, methods=["POST"])
    with serving(app) as url:
        yield url
    manager.unload()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def problem_with(case: Case, response: httpx.Response) -> str | None:
    """What is wrong with the answer to a hostile case, or None."""
    if not 400 <= response.status_code < 500 or (case.expect is not None and response.status_code != case.expect):
        return f"status {response.status_code}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if case.path.startswith("/v1/messages"):
        error = body.get("error") if isinstance(body, dict) else None
        if body.get("type") != "error" or not isinstance(error, dict) or error.get("type") not in ANTHROPIC_TYPES \
                or not error.get("message"):
            return f"not Anthropic's error shape: {str(body)[:300]}"
    else:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error) \
                or not error["message"]:
            return f"not OpenAI's error shape: {str(body)[:300]}"
    return None


def assert_alive(url: str) -> None:
    """A normal request still gets its answer."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=STARTER_GGUF, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
    assert httpx.get(url + "/v1/internal/health", headers=bearer(API_KEY), timeout=DEADLINE_S).json()["status"] == "ok"


def test_the_battery_has_several_hundred_cases() -> None:
    assert sum(len(cases) for cases in GROUPS.values()) >= 500


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_hostile_request_gets_a_shaped_4xx(served: str, group: str) -> None:
    failures = []
    with httpx.Client(timeout=DEADLINE_S) as client:  # a case not answered in time raises: the test fails
        for case in GROUPS[group]:
            headers = {**case.headers, **(bearer(case.key) if case.key else {})}
            response = client.request(case.method, served + case.path, content=case.body, headers=headers)
            if problem := problem_with(case, response):
                failures.append(f"{case.name}: {problem}")
    assert not failures, f"{len(failures)} of {len(GROUPS[group])} cases failed:\n" + "\n".join(failures[:30])
    assert_alive(served)


# --- the official SDKs ---------------------------------------------------------------------------------------------
def test_the_anthropic_sdk_raises_its_own_class_for_each_status(served: str) -> None:
    client = anthropic.Anthropic(base_url=served, api_key=API_KEY, max_retries=0, timeout=120)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user", "content": HUGE_TEXT}])
    assert "context is 512 tokens" in too_long.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as unknown_key:
        anthropic.Anthropic(base_url=served, api_key="wrong", max_retries=0).messages.create(
            model=STARTER_GGUF, max_tokens=2, messages=hi)
    assert unknown_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=2, messages=hi)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.RequestTooLargeError) as huge:
        client.messages.create(model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user", "content": "x" * 17 * 2**20}])
    assert huge.value.body["error"]["type"] == "request_too_large" and "16 MiB" in huge.value.body["error"]["message"]
    with pytest.raises(anthropic.InternalServerError) as bug:
        client.post("/v1/messages/test-bug", cast_to=object, body={})
    assert bug.value.status_code == 500 and bug.value.body["error"]["type"] == "api_error"
    stream = client.messages.create(model=STARTER_GGUF, max_tokens=3, messages=hi, stream=True)
    assert [event.type for event in stream][-1] == "message_stop"  # the SDK still works after all that


def test_the_openai_sdk_raises_its_own_class_for_each_status(served: str) -> None:
    client = openai.OpenAI(base_url=served + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=STARTER_GGUF, max_tokens=2, messages=[{"role": "user",
                                                                                     "content": HUGE_TEXT}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", max_tokens=2, messages=hi)
    with pytest.raises(openai.APIStatusError) as huge:
        client.completions.create(model=STARTER_GGUF, prompt="x" * 17 * 2**20, max_tokens=2)
    assert huge.value.status_code == 413 and huge.value.code == "request_too_large"
    with pytest.raises(openai.InternalServerError) as bug:
        client.post("/internal/test-bug", cast_to=object, body={})
    assert bug.value.status_code == 500 and bug.value.code == "internal_error"


def test_a_bug_is_a_500_whose_error_id_the_log_also_carries(served: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="extensions.openai.errors"):
        response = httpx.post(served + "/v1/internal/test-bug", headers=bearer(API_KEY), timeout=DEADLINE_S)
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "server_error" and "retry-after" not in response.headers
    error_id = error["error_id"]
    assert error_id in error["message"] and response.headers["x-error-id"] == error_id
    logged = [record for record in caplog.records if error_id in record.getMessage()]
    assert logged and logged[0].exc_info is not None  # the log line holds the traceback under the same id
    assert "a deliberate bug" not in error["message"]  # the body names no internals


def test_unknown_fields_of_any_name_come_back_as_warnings(served: str) -> None:
    """Field names a client made up are reported in a header that stays one valid header, whatever they hold."""
    names = ["日本語", "a\r\nSet-Cookie: stolen=1", "tab\there", "n" * 1000]
    body = {**COMPLETION, **{name: 1 for name in names}}
    response = httpx.post(served + "/v1/completions", content=json.dumps(body, ensure_ascii=False).encode(),
                          headers={**JSON, **bearer(API_KEY)}, timeout=DEADLINE_S)
    assert response.status_code == 200 and "set-cookie" not in response.headers
    header = response.headers["x-workbench-warnings"]
    assert header.isascii() and "\\u65e5" in header and "Set-Cookie: stolen=1" in header
    assert any("日本語" in warning for warning in response.json()["warnings"])
