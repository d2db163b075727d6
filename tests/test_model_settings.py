"""Per-model settings (user_data/models.yaml): which entry wins, aliases, bad files named by key, remote entries,
and every load path (start-up, ModelManager.load, just-in-time loads, the API's load route) loading a model the
way the file says, with flags and the caller's own options still winning. Models are the starter GGUF, linked
into a throwaway models folder under two names."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from api_helpers import serving_api
from conftest import ROOT
from modules.chat.templates import load_template
from modules.errors import ConfigError, ModelLoadError, NotFound
from modules.model_manager import ModelManager
from modules.model_settings import ModelSettings
from modules.presets import load_preset
from modules.services import Services, build_services, load_startup_model
from modules.settings import load_settings
from modules.starter import STARTER_GGUF
from test_entry_points import assert_bad_input, webui
from webui import check_model

TEMPLATES = ROOT / "instruction-templates"
PRESETS = ROOT / "presets"
SECOND = "Second-Name.gguf"  # the starter GGUF again, under another name


@pytest.fixture()
def folders(tmp_path: Path, starter_gguf: Path) -> Path:
    """tmp_path with models/ (the starter under two names), user_data/ and an empty settings.yaml."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / STARTER_GGUF).symlink_to(starter_gguf)
    (tmp_path / "models" / SECOND).symlink_to(starter_gguf)
    (tmp_path / "user_data").mkdir()
    (tmp_path / "settings.yaml").write_text("")
    return tmp_path


def write_models(folder: Path, text: str) -> Path:
    path = folder / "user_data" / "models.yaml"
    path.write_text(text)
    return path


def services_for(folder: Path, *flags: str) -> Services:
    """The services webui.py builds from these flags over `folder` (see folders)."""
    settings = load_settings(["--settings", str(folder / "settings.yaml"), "--model-dir", str(folder / "models"),
                              "--user-data-dir", str(folder / "user_data"), "--preset-dir", str(PRESETS),
                              "--template-dir", str(TEMPLATES), "--lora-dir", str(folder / "loras"), *flags])
    return build_services(settings)


@pytest.fixture()
def managers() -> Iterator[list[ModelManager]]:
    """Managers a test made: their models are unloaded at its end, even when it fails."""
    made: list[ModelManager] = []
    yield made
    for manager in made:
        manager.close()


def manager_of(services: Services, managers: list[ModelManager]) -> ModelManager:
    managers.append(services.manager)
    return services.manager


# --- which entry applies ----------------------------------------------------------------------------------------
def test_the_exact_name_wins_over_globs_and_a_later_glob_over_an_earlier_one(folders: Path) -> None:
    write_models(folders, """
"*.gguf": {n_ctx: 4096, n_batch: 64, preset: Creative}
"smollm2-*": {n_ctx: 2048}
SmolLM2-135M-Instruct.Q4_1.gguf: {n_batch: 32, template: ChatML}
"*": {n_gpu_layers: 0}
""")
    settings = services_for(folders).model_settings
    spec = settings.resolve(STARTER_GGUF)
    # n_ctx from the later glob (case does not matter), n_batch from the exact entry, the preset from the first glob
    assert spec.options == {"n_ctx": 2048, "n_batch": 32, "n_gpu_layers": 0}
    assert (spec.preset, spec.template) == ("Creative", "ChatML")
    assert spec.entries == ("*.gguf", "smollm2-*", "*", STARTER_GGUF)
    other = settings.resolve("bartowski_Qwen/Qwen2.5-0.5B.Q4_K_M.GGUF")  # a GGUF in a sub-folder of models/
    assert other.options == {"n_ctx": 4096, "n_batch": 64, "n_gpu_layers": 0} and other.template is None


def test_an_alias_names_its_model_in_just_in_time_loads_and_among_residents(folders: Path, managers) -> None:
    write_models(folders, f"{STARTER_GGUF}:\n  n_ctx: 1024\n  aliases: [smol, tiny]\n")
    manager = manager_of(services_for(folders, "--max-models", "2"), managers)
    resident = manager.ensure("smol")
    assert resident.name == STARTER_GGUF and resident.model.context_length == 1024
    assert manager.resident("tiny") is resident and manager.ensure(STARTER_GGUF) is resident
    assert [r.name for r in manager.pool.all()] == [STARTER_GGUF]  # never a second copy under the alias
    manager.unload("tiny")
    assert manager.resident(STARTER_GGUF) is None


