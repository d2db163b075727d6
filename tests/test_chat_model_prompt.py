"""build_model_prompt: the chat prompt the Chat tab and the API share, for the real starter model."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FRANCE, ROOT
from loaders.llama_cpp_loader import LlamaCppLoader, LlamaCppOptions
from modules.chat.model_prompt import build_model_prompt
from modules.settings import ChatSettings

TEMPLATES = ROOT / "instruction-templates"
CHARACTERS = ROOT / "characters"


@pytest.fixture(scope="module")
def model(starter_gguf: Path):
    loaded = LlamaCppLoader.load(starter_gguf, LlamaCppOptions(n_ctx=2048))
    yield loaded
    loaded.unload()


def build(model, chat: ChatSettings, messages, **kwargs):
    return build_model_prompt(model, chat, messages, max_new_tokens=64, template_dir=TEMPLATES,
                              characters_dir=CHARACTERS, **kwargs)


def test_instruct_uses_the_models_own_template(model):
    built = build(model, ChatSettings(), [{"role": "user", "content": FRANCE}])
    assert built.result.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert built.result.prompt.endswith("<|im_start|>assistant\n")
    assert built.warnings == [] and built.context == 2048
    assert "<|im_end|>" in built.result.stop_strings


def test_a_picked_template_and_a_truncation_length_apply(model):
    chat = ChatSettings(instruction_template="Alpaca", truncation_length=200)
    long_history = []
    for turn in range(30):
        long_history += [{"role": "user", "content": f"Question {turn}: tell me about the number {turn}."},
                         {"role": "assistant", "content": f"The number {turn} is a fine number indeed."}]
    built = build(model, chat, long_history + [{"role": "user", "content": FRANCE}])
    assert "### Instruction:" in built.result.prompt or "### Response:" in built.result.prompt
    assert built.context == 200
    assert built.result.dropped_messages > 0 and FRANCE in built.result.prompt
    assert model.token_count(built.result.prompt) <= 200 - 64


def test_chat_mode_brings_the_character_and_stop_strings(model):
    chat = ChatSettings(mode="chat", character="Assistant", user_name="Ada")
    built = build(model, chat, [{"role": "user", "content": "Hello!"}])
    assert "Ada:" in built.result.prompt or "Ada" in built.result.prompt
    assert any("Ada:" in stop for stop in built.result.stop_strings)
