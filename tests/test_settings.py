"""Settings: defaults < settings.yaml < flags, with clear errors naming the key and the file."""
import subprocess
import sys
from pathlib import Path

import pytest

from modules.errors import ConfigError
from modules.settings import Settings, load_settings, save_settings

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path):
    path = write(tmp_path, "listen_port: 8000\napi: true\nn_ctx: 1\nloader_options: {n_ctx: 2048, dtype: float32}\n"
                 .replace("n_ctx: 1\n", ""))
    settings = load_settings(["--settings", str(path), "--listen-port", "9000", "--n-ctx", "4096"])
    assert settings.listen_port == 9000  # flag
    assert settings.extensions == ["openai"]  # file: `api: true` is the openai extension's own flag
    assert settings.loader_options == {"n_ctx": 4096, "dtype": "float32"}


def test_extension_flags_set_the_extension_params(tmp_path: Path):
    """--api and --api-port are declared by extensions/openai (the core names no extension); a flag, a top-level
    key of settings.yaml and `extensions: {openai: {...}}` mean the same, and flags win."""
    path = write(tmp_path, "extensions: {openai: {port: 5005, embedding_device: cpu}}\napi_key: from-file\n")
    settings = load_settings(["--settings", str(path), "--api-port", "5001"])
    assert settings.extensions == ["openai"]
    assert settings.extension_params["openai"] == {"port": 5001, "embedding_device": "cpu", "api_key": "from-file"}
    assert load_settings(["--settings", "/dev/null", "--api"]).extensions == ["openai"]
    assert load_settings(["--settings", str(path), "--no-api"]).extensions == []
    with pytest.raises(ConfigError, match="port"):
        load_settings(["--settings", "/dev/null", "--api-port", "0"])
    with pytest.raises(ConfigError, match="prot"):
        load_settings(["--settings", str(write(tmp_path, "extensions: {openai: {prot: 1}}\n"))])


def test_binds_loopback_unless_listen():
    assert load_settings(["--settings", "/dev/null"]).host == "127.0.0.1"
    assert load_settings(["--settings", "/dev/null", "--listen"]).host == "0.0.0.0"
    assert load_settings(["--settings", "/dev/null", "--listen", "--listen-host", "10.1.2.3"]).host == "10.1.2.3"
    assert load_settings(["--settings", "/dev/null"]).share is False


def test_unknown_key_is_named_with_the_file(tmp_path: Path):
    path = write(tmp_path, "listen_prot: 8000\n")
    with pytest.raises(ConfigError) as error:
        load_settings(["--settings", str(path)])
    assert "listen_prot" in str(error.value) and str(path) in str(error.value)


def test_bad_value_is_named_with_the_file(tmp_path: Path):
    path = write(tmp_path, "listen_port: many\n")
    with pytest.raises(ConfigError, match="listen_port"):
        load_settings(["--settings", str(path)])
    path = write(tmp_path, "generation: {temperature: -3}\n")
    with pytest.raises(ConfigError, match="temperature"):
        load_settings(["--settings", str(path)])
    path = write(tmp_path, "loader_options: {n_ctxx: 5}\n")
    with pytest.raises(ConfigError, match="n_ctxx"):
        load_settings(["--settings", str(path)])
    path = write(tmp_path, "listen_port: [8000\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(["--settings", str(path)])


def test_extension_mapping_in_yaml_enables_and_sets_params(tmp_path: Path):
    path = write(tmp_path, "extensions:\n  openai: {port: 1}\n  gallery: {enabled: false}\n")
    settings = load_settings(["--settings", str(path)])
    assert settings.extensions == ["openai"]
    assert settings.extension_params["openai"] == {"port": 1}


def test_save_settings_writes_changed_keys_atomically(tmp_path: Path):
    path = tmp_path / "settings.yaml"
    settings = Settings(listen_port=7000, preset="Creative")
    save_settings(settings, path)
    again = load_settings(["--settings", str(path)])
    assert again.listen_port == 7000 and again.preset == "Creative"


def test_help_lists_every_required_flag_with_help_text():
    result = subprocess.run([sys.executable, "webui.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ["--model", "--loader", "--lora", "--model-dir", "--lora-dir", "--listen", "--listen-host",
                 "--listen-port", "--share", "--api", "--api-port", "--api-key", "--admin-key", "--extensions",
                 "--gradio-auth", "--gradio-auth-path", "--multi-user", "--settings",
                 # loader options
                 "--n-ctx", "--n-gpu-layers", "--n-threads", "--n-threads-batch", "--n-batch", "--n-ubatch",
                 "--use-mmap", "--use-mlock", "--tensor-split", "--flash-attn", "--cache-type", "--rope-freq-base",
                 "--rope-freq-scale", "--dtype", "--device", "--cpu-memory", "--gpu-memory", "--disk-offload",
                 "--load-in-4bit", "--load-in-8bit", "--use-double-quant", "--quant-type", "--compute-dtype",
                 "--attn-implementation", "--trust-remote-code"]:
        assert flag in result.stdout, flag


def test_bad_settings_file_exits_2_with_a_message_not_a_traceback(tmp_path: Path):
    path = write(tmp_path, "listen_prot: 1\n")
    result = subprocess.run([sys.executable, "webui.py", "--settings", str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "listen_prot" in result.stderr and "Traceback" not in result.stderr