# --- bad files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "words"), [
    (f"{STARTER_GGUF}:\n  n_ctxx: 1024\n", ["models.yaml", STARTER_GGUF, "unknown key 'n_ctxx'"]),
    (f"{STARTER_GGUF}:\n  n_ctx: -5\n", ["models.yaml", STARTER_GGUF, "'n_ctx'", "greater than or equal to 0"]),
    (f"{STARTER_GGUF}:\n  loader: llama.cpp\n  dtype: float16\n", ["models.yaml", "'dtype'", "llama.cpp"]),
    ("'*.gguf':\n  aliases: [x]\n", ["models.yaml", "'*.gguf'", "'aliases'", "glob"]),
    ("a.gguf: {aliases: [x]}\nb.gguf: {aliases: [x]}\n", ["models.yaml", "'x'", "'a.gguf'"]),
    (f"{STARTER_GGUF}: {{template: '{{% for m in messages %}}'}}\n", ["models.yaml", "'template'", "syntax"]),
    (f"{STARTER_GGUF}: {{preset: Nonexistent}}\n", ["models.yaml", STARTER_GGUF, "'preset'", "Nonexistent"]),
    (f"{STARTER_GGUF}: {{template: Nonexistent}}\n", ["models.yaml", "'template'", "Nonexistent"]),
    (f"{STARTER_GGUF}: 4096\n", ["models.yaml", STARTER_GGUF, "mapping"]),
    ("- a.gguf\n", ["models.yaml", "must map model names"]),
    (f"{STARTER_GGUF}:\n  n_ctx: [\n", ["models.yaml", "not valid YAML"]),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(folders: Path, text: str, words: list[str]) -> None:
    write_models(folders, text)
    with pytest.raises(ConfigError) as error:
        services_for(folders)
    for word in words:
        assert word in str(error.value)


def test_webui_refuses_a_bad_models_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "user_data").mkdir()
    (tmp_path / "user_data" / "models.yaml").write_text(f"{STARTER_GGUF}:\n  n_ctx: lots\n")
    assert_bad_input(webui(tmp_path, "--model", "none"), "models.yaml", STARTER_GGUF, "'n_ctx'")


def test_a_loader_the_file_names_that_does_not_exist_is_named_at_load(folders: Path, managers) -> None:
    write_models(folders, f"{SECOND}: {{loader: llamacpp2}}\n")  # unknown until load: extensions may add loaders
    manager = manager_of(services_for(folders), managers)
    with pytest.raises(ConfigError, match=f"models.yaml, model '{SECOND}': bad value for 'loader'.*llamacpp2"):
        manager.ensure(SECOND)


def test_the_file_is_read_again_when_it_changes(folders: Path, managers) -> None:
    manager = manager_of(services_for(folders), managers)  # no models.yaml yet
    assert manager.plan(STARTER_GGUF).options.n_ctx == 8192
    write_models(folders, f"{STARTER_GGUF}: {{n_ctx: 1024}}\n")
    assert manager.plan(STARTER_GGUF).options.n_ctx == 1024
    write_models(folders, f"{STARTER_GGUF}: {{n_ctx: oops}}\n")
    with pytest.raises(ConfigError, match="n_ctx"):
        manager.ensure(STARTER_GGUF)
    assert manager.resident(STARTER_GGUF) is None


# --- every load path ----------------------------------------------------------------------------------------------
def test_start_up_loads_the_model_as_the_file_says(folders: Path, managers) -> None:
    write_models(folders, f"smol:\n  n_ctx: 1024\n'{STARTER_GGUF}':\n  n_ctx: 1536\n  aliases: [s]\n")
    services = services_for(folders, "--model", "s")
    manager_of(services, managers)
    check_model(services.settings, services.manager)  # webui.py's check before anything starts
    with pytest.raises(NotFound, match="No model named 'nope"):
        check_model(services.settings.model_copy(update={"model": "nope"}), services.manager)
    load_startup_model(services)
    assert services.startup_messages == []
    info = services.manager.info()
    assert info.name == STARTER_GGUF and info.context_length == 1536


def test_load_and_ensure_read_the_file_and_the_callers_options_and_flags_win(folders: Path, managers) -> None:
    write_models(folders, f"'*.gguf': {{n_ctx: 1024}}\n{SECOND}: {{n_ctx: 1536}}\n")
    (folders / "settings.yaml").write_text("loader_options: {n_ctx: 3072, n_batch: 64}\n")  # the file beats it
    manager = manager_of(services_for(folders, "--max-models", "2"), managers)
    assert manager.load(STARTER_GGUF).info.context_length == 1024
    assert manager.plan(STARTER_GGUF).options.n_batch == 64  # what models.yaml leaves unset
    assert manager.ensure(SECOND).model.context_length == 1536
    assert manager.load(SECOND, options={"n_ctx": 2048}).info.context_length == 2048  # the Model tab's form

    pinned = manager_of(services_for(folders, "--n-ctx", "2560"), managers)
    assert pinned.load(SECOND).info.context_length == 2560


