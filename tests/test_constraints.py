"""Grammars and JSON schemas are user input (modules.constraints): what crashed or held the server before is refused
by name before anything compiles it, invalid ones are refused with the problem named, real-world ones still
constrain the output, and what a compiler does crash on or hang over costs only its child process.

Both local loaders are real: llama.cpp with the starter GGUF, Transformers with a 2-layer random Llama that has
the starter's tokenizer (xgrammar compiles against the tokenizer; the random weights keep generation fast on a
small CPU, and whatever valid structure comes out of them is the grammar's doing).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from api_helpers import server_settings, serving_api
from conftest import ROOT
from loaders.llama_cpp_sampling import trial_compiler as llama_trial_compiler
from modules.chat.tool_prompt import constraint_schema
from modules.constraints import CompileWorker, ConstraintChecker, limits, trial_compiler_of
from modules.errors import ConstraintError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.services import Services
from modules.starter import STARTER_GGUF

YES_NO = 'root ::= "yes" | "no"'


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def nested_schema_text(levels: int) -> str:
    """The same as JSON text, written without recursion (json.dumps cannot write it)."""
    return '{"type":"object","properties":{"a":' * levels + '{"type":"string"}' + "}}" * levels


#: What crashed the server or held it for tens of seconds (issue 12), and what each is refused with now.
HOSTILE = {
    "grammar nested 100,000 deep": ({"grammar_string": "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000},
                                    r"^grammar_string: 200012 characters exceed the limit of 131072\.$"),
    "grammar nested 20,000 deep": ({"grammar_string": "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000},
                                   r"^grammar_string: parentheses nest deeper than the limit of 64 levels"),
    "x{1000000}": ({"grammar_string": 'root ::= "x"{1000000}'},
                   r'^grammar_string: "x"\{1000000\} repeats more than the limit of 256 times\.$'),
    "nested repetitions": ({"grammar_string": 'root ::= ("x"{1000}){1000}'},
                           r'^grammar_string: "x"\{1000\} repeats more than the limit of 256 times\.$'),
    "repetitions adding up": ({"grammar_string": 'root ::= [^"]{0,200} "," [^"]{0,200}'},
                              r'^grammar_string: its repetition counts add up to more than the limit of 256 '
                              r'\(at \[\^"\]\{0,200\}\)\.$'),
    "grammar of 200 KB": ({"grammar_string": "root ::= " + " ".join(['"word"'] * 30_000)},
                          r"^grammar_string: \d+ characters exceed the limit of 131072\.$"),
    "schema nested 300 deep": ({"json_schema": nested_schema(300)},
                               r"^json_schema: nesting deeper than the limit of 64 levels \(at \$\.properties\.a\."),
    "maxLength 10^6": ({"json_schema": {"type": "object", "properties": {"bio": {"type": "string",
                                                                                "maxLength": 10**6}}}},
                       r"^json_schema: maxLength 1000000 at \$\.properties\.bio exceeds the limit of 256\.$"),
    "minItems 10^6": ({"json_schema": {"type": "array", "items": {"type": "integer"}, "minItems": 10**6}},
                      r"^json_schema: minItems 1000000 at \$ exceeds the limit of 1000\.$"),
    "maxItems 10^6": ({"json_schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 10**6}},
                      r"^json_schema: maxItems 1000000 at \$ exceeds the limit of 1000\.$"),
    "10^6 values": ({"json_schema": {"type": "array", "default": list(range(10**6))}},
                    r"^json_schema: more than the limit of 20000 values\.$"),
    "enum of 100,000": ({"json_schema": {"enum": [f"value{i}" for i in range(100_000)]}},
                        r"^json_schema: an enum of 100000 values at \$ exceeds the limit of 1000\.$"),
    "pattern a{1000000}": ({"json_schema": {"type": "string", "pattern": "^a{1000000}$"}},
                           r"the pattern at \$: a\{1000000\} repeats more than the limit of 256 times"),
    "many bounded strings": ({"json_schema": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": 50 + i} for i in range(20)}}},
        r"the length bounds of its strings and the repetitions of its patterns add up to more than the limit of "
        r"256"),
}

#: Schemas that are not valid JSON Schema, or contradict themselves, and the problem each is refused with.
INVALID = {
    "required not a list": ({"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"},
                            r"^json_schema is not a valid JSON Schema: 'a' is not of type 'array' \(at \$\.required\)"),
    "unknown type": ({"type": "object", "properties": {"age": {"type": "integr"}}},
                     r"'integr' is not a JSON Schema type \(array, boolean.*\(at \$\.properties\.age\.type\)"),
    "minimum > maximum": ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 5, "maximum": 1}}},
                          r"^json_schema: minimum 5 is greater than maximum 1 at \$\.properties\.age\.$"),
    "minLength > maxLength": ({"type": "string", "minLength": 10, "maxLength": 2},
                              r"^json_schema: minLength 10 is greater than maxLength 2 at \$\.$"),
    "minItems > maxItems": ({"type": "array", "minItems": 3, "maxItems": 1},
                            r"^json_schema: minItems 3 is greater than maxItems 1 at \$\.$"),
    "required but forbidden": ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"],
                                "additionalProperties": False}, r"required names 'b' at \$, which additionalProperties"),
}

#: Real schemas: the examples of OpenAI's structured-outputs guide (math tutor, UI generation with a recursive
#: $ref, research-paper extraction, moderation with nullable fields) and tools of real clients.
MATH = {"type": "object", "properties": {
    "steps": {"type": "array", "items": {"type": "object", "properties": {
        "explanation": {"type": "string"}, "output": {"type": "string"}},
        "required": ["explanation", "output"], "additionalProperties": False}},
    "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False}
UI = {"type": "object", "properties": {
    "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
    "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}},
    "attributes": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "value": {"type": "string"}}, "required": ["name", "value"],
        "additionalProperties": False}}},
    "required": ["type", "label", "children", "attributes"], "additionalProperties": False}
PAPER = {"type": "object", "properties": {
    "title": {"type": "string"}, "authors": {"type": "array", "items": {"type": "string"}},
    "abstract": {"type": "string"}, "keywords": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "authors", "abstract", "keywords"], "additionalProperties": False}
MODERATION = {"type": "object", "properties": {
    "is_violating": {"type": "boolean"},
    "category": {"anyOf": [{"type": "string", "enum": ["violence", "sexual", "self_harm"]}, {"type": "null"}]},
    "explanation_if_violating": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["is_violating", "category", "explanation_if_violating"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current temperature for a location.",
                                      "parameters": {"type": "object", "properties": {
                                          "location": {"type": "string", "description": "City and country"},
                                          "units": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["location", "units"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "send_email", "description": "Send an email.",
                                      "parameters": {"type": "object", "properties": {
                                          "to": {"type": "string"}, "subject": {"type": "string"},
                                          "body": {"type": "string"},
                                          "cc": {"type": "array", "items": {"type": "string"}}},
                                          "required": ["to", "subject", "body"]}}},
    {"type": "function", "function": {"name": "search_files", "description": "Find files in the workspace.",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"},
                                          "max_results": {"type": "integer", "minimum": 1, "maximum": 100},
                                          "include": {"type": "array", "items": {"type": "string"}}},
                                          "required": ["query"]}}},
]
REAL = {"math tutor": MATH, "ui (recursive $ref)": UI, "research paper": PAPER, "moderation": MODERATION,
        "tool call (required)": constraint_schema(TOOLS, "required")}


def bounded(schema: dict) -> dict:
    """`schema` with its strings and arrays bounded, so that even a model that repeats itself ends the reply
    well within max_new_tokens."""
    return json.loads(json.dumps(schema).replace('"type": "string"', '"type": "string", "maxLength": 40')
                      .replace('"type": "array"', '"type": "array", "maxItems": 3'))


@pytest.fixture(scope="module")
def managers(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, tiny_llama_dir: Path):
    """{"llama.cpp": manager, "transformers": manager}, each with its own checker and compiler process."""
    loras = tmp_path_factory.mktemp("loras")
    llama = ModelManager(starter_gguf.parent, loras)
    llama.load(STARTER_GGUF)
    hf = ModelManager(tiny_llama_dir.parent, loras)
    hf.load(tiny_llama_dir.name, loader="transformers")
    yield {"llama.cpp": llama, "transformers": hf}
    for manager in (llama, hf):
        manager.unload()
        manager.constraints.close()


LOADERS = ["llama.cpp", "transformers"]


def complete(manager: ModelManager, params: GenerationParams, question: str = "Answer in JSON.") -> str:
    from modules.chat.templates import render_chat

    template = manager.model.chat_template
    prompt = render_chat(template, [{"role": "user", "content": question}], add_generation_prompt=True)
    return manager.complete(prompt, params, add_bos=False).text


@pytest.mark.slow  # each hostile case against both loaders, then generates
@pytest.mark.parametrize("loader", LOADERS)
def test_what_crashed_the_server_is_refused_by_name_before_compiling_and_the_model_still_generates(
        managers, loader) -> None:
    manager = managers[loader]
    trials = manager.constraints.worker.trials
    for case, (fields, message) in HOSTILE.items():
        with pytest.raises(ConstraintError, match=message):
            manager.generate("Hello", GenerationParams(max_new_tokens=4, **fields))
    assert manager.constraints.worker.trials == trials  # each was refused before anything compiled it
    text = complete(manager, GenerationParams(do_sample=False, max_new_tokens=4, grammar_string=YES_NO),
                    "Is the sky blue?")
    assert text in ("yes", "no")


@pytest.mark.parametrize("loader", LOADERS)
def test_invalid_schemas_are_refused_with_the_problem_named(managers, loader) -> None:
    manager = managers[loader]
    for case, (schema, message) in INVALID.items():
        with pytest.raises(ConstraintError, match=message):
            manager.generate("Hello", GenerationParams(max_new_tokens=4, json_schema=schema))


@pytest.mark.parametrize(("loader", "message"), [
    ("llama.cpp", r"^grammar_string does not parse: Undefined rule identifier 'missing'$"),
    ("transformers", r'^The grammar_string could not be compiled: .*Rule "missing" is not defined'),
])
def test_a_grammar_that_does_not_parse_is_refused_with_the_parsers_message(managers, loader, message) -> None:
    with pytest.raises(ConstraintError, match=message):
        managers[loader].generate("Hello", GenerationParams(max_new_tokens=4, grammar_string="root ::= missing"))


@pytest.mark.parametrize("loader", LOADERS)
def test_real_world_schemas_and_tools_are_accepted(managers, loader) -> None:
    manager = managers[loader]
    for case, schema in REAL.items():
        manager.constraints.check(GenerationParams(json_schema=schema), manager.model)


@pytest.mark.slow  # long constrained generations
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("schema", "question"), [
    (bounded(MATH), "Solve 8x + 7 = -23 step by step. Answer in JSON."),
    (bounded(REAL["tool call (required)"]), "What is the weather in Paris? Call a tool."),
], ids=["math tutor", "tool call"])
def test_real_world_schemas_still_constrain_the_output(managers, loader, schema, question) -> None:
    text = complete(managers[loader], GenerationParams(do_sample=False, max_new_tokens=400, json_schema=schema),
                    question)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_constraint_seen_before_is_not_compiled_again(managers, loader) -> None:
    manager = managers[loader]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    accepted = GenerationParams(json_schema=schema)
    refused = GenerationParams(grammar_string='root ::= "a" undefined-rule')
    manager.constraints.check(accepted, manager.model)
    with pytest.raises(ConstraintError):
        manager.constraints.check(refused, manager.model)
    trials = manager.constraints.worker.trials
    manager.constraints.check(GenerationParams(json_schema=dict(schema), seed=5), manager.model)
    with pytest.raises(ConstraintError, match="undefined-rule|not defined"):
        manager.constraints.check(refused, manager.model)
    assert manager.constraints.worker.trials == trials


@pytest.mark.slow  # compiles the largest accepted inputs with every compiler
def test_the_largest_accepted_inputs_compile(managers) -> None:
    """At each limit, what is accepted passes every compiler (the limits are not tighter than the tools). How long
    they take is a measurement (docs/constraints.md), not this test's business: its checker waits for as long as
    a loaded machine needs, where the server's gives up after limits.COMPILE_SECONDS."""
    worst = [
        {"json_schema": nested_schema(limits.MAX_NESTING_DEPTH // 2 - 1)},
        {"json_schema": {"type": "string", "maxLength": limits.MAX_TEXT_REPEAT}},
        {"json_schema": {"type": "object", "properties": {  # distinct bounds: each is compiled on its own
            f"p{i}": {"type": "string", "maxLength": limits.MAX_TEXT_REPEAT // 4 - i} for i in range(4)}}},
        {"json_schema": {"type": "array", "items": {"type": "integer"}, "minItems": limits.MAX_ITEMS,
                         "maxItems": limits.MAX_ITEMS}},
        {"json_schema": {"enum": [f"value-{i:05d}" for i in range(limits.MAX_ENUM_VALUES)]}},
        {"json_schema": {"type": "object", "properties": {
            f"p{i}": {"type": "string"} for i in range(limits.MAX_OBJECT_PROPERTIES)}}},
        {"grammar_string": 'root ::= [^"]{0,128} "," ("x"{8}){16}'},
        {"grammar_string": "root ::= " + "(" * limits.MAX_NESTING_DEPTH + '"a"' + ")" * limits.MAX_NESTING_DEPTH},
    ]
    for manager in managers.values():
        patient = ConstraintChecker(CompileWorker(compile_seconds=600))
        try:
            for fields in worst:
                patient.check(GenerationParams(**fields), manager.model)
        finally:
            patient.close()


# --- the compiler process: what it crashes on or hangs over costs only the child -------------------------------
@pytest.mark.parametrize(("kind", "text"), [
    ("grammar_string", "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000),
    ("json_schema", json.dumps({"type": "string", "maxLength": 10**6})),
], ids=["grammar nested 100,000 deep", "maxLength 10^6"])
def test_llama_cpp_crashing_on_a_constraint_costs_only_the_compiler_process(starter_gguf, kind, text) -> None:
    """The static limits refuse these first; here they go straight to the compiler, as an input the limits miss
    would, and llama.cpp segfaults on them."""
    worker = CompileWorker()
    compiler = llama_trial_compiler(starter_gguf)
    try:
        worker.compile(compiler, "grammar_string", 'root ::= "a"')
        before = worker.pid
        with pytest.raises(ConstraintError, match=rf"^{kind} made the grammar compiler fail: it crashed \(SIGSEGV\)"):
            worker.compile(compiler, kind, text)
        worker.compile(compiler, "grammar_string", 'root ::= "b"')
        assert worker.pid not in (None, before)  # a fresh process took over
    finally:
        worker.close()


@pytest.mark.slow  # waits out a compile deadline
def test_a_compile_that_does_not_finish_is_killed_and_the_next_one_works(managers) -> None:
    """xgrammar compiles a 900-deep schema for minutes, in C++ that cannot be interrupted."""
    worker = CompileWorker(compile_seconds=2)
    compiler = trial_compiler_of(managers["transformers"].model)
    try:
        with pytest.raises(ConstraintError, match=r"^json_schema could not be compiled within 2 s; it is refused"):
            worker.compile(compiler, "json_schema", nested_schema_text(900))
        worker.compile(compiler, "grammar_string", YES_NO)
    finally:
        worker.close()


def test_a_compile_that_runs_out_of_memory_is_refused_and_the_next_one_works(starter_gguf) -> None:
    worker = CompileWorker(memory_budget=64 * 2**20)
    compiler = llama_trial_compiler(starter_gguf)
    huge = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 10**6})  # 18 MB of grammar
    try:
        with pytest.raises(ConstraintError, match=r"^json_schema needs more than the 0\.0625 GiB of memory"):
            worker.compile(compiler, "json_schema", huge)
        worker.compile(compiler, "json_schema", json.dumps(MATH))
    finally:
        worker.close()


def test_an_idle_compiler_process_is_stopped_and_the_next_compile_starts_one(starter_gguf) -> None:
    worker = CompileWorker(idle_seconds=0.5)
    compiler = llama_trial_compiler(starter_gguf)
    try:
        worker.compile(compiler, "grammar_string", YES_NO)
        deadline = time.monotonic() + 60
        while worker.pid is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.pid is None
        worker.compile(compiler, "grammar_string", 'root ::= "b"')
        assert worker.pid is not None
    finally:
        worker.close()


def test_without_a_vocabulary_llama_cpp_still_parses(tmp_path) -> None:
    """What the remote loader uses for llama.cpp's servers, which compile for themselves."""
    worker = CompileWorker()
    try:
        with pytest.raises(ConstraintError, match=r"^grammar_string does not parse: Undefined rule identifier 'x'$"):
            worker.compile(llama_trial_compiler(None), "grammar_string", "root ::= x")
        worker.compile(llama_trial_compiler(None), "json_schema", json.dumps(UI))
    finally:
        worker.close()


# --- every caller gets the same answer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def services(managers, tmp_path_factory: pytest.TempPathFactory) -> Services:
    manager = managers["llama.cpp"]
    return Services(settings=server_settings(manager.model_dir, tmp_path_factory.mktemp("api")), manager=manager)


@pytest.fixture(scope="module")
def api(services: Services):
    with serving_api(services) as url:
        yield url


def test_the_api_answers_a_hostile_schema_with_400_and_the_next_request_with_200(api: str) -> None:
    hostile = {"model": STARTER_GGUF, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
               "response_format": {"type": "json_schema", "json_schema": {
                   "name": "bio", "schema": {"type": "object", "properties": {
                       "bio": {"type": "string", "maxLength": 10**6}}}}}}
    answer = httpx.post(api + "/v1/chat/completions", json=hostile, timeout=120)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] == "json_schema: maxLength 1000000 at $.properties.bio exceeds the limit of 256."
    grammar = {"model": STARTER_GGUF, "prompt": "Is it?", "max_tokens": 8, "temperature": 0,
               "grammar_string": "root ::= missing"}
    answer = httpx.post(api + "/v1/completions", json=grammar, timeout=120)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "grammar_string does not parse: Undefined rule identifier 'missing'"
    fine = {**hostile, "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"]}}}, "max_tokens": 30, "temperature": 0}
    answer = httpx.post(api + "/v1/chat/completions", json=fine, timeout=120)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["choices"][0]["message"]["content"])["answer"] in ("yes", "no")


