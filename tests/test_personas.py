"""Personas: the shipped ones, the user's files over them, a broken file skipped in one line, and saving."""

from __future__ import annotations

import pytest

from chatapp.personas import Persona, copy_of, delete_persona, load_personas, parse, personas_dir, save_persona


def test_the_shipped_personas_load_and_are_marked_shipped(tmp_path):
    personas, errors = load_personas(tmp_path)
    assert errors == []
    assert {"assistant", "concise", "coder"} <= set(personas)
    coder = personas["coder"]
    assert coder.shipped and coder.system_prompt.startswith("You are an expert programmer")
    assert coder.sampling == {"temperature": 0.2, "top_p": 0.95}
    assert [p.name for p in personas.values()] == sorted((p.name for p in personas.values()), key=str.casefold)


def test_a_users_file_wins_over_a_shipped_one_and_adds_its_own(tmp_path):
    folder = personas_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "coder.toml").write_text('name = "My coder"\ntemperature = 0\ntop_k = 10\nthinking = false\n')
    (folder / "pirate.toml").write_text('name = "Pirate"\nsystem_prompt = "Arr."\n')
    personas, errors = load_personas(tmp_path)
    assert errors == []
    assert personas["coder"] == Persona(
        key="coder", name="My coder", sampling={"temperature": 0.0, "top_k": 10}, thinking=False
    )
    assert personas["pirate"].system_prompt == "Arr." and not personas["pirate"].shipped


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("bad.toml", 'name = "x\n', "not valid TOML"),
        ("bad.toml", 'name = "X"\ncolour = "red"\n', "unknown key 'colour' (known: name, description,"),
        ("bad.toml", 'name = "X"\ntop_p = 2\n', "'top_p' must be > 0 and <= 1, got 2.0"),
        ("bad.toml", 'name = "X"\ntop_k = 1.5\n', "'top_k' must be a whole number >= 0 and <= 1000, got 1.5"),
        ("bad.toml", 'name = "X"\nthinking = "yes"\n', "'thinking' must be true or false, got 'yes'"),
        ("bad.toml", 'description = "no name"\n', "'name' is missing"),
        ("bad.toml", b"name = '\xff'\n", "codec can't decode"),
        ("my persona.toml", 'name = "X"\n', "the file name must be letters, digits, - or _ before .toml"),
    ],
)
def test_a_broken_file_is_one_line_and_skipped(tmp_path, name, text, reason):
    folder = personas_dir(tmp_path)
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (folder / "good.toml").write_text('name = "Good"\n')
    personas, errors = load_personas(tmp_path)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"persona {path}: ") and reason in errors[0] and errors[0].endswith("; skipped")
    assert "good" in personas and path.stem not in personas
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())  # nothing is lost


def test_save_reload_duplicate_and_delete(tmp_path):
    tricky = 'Line one\nSay "hi" \\ and \x7f, ünïcode, """triple"""'
    persona = Persona(
        key="mine", name="Mine", description="d", system_prompt=tricky, sampling={"seed": 3, "min_p": 0.1}
    )
    path = save_persona(tmp_path, persona)
    assert path == personas_dir(tmp_path) / "mine.toml" and (path.stat().st_mode & 0o777) == 0o600
    personas, errors = load_personas(tmp_path)
    assert errors == [] and personas["mine"] == persona
    copy = copy_of(personas["mine"], personas)
    assert (copy.key, copy.name, copy.system_prompt) == ("mine-2", "Mine (copy)", tricky)
    save_persona(tmp_path, copy)
    # Editing a shipped persona saves the user's copy over it; deleting that copy brings the shipped one back.
    shipped = load_personas(tmp_path)[0]["concise"]
    save_persona(tmp_path, Persona(key="concise", name="Terse"))
    assert load_personas(tmp_path)[0]["concise"].name == "Terse"
    assert delete_persona(tmp_path, "concise")
    assert load_personas(tmp_path)[0]["concise"] == shipped
    assert not delete_persona(tmp_path, "assistant")  # shipped: nothing of the user's to delete
    assert delete_persona(tmp_path, "mine") and set(load_personas(tmp_path)[0]) >= {"mine-2"}
    with pytest.raises(ValueError, match="a persona's key"):
        save_persona(tmp_path, Persona(key="../evil", name="x"))


def test_parse_takes_ints_for_floats():
    assert parse("k", 'name = "K"\ntemperature = 1\n').sampling == {"temperature": 1.0}
