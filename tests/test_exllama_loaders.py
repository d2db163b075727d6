"""The EXL2 (exllamav2) and EXL3 (exllamav3) loaders on a machine without what they need: their checkpoints are
recognised and their loader picked, and loading one says plainly that it needs a CUDA GPU (and the package),
through the ModelManager, the API and the Model tab, with no traceback anywhere. Their sampling knobs map onto
what each library takes. tests/test_cuda.py loads real EXL2/EXL3 models where a GPU is.

The folders are laid out as the libraries' converters write them (config.json's quantization_config, or, for
checkpoints converted without it, their tensor names or exllamav2's measurement.json beside the weights). Their
weights are a tiny random Llama's: EXL2/EXL3 weights can only be made on a GPU, and the refusal comes before any
weight is read."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from api_helpers import server_settings, serving_api
from conftest import save_tiny_llama
from playwright.sync_api import Browser, expect
from ui_helpers import Server, Workspace, choose, open_app, run_event, tab

from loaders.exllama_sampling import EXLLAMAV2_PARAMS, EXLLAMAV3_PARAMS, exllamav2_plan, exllamav3_plan
from modules.errors import LoaderUnavailable, UnsupportedParameter
from modules.generation_params import GenerationParams, check_supported
from modules.model_manager import ModelManager
from modules.services import Services

CUDA = torch.cuda.is_available()
PACKAGES = {"exllamav2": "exllamav2", "exllamav3": "exllamav3"}
EXL2, EXL3 = "tiny-exl2-4.0bpw", "tiny-exl3-4.0bpw"


def runnable(loader: str) -> bool:
    return CUDA and importlib.util.find_spec(PACKAGES[loader]) is not None


def refusal_words(loader: str) -> list[str]:
    """What the refusal must say on this machine: what is missing, and how to get it."""
    package = PACKAGES[loader]
    words = [f"The {loader} loader runs on CUDA GPUs only", f"pip install {package}==", "llama.cpp"]
    if not CUDA:
        words.append("sees no CUDA GPU here")
    if importlib.util.find_spec(package) is None:
        words.append(f"{package} is not installed")
    return words


def signed(folder: Path, quantization: dict | None) -> Path:
    """`folder` with config.json's quantization_config set as the converter writes it (None: removed)."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def converted_without_signature(folder: Path, source: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A folder with the model's config and tokenizer and one safetensors file holding `tensors`."""
    from safetensors.numpy import save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    signed(folder, None)
    save_file(tensors, str(folder / "output.safetensors"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path) -> Path:
    root = tmp_path_factory.mktemp("exllama") / "models"
    plain = save_tiny_llama(root / "tiny-llama", starter_hf)
    calibration = {"rows": 100, "length": 2048, "dataset": "(default)"}
    shutil.copytree(plain, root / EXL2)
    signed(root / EXL2, {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6,
                         "calibration": calibration})
    shutil.copytree(plain, root / EXL3)
    signed(root / EXL3, {"quant_method": "exl3", "version": "1.6.5", "bits": 4.0, "head_bits": 6,
                         "calibration": {"rows": 250, "cols": 2048}, "out_scales": "auto", "codebook": "mul1"})
    layer = "model.layers.0.self_attn.q_proj"
    converted_without_signature(root / "old-exl2", plain, {
        f"{layer}.q_weight": np.zeros((8, 64), np.int32), f"{layer}.q_scale": np.zeros((4, 8), np.int32),
        f"{layer}.q_scale_max": np.ones(4, np.float16), f"{layer}.q_groups": np.zeros(4, np.int16),
        f"{layer}.q_invperm": np.arange(64, dtype=np.int32)})
    converted_without_signature(root / "old-exl3", plain, {
        f"{layer}.trellis": np.zeros((4, 4, 64), np.int16), f"{layer}.suh": np.ones(64, np.float16),
        f"{layer}.svh": np.ones(64, np.float16)})
    shutil.copytree(plain, root / "measured-exl2")
    (root / "measured-exl2" / "measurement.json").write_text(json.dumps({"measurement": {}, "last_module_idx": 0}))
    shutil.copytree(plain, root / "tiny-gptq")
    signed(root / "tiny-gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    return root


@pytest.mark.parametrize(("name", "loader"), [(EXL2, "exllamav2"), (EXL3, "exllamav3"), ("old-exl2", "exllamav2"),
                                               ("old-exl3", "exllamav3"), ("measured-exl2", "exllamav2"),
                                               ("tiny-llama", "transformers")])
def test_exl_checkpoints_are_recognised_and_their_loader_picked(models: Path, tmp_path: Path, name: str,
                                                                loader: str) -> None:
    manager = ModelManager(models, tmp_path / "loras")
    assert name in manager.list_models()
    assert manager.plan(name).loader.name == loader


def test_another_quantization_is_not_taken_for_exl(models: Path, tmp_path: Path) -> None:
    assert ModelManager(models, tmp_path / "loras").plan("tiny-gptq").loader.name not in PACKAGES


def test_their_options_are_typed_and_shared(models: Path, tmp_path: Path) -> None:
    manager = ModelManager(models, tmp_path / "loras")
    plan = manager.plan(EXL2, None, {"gpu_split": [20, 24], "cache_quant": "q4", "cache_size": 16384,
                                     "max_seq_len": 8192})
    assert plan.options.model_dump() == {"gpu_split": [20.0, 24.0], "max_seq_len": 8192, "cache_size": 16384,
                                         "cache_quant": "q4", "alpha_value": 1.0, "compress_pos_emb": 1.0}
    assert manager.plan(EXL3, "exl3", {"cache_quant": "q6"}).options.cache_quant == "q6"
    for written in ("20, 24", ["20,24"], [20, "24"]):  # a flag, a Model-tab box, settings.yaml
        assert manager.plan(EXL3, None, {"gpu_split": written}).options.gpu_split == [20.0, 24.0]
    assert manager.plan(EXL3, None, {"gpu_split": ""}).options.gpu_split is None
    with pytest.raises(Exception, match="cache_quant"):
        manager.plan(EXL3, None, {"cache_quant": "q5_1"})


@pytest.mark.parametrize(("name", "loader"), [(EXL2, "exllamav2"), (EXL3, "exllamav3")])
def test_loading_without_cuda_says_what_is_missing(models: Path, tmp_path: Path, name: str, loader: str) -> None:
    if runnable(loader):
        pytest.skip(f"{loader} can run here: tests/test_cuda.py loads real models")
    manager = ModelManager(models, tmp_path / "loras")
    with pytest.raises(LoaderUnavailable) as refused:
        manager.load(name)
    assert refused.value.loader == loader
    for words in refusal_words(loader):
        assert words in str(refused.value), str(refused.value)
    assert manager.resident() is None and manager.info() is None
    manager.load("tiny-llama", "transformers", {"parallel": 1})
    with pytest.raises(LoaderUnavailable):  # asked for by its alias, on any model
        manager.load("tiny-llama", loader.replace("exllamav", "exl"))
    assert manager.info().loader == "transformers"  # refused before anything was unloaded to make room
    manager.close()


def test_the_api_answers_the_refusal_as_a_400(models: Path, tmp_path: Path) -> None:
    if runnable("exllamav2") and runnable("exllamav3"):
        pytest.skip("both loaders can run here")
    services = Services(settings=server_settings(models, tmp_path), manager=ModelManager(models, tmp_path / "loras"))
    with serving_api(services) as url:
        for name, loader in ((EXL2, None), (EXL3, "exllamav3")):
            if runnable(loader or "exllamav2"):
                continue
            answer = httpx.post(url + "/v1/internal/model/load", json={"model_name": name, "loader": loader},
                                timeout=120)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and "Traceback" not in answer.text
            for words in refusal_words(loader or "exllamav2"):
                assert words in error["message"], error["message"]
        health = httpx.get(url + "/v1/internal/health", timeout=30).json()
        assert health == {"status": "no_model", "model_loaded": False}
    services.manager.close()


@pytest.mark.browser
def test_the_model_tab_picks_the_loader_shows_its_options_and_the_refusal(models: Path, browser: Browser,
                                                                          tmp_path: Path) -> None:
    if runnable("exllamav2"):
        pytest.skip("exllamav2 can run here")
    workspace = Workspace(tmp_path / "webui")
    (workspace.models / EXL2).symlink_to(models / EXL2, target_is_directory=True)
    server = Server(workspace).start()
    try:
        page, errors = open_app(browser, server.url)
        tab(page, "Model")
        choose(page, "#model-select", EXL2)
        expect(page.locator("#loader-select input").first).to_have_value("exllamav2")
        for option in ("gpu-split", "cache-size", "cache-quant", "max-seq-len"):
            expect(page.locator(f"#opt-exllamav2-{option}")).to_be_visible()
        expect(page.locator("#opt-llamacpp-n-ctx")).to_be_hidden()
        status = run_event(page, lambda: page.click("#model-load"), "#model-status")
        assert status.startswith("Error:"), status
        for words in refusal_words("exllamav2"):
            assert words in status, status
        assert "Traceback" not in page.content() and errors.messages == []
        info = page.inner_text("#model-info")  # refused before anything was unloaded: the starter stays
        assert "SmolLM2-135M-Instruct.Q4_1.gguf" in info, info
        page.context.close()
    finally:
        server.stop()


# --- the sampling knobs, as each library receives them ---------------------------------------------------------

def test_exllamav2_gets_every_setting_neutral_unless_asked() -> None:
    greedy = exllamav2_plan(GenerationParams(do_sample=False, repetition_penalty=1.2, repetition_penalty_range=0,
                                             top_p=0.5, min_p=0.1), eos_ids=[2])
    assert greedy.settings["top_k"] == 1 and greedy.settings["top_p"] == 1.0 and greedy.settings["min_p"] == 0.0
    assert greedy.settings["token_repetition_penalty"] == 1.2  # penalties still shape a greedy pick
    assert greedy.settings["token_repetition_range"] == -1  # exllamav2's "the whole sequence"
    assert greedy.bias == {}
    sampled = exllamav2_plan(GenerationParams(temperature=0.7, top_k=40, typical_p=0.9, dynamic_temperature=True,
                                              dynatemp_low=0.5, dynatemp_high=1.5, mirostat_mode=2, mirostat_tau=4,
                                              custom_token_bans=[7], logit_bias={5: 2.0}, ban_eos_token=True,
                                              dry_multiplier=0.8), eos_ids=[2, 3])
    settings = sampled.settings
    assert (settings["temperature"], settings["top_k"], settings["typical"]) == (0.7, 40, 0.9)
    assert (settings["min_temp"], settings["max_temp"]) == (0.5, 1.5)
    assert settings["mirostat"] is True and settings["mirostat_tau"] == 4
    assert settings["token_repetition_penalty"] == 1.0  # never the library's default of 1.025
    assert sampled.bias == {5: 2.0, 7: float("-inf"), 2: float("-inf"), 3: float("-inf")}
    assert sampled.dry_breakers == ("\n", ":", '"', "*")
    with pytest.raises(UnsupportedParameter, match="mirostat_mode 2"):
        exllamav2_plan(GenerationParams(mirostat_mode=1), eos_ids=[2])


def test_exllamav3_steps_follow_the_sampler_order() -> None:
    params = GenerationParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                              presence_penalty=0.5, custom_token_bans=[9], xtc_probability=0.5,
                              sampler_priority=["min_p", "top_k", "temperature", "top_p", "xtc"])
    names = [name for name, _ in exllamav3_plan(params, eos_ids=[2]).steps]
    assert names == ["SS_RepP", "SS_PresFreqP", "SS_BanTokens", "SS_MinP", "SS_TopK", "SS_Temperature", "SS_TopP",
                     "SS_XTC", "SS_Sample"]
    last = [name for name, _ in exllamav3_plan(params.model_copy(update={"temperature_last": True}), [2]).steps]
    assert last[-2:] == ["SS_Temperature", "SS_Sample"]
    greedy = exllamav3_plan(GenerationParams(do_sample=False, logit_bias={4: -1.5}, ban_eos_token=True), [2])
    assert greedy.steps == [("SS_LogitBias", {"logit_bias": {4: -1.5}}), ("SS_BanTokens", {"token_ids": [2]}),
                            ("SS_Argmax", {})]


def test_each_loader_declares_the_knobs_it_honours() -> None:
    typical = GenerationParams(typical_p=0.9, tfs=0.9)
    assert check_supported(typical, EXLLAMAV2_PARAMS, "exllamav2") == []
    assert "typical_p" in check_supported(typical, EXLLAMAV3_PARAMS, "exllamav3")[0]
    grammar = GenerationParams(grammar_string='root ::= "yes"')
    for supported in (EXLLAMAV2_PARAMS, EXLLAMAV3_PARAMS):
        assert check_supported(grammar, supported, "exllama")  # no grammar through these loaders