def test_a_remote_workbench_refuses_before_sending(api: str, managers, tmp_path) -> None:
    """The remote loader has no compiler of its own: the bounds and the schema check apply here, the server's
    compiler does the rest."""
    remote = ModelManager(tmp_path, tmp_path / "loras")
    remote.load("anything", "remote", {"remote_url": api + "/v1"})
    served = managers["llama.cpp"].constraints.worker.trials
    try:
        (too_long, too_long_message), (contradiction, contradiction_message) = (HOSTILE["maxLength 10^6"],
                                                                                INVALID["minimum > maximum"])
        with pytest.raises(ConstraintError, match=too_long_message):
            remote.generate("Hello", GenerationParams(max_new_tokens=4, **too_long))
        with pytest.raises(ConstraintError, match=contradiction_message):
            remote.generate("Hello", GenerationParams(max_new_tokens=4, json_schema=contradiction))
        assert managers["llama.cpp"].constraints.worker.trials == served  # nothing reached the server
        text = remote.complete("Is the sky blue?", GenerationParams(do_sample=False, max_new_tokens=4,
                                                                    grammar_string=YES_NO)).text
        assert text in ("yes", "no")
    finally:
        remote.unload()


def test_the_default_tab_shows_the_same_refusal(services: Services) -> None:
    """The Default and Notebook tabs' runner raises the ConstraintError, which modules.ui.common.user_errors shows
    as the page's error toast."""
    from modules.ui.completion_runner import run_completion
    from modules.ui.session_state import UiSession, new_session_id

    session = UiSession.start(services, new_session_id())
    params = GenerationParams(max_new_tokens=8, json_schema={"type": "string", "minLength": 10, "maxLength": 2})
    with pytest.raises(ConstraintError, match=r"^json_schema: minLength 10 is greater than maxLength 2 at \$\.$"):
        list(run_completion(services, session, "Once upon a time", params))
    assert not session.busy
    updates = list(run_completion(services, session, "Once upon a time", params.model_copy(
        update={"json_schema": None, "grammar_string": YES_NO})))
    assert updates[-1].done and updates[-1].text in ("yes", "no")


