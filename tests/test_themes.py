"""Theme files: the shipped ones load and are readable, bad files are reported one line each, the app takes them."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys

import pytest

from chatapp.errors import ConfigError
from chatapp.ui.themes import (
    DEFAULT_THEME,
    SHIPPED_THEMES_DIR,
    load_theme_file,
    load_themes,
    register_themes,
    resolve_theme,
)

SHIPPED = {
    "chatapp-dark": True,
    "chatapp-light": False,
    "chatapp-high-contrast": True,
    "chatapp-dusk": True,
}


def _luminance(color) -> float:
    def channel(v: int) -> float:
        v = v / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(color.r) + 0.7152 * channel(color.g) + 0.0722 * channel(color.b)


def contrast(a: str, b: str) -> float:
    """The WCAG contrast ratio of two colours."""
    from textual.color import Color

    high, low = sorted((_luminance(Color.parse(a)), _luminance(Color.parse(b))), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_shipped_themes_load_with_the_right_names_and_modes():
    themes, errors = load_themes(SHIPPED_THEMES_DIR)
    assert errors == []
    by_name = {t.name: t for t in themes}
    assert set(SHIPPED) <= set(by_name)
    for name, dark in SHIPPED.items():
        assert by_name[name].dark is dark, name
        assert (SHIPPED_THEMES_DIR / f"{name}.toml").is_file()
    assert DEFAULT_THEME in by_name


def test_default_theme_matches_the_settings_default():
    from chatapp.config import Settings

    assert Settings().theme == DEFAULT_THEME


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_themes_are_readable(name):
    theme = load_theme_file(SHIPPED_THEMES_DIR / f"{name}.toml")
    colors = theme.to_color_system().generate()
    minimum = 7.0 if name == "chatapp-high-contrast" else 4.5
    for where in ("background", "surface", "panel"):
        assert contrast(theme.foreground, colors[where]) >= minimum, (name, where)
    for role in ("primary", "secondary", "accent", "success", "warning", "error"):
        assert contrast(getattr(theme, role), colors["background"]) >= minimum, (name, role)


def test_high_contrast_is_black_white_and_yellow():
    theme = load_theme_file(SHIPPED_THEMES_DIR / "chatapp-high-contrast.toml")
    assert theme.background == "#000000"
    assert theme.foreground == "#ffffff"
    assert theme.variables["border"] == "#ffff00"
    assert contrast(theme.variables["text-muted"], "#000000") >= 7.0
    assert contrast(theme.variables["text-disabled"], "#000000") >= 7.0


GOOD = 'name = "mine"\nprimary = "#336699"\nbackground = "#101010"\n'


@pytest.mark.parametrize(
    "text, message",
    [
        ("name = [unclosed\n", "not valid TOML"),
        ('primary = "#336699"\n', "missing field 'name'"),
        ('name = "x"\n', "missing field 'primary'"),
        ('name = "x"\nprimary = "#336699"\ncolour = "red"\n', "unknown field 'colour'"),
        ('name = "x"\nprimary = "#33669"\n', "'primary' is not a colour: '#33669'"),
        ('name = "x"\nprimary = "#336699"\nerror = 12\n', "'error' is not a colour: 12"),
        ('name = "x"\nprimary = "#336699"\ndark = "yes"\n', "'dark' must be true or false"),
        ('name = "two words"\nprimary = "#336699"\n', "'name' must be letters"),
        ('name = "x"\nprimary = "#336699"\n[variables]\nborder = "bogus"\n', "variable 'border' is not a colour"),
        ('name = "x"\nprimary = "#336699"\n[variables]\nlink-style = "loud"\n', "variable 'link-style' must be text"),
        ('name = "x"\nprimary = "#336699"\nvariables = "no"\n', "[variables] must be a table of strings"),
    ],
)
def test_bad_theme_file_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_theme_file(path)
    line = str(caught.value)
    assert line.startswith(f"{path}: ")
    assert message in line
    assert "\n" not in line


def test_bad_files_are_reported_and_the_good_ones_still_load(tmp_path):
    (tmp_path / "a-good.toml").write_text(GOOD)
    (tmp_path / "b-not-toml.toml").write_text("this is not toml\n")
    (tmp_path / "c-no-primary.toml").write_text('name = "c"\n')
    (tmp_path / "d-bad-colour.toml").write_text('name = "d"\nprimary = "sky-ish"\n')
    (tmp_path / "notes.txt").write_text("not a theme")
    themes, errors = load_themes(tmp_path)
    assert [t.name for t in themes] == ["mine"]
    assert len(errors) == 3
    assert errors[0].startswith(str(tmp_path / "b-not-toml.toml")) and "not valid TOML" in errors[0]
    assert errors[1].startswith(str(tmp_path / "c-no-primary.toml")) and "missing field 'primary'" in errors[1]
    assert errors[2].startswith(str(tmp_path / "d-bad-colour.toml")) and "'primary' is not a colour" in errors[2]


def test_user_dir_adds_and_overrides_themes(tmp_path):
    (tmp_path / "mine.toml").write_text(GOOD)
    (tmp_path / "dark.toml").write_text('name = "chatapp-dark"\nprimary = "#ff0000"\n')
    themes, errors = load_themes(SHIPPED_THEMES_DIR, tmp_path)
    assert errors == []
    by_name = {t.name: t for t in themes}
    assert set(SHIPPED) | {"mine"} <= set(by_name)
    assert by_name["chatapp-dark"].primary == "#ff0000"  # the later folder wins


def test_same_name_twice_in_one_folder_is_reported(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD.replace("#336699", "#993366"))
    themes, errors = load_themes(tmp_path)
    assert [t.primary for t in themes] == ["#993366"]
    assert len(errors) == 1 and "also defined by a.toml" in errors[0]


def test_missing_user_dir_is_no_error(tmp_path):
    themes, errors = load_themes(SHIPPED_THEMES_DIR, tmp_path / "nowhere", None)
    assert errors == []
    assert len(themes) >= len(SHIPPED)


def test_readme_example_loads(tmp_path):
    readme = (SHIPPED_THEMES_DIR / "README.md").read_text()
    example = re.search(r"```toml\n(.*?)```", readme, re.DOTALL).group(1)
    (tmp_path / "sea.toml").write_text(example)
    assert load_theme_file(tmp_path / "sea.toml").name == "sea"


def test_resolve_theme_falls_back_to_the_default():
    available = ["textual-dark", *SHIPPED, "mine"]
    assert resolve_theme("chatapp-dusk", available) == ("chatapp-dusk", None)
    name, error = resolve_theme("no-such-theme", available)
    assert name == DEFAULT_THEME
    assert "unknown theme 'no-such-theme'" in error and "mine" in error and f"using {DEFAULT_THEME}" in error
    assert "textual-dark" not in error.split("(try")[1].split(" or ")[0]
    assert resolve_theme("x", ["textual-dark"])[0] == "textual-dark"


def _run_app(user_dir):
    from textual.app import App
    from textual.widgets import Button, Footer, Input, Markdown, OptionList

    class ThemedApp(App):
        def compose(self):
            yield Input()
            yield Button("ok")
            yield OptionList("one", "two")
            yield Markdown("# Title\n\nsome *text* and a [link](x)")
            yield Footer()

        def on_mount(self):
            self.errors = register_themes(self, user_dir)

    async def go():
        app = ThemedApp()
        applied = []
        async with app.run_test() as pilot:
            # Applying each theme re-parses the stylesheet: a theme Textual can't use would raise here.
            for name in [*SHIPPED, *(["mine"] if user_dir else [])]:
                app.theme = name
                await pilot.pause()
                applied.append(app.theme)
        return app, applied

    return asyncio.run(go())


def test_register_themes_in_a_running_app(tmp_path):
    (tmp_path / "mine.toml").write_text(GOOD)
    (tmp_path / "broken.toml").write_text('name = "broken"\n')
    app, applied = _run_app(tmp_path)
    assert set(SHIPPED) | {"mine"} <= set(app.available_themes)
    assert "broken" not in app.available_themes
    assert len(app.errors) == 1 and app.errors[0].startswith(str(tmp_path / "broken.toml"))
    assert applied == [*SHIPPED, "mine"]


def test_register_themes_without_a_user_dir():
    app, _applied = _run_app(None)
    assert app.errors == []
    assert set(SHIPPED) <= set(app.available_themes)


def test_register_reports_a_missing_default(tmp_path, monkeypatch):
    import chatapp.ui.themes as themes_module

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(SHIPPED_THEMES_DIR / "chatapp-light.toml", shipped)
    monkeypatch.setattr(themes_module, "SHIPPED_THEMES_DIR", shipped)

    class FakeApp:
        def __init__(self):
            self.available_themes = {"textual-dark": None}

        def register_theme(self, theme):
            self.available_themes[theme.name] = theme

    errors = register_themes(FakeApp(), None)
    assert len(errors) == 1 and "the default theme 'chatapp-dark' is missing" in errors[0]


def test_themes_module_imports_no_torch():
    code = "import sys, chatapp.ui.themes; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
