"""Chat templates render as Transformers renders them, the shipped templates produce the formats they name, and
template names never leave their folder."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from modules.chat.templates import (CHATML_TEMPLATE, choose_template, list_templates, load_template, render_chat,
                                    save_template, starts_with_bos, strip_leading_bos, template_stop_strings,
                                    validate_template)
from modules.errors import ConfigError, PathError

SHIPPED = ["Alpaca", "ChatML", "Gemma", "Llama-3", "Mistral", "Vicuna"]
TWO_TURNS = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
             {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def gguf_template(starter_gguf: Path) -> str:
    field = GGUFReader(starter_gguf).fields["tokenizer.chat_template"]
    return field.contents()


@pytest.fixture(scope="module")
def hf_tokenizer(starter_hf: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(starter_hf)


def test_starter_model_template_renders_exact_chatml(gguf_template: str) -> None:
    prompt = render_chat(gguf_template, TWO_TURNS, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
                      "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be terse."}, *TWO_TURNS[:1]]
    assert render_chat(gguf_template, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n")


@pytest.mark.parametrize("template_name", ["model", *SHIPPED])
@pytest.mark.parametrize("case", ["generation", "no_generation", "continue", "system"])
def test_same_text_as_transformers_apply_chat_template(hf_tokenizer, gguf_template: str, template_name: str,
                                                       case: str) -> None:
    template = gguf_template if template_name == "model" else load_template(template_name)
    messages = [{"role": "system", "content": "Be terse."}, *TWO_TURNS] if case == "system" else list(TWO_TURNS)
    kwargs = {"add_generation_prompt": case != "no_generation"}
    if case == "continue":
        messages.append({"role": "assistant", "content": "Blue, or maybe "})
        kwargs = {"continue_final_message": True, "add_generation_prompt": False}
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    ours = render_chat(template, messages, bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token,
                       **kwargs)
    assert ours == expected


def test_shipped_templates_are_listed_and_valid() -> None:
    assert set(SHIPPED) <= set(list_templates())
    for name in SHIPPED:
        validate_template(load_template(name))
    assert load_template("ChatML") == CHATML_TEMPLATE  # the built-in fallback is the shipped file


@pytest.mark.parametrize("name, turn_markers, opening", [
    ("ChatML", ["<|im_start|>user\nHello<|im_end|>\n", "<|im_start|>assistant\nHi there<|im_end|>\n"],
     "<|im_start|>assistant\n"),
    ("Llama-3", ["<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"],
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("Alpaca", ["### Instruction:\nHello\n\n", "### Response:\nHi there\n\n"], "### Response:\n"),
    ("Mistral", ["[INST] Be terse.\n\nHello [/INST]Hi there</s>", "[INST] Name a colour. [/INST]"], " [/INST]"),
    ("Gemma", ["<start_of_turn>user\nBe terse.\n\nHello<end_of_turn>\n",
               "<start_of_turn>model\nHi there<end_of_turn>\n"], "<start_of_turn>model\n"),
    ("Vicuna", ["Be terse.\n\nUSER: Hello\n", "ASSISTANT: Hi there</s>\n"], "ASSISTANT:"),
])
def test_shipped_template_renders_its_format(name: str, turn_markers: list[str], opening: str) -> None:
    messages = [{"role": "system", "content": "Be terse."}, *TWO_TURNS]
    prompt = render_chat(load_template(name), messages, add_generation_prompt=True, bos_token="<BOS>",
                         eos_token="<EOS>")
    positions = [prompt.find(marker) for marker in turn_markers]
    assert all(p >= 0 for p in positions), prompt
    assert positions == sorted(positions)
    assert prompt.index("Name a colour.") > positions[-1]
    assert prompt.endswith(opening)
    assert prompt.count("Be terse.") == 1


@pytest.mark.parametrize("name, bos", [("Llama-3", "<|begin_of_text|>"), ("Gemma", "<bos>"), ("Mistral", "<s>")])
def test_templates_that_write_bos_say_so(name: str, bos: str) -> None:
    prompt = render_chat(load_template(name), TWO_TURNS, bos_token=bos)
    assert starts_with_bos(prompt, bos)
    stripped = strip_leading_bos(prompt, bos)
    assert not stripped.startswith(bos) and bos + stripped == prompt
    chatml = render_chat(load_template("ChatML"), TWO_TURNS, bos_token=bos)
    assert not starts_with_bos(chatml, bos) and strip_leading_bos(chatml, bos) == chatml
    assert not starts_with_bos(prompt, None)


def test_default_system_prompt_of_alpaca_and_vicuna_yields_to_a_given_one() -> None:
    for name, preamble in [("Alpaca", "Below is an instruction"), ("Vicuna", "A chat between a curious user")]:
        assert render_chat(load_template(name), TWO_TURNS).startswith(preamble)
        own = render_chat(load_template(name), [{"role": "system", "content": "Custom."}, *TWO_TURNS])
        assert own.startswith("Custom.") and preamble not in own


@pytest.mark.parametrize("name, stop", [("ChatML", "<|im_end|>"), ("Llama-3", "<|eot_id|>"),
                                        ("Gemma", "<end_of_turn>"), ("Alpaca", "\n\n### Instruction:"),
                                        ("Vicuna", "</s>")])
def test_template_stop_strings(name: str, stop: str) -> None:
    assert stop in template_stop_strings(load_template(name))


def test_template_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="syntax error on line 1"):
        render_chat("{% for message in messages %}{{ message['content'] }", TWO_TURNS)
    refusing = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('A system message must come first.') }}" \
               "{% endif %}"
    with pytest.raises(ConfigError, match="A system message must come first."):
        render_chat(refusing, TWO_TURNS)
    with pytest.raises(ConfigError, match="cannot both be set"):
        render_chat(CHATML_TEMPLATE, TWO_TURNS, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ConfigError, match="Message 1"):
        render_chat(CHATML_TEMPLATE, [TWO_TURNS[0], "not a message"])
    with pytest.raises(ConfigError, match="empty"):
        render_chat("", TWO_TURNS)


def test_none_values_are_dropped_as_in_transformers() -> None:
    template = "{% for m in messages %}{{ m['role'] }}:{{ m.get('name', 'anon') }};{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "x", "name": None}], add_generation_prompt=False) == \
        "user:anon;"


def test_choose_template(tmp_path: Path, gguf_template: str) -> None:
    own = choose_template(gguf_template)
    assert (own.source, own.template, own.warning) == ("model", gguf_template, None)
    assert choose_template(gguf_template, "auto").source == "model"
    picked = choose_template(gguf_template, "Llama-3")
    assert picked.source == "user" and "<|start_header_id|>" in picked.template
    fallback = choose_template(None)
    assert fallback.source == "default" and fallback.name == "ChatML" and "ChatML" in fallback.warning
    assert "<|im_start|>" in render_chat(fallback.template, TWO_TURNS)
    # Even with no templates folder at all, a model without a template still gets a prompt.
    bare = choose_template("", templates_dir=tmp_path / "missing")
    assert bare.template == CHATML_TEMPLATE and bare.warning
    with pytest.raises(ConfigError, match="No instruction template named 'Nope'"):
        choose_template(gguf_template, "Nope")


def test_save_load_and_refuse_invalid(tmp_path: Path) -> None:
    template = "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
    save_template("Mine", template, templates_dir=tmp_path)
    assert load_template("Mine", templates_dir=tmp_path) == template
    assert list_templates(tmp_path) == ["Mine"]
    with pytest.raises(ConfigError):
        save_template("Broken", "{% for %}", templates_dir=tmp_path)
    assert not (tmp_path / "Broken.yaml").exists()
    (tmp_path / "Empty.yaml").write_text("other_key: 1\n")
    with pytest.raises(ConfigError, match="instruction_template"):
        load_template("Empty", templates_dir=tmp_path)


@pytest.mark.parametrize("name", ["../ChatML", "/etc/passwd", "..\\ChatML", "sub/ChatML", "~root"])
def test_template_names_cannot_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(PathError):
        load_template(name)
    with pytest.raises(PathError):
        save_template(name, CHATML_TEMPLATE, templates_dir=tmp_path / "inner")
    assert not any(tmp_path.rglob("*.yaml"))
