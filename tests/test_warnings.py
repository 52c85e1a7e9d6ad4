"""Warnings: deprecations from our code and huggingface_hub fail the tests; library noise goes to the log."""

from __future__ import annotations

import warnings

import pytest


def _warn(category: type[Warning], module: str) -> None:
    # The module a warning is attributed to is what pyproject's filterwarnings match.
    warnings.warn_explicit("old API", category, f"{module.replace('.', '/')}.py", 1, module=module)


OURS_AND_HUB = ["chatapp", "chatapp.hub_download", "huggingface_hub", "huggingface_hub.file_download"]


@pytest.mark.parametrize("module", OURS_AND_HUB)
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecations_from_us_and_huggingface_hub_are_errors(module, category):
    with pytest.raises(category):
        _warn(category, module)


@pytest.mark.parametrize("module", ["transformers.utils", "chatapp_plugin", "huggingface_hubby"])
def test_other_libraries_deprecations_stay_warnings(module):
    with pytest.warns(DeprecationWarning):
        _warn(DeprecationWarning, module)
