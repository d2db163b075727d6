"""GenerationParams validation, knob support checks and presets."""
from pathlib import Path

import pytest

from modules.errors import ConfigError, PathError, UnsupportedParameter
from modules.generation_params import SAMPLER_NAMES, GenerationParams, check_supported, unsupported_knobs
from modules.presets import delete_preset, list_presets, load_preset, parse_preset_text, save_preset

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_neutral():
    assert GenerationParams().active_knobs() == set()


def test_bad_values_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=1.5)
    with pytest.raises(ValueError, match="sampler"):
        GenerationParams(sampler_priority=["top_k", "nonsense"])
    with pytest.raises(ValueError, match="not both"):
        GenerationParams(grammar_string="root ::= \"a\"", json_schema={"type": "string"})


def test_sampler_priority_keeps_missing_samplers_after_the_named_ones():
    params = GenerationParams(sampler_priority=["min_p", "temperature"])
    assert params.sampler_priority[:2] == ["min_p", "temperature"]
    assert sorted(params.sampler_priority) == sorted(SAMPLER_NAMES)


def test_text_generation_webui_shapes_are_accepted():
    params = GenerationParams(custom_token_bans="1, 2,3", stop="###", json_schema='{"type": "object"}')
    assert params.custom_token_bans == [1, 2, 3]
    assert params.stop == ["###"]
    assert params.json_schema == {"type": "object"}


def test_tuning_knobs_count_only_when_their_sampler_is_on():
    assert GenerationParams(dry_base=3.0).active_knobs() == set()
    assert GenerationParams(dry_base=3.0, dry_multiplier=0.8).active_knobs() == {"dry_base", "dry_multiplier"}
    assert "top_k" not in GenerationParams(do_sample=False, top_k=5).active_knobs()  # greedy ignores it


def test_unsupported_knobs_warn_or_raise():
    params = GenerationParams(top_a=0.2, min_p=0.1)
    assert unsupported_knobs(params, {"min_p"}) == ["top_a"]
    warnings = check_supported(params, {"min_p"}, "toy")
    assert warnings and "top_a" in warnings[0]
    with pytest.raises(UnsupportedParameter, match="top_a"):
        check_supported(params, {"min_p"}, "toy", strict=True)


def test_shipped_presets_load_and_the_required_ones_exist():
    names = list_presets(ROOT / "presets")
    for required in ["Default", "Deterministic", "Creative", "Top-P", "Min-P", "Mirostat", "Beam-Search"]:
        assert required in names
    for name in names:
        load_preset(ROOT / "presets", name)
    assert load_preset(ROOT / "presets", "Deterministic").greedy
    assert load_preset(ROOT / "presets", "Beam-Search").num_beams > 1


def test_preset_round_trip_holds_only_changed_keys(tmp_path: Path):
    params = GenerationParams(temperature=0.3, min_p=0.05, stop=["\n\n"], logit_bias={42: -5.0})
    path = save_preset(tmp_path, "Mine", params)
    assert set(__import__("yaml").safe_load(path.read_text())) == {"temperature", "min_p", "stop", "logit_bias"}
    assert load_preset(tmp_path, "Mine") == params
    assert list_presets(tmp_path) == ["Mine"]
    delete_preset(tmp_path, "Mine")
    assert list_presets(tmp_path) == []


def test_bad_preset_yaml_and_bad_keys_are_named():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_preset_text("temperature: [1, 2", "preset X.yaml")
    with pytest.raises(ConfigError, match="unknown key 'temprature'"):
        parse_preset_text("temprature: 0.5", "preset X.yaml")
    with pytest.raises(ConfigError, match="bad value for 'top_k'"):
        parse_preset_text("top_k: many", "preset X.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        parse_preset_text("- 1\n- 2", "preset X.yaml")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..\\x", "a/../../b"])
def test_preset_names_cannot_escape(tmp_path: Path, name: str):
    with pytest.raises(PathError):
        save_preset(tmp_path, name, GenerationParams())
    with pytest.raises(PathError):
        load_preset(tmp_path, name)
