"""Extensions: the registry loads packages by name with settings.yaml params, every hook of the shipped extensions
runs, logits processors reach the Transformers loader, and a broken extension is reported and skipped."""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from modules.extensions import BUILTIN_DIR, ExtensionRegistry, requirement_files, start_extensions
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.services import Services
from modules.settings import Settings, load_settings
from modules.starter import STARTER_GGUF


def registry_with(names: list[str], params: dict | None = None, folders: list[Path] | None = None) -> ExtensionRegistry:
    registry = ExtensionRegistry(folders=folders, param_overrides=params or {})
    registry.enable_all(names)
    return registry


def test_shipped_extensions_are_available_and_load() -> None:
    registry = registry_with(["openai", "example", "gallery", "perplexity_colors"])
    assert registry.errors == {}
    assert {"openai", "example", "gallery", "perplexity_colors"} <= set(registry.available())
    assert registry.enabled == ["openai", "example", "gallery", "perplexity_colors"]
    for name in registry.enabled:
        assert registry.extensions[name].readme.startswith("# ")
    assert set(registry.extensions["example"].hooks) == {
        "setup", "ui", "state_modifier", "chat_input_modifier", "input_modifier", "history_modifier",
        "custom_generate_chat_prompt", "output_modifier", "logits_processor"}


def test_settings_yaml_enables_extensions_and_sets_params(tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(textwrap.dedent("""\
        extensions:
          example:
            input_prefix: "P: "
            uppercase_output: true
          gallery:
            enabled: false
        """))
    settings = load_settings(["--settings", str(settings_file), "--api"])
    services = Services(settings=settings, manager=ModelManager(tmp_path, tmp_path))
    registry = start_extensions(services, serve=False)
    assert registry.enabled == ["example", "openai"] and services.extensions is registry
    example = registry.extensions["example"].params
    assert example.input_prefix == "P: " and example.uppercase_output and example.keep_last_messages == 0
    assert registry.modify_input("hello", {}) == "P: hello"


def test_bad_params_in_settings_disable_the_extension_by_name() -> None:
    registry = registry_with(["example", "perplexity_colors"], {"example": {"keep_last_messages": "lots"},
                                                                "perplexity_colors": {"colour": "blue"}})
    assert registry.enabled == []
    assert "keep_last_messages" in registry.errors["example"]
    assert "colour" in registry.errors["perplexity_colors"]
    assert all("example" in m or "perplexity_colors" in m for m in registry.messages())


def test_every_hook_of_the_example_runs() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    registry = registry_with(["example"], {"example": {
        "input_prefix": "Briefly: ", "hidden_suffix": " (be kind)", "uppercase_output": True,
        "keep_last_messages": 2, "min_p": 0.2, "plain_transcript": True, "banned_token_ids": [1, 3]}})
    state = {"min_p": 0.0, "source": "api"}
    assert registry.modify_state(state)["min_p"] == 0.2 and state["min_p"] == 0.0
    assert registry.modify_chat_input("hi", "hi", state) == ("hi (be kind)", "hi")
    assert registry.modify_input("hi", state) == "Briefly: hi"
    history = [{"role": "system", "content": "S"}] + [{"role": "user", "content": str(i)} for i in range(5)]
    assert [m["content"] for m in registry.modify_history(history)] == ["S", "3", "4"]
    prompt = registry.custom_chat_prompt([{"role": "user", "content": "Hi"}], state, None)
    assert prompt == "User: Hi\nAssistant:"
    assert registry.modify_output("paris", state) == "PARIS"
    [processor] = registry.logits_processors(None)
    import torch

    scores = processor(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 5))
    assert torch.isinf(scores[0, [1, 3]]).all() and (scores[0, [0, 2, 4]] == 0).all()
    app = FastAPI()
    registry.setup(app, Services(settings=Settings(), manager=ModelManager(Path("."), Path("."))))
    assert TestClient(app).get("/example/status").json()["params"]["min_p"] == 0.2
    import gradio as gr

    with gr.Blocks():
        registry.ui(None)
    assert registry.errors == {}


