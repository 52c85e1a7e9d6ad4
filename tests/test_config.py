"""Settings: defaults, config.toml, CHATAPP_* overrides, one warning line per bad value, and `chatapp config`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from chatapp.config import (
    Settings,
    field_docs,
    load_settings,
    load_settings_checked,
    load_settings_sourced,
    save_setting,
)
from chatapp.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_setting_overrides(monkeypatch):
    # Only the dirs conftest points at a scratch place may come from the environment here.
    for name in os.environ:
        if name.startswith("CHATAPP_") and name not in ("CHATAPP_CONFIG_DIR", "CHATAPP_DATA_DIR"):
            monkeypatch.delenv(name)


def test_new_fields_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATAPP_CONFIG_DIR", str(tmp_path))
    settings = load_settings(tmp_path / "config.toml")
    assert settings.theme == "chatapp-dark"
    assert settings.themes_dir == tmp_path / "themes"
    assert settings.hub_cache is None


def test_every_field_has_a_doc():
    from dataclasses import fields

    docs = field_docs()
    assert [f.name for f in fields(Settings)] == list(docs)
    assert all(docs.values())
    assert docs["theme"].startswith("The UI theme: a shipped one (chatapp-dark")  # a two-line comment, joined


def test_file_values_and_new_fields(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('theme = "chatapp-dusk"\nthemes_dir = "~/my-themes"\nhub_cache = "/big/disk/hf"\n')
    settings, errors, sources = load_settings_sourced(path)
    assert errors == []
    assert settings.theme == "chatapp-dusk"
    assert settings.themes_dir == Path.home() / "my-themes"
    assert settings.hub_cache == Path("/big/disk/hf")
    assert sources["theme"] == "config.toml" and sources["top_p"] == "default"


def test_empty_hub_cache_means_unset(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('hub_cache = ""\n')
    assert load_settings(path).hub_cache is None


def test_themes_dir_follows_a_config_dir_set_in_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATAPP_CONFIG_DIR")  # it would win over the file's config_dir
    path = tmp_path / "config.toml"
    path.write_text(f'config_dir = "{tmp_path / "elsewhere"}"\n')
    assert load_settings(path).themes_dir == tmp_path / "elsewhere" / "themes"


@pytest.mark.parametrize(
    "line, key, reason, default",
    [
        (
            'default_preset = "fp8"',
            "default_preset",
            "must be one of auto, bf16, fp16, fp32, int8, nf4, got 'fp8'",
            '"auto"',
        ),
        ("temperature = -0.5", "temperature", "must be >= 0 and <= 2, got -0.5", "0.7"),
        ("temperature = 3", "temperature", "must be >= 0 and <= 2, got 3", "0.7"),
        ("top_p = 0", "top_p", "must be > 0 and <= 1, got 0", "0.9"),
        ("top_p = 1.5", "top_p", "must be > 0 and <= 1, got 1.5", "0.9"),
        ("max_new_tokens = 0", "max_new_tokens", "must be a whole number >= 1, got 0", "512"),
        ('max_new_tokens = "lots"', "max_new_tokens", "must be int, got 'lots'", "512"),
        ("context_cap = -1", "context_cap", "must be >= 0 (0: the model's own maximum), got -1", "0"),
        ("temperature = true", "temperature", "must be float, got True", "0.7"),
        ('theme = ""', "theme", "must not be empty, got ''", '"chatapp-dark"'),
        ("hub_cache = 3", "hub_cache", "must be a path, got 3", "unset"),
    ],
)
def test_bad_value_is_one_line_and_falls_back(tmp_path, line, key, reason, default):
    path = tmp_path / "config.toml"
    good = "" if key == "temperature" else "temperature = 0.2\n"
    path.write_text(f'# my settings\ndefault_model = "mine"\n{line}\n{good}')
    settings, errors = load_settings_checked(path)
    assert errors == [f"{path}: '{key}' {reason}; using the default ({default})"]
    assert getattr(settings, key) == getattr(Settings(), key)
    assert settings.default_model == "mine"  # the good keys are kept
    if key != "temperature":
        assert settings.temperature == 0.2
    with pytest.raises(ConfigError, match=f"'{key}' "):
        load_settings(path)


def test_several_bad_keys_each_get_a_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('top_p = 2\nmax_new_tokens = 64\ncolour = "red"\ntemperature = -1\n')
    settings, errors = load_settings_checked(path)
    assert len(errors) == 3
    assert "'top_p'" in errors[0]
    assert errors[1].startswith(f"{path}: unknown setting 'colour' (known: ") and errors[1].endswith("; ignored")
    assert "'temperature'" in errors[2]
    assert (settings.top_p, settings.max_new_tokens, settings.temperature) == (0.9, 64, 0.7)


def test_invalid_toml(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("temperature = = 1\n")
    settings, errors = load_settings_checked(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: not valid TOML (") and errors[0].endswith("); using the defaults")
    assert settings.temperature == 0.7
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_env_overrides_and_their_errors(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text("top_p = 0.5\nmax_new_tokens = 64\n")
    monkeypatch.setenv("CHATAPP_TOP_P", "0.8")
    monkeypatch.setenv("CHATAPP_MAX_NEW_TOKENS", "-3")
    monkeypatch.setenv("CHATAPP_THEME", "chatapp-light")
    settings, errors, sources = load_settings_sourced(path)
    assert errors == [
        "$CHATAPP_MAX_NEW_TOKENS: 'max_new_tokens' must be a whole number >= 1, got '-3'; using the default (512)"
    ]
    assert settings.top_p == 0.8 and sources["top_p"] == "$CHATAPP_TOP_P"
    assert settings.theme == "chatapp-light" and sources["theme"] == "$CHATAPP_THEME"
    # The env value was bad, so the file's good value stands.
    assert settings.max_new_tokens == 64 and sources["max_new_tokens"] == "config.toml"


def test_save_setting_keeps_comments_and_other_keys(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('# my settings\ntemperature = 0.3  # cooler\n\n# looks\ntheme = "chatapp-dark"  # for now\n')
    save_setting(path, "theme", "chatapp-dusk")
    assert path.read_text() == (
        '# my settings\ntemperature = 0.3  # cooler\n\n# looks\ntheme = "chatapp-dusk"  # for now\n'
    )
    save_setting(path, "default_model", 'odd "name" \\ here')
    text = path.read_text()
    assert text.startswith("# my settings\ntemperature = 0.3  # cooler\n")
    assert tomllib.loads(text) == {"temperature": 0.3, "theme": "chatapp-dusk", "default_model": 'odd "name" \\ here'}


def test_save_setting_adds_the_key_above_any_table(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('theme = "x"\n\n[later]\nmodel = "y"\n')
    save_setting(path, "default_model", "z")
    assert tomllib.loads(path.read_text()) == {"theme": "x", "default_model": "z", "later": {"model": "y"}}


def test_save_setting_creates_a_missing_file(tmp_path):
    path = tmp_path / "new" / "dir" / "config.toml"
    save_setting(path, "theme", "chatapp-high-contrast")
    assert path.read_text() == 'theme = "chatapp-high-contrast"\n'
    assert load_settings(path).theme == "chatapp-high-contrast"


def chatapp(*args: str, config_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHATAPP_") or k == "CHATAPP_DATA_DIR"}
    environ.update(CHATAPP_CONFIG_DIR=str(config_dir), **env)
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=120, env=environ
    )


def test_config_path(tmp_path):
    out = chatapp("config", "path", config_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "config.toml")


def test_config_show(tmp_path):
    (tmp_path / "config.toml").write_text('# mine\ntemperature = 0.2\ntop_p = 7\ntheme = "chatapp-dusk"\n')
    out = chatapp("config", "show", config_dir=tmp_path, CHATAPP_MAX_NEW_TOKENS="99")
    assert out.returncode == 0, out.stderr
    assert out.stderr == (
        f"chatapp: warning: {tmp_path / 'config.toml'}: 'top_p' must be > 0 and <= 1, got 7; using the default (0.9)\n"
    )
    lines = {line.split(" = ")[0]: line for line in out.stdout.splitlines() if " = " in line}
    assert out.stdout.splitlines()[0] == f"# {tmp_path / 'config.toml'}"
    assert set(lines) == set(field_docs())
    assert lines["temperature"].startswith("temperature = 0.2 ")
    assert "# [config.toml] Sampling temperature" in lines["temperature"]
    assert lines["top_p"].startswith("top_p = 0.9 ") and "# [default] Nucleus" in lines["top_p"]
    assert "max_new_tokens = 99 " in lines["max_new_tokens"] and "[$CHATAPP_MAX_NEW_TOKENS]" in lines["max_new_tokens"]
    assert 'theme = "chatapp-dusk" ' in lines["theme"]
    assert f'themes_dir = "{tmp_path / "themes"}"' in lines["themes_dir"]
    assert 'hub_cache = ""' in lines["hub_cache"] and "huggingface_hub's own default" in lines["hub_cache"]
    # What show prints is itself a valid config.toml.
    assert tomllib.loads(out.stdout)["theme"] == "chatapp-dusk"


def test_config_show_without_a_file(tmp_path):
    out = chatapp("config", "show", config_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "(missing: every value is a default)" in out.stdout.splitlines()[0]
    assert all("# [default]" in line or "# [$CHATAPP_" in line for line in out.stdout.splitlines()[1:])


def test_config_show_with_invalid_toml(tmp_path):
    (tmp_path / "config.toml").write_text("theme = \n")
    out = chatapp("config", "show", config_dir=tmp_path)
    assert out.returncode == 0
    assert out.stderr.startswith(f"chatapp: warning: {tmp_path / 'config.toml'}: not valid TOML (")
    assert 'theme = "chatapp-dark"' in out.stdout


def test_other_commands_still_stop_at_a_bad_value(tmp_path):
    (tmp_path / "config.toml").write_text("top_p = 7\n")
    out = chatapp("doctor", config_dir=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == f"chatapp: error: {tmp_path / 'config.toml'}: 'top_p' must be > 0 and <= 1, got 7"


def test_settings_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text('default_preset = "nf4"\ntemperature = 1\n')
    monkeypatch.setenv("CHATAPP_MAX_NEW_TOKENS", "99")
    settings = load_settings(path)
    assert (settings.default_preset, settings.temperature, settings.max_new_tokens) == ("nf4", 1.0, 99)
    path.write_text('max_new_tokens = "lots"\n')
    with pytest.raises(ConfigError, match="'max_new_tokens' must be int"):
        load_settings(path)
