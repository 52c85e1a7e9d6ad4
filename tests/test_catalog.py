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