def test_defaults_change_nothing() -> None:
    registry = registry_with(["example", "perplexity_colors", "gallery"])
    state = {"min_p": 0.0, "logprobs": 0, "source": "api"}
    assert registry.modify_state(dict(state)) == state
    assert registry.modify_input("hi", state) == "hi" and registry.modify_output("hi", state) == "hi"
    assert registry.custom_chat_prompt([{"role": "user", "content": "x"}], state, None) is None
    assert registry.logits_processors(None) == []


@pytest.fixture(scope="module")
def llama(starter_gguf: Path) -> ModelManager:
    manager = ModelManager(starter_gguf.parent, starter_gguf.parent / "no-loras")
    manager.load(STARTER_GGUF, options={"n_ctx": 1024})
    yield manager
    manager.unload()


def test_perplexity_colors_marks_each_token_by_its_probability(llama: ModelManager) -> None:
    registry = registry_with(["perplexity_colors"])
    state = registry.modify_state({**GenerationParams(do_sample=False, max_new_tokens=12).model_dump(),
                                   "source": "ui"})
    assert state["logprobs"] == 1  # it asked the loader for logprobs
    params = GenerationParams(**{k: v for k, v in state.items() if k in GenerationParams.model_fields})
    generation = llama.generate("The capital of France is", params)
    tokens = [token for chunk in generation for token in chunk.tokens]
    html = registry.modify_output(generation.text, state, tokens)
    spans = re.findall(r'<span class="token" style="background-color: rgba\((\d+), (\d+), 0, 0.35\)" '
                       r'title="([0-9.]+)">', html)
    assert len(spans) == len([t for t in tokens if t.text])
    for (red, green, shown), token in zip(spans, [t for t in tokens if t.text]):
        probability = math.exp(token.logprob)
        assert abs(float(shown) - probability) < 1e-3
        assert (int(green) >= int(red)) == (probability >= 0.5)
    assert re.sub(r"<[^>]+>", "", html).replace("&#x27;", "'").replace("&quot;", '"') == generation.text
    api_state = {**state, "source": "api"}
    assert registry.modify_output(generation.text, api_state, tokens) == generation.text


def test_gallery_lists_characters_and_builds_its_tab(tmp_path: Path) -> None:
    import gradio as gr

    from extensions.gallery import gallery_items
    from modules.chat.characters import Character, save_character

    save_character("Ada", Character(name="Ada", greeting="Hello!"), characters_dir=tmp_path)
    save_character("Bob", Character(name="Bob"), characters_dir=tmp_path)
    items = gallery_items(tmp_path)
    assert [name for _, name in items] == ["Ada", "Bob"]
    assert all(getattr(picture, "size", None) == (192, 192) for picture, _ in items)  # drawn cards
    registry = registry_with(["gallery"])
    services = Services(settings=Settings(character_dir=tmp_path), manager=ModelManager(tmp_path, tmp_path))
    with gr.Blocks() as app:
        menu = gr.Dropdown(choices=["Ada", "Bob"], value="Bob")
        registry.ui(services, {"character": menu})
    assert registry.errors == {}
    galleries = [block for block in app.blocks.values() if isinstance(block, gr.Gallery)]
    assert len(galleries) == 1


