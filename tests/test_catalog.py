"""The model catalog: the shipped models.toml and the user's entries on top of it."""

from __future__ import annotations

import pytest

from chatapp.catalog import load_catalog
from chatapp.errors import ConfigError


def test_user_catalog_overrides_and_bad_entries(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\n[models.smollm2-135m]\ncontext_length = 2048\n')
    catalog = load_catalog(user)
    assert catalog["mine"].repo == "me/mine"
    assert catalog["smollm2-135m"].context_length == 2048
    assert catalog["smollm2-135m"].repo == "HuggingFaceTB/SmolLM2-135M-Instruct"
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\ncontext_length = "long"\n')
    with pytest.raises(ConfigError, match=r"models.toml: entry 'mine' field 'context_length' must be int"):
        load_catalog(user)
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="entry 'mine' has unknown field 'colour'"):
        load_catalog(user)
    user.write_text("[models.mine\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_catalog(user)


def test_shipped_catalog_is_package_data_and_its_absence_is_an_error(tmp_path):
    from chatapp import catalog

    # Inside the package, so a wheel carries it; the top-level models.toml is the same file (a symlink).
    assert catalog.SHIPPED_CATALOG.is_file()
    assert "chatapp/data/models.toml" in str(catalog.SHIPPED_CATALOG).replace("\\", "/")
    with pytest.raises(ConfigError, match="the shipped model catalog is missing"):
        load_catalog(shipped=tmp_path / "nowhere.toml")


def test_the_app_falls_back_to_the_shipped_catalog_when_the_users_file_is_broken(tmp_path):
    from chatapp.catalog import load_catalog_or_shipped

    user = tmp_path / "models.toml"
    user.write_text("[models.x]\nname = 3\nrepo = 'Org/x'\n")
    catalog, problem = load_catalog_or_shipped(user)
    assert "smollm2-135m-local" in catalog and "x" not in catalog
    assert problem.startswith(str(user)) and problem.endswith("using the shipped catalog until it is fixed")
    user.write_text("[models.x]\nname = 'X'\nrepo = 'Org/x'\n")
    assert load_catalog_or_shipped(user) == (load_catalog(user), None)


def test_shipped_drafts_are_smaller_catalog_models_of_the_same_family():
    from chatapp.facts import facts_from_spec

    catalog = load_catalog()
    drafting = {key: spec.draft for key, spec in catalog.items() if spec.draft}
    assert drafting["smollm2-1.7b"] == "smollm2-135m" and drafting["qwen2.5-7b"] == "qwen2.5-0.5b"
    for key, draft in drafting.items():
        assert key.split("-")[0] == draft.split("-")[0]  # same family, so the same tokenizer
        assert facts_from_spec(catalog[draft]).params * 2 < facts_from_spec(catalog[key]).params


@pytest.mark.parametrize(
    ("draft", "problem"),
    [
        ('"smollm2-13m"', "entry 'mine' field 'draft' names 'smollm2-13m', not in the catalog"),
        ("135", "entry 'mine' field 'draft' must be str, got 135"),
        ('"HuggingFaceTB/SmolLM2-135M-Instruct"', None),  # a Hub repo id: checked when it loads
        ('"smollm2-135m"', None),
    ],
)
def test_a_users_draft_must_name_a_catalog_model_or_a_repo(tmp_path, draft, problem):
    user = tmp_path / "models.toml"
    user.write_text(f'[models.mine]\nname = "Mine"\nrepo = "me/mine"\ndraft = {draft}\n')
    if problem is None:
        assert load_catalog(user)["mine"].draft == draft.strip('"')
    else:
        with pytest.raises(ConfigError, match=problem):
            load_catalog(user)


def test_a_catalog_entrys_sampling_is_checked_against_the_table(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\ntop_k = 40\nmin_p = 0\nrepetition_penalty = 1.1\n')
    mine = load_catalog(user)["mine"]
    assert (mine.top_k, mine.min_p, mine.repetition_penalty) == (40, 0.0, 1.1)
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\nmin_p = 2\n')
    with pytest.raises(ConfigError, match=r"entry 'mine' field 'min_p' must be >= 0 and <= 1, got 2.0$"):
        load_catalog(user)
