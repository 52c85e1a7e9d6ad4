"""The wheel installs anywhere: built, installed non-editable into a fresh venv, and run from there."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from modelhelpers import ROOT, TEST_DATA

pytestmark = pytest.mark.integration

# What the wheel is built from: the source tree without caches, build leftovers and the test suite.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", ".pytest_cache", "__pycache__", "build", "dist", "*.egg-info", "tests", "bench"
)

# Run in the fresh venv: every requirement the installed wheel declares (extras aside) is met.
_CHECK_REQUIREMENTS = """
import importlib.metadata as md
from packaging.requirements import Requirement

dist = md.distribution("chatapp")
print(dist.locate_file(""))
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        version = None
    if version is None or not req.specifier.contains(version, prereleases=True):
        print(f"unmet: {req} (installed: {version})")
"""

_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"

_LOAD_THEMES = """
import chatapp, chatapp.catalog
from chatapp.ui.themes import SHIPPED_THEMES_DIR, load_themes

themes, errors = load_themes(SHIPPED_THEMES_DIR)
print(chatapp.__file__)
print(chatapp.catalog.SHIPPED_CATALOG)
print(SHIPPED_THEMES_DIR)
print(" ".join(sorted(t.name for t in themes)))
print(len(errors))
import tempfile
from chatapp.personas import SHIPPED_DIR, load_personas

personas, errors = load_personas(tempfile.mkdtemp())
print(SHIPPED_DIR)
print(" ".join(sorted(personas)), len(errors))
"""


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding the chatapp wheel, with this venv's packages as its dependencies; (bin dir, env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # The fresh venv must see neither the repo (PYTHONPATH, the cwd) nor the editable install.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # nothing comes from PyPI: the build uses this venv's setuptools
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    source = tmp / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)],
        cwd=tmp,
        env=env,
    )
    (wheel,) = (tmp / "dist").glob("chatapp-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    # --no-deps: the dependencies (a multi-GB torch among them) come from this venv, through the .pth below.
    _run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], cwd=tmp, env=env)
    purelib = _run([str(python), "-c", _PURELIB], cwd=tmp, env=env).stdout.strip()
    # A directory named in a .pth is appended to sys.path without running the .pth files inside it, so this
    # venv's editable-install finder stays inert and the wheel's chatapp (earlier on sys.path) is the one imported.
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "outer-venv.pth").write_text("".join(f"{p}\n" for p in outer))
    return venv / "bin", env


def test_wheel_installs_with_its_data_and_dependencies(installed, tmp_path):
    bin_dir, env = installed
    venv = bin_dir.parent.resolve()
    out = _run([str(bin_dir / "python"), "-c", _CHECK_REQUIREMENTS], cwd=tmp_path, env=env)
    location, *unmet = out.stdout.splitlines()
    assert Path(location).resolve().is_relative_to(venv), location
    assert unmet == []

    out = _run([str(bin_dir / "python"), "-c", _LOAD_THEMES], cwd=tmp_path, env=env)
    module, catalog, themes_dir, names, errors, personas_dir, personas = out.stdout.splitlines()
    assert personas == "assistant coder concise 0"
    for path in (module, catalog, themes_dir, personas_dir):
        assert Path(path).resolve().is_relative_to(venv), path  # the wheel's copy, not the repo's
    assert {"chatapp-dark", "chatapp-light", "chatapp-high-contrast", "chatapp-dusk"} <= set(names.split())
    assert errors == "0"
    assert "warning" not in out.stderr.lower()


def test_wheel_lists_and_runs_the_starter_model(installed, starter_folder, tmp_path):
    bin_dir, env = installed
    # The test suite's data dir, so the starter model converted for the other tests is reused.
    env = {**env, "CHATAPP_DATA_DIR": str(TEST_DATA), "CHATAPP_CONFIG_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    chatapp = str(bin_dir / "chatapp")
    out = _run([chatapp, "models", "--json"], cwd=tmp_path, env=env)
    assert "smollm2-135m-local" in {row["key"] for row in json.loads(out.stdout)}

    question = "What is the capital of France?"
    greedy = ["--temperature", "0", "--max-new-tokens", "30"]
    out = _run([chatapp, "ask", question, "--model", "smollm2-135m-local", *greedy], cwd=tmp_path, env=env)
    assert "Paris" in out.stdout, out.stdout + out.stderr