# --- logits processors reach the Transformers loader ---------------------------------------------------------------
@pytest.mark.slow  # loads a Transformers model
def test_logits_processors_reach_the_transformers_loader(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny").symlink_to(tiny_llama_dir)
    manager = ModelManager(tmp_path, tmp_path / "loras")
    manager.load("tiny", "transformers")
    greedy = GenerationParams(do_sample=False, max_new_tokens=1, ban_eos_token=True)
    first = manager.complete([1, 2, 3], greedy).text
    favourite = manager.encode(first)[0]
    manager.unload()
    settings = Settings(extensions=["example"], extension_params={"example": {"banned_token_ids": [favourite]}})
    services = Services(settings=settings, manager=manager)
    registry = start_extensions(services, serve=False)
    manager.load("tiny", "transformers")  # the registry attaches its processors to every model loaded
    try:
        assert len(manager.model.extra_processors) == 1
        assert manager.complete([1, 2, 3], greedy).text != first
    finally:
        manager.unload()
    assert registry.errors == {}


# --- broken extensions ---------------------------------------------------------------------------------------------
BROKEN = {
    "broken_import": "import no_such_module_anywhere\n",
    "raises_in_hook": textwrap.dedent("""\
        from modules.extensions import hookimpl

        @hookimpl
        def input_modifier(text):
            raise RuntimeError("boom")
        """),
    "wrong_return": textwrap.dedent("""\
        from modules.extensions import hookimpl

        @hookimpl
        def output_modifier(text):
            return 42
        """),
    "unknown_hook_argument": textwrap.dedent("""\
        from modules.extensions import hookimpl

        @hookimpl
        def input_modifier(text, surprise):
            return text
        """),
}


def test_broken_extensions_are_reported_by_name_and_skipped(tmp_path: Path) -> None:
    for name, code in BROKEN.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(code)
    registry = registry_with([*BROKEN, "example", "missing_one"], {"example": {"input_prefix": "> "}},
                             folders=[tmp_path, BUILTIN_DIR])
    assert set(registry.errors) == {"broken_import", "unknown_hook_argument", "missing_one"}
    assert "no_such_module_anywhere" in registry.errors["broken_import"]
    assert registry.enabled == ["raises_in_hook", "wrong_return", "example"]
    assert registry.modify_input("hi", {}) == "> hi"  # the app goes on; the failing one is dropped
    assert "boom" in registry.errors["raises_in_hook"] and "raises_in_hook" not in registry.enabled
    assert registry.modify_output("hi", {}) == "hi"
    assert "wrong_return" in registry.errors and registry.enabled == ["example"]
    messages = registry.messages()
    assert len(messages) == 5 and all("disabled" in m for m in messages)


def test_start_script_finds_requirements_of_enabled_extensions() -> None:
    assert requirement_files(["--api"]) == [BUILTIN_DIR / "openai" / "requirements.txt"]
    assert requirement_files(["--extensions", "example", "gallery"]) == []
    assert requirement_files(["--help"]) == [] and requirement_files(["--no-such-flag"]) == []
    assert (ROOT / "extensions" / "openai" / "requirements.txt").is_file()


# --- an extension adds a loader --------------------------------------------------------------------------------------
def test_an_extension_registers_a_loader_that_loads_and_generates(tmp_path: Path, starter_gguf: Path) -> None:
    """The register_loaders hook: the loader an extension adds is picked by name (--loader, the Model tab, the API's
    load route all go through the manager's registry) and serves generations like a built-in one."""
    package = tmp_path / "extensions" / "my_loader"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        from loaders.base import LoaderEntry
        from loaders.llama_cpp_loader import LlamaCppLoader
        from modules.extensions import hookimpl

        class RenamedLlama(LlamaCppLoader):
            name = "renamed-llama"

            @classmethod
            def accepts(cls, path):
                return False  # only when asked for by name

        @hookimpl
        def register_loaders(loaders):
            loaders.register(LoaderEntry("renamed-llama", __name__, "RenamedLlama"))
    """))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / STARTER_GGUF).symlink_to(starter_gguf)
    manager = ModelManager(tmp_path / "models", tmp_path / "loras")
    assert "renamed-llama" not in manager.registry.names
    services = Services(settings=Settings(extensions=["my_loader"]), manager=manager)
    registry = start_extensions(services, serve=False, folders=[tmp_path / "extensions"])
    assert registry.errors == {} and "renamed-llama" in manager.registry.names
    result = manager.load(STARTER_GGUF, "renamed-llama", {"n_ctx": 512})
    try:
        assert result.info.loader == "llama.cpp" and type(manager.model).__name__ == "LlamaCppModel"
        assert manager.complete("The capital of France is", GenerationParams(max_new_tokens=3, do_sample=False)).text
    finally:
        manager.unload()
