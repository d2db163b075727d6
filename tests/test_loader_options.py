"""Loader options that change how a model is held: KV cache type, RoPE scaling, memory caps with disk offload,
and models without a chat template."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from loaders.llama_cpp_loader import LlamaCppLoader, LlamaCppOptions
from loaders.transformers_loader import TransformersLoader, TransformersOptions
from modules.chat.templates import choose_template
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager

GREEDY = GenerationParams(do_sample=False, max_new_tokens=6, ban_eos_token=True)


def generate(model, text: str) -> str:
    return "".join(t.text for t in model.stream(model.encode(text, add_bos=True), GREEDY, threading.Event()))


def test_quantized_kv_cache_with_flash_attention_generates(starter_gguf: Path):
    model = LlamaCppLoader.load(starter_gguf, LlamaCppOptions(n_ctx=1024, flash_attn=True, cache_type="q8_0"))
    try:
        assert generate(model, "The capital of France is").strip()
    finally:
        model.unload()


def test_quantized_v_cache_without_flash_attention_is_refused():
    with pytest.raises(ValueError, match="flash_attn"):
        LlamaCppOptions(cache_type="q4_0")


def test_rope_scaling_extends_the_context_past_the_trained_length(starter_gguf: Path):
    capped = LlamaCppLoader.load(starter_gguf, LlamaCppOptions(n_ctx=16384))
    try:
        assert capped.context_length == 8192  # capped at the trained length without scaling
    finally:
        capped.unload()
    scaled = LlamaCppLoader.load(starter_gguf, LlamaCppOptions(n_ctx=16384, rope_freq_scale=0.5, n_threads=1,
                                                                n_batch=64, n_ubatch=64, use_mmap=False))
    try:
        assert scaled.context_length == 16384
        assert generate(scaled, "Once upon a time")
    finally:
        scaled.unload()


@pytest.mark.slow  # loads a model with its layers offloaded to disk
def test_cpu_memory_cap_with_disk_offload_still_generates(tiny_llama_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the offload folder goes under ./.cache
    model = TransformersLoader.load(tiny_llama_dir, TransformersOptions(cpu_memory="1MB", disk_offload=True,
                                                                        dtype="float32"))
    try:
        assert "disk" in set(model.model.hf_device_map.values())
        assert len(generate(model, "Hello")) > 0
    finally:
        model.unload()


def test_a_model_without_a_chat_template_chats_through_a_stated_default(tiny_llama_dir: Path, tmp_path: Path):
    folder = tmp_path / "models" / "base-model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_chat_template"'))
    manager = ModelManager(folder.parent, tmp_path / "loras")
    result = manager.load("base-model")
    try:
        assert manager.require_model().chat_template is None
        assert any("no chat template" in warning for warning in result.warnings)
        chosen = choose_template(None)
        assert chosen.source == "default" and chosen.warning
        assert "<|im_start|>" in chosen.template  # ChatML, as the warning says
    finally:
        manager.unload()


@pytest.mark.parametrize("written", ["60,40", "60, 40", ["60,40"], ["60", "40"], [60, 40]])
def test_a_list_option_typed_in_one_box_is_its_items(starter_gguf: Path, tmp_path: Path, written):
    """The Model tab sends a list option's box as one text ("60,40", as its help says), a flag as items,
    settings.yaml as numbers: all are the same list, and an empty box is the loader's default."""
    manager = ModelManager(starter_gguf.parent, tmp_path / "loras")
    assert manager.plan(starter_gguf.name, "llama.cpp", {"tensor_split": written}).options.tensor_split == [60.0, 40.0]
    assert manager.plan(starter_gguf.name, "llama.cpp", {"tensor_split": ""}).options.tensor_split is None
    assert TransformersOptions(gpu_memory="20GiB 10GiB").gpu_memory == ["20GiB", "10GiB"]