DEAD_ENDS = """
import sys
from pathlib import Path
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
manager = ModelManager(Path(sys.argv[1]).parent, Path(sys.argv[1]).parent)
manager.load(Path(sys.argv[1]).name, options={"n_ctx": 256})
for grammar, ban_eos in (('root ::= [^\\\\x00-\\\\U0010FFFF]', False), ('root ::= "a"', True)):
    params = GenerationParams(max_new_tokens=8, do_sample=False, grammar_string=grammar, ban_eos_token=ban_eos)
    print(repr(manager.complete("Hi", params).text))
print(repr(manager.complete("The capital of France is", GenerationParams(max_new_tokens=4, do_sample=False)).text))
"""


def test_a_grammar_with_no_way_on_ends_the_reply_instead_of_aborting_the_process(starter_gguf) -> None:
    """A grammar no token can satisfy, or one at its end with the end of generation banned, left llama.cpp's
    grammar sampler a token it had masked: it threw a C++ exception and the process (the whole server) aborted.
    Run in a child, so a regression fails this test instead of the test session."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DEAD_ENDS, str(starter_gguf)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    nothing, just_a, after = done.stdout.splitlines()
    assert (nothing, just_a) == ("''", "'a'") and "Paris" in after


def test_the_transformers_loader_ends_a_reply_with_no_way_on(managers) -> None:
    """A grammar no token can satisfy masks every logit: the reply ends (empty), as with llama.cpp, instead of a
    "generation failed" error."""
    for sampling in (False, True):
        params = GenerationParams(max_new_tokens=6, do_sample=sampling, seed=1,
                                  grammar_string="root ::= [^\\x00-\\U0010FFFF]")
        result = managers["transformers"].complete("Hi", params)
        assert result.text == "" and result.stats.finish_reason == "stop"