def test_the_apis_load_route_reads_the_file(folders: Path, managers) -> None:
    write_models(folders, f"{STARTER_GGUF}:\n  n_ctx: 1536\n  aliases: [smol]\n")
    services = services_for(folders)
    manager_of(services, managers)
    with serving_api(services) as url:
        answer = httpx.post(url + "/v1/internal/model/load", json={"model_name": "smol"}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert services.manager.info().name == STARTER_GGUF and services.manager.info().context_length == 1536


# --- preset and template --------------------------------------------------------------------------------------------
def test_the_preset_and_template_become_the_models_defaults(folders: Path, managers) -> None:
    write_models(folders, f"{STARTER_GGUF}:\n  preset: Creative\n  template: Alpaca\n  aliases: [smol]\n"
                          "'*': {preset: Deterministic}\n")
    (folders / "settings.yaml").write_text("chat: {instruction_template: ChatML}\n")
    services = services_for(folders)
    manager = manager_of(services, managers)
    loaded = manager.ensure("smol").model
    assert loaded.chat_template == load_template("Alpaca", templates_dir=TEMPLATES)
    assert services.default_params("smol") == load_preset(PRESETS, "Creative")
    assert services.default_params(SECOND) == load_preset(PRESETS, "Deterministic")  # the glob's
    assert services.default_params() == load_preset(PRESETS, "Default")  # no model named: the settings'
    # the model's own template is now models.yaml's, and the settings' ChatML does not cover it
    assert services.chat_settings("smol").instruction_template == ""
    assert services.chat_settings(SECOND).instruction_template == "ChatML"

    flagged = services_for(folders, "--preset", "Top-P")
    assert flagged.default_params("smol") == load_preset(PRESETS, "Top-P")


def test_api_requests_start_from_the_preset_of_the_model_they_name(folders: Path, managers, tmp_path) -> None:
    """A request that sets no knob gets its model's preset from models.yaml (here: 3 tokens at most)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "Default.yaml").write_text("max_new_tokens: 40\nban_eos_token: true\n")
    (presets / "Short.yaml").write_text("max_new_tokens: 3\nban_eos_token: true\n")
    write_models(folders, f"{SECOND}:\n  preset: Short\n")
    services = services_for(folders, "--preset-dir", str(presets), "--max-models", "2")
    manager = manager_of(services, managers)
    manager.load(STARTER_GGUF, options={"n_ctx": 512})
    manager.load(SECOND, options={"n_ctx": 512})
    with serving_api(services) as url:
        def tokens(model: str) -> int:
            answer = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Once upon a time"},
                                timeout=120)
            assert answer.status_code == 200, answer.text
            return answer.json()["usage"]["completion_tokens"]

        assert (tokens(SECOND), tokens(STARTER_GGUF)) == (3, 40)


def test_a_jinja_template_in_the_file_is_the_models_template(folders: Path, managers) -> None:
    jinja = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    write_models(folders, yaml.safe_dump({SECOND: {"template": jinja}}))
    manager = manager_of(services_for(folders), managers)
    assert manager.load(SECOND).warnings == []  # it has a template now
    assert manager.model.chat_template == jinja


# --- remote entries -------------------------------------------------------------------------------------------------
def test_a_remote_entry_builds_the_remote_loaders_options(folders: Path, managers) -> None:
    write_models(folders, "big-llama:\n  loader: remote\n  remote_url: http://127.0.0.1:9/v1/\n"
                          "  remote_model: meta-llama/Llama-3.1-70B-Instruct\n  remote_api_key: sk-test\n"
                          "  aliases: [big]\n")
    manager = manager_of(services_for(folders), managers)
    plan = manager.plan("big")
    assert plan.loader.name == "remote" and plan.name == "big-llama"
    assert plan.options.model_dump(include={"remote_url", "remote_model", "remote_api_key"}) == {
        "remote_url": "http://127.0.0.1:9/v1", "remote_model": "meta-llama/Llama-3.1-70B-Instruct",
        "remote_api_key": "sk-test"}
    assert "big-llama" in manager.list_models()  # no file stands for it
    with pytest.raises(ModelLoadError, match=r"Cannot reach the remote server at http://127.0.0.1:9/v1"):
        manager.ensure("big")


@pytest.mark.slow  # a second server over a loaded model
def test_a_remote_entry_serves_another_servers_model_by_name(folders: Path, managers, tmp_path_factory) -> None:
    backend = manager_of(services_for(folders), managers)
    backend.load(STARTER_GGUF, options={"n_ctx": 2048})
    other = tmp_path_factory.mktemp("front")
    (other / "models").mkdir()
    (other / "user_data").mkdir()
    (other / "settings.yaml").write_text("")
    with serving_api(Services(settings=load_settings(["--settings", str(folders / "settings.yaml")]),
                              manager=backend)) as url:
        write_models(other, f"smol-remote:\n  loader: remote\n  remote_url: {url}/v1\n"
                            f"  remote_model: {STARTER_GGUF}\n")
        front = manager_of(services_for(other), managers)
        resident = front.ensure("smol-remote")
        assert resident.name == "smol-remote" and resident.model.info().loader == "remote"
        assert resident.model.context_length == 2048  # what the other server said
        from modules.generation_params import GenerationParams

        text = front.complete("The capital of France is", GenerationParams(do_sample=False, max_new_tokens=8),
                              model="smol-remote").text
        assert text == backend.complete("The capital of France is",
                                        GenerationParams(do_sample=False, max_new_tokens=8)).text


# --- saving ---------------------------------------------------------------------------------------------------------
def test_saving_writes_what_differs_and_keeps_the_other_entries_and_comments(folders: Path, managers) -> None:
    path = write_models(folders, f"""# models of this machine
"*.gguf":
  n_ctx: 4096   # every GGUF
{STARTER_GGUF}:
  n_batch: 32
# the remote one
big: {{loader: remote, remote_url: "http://127.0.0.1:9/v1"}}
""")
    services = services_for(folders)
    manager_of(services, managers)
    form = services.manager.plan(STARTER_GGUF).options.model_dump()
    form.update(n_ctx=1024)  # changed in the form; n_batch 32 as shown, the rest as the glob and defaults say
    entry = services.save_model_settings(STARTER_GGUF, "llama.cpp", form, preset="Creative", template="ChatML",
                                         aliases=["smol"])
    assert entry.options == {"n_ctx": 1024, "n_batch": 32}
    text = path.read_text()
    assert text.startswith("# models of this machine\n\"*.gguf\":\n  n_ctx: 4096   # every GGUF\n")
    assert "# the remote one\nbig: {loader: remote" in text
    assert yaml.safe_load(text)[STARTER_GGUF] == {"loader": "llama.cpp", "n_ctx": 1024, "n_batch": 32,
                                                  "preset": "Creative", "template": "ChatML", "aliases": ["smol"]}
    assert services.manager.plan("smol").options.model_dump() == {**form, "n_ctx": 1024}

    services.save_model_settings(SECOND, "llama.cpp", services.manager.plan(SECOND).options.model_dump())
    assert yaml.safe_load(path.read_text())[SECOND] == {"loader": "llama.cpp"}  # nothing differs: appended as is


def test_a_bad_save_writes_nothing(folders: Path, managers) -> None:
    path = write_models(folders, f"{STARTER_GGUF}: {{aliases: [smol]}}\n")
    services = services_for(folders)
    manager_of(services, managers)
    form = services.manager.plan(SECOND).options.model_dump()
    for kwargs, words in [({"preset": "Nonexistent"}, "Nonexistent"), ({"aliases": ["smol"]}, "'smol'"),
                          ({"template": "Nonexistent"}, "Nonexistent")]:
        with pytest.raises(ConfigError, match=words):
            services.save_model_settings(SECOND, "llama.cpp", form, **kwargs)
    with pytest.raises(ConfigError, match="n_ctx"):
        services.save_model_settings(SECOND, "llama.cpp", {**form, "n_ctx": -1})
    assert path.read_text() == f"{STARTER_GGUF}: {{aliases: [smol]}}\n"


def test_model_settings_without_a_file_change_nothing(tmp_path: Path) -> None:
    from loaders.base import LoaderRegistry

    settings = ModelSettings(tmp_path / "models.yaml", LoaderRegistry(), preset_dir=PRESETS, template_dir=TEMPLATES)
    assert settings.entries() == {} and settings.resolve("x.gguf").options == {}
    assert settings.canonical("x") == "x"
